"""The worker runtime: producers, executor and acker for a node's queues, on one event loop.

Each worker process runs one `Runtime`, built after the fork, with its own
loop, its own connections and its own thread pool for sync jobs. An `Oban`
embedded in an application runs one too, on the application's loop, with a
slot table in private memory instead of shared memory.

The runtime owns one connection for fetching, up to two for acking and
orphan checks, and the LISTEN connection of its notifier. Job code gets a
separate pool through ``Oban.get_instance()``, so jobs that hold every
connection of that pool cannot starve fetches and acks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg

from . import _core
from .acker import Acker, Refill
from .db import create_pool, session_settings
from .executor import AckAction, Executor
from .job import Job
from .notifier import Notifier
from .process import release_free_memory
from .producer import Producer
from .thread_gate import CpuLane, sample_gates
from .worker import lookup

log = logging.getLogger(__name__)

ACK_MARGIN = 3.0
"""Seconds past the grace period for storing the results of finished jobs, below the
supervisor's kill margin so the process still exits by itself."""
MONITOR_INTERVAL = 0.05
HEARTBEAT_INTERVAL = 1.0
TRIM_INTERVAL = 60.0
"""Seconds between returns of free C heap pages to the system, in worker processes only."""
CPU_BUSY_FRACTION = 0.6
"""Share of one core above which a process counts as saturated with CPU work (an estimate:
a CPU-bound process measured 0.6 to 1.0 here, with PostgreSQL on the same cores)."""

LOOP_LAG_BUSY = 0.002
"""Seconds the monitor may wake late before the process counts as saturated; an idle
loop wakes within about 0.1 ms, one behind CPU-bound job threads waits up to the
interpreter's 5 ms switch interval for the GIL (measured here)."""

_PAGE_SIZE = resource.getpagesize()


def resident_bytes() -> int:
    """Return this process's resident set size in bytes (Linux ``/proc``, else the peak)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Runtime:
    """Runs the queues of a slot table in this process.

    Args:
        dsn: connection string for the runtime's own connections.
        prefix: schema of the Oban tables.
        node: node name written to ``attempted_by``.
        slots: the node's slot table (shared) or a private one.
        worker_index: this process's record in the slot table.
        import_roots: packages from which unknown worker names may be imported.
        supervised: True under a supervisor that enforces deadlines and rescues.
        wake_fd: read end of this process's wake pipe, or None.
        sibling_fds: write ends of the other worker processes' wake pipes.
        max_jobs: recycle the process after this many jobs (0: never).
        max_memory: recycle the process above this many resident bytes (0: never).
        worker_uuid: this process's identity, as in its worker record; read from the record when omitted.
    """

    def __init__(
        self,
        *,
        dsn: str,
        prefix: str,
        node: str,
        slots: _core.SlotTable,
        worker_index: int = 0,
        import_roots: Iterable[str] = (),
        supervised: bool = False,
        wake_fd: int | None = None,
        sibling_fds: Sequence[int] = (),
        max_jobs: int = 0,
        max_memory: int = 0,
        worker_uuid: uuid.UUID | None = None,
    ) -> None:
        self.dsn = dsn
        self.prefix = prefix
        self.node = node
        self.slots = slots
        self.worker_index = worker_index
        self.pid = os.getpid()
        # The producers' uuids derive from the worker record's, which is what the supervisor rescues by.
        self.uuid = worker_uuid or uuid.UUID(bytes=slots.worker(worker_index)["uuid"])
        self.supervised = supervised
        self._trimmed_at = time.monotonic()
        self.draining = False
        self.recycle_reason: str | None = None
        self.finished = asyncio.Event()
        self.pool: asyncpg.Pool = None  # type: ignore[assignment]
        self.fetch_pool: asyncpg.Pool = None  # type: ignore[assignment]
        self._import_roots = tuple(import_roots)
        self._wake_fd = wake_fd
        self._sibling_fds = tuple(sibling_fds)
        self._max_jobs = max_jobs
        self._max_memory = max_memory
        self._producers: dict[str, Producer] = {}
        self.lane = CpuLane()
        """Runs the process's CPU-bound sync jobs one at a time, whatever their queue."""
        self._running: dict[int, tuple[asyncio.Task[None], Job, Producer]] = {}
        # One thread per slot the process could hold, created on demand: the
        # default of cores + 4 left sync jobs holding slots without running.
        capacity = sum(slots.capacity(index) for index in slots.queues().values())
        self._threads = ThreadPoolExecutor(max_workers=max(32, capacity), thread_name_prefix="obanpro-job")
        self._executor = Executor(
            threads=self._threads,
            import_roots=self._import_roots,
            supervised=supervised,
            cancel_check=slots.cancel_requested,
            on_deadline=self._record_deadline,
        )
        self._acker: Acker | None = None
        self._notifier: Notifier | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._generation = -1
        self._jobs_run = 0
        self.fetching = 0
        """Jobs asked for by fetches whose replies have not arrived yet."""
        self._live_workers = 1
        self._cpu_busy = False
        self._sample_start_ns = 0
        self._last_sibling_wake = 0.0
        self._cancelled: set[int] = set()

    # Lifecycle

    async def start(self) -> None:
        """Open connections, start listening and start a producer per running queue."""
        name = f"obanpro {self.node} worker {self.worker_index}"
        self._notifier = Notifier(
            self.dsn,
            self.prefix,
            {"insert": self._on_insert},
            on_reconnect=self._on_reconnect,
            connect_kwargs={"server_settings": session_settings(f"{name} listen")},
        )

        # The three connections open at once; a process start waits for the slowest only.
        opened = await asyncio.gather(
            create_pool(self.dsn, min_size=1, max_size=2, internal=True, application_name=f"{name} ack"),
            # A fetch that is lost in a server crash only makes its jobs available
            # again, which a dead worker does too, so fetches skip waiting for the
            # WAL flush (about 0.2 ms a commit here). Acks wait for it.
            create_pool(
                self.dsn,
                min_size=1,
                max_size=1,
                internal=True,
                application_name=f"{name} fetch",
                server_settings={"synchronous_commit": "off"},
            ),
            self._notifier.start(),
            return_exceptions=True,
        )
        self.pool, self.fetch_pool = (None if isinstance(item, BaseException) else item for item in opened[:2])
        failed = [item for item in opened if isinstance(item, BaseException)]
        if failed:
            raise failed[0]

        self._acker = Acker(self.pool, self.prefix, self._on_acked, self._plan_refill)
        self._acker.start()

        self._refresh_queues()
        self._refresh_live_workers()
        self.slots.set_worker_state(self.worker_index, _core.WORKER_RUNNING)

        if self._wake_fd is not None:
            os.set_blocking(self._wake_fd, False)
            asyncio.get_running_loop().add_reader(self._wake_fd, self._on_wake_pipe)

        self._monitor = asyncio.create_task(self._monitor_loop(), name="obanpro-monitor")

    async def drain(self, grace: float) -> bool:
        """Stop taking jobs, wait up to ``grace`` seconds for running ones, and store every ack.

        Finished jobs whose acks cannot be stored yet get `ACK_MARGIN` more
        seconds, which is less than the supervisor waits before killing the
        process. Returns True when nothing was left running or unacked.
        """
        deadline = time.monotonic() + grace
        self.draining = True
        self.slots.set_worker_state(self.worker_index, _core.WORKER_DRAINING)

        await asyncio.gather(*(producer.stop() for producer in self._producers.values()))

        if self._running:
            log.info(
                "pid %s waiting up to %.1f s for %d running jobs",
                self.pid,
                max(0.0, deadline - time.monotonic()),
                len(self._running),
            )

        # An ack in flight when draining began may still start the jobs it
        # fetched, even while the flush below waits for it, so wait until
        # nothing runs and nothing is left to store rather than for a snapshot.
        while True:
            while self._unfinished() and time.monotonic() < deadline:
                await asyncio.wait(self._unfinished(), timeout=max(0.0, deadline - time.monotonic()))

            flushed = await self._acker.flush(max(0.1, deadline + ACK_MARGIN - time.monotonic()))
            unfinished = self._unfinished()
            if not unfinished or not flushed or time.monotonic() >= deadline:
                break
        if unfinished:
            log.warning(
                "pid %s stops with %d jobs still running after the %.1f s grace period: %s; they are left for rescue",
                self.pid,
                len(unfinished),
                grace,
                sorted(job.id for task, job, _producer in self._running.values() if task in unfinished),
            )
        if not flushed:
            log.error(
                "pid %s stops with %d finished jobs whose results could not be stored; they are left for rescue",
                self.pid,
                self._acker.pending + self._acker.in_flight,
            )
        return flushed and not unfinished

    def _unfinished(self) -> list[asyncio.Task[None]]:
        return [task for task, _job, _producer in self._running.values() if not task.done()]

    async def stop(self) -> None:
        """Cancel what still runs and close connections. Call `drain` first for a graceful stop."""
        self.draining = True

        if self._wake_fd is not None:
            asyncio.get_running_loop().remove_reader(self._wake_fd)

        if self._monitor:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)

        for producer in self._producers.values():
            await producer.stop()

        if self._notifier:
            await self._notifier.stop()

        if self._acker:
            await self._acker.stop()

        for task, _job, _producer in list(self._running.values()):
            task.cancel()

        for pool in (self.pool, self.fetch_pool):
            if pool is not None:
                await _close_pool(pool)

        self._threads.shutdown(wait=False, cancel_futures=True)

    # Jobs

    def start_job(self, producer: Producer, job: Job, entry: int) -> None:
        self.slots.set_job(entry, job.id, job.attempt, self.worker_index, 0.0)
        task = asyncio.create_task(self._run(producer, job, entry), name=f"obanpro-job-{job.id}")
        self._running[entry] = (task, job, producer)

    async def _run(self, producer: Producer, job: Job, entry: int) -> None:
        cls = lookup(job.worker)
        sync = cls is not None and not cls.__obanpro_async__
        producer.running_sync += sync
        try:
            action = await self._executor.run(job, entry, producer.gate)
        finally:
            producer.running_sync -= sync
        self._acker.add(action)

    def _record_deadline(self, entry: int, timeout: float) -> None:
        job = self._running[entry][1]
        self.slots.set_job(entry, job.id, job.attempt, self.worker_index, timeout)

    def remaining_jobs(self) -> int | None:
        """Return how many more jobs this process may start before it recycles, or None without a limit.

        Fetches in flight count as started, since both the producer and the
        acker may be fetching at once.
        """
        if not self._max_jobs:
            return None
        return max(0, self._max_jobs - self._jobs_run - len(self._running) - self.fetching)

    def _plan_refill(self, batch: list[AckAction]) -> Refill | None:
        """Choose the producer whose freed slots the ack statement should fill again, if any wants them."""
        if self.draining or self.slots.stopping:
            return None

        freed: dict[Producer, list[int]] = {}
        for action in batch:
            running = self._running.get(action.entry)
            if running is not None:
                freed.setdefault(running[2], []).append(action.entry)
        if not freed:
            return None

        producer, entries = max(freed.items(), key=lambda item: len(item[1]))
        demand = producer.refill_demand(len(entries))
        remaining = self.remaining_jobs()
        if remaining is not None:
            demand = min(demand, remaining)
        if demand <= 0:
            return None

        self.fetching += demand

        def lost() -> None:
            self.fetching -= demand
            producer.expect_orphans()

        return Refill(producer.queue, entries[:demand], producer.attempted_by, lost)

    def _on_acked(self, batch: list[AckAction], refill: Refill | None, jobs: list[Job]) -> None:
        if refill is not None:
            self.fetching -= len(refill.entries)
        woken: set[Producer] = set()
        fetched = dict(zip(refill.entries, jobs)) if refill is not None else {}
        placed: list[tuple[Producer, Job, int]] = []

        for action in batch:
            running = self._running.pop(action.entry, None)
            self._cancelled.discard(action.entry)
            producer = running[2] if running is not None else None
            job = fetched.pop(action.entry, None)

            if job is not None and producer is not None and self.slots.reuse(action.entry, self.pid):
                placed.append((producer, job, action.entry))
                continue

            if job is not None:
                fetched[action.entry] = job
            self.slots.release(action.entry, self.pid)
            if producer is not None:
                producer.held -= 1
                woken.add(producer)

        # Jobs handed back unstarted at a drain did not run here.
        ran = sum(1 for action in batch if not (action.state == "available" and action.attempt_change < 0))
        self._jobs_run += ran
        self.slots.add_jobs_run(self.worker_index, ran)

        for producer, job, entry in placed:
            self.start_job(producer, job, entry)

        if fetched:
            # A slot retired by a scale-down between the plan and the reply: the
            # producer gives those rows back as jobs it fetched without a slot.
            producer = self._producers.get(refill.queue)
            if producer is not None:
                producer.expect_orphans()

        if self._max_jobs and self._jobs_run >= self._max_jobs and not self.draining:
            self._begin_recycle(f"it ran {self._jobs_run} jobs (max-jobs-per-process {self._max_jobs})")

        for producer in woken:
            producer.wake()

        if self.draining and not self._running and self.recycle_reason:
            self.finished.set()

    def running_jobs(self, queue: str | None = None) -> list[Job]:
        return [job for _task, job, producer in self._running.values() if queue is None or producer.queue == queue]

    # Work spreading

    def live_workers(self) -> int:
        return self._live_workers

    @property
    def cpu_busy(self) -> bool:
        """True when the last CPU sample found the process saturated."""
        return self._cpu_busy

    def cpu_idle_since(self, since_ns: int) -> bool:
        """Return True when the last CPU sample began after ``since_ns`` and found the process unsaturated."""
        return not self._cpu_busy and self._sample_start_ns >= since_ns

    def wake_siblings(self) -> None:
        now = time.monotonic()
        if not self._sibling_fds or now - self._last_sibling_wake < 0.005:
            return

        self._last_sibling_wake = now
        for fd in self._sibling_fds:
            try:
                os.write(fd, b"w")
            except (BlockingIOError, BrokenPipeError, OSError):
                pass

    def wake_all(self) -> None:
        for producer in self._producers.values():
            producer.wake()

    # Events

    def _on_insert(self, _channel: str, payload: dict[str, Any]) -> None:
        producer = self._producers.get(payload.get("queue"))  # type: ignore[arg-type]
        if producer is not None:
            producer.wake()

    async def _on_reconnect(self) -> None:
        self.wake_all()

    def _on_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_fd, 4096):  # type: ignore[arg-type]
                pass
        except BlockingIOError:
            pass

        self._check_cancels()
        self.wake_all()

    # Monitoring

    async def _monitor_loop(self) -> None:
        wall = time.monotonic()
        cpu = time.process_time()
        last_heartbeat = 0.0

        while True:
            self._sample_start_ns = time.monotonic_ns()
            await asyncio.sleep(MONITOR_INTERVAL)

            now, now_cpu = time.monotonic(), time.process_time()
            was_busy = self._cpu_busy
            # Saturated: the process used most of a core, or the loop waited for
            # the CPU or the GIL after its sleep, as it does behind busy job threads
            # or on a machine with more runnable processes than cores.
            lag = now - wall - MONITOR_INTERVAL
            self._cpu_busy = (now_cpu - cpu) / max(now - wall, 1e-6) > CPU_BUSY_FRACTION or lag > LOOP_LAG_BUSY
            wall, cpu = now, now_cpu

            if self.draining:
                self.lane.drain()
            else:
                sample_gates([producer.gate for producer in self._producers.values()], self._cpu_busy)

            for producer in self._producers.values():
                if self._cpu_busy and producer.running_sync:
                    producer.saturated_at = now
                elif not self._cpu_busy and (producer.limited or was_busy):
                    producer.wake()

            self._check_cancels()
            self._refresh_live_workers()
            if self.slots.generation != self._generation:
                self._refresh_queues()

            if now - last_heartbeat >= HEARTBEAT_INTERVAL:
                last_heartbeat = now
                self._heartbeat()

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if self.supervised and now - self._trimmed_at >= TRIM_INTERVAL:
            self._trimmed_at = now
            release_free_memory()

        rss = resident_bytes()
        self.slots.heartbeat(self.worker_index, rss, self._cpu_busy)

        if self._max_memory and rss > self._max_memory and not self.draining:
            self._begin_recycle(
                f"its resident memory {rss // 1048576} MB is over max-memory-per-process {self._max_memory // 1048576} MB"
            )

    def _begin_recycle(self, reason: str) -> None:
        log.info("pid %s stops taking jobs and will be replaced: %s", self.pid, reason)
        self.recycle_reason = reason
        self.draining = True
        self.slots.set_worker_state(self.worker_index, _core.WORKER_DRAINING)
        self.wake_siblings()
        if not self._running:
            self.finished.set()

    def _check_cancels(self) -> None:
        for entry, (task, job, _producer) in self._running.items():
            if entry in self._cancelled or not self.slots.cancel_requested(entry):
                continue

            self._cancelled.add(entry)
            cls = lookup(job.worker)
            if entry in self._executor.waiting:
                log.info("cancelling job %s (%s) in pid %s before it started", job.id, job.worker, self.pid)
                task.cancel()
            elif cls is not None and cls.__obanpro_async__:
                log.info("cancelling running job %s (%s) in pid %s", job.id, job.worker, self.pid)
                task.cancel()

    def _refresh_live_workers(self) -> None:
        # Every record counts, even before its process starts or after it died and
        # waits for a respawn, except processes that stopped taking jobs: a
        # process that started first must not take the shares of siblings still
        # forking.
        stopping = 0
        for index in range(self.slots.max_workers):
            if self.slots.worker_state(index) in (_core.WORKER_DRAINING, _core.WORKER_EXITING):
                stopping += 1
        self._live_workers = max(1, self.slots.max_workers - stopping)

    def _refresh_queues(self) -> None:
        self._generation = self.slots.generation

        for name, index in self.slots.queues().items():
            if name in self._producers or self.slots.queue_state(index) != _core.QUEUE_RUNNING:
                continue

            producer = Producer(self, name, index)
            self._producers[name] = producer
            if not self.draining:
                producer.start()
                producer.wake()


async def _close_pool(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout=5)
    except (asyncio.TimeoutError, OSError, asyncpg.InterfaceError):
        pool.terminate()
