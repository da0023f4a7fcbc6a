"""Queue control through the Oban signal channel: pause, resume, scale, start, stop and pkill.

Senders (`obanpro.Oban`, oban-py, Elixir Oban, Oban Web) NOTIFY on
``<prefix>.oban_signal`` with a JSON object such as
``{"action": "pause", "queue": "default", "ident": "any"}``. ``ident`` is
``"any"`` or ``"<instance name>.<node>"``; a signal without one is for every
node, as oban-py 0.6 and later read it. ``queue`` may be ``"*"`` for pause and
resume. A pkill signal, ``{"action": "pkill", "job_id": 12}``, carries no
ident: only the node that runs the job finds it.

The node applies a signal by writing its slot table, then wakes its worker
processes. Workers read the table before taking every slot, so a pause holds
for every process of the node at once and no process has to hear the
notification itself. Under ``obanpro start`` the listener runs in the duties
process, which is the only process besides the supervisor allowed to scale a
queue. It adds a queue by asking the supervisor, which owns the table's shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from . import _core
from .db import CONNECTION_ERRORS, Backoff
from .dsn import describe_dsn
from .job import MAX_NAME_LENGTH
from .notifier import Callback, Notifier

if TYPE_CHECKING:
    from .node import NodeContext

log = logging.getLogger(__name__)

ANY = "any"
"""The ident that addresses every node."""

ALL_QUEUES = "*"
"""The queue name that addresses every queue of a node, in pause and resume signals."""

REQUEST_TIMEOUT = 5.0
"""Seconds a start signal for a queue not yet in the table waits before asking for it again,
so repeated signals do not race each other in the table's owner."""


class InvalidSignalError(ValueError):
    """Raised for a signal that names a known action but lacks a valid field; the message names it."""


def node_ident(name: str, node: str) -> str:
    """Return the ident of one node: ``"<instance name>.<node>"``, as Oban builds it."""
    return f"{name}.{node}"


def scope_ident(name: str, node: str | None) -> str:
    """Return the ident a sender writes: ``"any"`` without ``node``, else that node's ident."""
    return ANY if node is None else node_ident(name, node)


def check_queue_name(queue: Any, *, allow_all: bool = False) -> str:
    """Return ``queue`` when it is a valid queue name (or ``"*"`` where allowed), else raise."""
    if not isinstance(queue, str):
        raise InvalidSignalError(f"invalid queue {queue!r}: expected a queue name as a string")
    if queue == ALL_QUEUES and not allow_all:
        raise InvalidSignalError("invalid queue '*': only pause and resume apply to every queue")
    if not queue.strip() or len(queue) > MAX_NAME_LENGTH:
        raise InvalidSignalError(
            f"invalid queue {queue[:40]!r}: expected 1 to {MAX_NAME_LENGTH} characters, not blank"
        )
    return queue


def check_limit(limit: Any, queue: str) -> int:
    """Return ``limit`` when it is a positive integer, else raise naming the queue."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidSignalError(f"invalid limit {limit!r} for queue {queue!r}: expected a positive integer")
    return limit


class QueueControl:
    """Applies control signals to one node's slot table and wakes its worker processes.

    Both the signal listener and an in-process `Oban` (which applies its own
    calls at once, without the round trip through PostgreSQL) go through this
    object, so a signal has the same effect whichever way it arrives. Applying
    the same signal twice changes nothing the second time.
    """

    def __init__(self, context: NodeContext) -> None:
        self.context = context
        self.requested: dict[str, float] = {}
        """New queues asked of the table's owner, with the monotonic time of the request."""
        self.started_at: dict[str, datetime] = {}
        """When this node started each queue that a start signal added or restarted."""
        self.queue_meta: dict[str, dict[str, Any]] = {}
        """Options of start signals beyond queue, limit and paused, kept per queue as oban-py keeps them."""

    def addressed_here(self, payload: Mapping[str, Any]) -> bool:
        """Return True when the signal's ident is ``"any"``, missing, or this node's."""
        ident = payload.get("ident", ANY)
        return ident in (ANY, None) or ident == node_ident(self.context.name, self.context.node)

    def apply(self, payload: Mapping[str, Any]) -> bool:
        """Apply one signal addressed to this node; return True when it changed something here.

        Raises:
            InvalidSignalError: for a missing or invalid field of a known action.
            ValueError: when the slot table cannot take the change (a limit above
                the slots reserved for the queue, no room for a new queue).
        """
        action = payload.get("action")

        if action == "pause":
            return self.pause(payload.get("queue", ALL_QUEUES))
        if action == "resume":
            return self.resume(payload.get("queue", ALL_QUEUES))
        if action == "scale":
            return self.scale(payload.get("queue"), payload.get("limit"))
        if action == "start":
            extra = {key: value for key, value in payload.items() if key not in ("action", "ident", "queue", "limit", "paused")}
            return self.start(payload.get("queue"), payload.get("limit"), payload.get("paused", False), extra)
        if action == "stop":
            return self.stop(payload.get("queue"))
        if action == "pkill":
            return self.pkill(payload.get("job_id"))

        log.debug("ignored a signal with action %r on node %s: %r", action, self.context.node, payload)
        return False

    # Actions

    def pause(self, queue: Any) -> bool:
        return self._set_paused(queue, True)

    def resume(self, queue: Any) -> bool:
        return self._set_paused(queue, False)

    def scale(self, queue: Any, limit: Any) -> bool:
        queue = check_queue_name(queue)
        index = self.context.table.queue_index(queue)
        if index < 0:
            return False

        if limit is None:
            # Pro senders may scale options other than the limit, which this node does not have.
            log.debug("ignored a scale signal for queue %s without a limit", queue)
            return False

        limit = check_limit(limit, queue)
        table = self.context.table
        if table.limit(index) == limit and table.counts(index)[2] == limit:
            return False

        table.scale(index, limit)
        return self._done(f"scaled to {limit}", queue, [index])

    def start(self, queue: Any, limit: Any, paused: Any = False, extra: Mapping[str, Any] | None = None) -> bool:
        """Start ``queue``: restart it in place when it is stopped, ask the table's owner to add it when new."""
        queue = check_queue_name(queue)
        limit = check_limit(limit, queue)
        table = self.context.table
        index = table.queue_index(queue)

        if index >= 0 and table.queue_state(index) == _core.QUEUE_RUNNING:
            return False

        if index >= 0:
            table.scale(index, limit)
            table.set_paused(index, bool(paused))
            table.set_queue_state(index, _core.QUEUE_RUNNING)
            self.context.wake_worker(-1)
            log.info("restarted queue %s with limit %s on node %s", queue, limit, self.context.node)
        elif time.monotonic() - self.requested.get(queue, float("-inf")) < REQUEST_TIMEOUT:
            return False
        else:
            # The supervisor adds it and logs the start; workers start producers when they see it.
            self.requested[queue] = time.monotonic()
            self.context.request_queue({"queue": queue, "limit": limit, "paused": bool(paused)})

        self.started_at[queue] = datetime.now(UTC)
        self.queue_meta[queue] = dict(extra or {})
        return True

    def stop(self, queue: Any) -> bool:
        queue = check_queue_name(queue)
        table = self.context.table
        index = table.queue_index(queue)
        if index < 0 or table.queue_state(index) != _core.QUEUE_RUNNING:
            return False

        # Running jobs keep their slots and finish; the producers take no more.
        table.set_queue_state(index, _core.QUEUE_STOPPED)
        return self._done("stopped", queue, [index])

    def pkill(self, job_id: Any) -> bool:
        """Set the cancel flag of the slot running ``job_id`` and wake the process that owns it."""
        if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 1:
            raise InvalidSignalError(f"invalid job_id {job_id!r} in a pkill signal: expected a positive integer")

        pid = self.context.table.request_cancel(job_id)
        if not pid:
            log.debug("job %s is not running on node %s; pkill ignored", job_id, self.context.node)
            return False

        index = self.context.worker_index_of(pid)
        if index >= 0:
            self.context.wake_worker(index)
        log.info("requested cancelling job %s, running in pid %s on node %s", job_id, pid, self.context.node)
        return True

    # Helpers

    def _set_paused(self, queue: Any, paused: bool) -> bool:
        queue = check_queue_name(queue, allow_all=True)
        table = self.context.table
        queues = table.queues()
        if queue == ALL_QUEUES:
            indexes = sorted(queues.values())
        elif queue in queues:
            indexes = [queues[queue]]
        else:
            indexes = []

        changed = [index for index in indexes if table.paused(index) != paused]
        for index in changed:
            table.set_paused(index, paused)
        return self._done("paused" if paused else "resumed", queue, changed)

    def _done(self, change: str, queue: str, indexes: list[int]) -> bool:
        if not indexes:
            return False

        self.context.wake_worker(-1)
        target = "every queue" if queue == ALL_QUEUES else f"queue {queue}"
        log.info("%s %s on node %s", change, target, self.context.node)
        return True


class SignalListener:
    """The node service that listens on ``<prefix>.oban_signal`` and applies what is addressed to this node.

    It connects in the background with retries, so a database that is down at
    start delays control signals instead of stopping the node. Signals sent
    while the LISTEN connection is down are lost, as they are for every Oban
    node; the notifier reconnects by itself.
    """

    def __init__(self, context: NodeContext, channels: Mapping[str, Callback] | None = None) -> None:
        self.context = context
        self.control = QueueControl(context)
        self.listening = asyncio.Event()
        self.applied = 0
        # Other channels the node listens on share this connection.
        self._notifier = Notifier(context.dsn, context.prefix, {"signal": self._on_signal, **(channels or {})})
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="obanpro-signals")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._notifier.stop()
        self.listening.clear()

    async def _listen(self) -> None:
        backoff = Backoff(maximum=5.0)
        while True:
            try:
                await self._notifier.start()
                break
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
                log.warning(
                    "listening for signals at %s failed: %r; retrying in %.2f s",
                    describe_dsn(self.context.dsn),
                    error,
                    backoff.delay,
                )
                await backoff.sleep()

        self.listening.set()
        log.debug("node %s listening for signals on %s.oban_signal", self.context.node, self.context.prefix)

    def _on_signal(self, _channel: str, payload: dict[str, Any]) -> None:
        if not self.control.addressed_here(payload):
            return

        try:
            if self.control.apply(payload):
                self.applied += 1
        except InvalidSignalError as error:
            log.warning("ignored a signal on node %s: %s; payload %r", self.context.node, error, payload)
        except ValueError as error:
            log.error("applying signal %r on node %s failed: %s", payload, self.context.node, error)
