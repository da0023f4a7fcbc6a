"""Deletes finished jobs once they are older than ``max_age``; a leader duty.

Completed, cancelled and discarded jobs are deleted when their finish time
(``completed_at``, ``cancelled_at``, ``discarded_at``) is more than ``max_age``
seconds old. Each pass deletes at most ``limit`` jobs, as oban-py's pruner
does, in transactions of at most ``batch_size`` rows each, so no transaction
holds many row locks or runs long. The batches skip locked rows, so pruners on
two nodes that both believe they lead never wait on each other.
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

DEFAULT_BATCH_SIZE = 2_000


def _positive(option: str, value: Any, integer: bool = False) -> Any:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(f"invalid pruner {option} {value!r}: expected {kind}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"invalid pruner {option} {value!r}: must be positive")
    return value


class Pruner:
    """Deletes old finished jobs every ``interval`` seconds while ``leader`` leads.

    Args:
        pool: connections for the deletes.
        prefix: schema of the Oban tables.
        leader: the node's `Leader`; with None every pass runs.
        max_age: seconds a finished job is kept (86,400 by default, one day).
        interval: seconds between passes.
        limit: most jobs deleted per pass.
        batch_size: most jobs deleted per transaction.

    Raises:
        TypeError, ValueError: for an option of the wrong type or a value that is not positive.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        prefix: str,
        *,
        leader: Leader | None = None,
        max_age: float = 86_400,
        interval: float = 60.0,
        limit: int = 20_000,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self.max_age = float(_positive("max_age", max_age))
        self.interval = float(_positive("interval", interval))
        self.limit = _positive("limit", limit, integer=True)
        self.batch_size = _positive("batch_size", batch_size, integer=True)
        self._pool = pool
        self._leader = leader
        self._sql = queries.load("prune_jobs", prefix)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="obanpro-pruner")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _leading(self) -> bool:
        return self._leader is None or self._leader.is_leader

    async def prune(self) -> int:
        """Run one pass: delete up to ``limit`` old finished jobs; return how many were deleted.

        The pass stops early when a batch comes back short or leadership is lost.
        """
        if not self._leading():
            return 0

        pruned = 0
        with telemetry.span("oban.pruner.prune", {}) as span:
            try:
                while pruned < self.limit and self._leading():
                    size = min(self.batch_size, self.limit - pruned)
                    status = await self._pool.execute(self._sql, self.max_age, size, timeout=QUERY_TIMEOUT)
                    deleted = int(status.rpartition(" ")[2])
                    pruned += deleted
                    if deleted < size:
                        break
            finally:
                span.add({"pruned_count": pruned})

        if pruned:
            log.info("pruned %d finished jobs older than %g s", pruned, self.max_age)
        return pruned

    async def _loop(self) -> None:
        backoff = Backoff(first=0.5, maximum=min(30.0, self.interval))

        while True:
            try:
                await self.prune()
                backoff.reset()
            except CONNECTION_ERRORS as error:
                log.warning("pruning jobs failed: %r; retrying in %.2f s", error, backoff.delay)
                recover(self._pool, error)
                await backoff.sleep()
                continue
            except Exception:
                log.exception("pruning jobs failed; trying again in %.0f s", self.interval)

            await asyncio.sleep(self.interval)
