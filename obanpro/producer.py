"""Fetches jobs for one queue in one worker process.

A producer takes free slots from the slot table first and then fetches at most
that many jobs, so the queue's limit holds across every process of the node
without a coordinator. It wakes on the insert notification, when a slot frees
up, when a sibling process asks, and on a one-second poll, so a lost
notification costs at most that second.

Work spreading: a process may hold its share of the queue's limit (the limit
divided by the worker processes). It takes more only once a CPU sample taken
after its last take shows it is not saturated, so a process busy with
CPU-bound sync jobs leaves the rest of the slots, and the rows they would mark
executing, to its idle siblings, while a process running I/O-bound async jobs
can still fill the whole limit. A saturated process that runs sync jobs of the
queue keeps only `SATURATED_SYNC_JOBS` of them, and the process's CPU lane
(`obanpro.thread_gate`) runs them one after the other: more threads would only
share one GIL, and fewer held jobs leave less work stranded in one process at
the end.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import TYPE_CHECKING

import asyncpg

from . import _core, queries, telemetry
from .db import CONNECTION_ERRORS, QUERY_TIMEOUT, Backoff, recover
from .job import Job, JobState
from .thread_gate import ThreadGate

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
SATURATED_SYNC_JOBS = 2
"""Sync jobs of a queue a CPU-saturated process keeps running: one on the CPU and
one ready, so the thread never waits for a fetch."""
SATURATION_MEMORY = 1.0
"""Seconds the cap on sync jobs lasts after the last sample that found them saturating
the process, so it holds between one batch of jobs and the next."""


class Producer:
    """The fetch loop of one queue in one worker process."""

    def __init__(self, runtime: Runtime, queue: str, queue_index: int) -> None:
        self.runtime = runtime
        self.queue = queue
        self.queue_index = queue_index
        self.uuid = uuid.uuid5(runtime.uuid, queue)
        self.attempted_by = [runtime.node, str(self.uuid)]
        self.held = 0
        self.running_sync = 0
        self.saturated_at = -SATURATION_MEMORY
        """When a CPU sample last found the process saturated while this queue's sync jobs ran."""
        self.gate = ThreadGate(runtime.lane)
        """Samples this queue's sync jobs and sends them through the process's CPU lane while they compute."""
        self.limited = False
        self._free_left = 0
        """Free slots of the queue when this producer last found itself limited; 0 when it is not."""
        self.last_take_ns = 0
        self._fetch_sql = queries.load("fetch_jobs", runtime.prefix)
        self._release_sql = queries.load("release_orphans", runtime.prefix)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._orphans_possible = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"obanpro-producer-{self.queue}")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """Let the loop finish its current fetch and end; it takes no slots afterwards."""
        self.wake()
        if self._task:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        # Retries of a failed fetch are cheap, so they stay within the poll interval.
        backoff = Backoff(maximum=POLL_INTERVAL)
        runtime = self.runtime

        while not runtime.draining:
            # asyncio.timeout wakes this task directly; wait_for would first run a task of its own.
            try:
                async with asyncio.timeout(POLL_INTERVAL):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

            if self._orphans_possible:
                await self._release_orphans()

            try:
                await self._dispatch()
                backoff.reset()
            except CONNECTION_ERRORS as error:
                log.warning(
                    "fetching queue %s failed in pid %s: %r; retrying in %.2f s",
                    self.queue,
                    runtime.pid,
                    error,
                    backoff.delay,
                )
                recover(runtime.fetch_pool, error)
                recover(runtime.pool, error)
                await backoff.sleep()
                self.wake()
            except Exception:
                log.exception("fetching queue %s failed in pid %s", self.queue, runtime.pid)
                await backoff.sleep()
                self.wake()

    async def _dispatch(self) -> None:
        runtime = self.runtime
        slots = runtime.slots

        while not runtime.draining:
            demand = self._demand()
            if demand <= 0:
                return

            entries = slots.take(self.queue_index, runtime.pid, demand, runtime.worker_index * 7)
            if not entries:
                return

            self.last_take_ns = time.monotonic_ns()
            runtime.fetching += len(entries)
            try:
                jobs = await self._fetch(len(entries))
            except BaseException:
                self._orphans_possible = True
                for entry in entries:
                    slots.release(entry, runtime.pid)
                raise
            finally:
                runtime.fetching -= len(entries)

            for entry in entries[len(jobs):]:
                slots.release(entry, runtime.pid)

            self.held += len(jobs)
            for job, entry in zip(jobs, entries):
                runtime.start_job(self, job, entry)

            if len(jobs) < len(entries):
                return

    def _demand_for(self, held: int) -> int:
        """Return how many more slots this process should hold when it holds ``held``."""
        runtime = self.runtime
        limit = runtime.slots.limit(self.queue_index)
        share = math.ceil(limit / max(1, runtime.live_workers()))

        # Beyond its share only with evidence: a CPU sample taken while it held
        # its share, after its last take, that found the process unsaturated.
        if held >= share and runtime.cpu_idle_since(self.last_take_ns):
            return limit - held

        # A process that this queue's sync jobs saturated gains nothing from more
        # threads on one GIL: it keeps a few, and its siblings take the rest.
        if time.monotonic() - self.saturated_at < SATURATION_MEMORY:
            return min(share - held, SATURATED_SYNC_JOBS - self.running_sync)

        return share - held

    def refill_demand(self, freed: int) -> int:
        """Return how many of ``freed`` slots, about to be returned, should take new jobs at once."""
        slots = self.runtime.slots
        if self.runtime.draining or slots.paused(self.queue_index):
            return 0
        if slots.queue_state(self.queue_index) != _core.QUEUE_RUNNING:
            return 0

        return max(0, min(freed, self._demand_for(self.held - freed)))

    def expect_orphans(self) -> None:
        """Look for rows this producer fetched but never received, before its next fetch."""
        self._orphans_possible = True
        self.wake()

    def _demand(self) -> int:
        runtime = self.runtime
        limit = runtime.slots.limit(self.queue_index)
        demand = self._demand_for(self.held)

        remaining = runtime.remaining_jobs()
        if remaining is not None:
            demand = min(demand, remaining)

        # A limited producer leaves free slots to its siblings. It wakes them only
        # when more slots are free than at its last check, because two limited
        # processes would otherwise wake each other back and forth, and each wake
        # takes the GIL from a job thread.
        self.limited = demand <= 0 and self.held < limit
        if self.limited:
            free = runtime.slots.counts(self.queue_index)[0]
            if free > self._free_left:
                runtime.wake_siblings()
            self._free_left = free
        else:
            self._free_left = 0

        return demand

    async def _fetch(self, demand: int) -> list[Job]:
        runtime = self.runtime

        with telemetry.span("oban.producer.get", {"queue": self.queue}) as span:
            async with runtime.fetch_pool.acquire(timeout=QUERY_TIMEOUT) as conn:
                rows = await conn.fetch(self._fetch_sql, self.queue, demand, self.attempted_by, timeout=QUERY_TIMEOUT)
            span.add({"count": len(rows)})

        return _core.decode_jobs(rows, Job, JobState.EXECUTING)

    async def _release_orphans(self) -> None:
        """Give back rows this producer marked executing in a fetch whose reply was lost.

        A failure leaves the flag set for the next round and lets the fetch go
        ahead, so the release can never hold the queue up.
        """
        running = [job.id for job in self.runtime.running_jobs(self.queue)]

        try:
            async with self.runtime.pool.acquire(timeout=QUERY_TIMEOUT) as conn:
                released = await conn.fetch(self._release_sql, self.queue, str(self.uuid), running, timeout=QUERY_TIMEOUT)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
            log.warning("giving back jobs of queue %s fetched without a reply failed: %r", self.queue, error)
            return

        self._orphans_possible = False
        if released:
            log.warning(
                "made %d jobs of queue %s available again after a fetch whose reply was lost: %s",
                len(released),
                self.queue,
                [row[0] for row in released],
            )
