"""Makes due scheduled and retryable jobs available, for the queues this node runs.

Every node stages its own queues (this is not a leader duty), in batches of
``limit`` rows, and notifies each queue that received jobs so that idle
producers on every node wake at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import asyncpg

from . import queries, telemetry
from .db import CONNECTION_ERRORS, QUERY_TIMEOUT, Backoff, recover

log = logging.getLogger(__name__)


class Stager:
    """Runs the staging query every ``interval`` seconds for the queues ``queues()`` returns."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        prefix: str,
        queues: Callable[[], Iterable[str]],
        *,
        interval: float = 1.0,
        limit: int = 20_000,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"invalid stager interval {interval!r}: must be a positive number of seconds")
        if limit < 1:
            raise ValueError(f"invalid stager limit {limit!r}: must be at least 1")

        self._pool = pool
        self._sql = queries.load("stage_jobs", prefix)
        self._queues = queues
        self._interval = interval
        self._limit = limit
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="obanpro-stager")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def stage(self) -> dict[str, int]:
        """Stage due jobs once; return the number made available per queue."""
        queues = sorted(set(self._queues()))
        if not queues:
            return {}

        with telemetry.span("oban.stager.stage", {"queues": queues}) as span:
            async with self._pool.acquire(timeout=QUERY_TIMEOUT) as conn:
                rows = await conn.fetch(self._sql, queues, self._limit, timeout=QUERY_TIMEOUT)

            staged = {row["queue"]: row["staged"] for row in rows}
            span.add({"staged_count": sum(staged.values()), "available_queues": sorted(staged)})

        return staged

    async def _loop(self) -> None:
        backoff = Backoff()

        while True:
            try:
                staged = await self.stage()
                backoff.reset()
                # A full batch means more jobs are due: go again without waiting.
                if sum(staged.values()) >= self._limit:
                    continue
            except CONNECTION_ERRORS as error:
                log.warning("staging jobs failed: %r; retrying in %.2f s", error, backoff.delay)
                recover(self._pool, error)
                await backoff.sleep()
                continue
            except Exception:
                log.exception("staging jobs failed")

            await asyncio.sleep(self._interval)
