"""Lets a queue's sync jobs into the threads of a worker process, one at a time while they are CPU-bound.

The threads of a process share one GIL, so two CPU-bound jobs in two threads
finish no sooner than one after the other would. The interpreter also switches
between them every 5 ms, and that costs time. On a 2-core machine, 20 jobs of
100,000 SHA-256 rounds in a two-thread pool took 1.02x as long as in a
one-thread pool while the machine was idle, and up to 1.15x while other
processes ran.

While the last sample found the queue's job threads computing (running or
waiting for a core), a sync job that its producer has already fetched waits
here until the job before it returns. It then starts on the loop's next turn,
with no fetch in between. Sync
jobs that wait on I/O (sleeps, sockets, subprocesses) release the GIL, so the
sample finds their threads idle and the gate lets them all run at once. A new
gate starts closed, so the first I/O-bound jobs of a queue wait for the first
sample, about 60 ms at most.

Each job thread's busy time comes from its own clock (see `JobThread`). Where
the platform has none, the process's CPU sample takes its place.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import Callable

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

    __slots__ = ("_reader", "_last")

    def __init__(self) -> None:
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


class ThreadGate:
    """Gate for the sync jobs of one queue in one process: the ones running in threads, and the ones waiting."""

    def __init__(self, busy_fraction: float = BUSY_FRACTION) -> None:
        self.busy_fraction = busy_fraction
        self.serial = True
        """True while the last sample found this queue's threads CPU-bound, and until the first sample:
        one job at a time. Starting serial keeps a first batch of CPU-bound jobs from sharing the GIL
        in many threads, where each would take as long as the whole batch and could overrun its timeout."""
        self._running: set[JobThread] = set()
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._finished_busy = 0.0
        self._busy_since: float | None = None
        """When the queue's threads last went from none running to one, while some run."""
        self._busy_wall = 0.0
        """Seconds since the last sample during which at least one of the queue's threads ran."""
        self._last_sample = time.monotonic()
        self.opened = False
        """True while draining: every waiting job starts, as it would have without the gate."""

    @property
    def running(self) -> int:
        return len(self._running)

    async def enter(self) -> JobThread:
        """Wait until a job of this queue may run in a thread. The job's thread must call ``enter`` on the result."""
        while self._running and self.serial and not self.opened:
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)

        thread = JobThread()
        if not self._running:
            self._busy_since = time.monotonic()
        self._running.add(thread)
        return thread

    def leave(self, thread: JobThread) -> None:
        """Record that the job's thread returned, and let the next waiting job in."""
        self._finished_busy += thread.read()
        self._running.discard(thread)
        if not self._running and self._busy_since is not None:
            self._busy_wall += time.monotonic() - max(self._busy_since, self._last_sample)
            self._busy_since = None
        self._release(1 if self.serial and not self.opened else len(self._waiting))

    def open(self) -> None:
        """Let every waiting job start, and the ones after them: the process is draining."""
        self.opened = True
        self._release(len(self._waiting))

    def sample(self, process_busy: bool) -> None:
        """Decide how busy the queue's threads were since the last sample, over the time any of them ran."""
        now = time.monotonic()
        busy = self._busy_wall
        if self._busy_since is not None:
            busy += now - max(self._busy_since, self._last_sample)
        thread_busy = self._finished_busy + sum(thread.read() for thread in self._running)
        self._finished_busy = 0.0
        self._busy_wall = 0.0
        self._last_sample = now
        if busy < MIN_SAMPLE:
            return  # too short to judge: keep the last decision

        if not MEASURABLE:
            self.serial = process_busy
        else:
            self.serial = thread_busy / busy >= self.busy_fraction
        if not self.serial:
            self._release(len(self._waiting))

    def _release(self, count: int) -> None:
        for _ in range(count):
            while self._waiting:
                waiter = self._waiting.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    break
