"""Lets a queue's sync jobs into the threads of a worker process, one at a time while they are CPU-bound.

The threads of a process share one GIL, so two CPU-bound jobs in two threads
finish no sooner than one after the other would. The interpreter also switches
between them every 5 ms, and that costs time. On a 2-core machine, 20 jobs of
100,000 SHA-256 rounds in a two-thread pool took 1.02x as long as in a
one-thread pool while the machine was idle, and up to 1.15x while other
processes ran.

While the last CPU sample found the queue's job threads keeping a core busy, a
sync job that its producer already holds waits here until the job before it
returns. It then starts on the loop's next turn, with no fetch in between. Sync
jobs that wait on I/O (sleeps, sockets, subprocesses) release the GIL, so the
sample finds their threads idle and the gate lets them all run at once.

The CPU time of each job thread comes from its own clock
(`time.pthread_getcpuclockid`). Where Python has none (macOS), the process's
CPU sample takes its place.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable

BUSY_FRACTION = 0.6
"""Share of a core that the queue's threads must use, while any of them runs, for the gate to pass one
job at a time. A computing thread got 0.6 to 1.0 of a core on a 2-core machine that also ran PostgreSQL."""

MIN_SAMPLE = 0.01
"""Seconds the queue's threads must have run since the last sample for it to decide anything."""

_thread_clock: Callable[[int], int] | None = getattr(time, "pthread_getcpuclockid", None)


class JobThread:
    """The CPU clock of the thread that runs one job, read by the event loop."""

    __slots__ = ("clock", "used")

    def __init__(self) -> None:
        self.clock: int | None = None
        self.used = 0.0
        """CPU seconds of the thread up to the last reading."""

    def enter(self) -> None:
        """Called in the job's thread as it starts."""
        if _thread_clock is None:
            return
        try:
            clock = _thread_clock(threading.get_ident())
            self.used = time.clock_gettime(clock)
            self.clock = clock
        except OSError:
            pass

    def read(self) -> float:
        """Return the thread's CPU seconds since the last reading."""
        if self.clock is None:
            return 0.0
        try:
            now = time.clock_gettime(self.clock)
        except OSError:
            return 0.0
        used, self.used = now - self.used, now
        return max(0.0, used)


class ThreadGate:
    """Gate for the sync jobs of one queue in one process: the ones running in threads, and the ones waiting."""

    def __init__(self, busy_fraction: float = BUSY_FRACTION) -> None:
        self.busy_fraction = busy_fraction
        self.serial = False
        """True while the last sample found this queue's threads CPU-bound: one job at a time."""
        self._running: set[JobThread] = set()
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._finished_cpu = 0.0
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
        self._finished_cpu += thread.read()
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
        """Decide from the CPU the queue's threads used since the last sample, while any of them ran."""
        now = time.monotonic()
        busy = self._busy_wall
        if self._busy_since is not None:
            busy += now - max(self._busy_since, self._last_sample)
        used = self._finished_cpu + sum(thread.read() for thread in self._running)
        self._finished_cpu = 0.0
        self._busy_wall = 0.0
        self._last_sample = now
        if busy < MIN_SAMPLE:
            return  # too short to judge: keep the last decision

        if _thread_clock is None:
            self.serial = process_busy
        else:
            self.serial = used / busy >= self.busy_fraction
        if not self.serial:
            self._release(len(self._waiting))

    def _release(self, count: int) -> None:
        for _ in range(count):
            while self._waiting:
                waiter = self._waiting.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    break
