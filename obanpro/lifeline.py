"""Rescues executing jobs whose producer is gone; a leader duty.

A node whose supervisor dies with it (a lost host, a SIGKILL to the whole
process group) leaves its jobs ``executing`` with no one to rescue them
accurately. Every producer heartbeats a row in ``oban_producers`` (see
`obanpro.refresher`), and each job names its producer in ``attempted_by[2]``.

A job is rescued only when both hold:

- its producer has no row updated within ``producer_max_age`` seconds, so a
  producer that is still alive protects its jobs however long they run;
- it was attempted more than ``rescue_after`` seconds ago.

The second rule also covers a producer whose row is missing rather than stale,
which cannot be distinguished from a live producer that never writes a row:
Elixir Oban without Pro writes none, and a new worker process runs jobs for up
to one refresher pass before its row appears. For those, the lifeline falls
back to oban-py's time-based rule.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any

import asyncpg

from . import queries, telemetry
from .db import CONNECTION_ERRORS, QUERY_TIMEOUT, Backoff, recover

if TYPE_CHECKING:
    from .leader import Leader

log = logging.getLogger(__name__)

BATCH_SIZE = 1_000


def _positive(option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"invalid lifeline {option} {value!r}: expected seconds as a number")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"invalid lifeline {option} {value!r}: must be a positive number of seconds")
    return float(value)


class Lifeline:
    """Rescues orphaned executing jobs every ``interval`` seconds while ``leader`` leads.

    Args:
        pool: connections for the rescue.
        prefix: schema of the Oban tables.
        leader: the node's `Leader`; with None every pass runs.
        interval: seconds between passes.
        rescue_after: seconds since a job's attempt before it may be rescued.
        producer_max_age: seconds after its last heartbeat that a producer row
            stops counting as alive; the refresher's ``max_age``.

    Raises:
        TypeError, ValueError: for an option that is not a positive number.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        prefix: str,
        *,
        leader: Leader | None = None,
        interval: float = 60.0,
        rescue_after: float = 300.0,
        producer_max_age: float = 60.0,
    ) -> None:
        self.interval = _positive("interval", interval)
        self.rescue_after = _positive("rescue_after", rescue_after)
        self.producer_max_age = _positive("producer_max_age", producer_max_age)
        self._pool = pool
        self._leader = leader
        self._sql = queries.load("rescue_orphaned_jobs", prefix)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="obanpro-lifeline")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _leading(self) -> bool:
        return self._leader is None or self._leader.is_leader

    async def rescue(self) -> list[tuple[int, str]]:
        """Run one pass; return ``[(job id, new state)]`` for the rescued jobs."""
        if not self._leading():
            return []

        rescued: list[tuple[int, str]] = []
        with telemetry.span("oban.lifeline.rescue", {}) as span:
            try:
                while self._leading():
                    rows = await self._pool.fetch(
                        self._sql, self.rescue_after, self.producer_max_age, BATCH_SIZE, timeout=QUERY_TIMEOUT
                    )
                    rescued.extend((row["id"], row["state"]) for row in rows)
                    if len(rows) < BATCH_SIZE:
                        break
            finally:
                span.add({"rescued_count": len(rescued)})

        if rescued:
            log.warning(
                "rescued %d executing jobs whose producers stopped sending heartbeats: %s",
                len(rescued),
                rescued[:100],
            )
        return rescued

    async def _loop(self) -> None:
        backoff = Backoff(first=0.5, maximum=min(30.0, self.interval))

        while True:
            try:
                await self.rescue()
                backoff.reset()
            except CONNECTION_ERRORS as error:
                log.warning("rescuing orphaned jobs failed: %r; retrying in %.2f s", error, backoff.delay)
                recover(self._pool, error)
                await backoff.sleep()
                continue
            except Exception:
                log.exception("rescuing orphaned jobs failed; trying again in %.0f s", self.interval)

            await asyncio.sleep(self.interval)
