"""Leader election: one node instance per Oban name runs cron, pruning and rescue.

The lease is a row in ``<prefix>.oban_leaders``, keyed by the instance name
(``"Oban"`` by default) as oban-py keys it, so obanpro and oban-py nodes that
share a schema and a name elect one leader between them. The ``node`` column
holds the identity of the running instance that holds the lease.

The identity is ``"<node>/<pid>-<8 hex digits>"``, made when the leader starts.
oban-py writes its ``node`` there, which defaults to ``"<host>.<pid>"`` and
must be unique per running instance. The node name alone would not do for
obanpro: every process of an ``obanpro start`` shares it, two nodes started
with the same ``--node`` would share one lease, and an oban-py instance started
with ``node=<host name>`` would count as the same holder. The random part also
keeps a restarted duties process, which may get the pid of a dead one, from
renewing a lease it never won. Because the identity is made in ``start``, which
runs in the process that uses it, a fork never copies a lease.

A leader renews its lease every ``interval / 2`` seconds and the lease lasts
``interval`` seconds in the database. ``is_leader`` turns false by itself when
the lease may have run out: the local deadline is measured on the monotonic
clock from the moment the renewal was sent, which is no later than the moment
the database computed the expiry. A failed renewal drops leadership at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
from datetime import datetime
from typing import Any

import asyncpg

from . import queries, telemetry
from .db import CONNECTION_ERRORS, QUERY_TIMEOUT, Backoff, recover
from .job import to_utc
from .notifier import Notifier

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 30.0
SAFETY_MARGIN = 0.1
"""Share of the lease, at most one second, that the local deadline keeps in hand
for clocks that run at slightly different rates."""


def make_identity(node: str) -> str:
    """Return a new lease identity for ``node``, unique to this process and this call."""
    return f"{node}/{os.getpid()}-{secrets.token_hex(4)}"


class Leader:
    """Holds or competes for the leader lease of instance ``name``.

    Args:
        pool: connections for elections and resignation.
        prefix: schema of the Oban tables.
        name: Oban instance name; one leader is elected per name.
        node: node name, the first part of the lease identity.
        dsn: connection string for the LISTEN connection on the leader channel;
            without one, elections happen only on the timer.
        enabled: False to run no elections (``leadership = false``); `elect`
            still works when called directly.
        interval: lease length in seconds; a leader renews twice per interval.

    Raises:
        TypeError, ValueError: for a bad ``interval``.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        prefix: str,
        *,
        name: str,
        node: str,
        dsn: str | None = None,
        enabled: bool = True,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, (int, float)):
            raise TypeError(f"invalid leader interval {interval!r}: expected seconds as a number")
        if not math.isfinite(interval) or interval <= 0:
            raise ValueError(f"invalid leader interval {interval!r}: must be a positive number of seconds")

        self.name = name
        self.node = node
        self.identity = ""
        self.enabled = enabled
        self.interval = float(interval)
        self._pool = pool
        self._prefix = prefix
        self._dsn = dsn
        self._elect_sql = queries.load("elect_leader", prefix)
        self._resign_sql = queries.load("resign_leader", prefix)
        self._held = False
        self._deadline = 0.0
        self._elected_at: datetime | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._notifier: Notifier | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        """Whether this instance holds a lease that cannot have run out yet."""
        return self._held and time.monotonic() < self._deadline

    @property
    def elected_at(self) -> datetime | None:
        """When the current lease began, by the database's clock (UTC), or None when not leading."""
        return self._elected_at if self.is_leader else None

    def start(self) -> None:
        self.identity = make_identity(self.node)
        if self.enabled:
            self._task = asyncio.create_task(self._loop(), name="obanpro-leader")

    async def stop(self) -> None:
        """Stop competing and, when leading, resign so another node is elected at once."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

        if self._notifier is not None:
            await self._notifier.stop()
            self._notifier = None

        if self._held:
            await self.resign()

    async def elect(self) -> bool:
        """Try once to take or renew the lease; return whether this instance leads now.

        A database error drops leadership and is raised.
        """
        if not self.identity:
            raise RuntimeError("call Leader.start() before elect(): the lease identity is made there")

        async with self._lock:
            with telemetry.span("oban.leader.election", {"leader": self.is_leader}) as span:
                sent = time.monotonic()
                try:
                    row = await self._pool.fetchrow(
                        self._elect_sql, self.name, self.identity, self.interval, timeout=QUERY_TIMEOUT
                    )
                except BaseException:
                    self.drop("the election query failed")
                    span.add({"leader": False})
                    raise

                won = row is not None and row["node"] == self.identity
                self._record(won, sent, row["elected_at"] if won else None)
                span.add({"leader": won})

        return won

    def drop(self, reason: str) -> None:
        """Give up leadership locally, for example when a duty finds the lease gone."""
        if self._held:
            log.warning("node %s (%s) is no longer leader of %s: %s", self.node, self.identity, self.name, reason)
        self._held = False
        self._deadline = 0.0
        self._elected_at = None
        self._wake.set()

    async def resign(self) -> None:
        """Delete this instance's lease row and notify the leader channel, as oban-py does on stop."""
        self._held = False
        self._deadline = 0.0
        self._elected_at = None
        try:
            await self._pool.execute(self._resign_sql, self.name, self.identity, timeout=QUERY_TIMEOUT)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
            log.warning(
                "node %s could not resign as leader of %s: %r; the lease runs out after %.0f s",
                self.node,
                self.name,
                error,
                self.interval,
            )
            return

        log.info("node %s (%s) resigned as leader of %s", self.node, self.identity, self.name)

    def _record(self, won: bool, sent: float, elected_at: datetime | None) -> None:
        was_leader = self.is_leader
        if not won:
            if self._held:
                self.drop("another node holds the lease")
            return

        margin = min(1.0, self.interval * SAFETY_MARGIN)
        self._held = True
        self._deadline = sent + self.interval - margin
        self._elected_at = to_utc(elected_at) if elected_at is not None else None
        if not was_leader:
            log.info("node %s (%s) is now leader of %s", self.node, self.identity, self.name)

    async def _loop(self) -> None:
        backoff = Backoff(first=0.1, maximum=min(5.0, self.interval / 2))

        while True:
            await self._listen()
            # Cleared before the election, so a notification that arrives during it wakes the next one.
            self._wake.clear()
            try:
                await self.elect()
                backoff.reset()
                delay = self.interval / 2 if self._held else self.interval
            except CONNECTION_ERRORS as error:
                log.warning("leader election for %s failed: %r; retrying in %.2f s", self.name, error, backoff.delay)
                recover(self._pool, error)
                await backoff.sleep()
                continue
            except Exception:
                log.exception("leader election for %s failed", self.name)
                await backoff.sleep()
                continue

            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def _listen(self) -> None:
        """Start the LISTEN connection once; without it, elections still run on the timer."""
        if self._notifier is not None or self._dsn is None:
            return

        notifier = Notifier(self._dsn, self._prefix, {"leader": self.on_notification})
        try:
            await notifier.start()
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
            log.warning("could not listen on the leader channel: %r; elections run every %.0f s", error, self.interval)
            return

        self._notifier = notifier

    def on_notification(self, _channel: str, payload: dict[str, Any]) -> None:
        """Wake the election on a message from another node on the leader channel.

        A node's own LISTEN connection may carry the channel instead of this
        instance's, when it was created without ``dsn``.
        """
        # Any message on the channel may mean the lease is free; oban-py and
        # Elixir nodes send other shapes too, so the payload is not checked.
        if payload.get("node") != self.identity:
            self._wake.set()
