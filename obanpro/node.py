"""Node services: the loops a node runs once, whatever its number of worker processes.

`NodeServices` runs in the duties process under ``obanpro start``, and inside
the application's loop for an `Oban` embedded with queues. Each service is an
object with ``start()`` and ``async stop()``. They share one pool and act on the
node's slot table, which every worker process reads without a round trip.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg

from . import _core
from .leader import Leader
from .lifeline import Lifeline
from .pruner import Pruner
from .refresher import Refresher
from .scheduler import Scheduler
from .signals import SignalListener
from .stager import Stager
from .vacuum_watch import VacuumWatch

log = logging.getLogger(__name__)

_SERVICE_CLASSES = {
    "stager": Stager,
    "scheduler": Scheduler,
    "pruner": Pruner,
    "lifeline": Lifeline,
    "refresher": Refresher,
    "vacuum_watch": VacuumWatch,
}


class Service(Protocol):
    """A background loop with a lifecycle."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class NodeContext:
    """The pool, names, slot table and callbacks that node services share."""

    pool: asyncpg.Pool
    dsn: str
    prefix: str
    name: str
    node: str
    table: _core.SlotTable
    wake_worker: Callable[[int], None]
    """Wakes the worker process with the given slot-table index (all of them for -1)."""
    request_queue: Callable[[dict[str, Any]], None]
    """Asks the owner of the table's shape to add a queue: ``{"queue", "limit", "paused"}``."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-service settings from the config: stager, lifeline, pruner, refresher, scheduler, vacuum_watch."""
    leadership: bool = True

    def running_queues(self) -> list[str]:
        table = self.table
        return [name for name, index in table.queues().items() if table.queue_state(index) == _core.QUEUE_RUNNING]

    def worker_index_of(self, pid: int) -> int:
        for index in range(self.table.max_workers):
            if self.table.worker_pid(index) == pid:
                return index
        return -1


def check_options(options: Mapping[str, Any]) -> None:
    """Check the settings tables of the node services (stager, scheduler, pruner, lifeline, refresher, vacuum_watch).

    Raises:
        ValueError: naming the table, the setting and the problem, so a bad
            setting stops ``obanpro start`` instead of crash-looping the duties process.
    """
    builders = {
        "stager": lambda values: Stager(None, "public", list, **values),
        "scheduler": lambda values: Scheduler(None, "public", name="Oban", leader=None, **values),
        "pruner": lambda values: Pruner(None, "public", leader=None, **values),
        "lifeline": lambda values: Lifeline(None, "public", leader=None, **values),
        "refresher": lambda values: Refresher(None, "public", name="Oban", node="node", table=None, leader=None, **values),
        "vacuum_watch": lambda values: VacuumWatch(None, "public", leader=None, **values),
    }

    for name, values in options.items():
        if not isinstance(values, Mapping):
            raise ValueError(f"invalid [{name}] settings {values!r}: expected a table such as interval = 1.0")

        try:
            builders[name](dict(values))
        except TypeError as error:
            known = [
                parameter
                for parameter in inspect.signature(_SERVICE_CLASSES[name]).parameters
                if parameter not in ("pool", "prefix", "queues", "leader", "name", "node", "table", "entries")
            ]
            raise ValueError(f"invalid [{name}] settings {dict(values)}: {error}; known settings are {known}") from None
        except ValueError as error:
            raise ValueError(f"invalid [{name}] settings: {error}") from None


class NodeServices:
    """Starts and stops the node's services in order."""

    def __init__(self, context: NodeContext) -> None:
        self.context = context
        self.services: list[Service] = []
        self.leader: Leader | None = None
        """The node's leader election, once started; its ``is_leader`` gates the leader duties."""
        self.signals: SignalListener | None = None

    async def start(self) -> None:
        context = self.context
        options = context.options
        # The leader starts first and stops last, so it resigns after the duties that need it.
        # The leader's channel shares the signal listener's connection, so a
        # node opens one LISTEN connection for both.
        self.leader = Leader(context.pool, context.prefix, name=context.name, node=context.node, enabled=context.leadership)
        self.signals = SignalListener(context, channels={"leader": self.leader.on_notification})
        producer_max_age = options.get("refresher", {}).get("max_age", 60.0)
        self.services = [
            self.leader,
            Stager(context.pool, context.prefix, context.running_queues, **context.options.get("stager", {})),
            self.signals,
            Scheduler(context.pool, context.prefix, name=context.name, leader=self.leader, **options.get("scheduler", {})),
            Pruner(context.pool, context.prefix, leader=self.leader, **options.get("pruner", {})),
            Lifeline(
                context.pool,
                context.prefix,
                leader=self.leader,
                producer_max_age=producer_max_age,
                **options.get("lifeline", {}),
            ),
            Refresher(
                context.pool,
                context.prefix,
                name=context.name,
                node=context.node,
                table=context.table,
                leader=self.leader,
                **options.get("refresher", {}),
            ),
            VacuumWatch(context.pool, context.prefix, leader=self.leader, **options.get("vacuum_watch", {})),
        ]

        for service in self.services:
            service.start()

        log.debug("node %s services started in pid %s", context.node, os.getpid())

    async def wait_listening(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the signal listener; return whether it listens."""
        if self.signals is None:
            return False
        try:
            await asyncio.wait_for(self.signals.listening.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        for service in reversed(self.services):
            try:
                await service.stop()
            except Exception:
                log.exception("stopping %s failed", type(service).__name__)
        self.services = []
