"""Runs the CPU-bound sync jobs of a worker process one at a time, in its CPU lane.

The threads of a process share one GIL, so two CPU-bound jobs in two threads
finish no sooner than one after the other would. The interpreter also switches
between them every 5 ms, and that costs time. On a 2-core machine, 20 jobs of
100,000 SHA-256 rounds in a two-thread pool took 1.02x as long as in a
one-thread pool while the machine was idle, and up to 1.15x while other
processes ran. Each job's duration, and so its timeout, also covered the work
of the jobs that shared the GIL with it.

Each queue's `ThreadGate` samples how busy its job threads are. While a queue
counts as CPU-bound, a sync job of it that the producer has already fetched
waits for the process's `CpuLane` until the CPU-bound job before it returns,
whatever that job's queue. It then starts on the loop's next turn, with no
fetch in between. Sync jobs that wait on I/O (sleeps, sockets, subprocesses)
release the GIL, so the sample finds their threads idle and their queue's jobs
run side by side, outside the lane. A queue starts in the lane, so its first
I/O-bound jobs wait for the first sample, about 60 ms at most.

Each job thread's busy time comes from its own clock (see `JobThread`). Where
the platform has none, the process's CPU sample takes its place.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

BUSY_FRACTION = 0.6
"""Share of the time that the queue's threads must have been running or waiting for a core, while any
of them ran, for the gate to pass one job at a time. A computing thread scores about 1.0 and a thread
waiting on I/O about 0."""

MIN_SAMPLE = 0.01
"""Seconds the queue's threads must have run since the last sample for it to decide anything."""

_thread_clock: Callable[[int], int] | None = getattr(time, "pthread_getcpuclockid", None)


def _schedstat_seconds(native_id: int) -> float | None:
    """Return the seconds a thread of this process ran or waited for a core, from Linux's schedstat."""
    try:
        fd = os.open(f"/proc/self/task/{native_id}/schedstat", os.O_RDONLY)
    except OSError:
        return None
    try:
        on_cpu, waiting = os.read(fd, 128).split()[:2]
        return (int(on_cpu) + int(waiting)) / 1e9
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _clock_seconds(clock: int) -> float | None:
    try:
        return time.clock_gettime(clock)
    except OSError:
        return None


MEASURABLE = _schedstat_seconds(threading.get_native_id()) is not None or _thread_clock is not None
"""True when this platform can tell how busy each job thread is."""


class JobThread:
    """The clock of the thread that runs one job, read by the event loop.

    On Linux the clock counts the time the thread ran or waited for a core
    (``/proc/self/task/<tid>/schedstat``), so a computing thread still counts as
    busy while other processes take the cores. Elsewhere it counts CPU time
    (`time.pthread_getcpuclockid`).
    """

    __slots__ = ("in_lane", "_reader", "_last")

    def __init__(self, in_lane: bool) -> None:
        self.in_lane = in_lane
        """True when the job has its process's CPU lane."""
        self._reader: Callable[[], float | None] | None = None
        self._last = 0.0
        """Clock value at the last reading."""

    def enter(self) -> None:
        """Start the clock; called in the job's thread before the job runs."""
        native_id = threading.get_native_id()
        start = _schedstat_seconds(native_id)
        if start is not None:
            self._last = start
            self._reader = lambda: _schedstat_seconds(native_id)
            return

        if _thread_clock is None:
            return
        try:
            clock = _thread_clock(threading.get_ident())
        except OSError:
            return
        start = _clock_seconds(clock)
        if start is not None:
            self._last = start
            self._reader = lambda: _clock_seconds(clock)

    def read(self) -> float:
        """Return the thread's busy seconds since the last reading."""
        reader = self._reader
        if reader is None:
            return 0.0
        now = reader()
        if now is None:
            return 0.0
        busy, self._last = now - self._last, now
        return max(0.0, busy)


class NotStarted(Exception):
    """Raised to a job waiting for the CPU lane when its process drains: the job goes back to its queue unstarted."""


class CpuLane:
    """The one CPU-bound sync job that a worker process runs at a time, and the jobs waiting for it.

    Jobs wait in the order they arrived, whatever their queue.
    """

    def __init__(self) -> None:
        self.busy = False
        self.draining = False
        """True once the process drains: jobs that would wait go back to their queue instead."""
        self._waiting: deque[tuple[ThreadGate, asyncio.Future[None]]] = deque()

    async def acquire(self, gate: ThreadGate) -> bool:
        """Wait for the lane while ``gate``'s queue is CPU-bound; return True when the job has it.

        Raises:
            NotStarted: the process drains, and the job would have had to wait.
        """
        woken = False
        while self.busy and gate.serial:
            if self.draining:
                raise NotStarted
            waiter = asyncio.get_running_loop().create_future()
            entry = (gate, waiter)
            # A job woken for its turn that found the lane taken keeps its place at the front.
            if woken:
                self._waiting.appendleft(entry)
            else:
                self._waiting.append(entry)
            try:
                await waiter
            except BaseException:
                # Cancelled just after its wake-up: pass the turn on, or the lane would stay idle.
                if waiter.done() and not waiter.cancelled() and not self.busy:
                    self._wake(lambda _gate: True, first_only=True)
                raise
            finally:
                if entry in self._waiting:
                    self._waiting.remove(entry)
            woken = True

        if not gate.serial:
            return False  # the queue turned out not to be CPU-bound while the job waited
        self.busy = True
        return True

    def release(self) -> None:
        """Free the lane and wake the job that waited longest."""
        self.busy = False
        self._wake(lambda _gate: True, first_only=True)

    def release_queue(self, gate: ThreadGate) -> None:
        """Wake the waiting jobs of ``gate``'s queue, which no longer needs the lane."""
        self._wake(lambda waiting_gate: waiting_gate is gate, first_only=False)

    def drain(self) -> None:
        """Send every waiting job back to its queue, and every later one that would wait."""
        self.draining = True
        self._wake(lambda _gate: True, first_only=False)

    def _wake(self, matches: Callable[[ThreadGate], bool], first_only: bool) -> None:
        for gate, waiter in list(self._waiting):
            if matches(gate) and not waiter.done():
                waiter.set_result(None)
                if first_only:
                    return


class ThreadGate:
    """The sync jobs of one queue in one process: how busy their threads are, and whether they need the lane."""

    def __init__(self, lane: CpuLane) -> None:
        self.lane = lane
        self.serial = True
        """True while the last sample found this queue's threads CPU-bound, and until the first sample:
        its jobs then run in the process's CPU lane, one at a time. Starting there keeps a first
        batch of CPU-bound jobs from sharing the GIL in many threads, where each would take as long
        as the whole batch and could overrun its timeout."""
        self._running: set[JobThread] = set()
        self._finished_busy = 0.0
        self._busy_since: float | None = None
        """When the queue's threads last went from none running to one, while some run."""
        self._busy_wall = 0.0
        """Seconds since the last sample during which at least one of the queue's threads ran."""
        self._last_sample = time.monotonic()

    @property
    def running(self) -> int:
        return len(self._running)

    async def enter(self) -> JobThread:
        """Wait until a job of this queue may run in a thread. The job's thread must call ``enter`` on the result.

        Raises:
            NotStarted: the process drains, and the job would have had to wait.
        """
        thread = JobThread(in_lane=await self.lane.acquire(self))
        if not self._running:
            self._busy_since = time.monotonic()
        self._running.add(thread)
        return thread

    def leave(self, thread: JobThread) -> None:
        """Record that the job's thread returned, and free the lane when the job held it."""
        self._finished_busy += thread.read()
        self._running.discard(thread)
        if not self._running and self._busy_since is not None:
            self._busy_wall += time.monotonic() - max(self._busy_since, self._last_sample)
            self._busy_since = None
        if thread.in_lane:
            self.lane.release()

    def measure(self) -> float | None:
        """Return how busy the queue's threads were since the last call, over the time any of them ran.

        The result is the threads' running and runnable seconds divided by the
        wall seconds in which at least one of them ran, or None when they ran
        for less than `MIN_SAMPLE`.
        """
        now = time.monotonic()
        busy = self._busy_wall
        if self._busy_since is not None:
            busy += now - max(self._busy_since, self._last_sample)
        thread_busy = self._finished_busy + sum(thread.read() for thread in self._running)
        self._finished_busy = 0.0
        self._busy_wall = 0.0
        self._last_sample = now
        if busy < MIN_SAMPLE:
            return None
        return thread_busy / busy

    def decide(self, serial: bool) -> None:
        self.serial = serial
        if not serial:
            self.lane.release_queue(self)


def sample_gates(gates: Iterable[ThreadGate], process_busy: bool) -> None:
    """Decide for each queue of a process whether its sync jobs run in the CPU lane.

    A thread waiting for the GIL sleeps on a lock, so it counts as idle. When
    CPU-bound sync jobs of k queues share one GIL outside the lane, each
    queue's threads are busy about 1/k of the time, so a queue counts as
    CPU-bound from `BUSY_FRACTION` / k. Inside the lane a CPU-bound job has the
    GIL to itself and scores near 1. Where threads cannot be measured, the
    process's CPU sample decides for every queue whose threads ran.
    """
    shares = [(gate, gate.measure()) for gate in gates]
    measured = [(gate, share) for gate, share in shares if share is not None]
    for gate, share in measured:
        gate.decide(share >= BUSY_FRACTION / len(measured) if MEASURABLE else process_busy)
