"""The thread gate: one CPU-bound sync job of a queue at a time, I/O-bound ones all at once."""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from obanpro import thread_gate
from obanpro.executor import Executor
from obanpro.job import Job
from obanpro.thread_gate import CpuLane, NotStarted, ThreadGate, sample_gates

from . import workers

pytestmark = pytest.mark.skipif(
    not thread_gate.MEASURABLE, reason="this platform cannot measure how busy a thread is"
)


def _compute(seconds: float) -> None:
    value = b"x"
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            value = hashlib.sha256(value).digest()


async def _run(gate: ThreadGate, pool: ThreadPoolExecutor, body, spans: list[tuple[float, float]]) -> None:
    thread = await gate.enter()

    def call() -> None:
        thread.enter()
        started = time.monotonic()
        body()
        spans.append((started, time.monotonic()))

    try:
        await asyncio.get_running_loop().run_in_executor(pool, call)
    finally:
        gate.leave(thread)


async def _sample_every(gate: ThreadGate | list[ThreadGate], interval: float, stop: asyncio.Event) -> None:
    gates = gate if isinstance(gate, list) else [gate]
    while not stop.is_set():
        await asyncio.sleep(interval)
        sample_gates(gates, process_busy=True)


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(stop, -1) for _, stop in spans])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


async def test_cpu_bound_jobs_run_serially() -> None:
    gate = ThreadGate(CpuLane())
    spans: list[tuple[float, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_every(gate, 0.02, stop))
    with ThreadPoolExecutor(8) as pool:
        # The first job shows the sampler what the queue's jobs do.
        await _run(gate, pool, lambda: _compute(0.1), spans)
        assert gate.serial
        spans.clear()
        await asyncio.gather(*(_run(gate, pool, lambda: _compute(0.05), spans) for _ in range(6)))
    stop.set()
    await sampler

    assert len(spans) == 6
    assert _max_overlap(spans) == 1


async def test_io_bound_jobs_run_together() -> None:
    gate = ThreadGate(CpuLane())  # a new queue starts in the lane: the first sample must let it out
    spans: list[tuple[float, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_every(gate, 0.02, stop))
    with ThreadPoolExecutor(8) as pool:
        await asyncio.gather(*(_run(gate, pool, lambda: time.sleep(0.3), spans) for _ in range(6)))
    stop.set()
    await sampler

    assert _max_overlap(spans) >= 5


async def test_first_cpu_batch_runs_serially() -> None:
    gate = ThreadGate(CpuLane())
    spans: list[tuple[float, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_every(gate, 0.05, stop))
    with ThreadPoolExecutor(8) as pool:
        await asyncio.gather(*(_run(gate, pool, lambda: _compute(0.05), spans) for _ in range(6)))
    stop.set()
    await sampler

    assert gate.serial
    assert _max_overlap(spans) == 1


async def test_cpu_queues_share_one_lane() -> None:
    lane = CpuLane()
    first, second = ThreadGate(lane), ThreadGate(lane)
    spans: list[tuple[float, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_every([first, second], 0.05, stop))
    with ThreadPoolExecutor(12) as pool:
        await asyncio.gather(*(_run(gate, pool, lambda: _compute(0.05), spans) for gate in (first, second) for _ in range(5)))
    stop.set()
    await sampler

    assert first.serial
    assert second.serial
    assert len(spans) == 10
    assert _max_overlap(spans) == 1


async def test_cpu_lane_leaves_io_queue_free() -> None:
    lane = CpuLane()
    cpu, io = ThreadGate(lane), ThreadGate(lane)
    cpu_spans: list[tuple[float, float]] = []
    io_spans: list[tuple[float, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_every([cpu, io], 0.05, stop))
    with ThreadPoolExecutor(12) as pool:
        await asyncio.gather(
            *(_run(cpu, pool, lambda: _compute(0.1), cpu_spans) for _ in range(5)),
            *(_run(io, pool, lambda: time.sleep(0.3), io_spans) for _ in range(6)),
        )
    stop.set()
    await sampler

    assert cpu.serial
    assert _max_overlap(cpu_spans) == 1
    assert _max_overlap(io_spans) >= 5


async def test_drain_sends_waiting_jobs_back() -> None:
    gate = ThreadGate(CpuLane())
    first = await gate.enter()
    waiting = [asyncio.create_task(gate.enter()) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert not any(task.done() for task in waiting)

    gate.lane.drain()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(result, NotStarted) for result in results)
    with pytest.raises(NotStarted):
        await gate.enter()  # a job fetched during the drain that would wait
    gate.leave(first)
    gate.leave(await gate.enter())  # nothing runs: a job may still start
    assert gate.running == 0


async def test_cancelled_waiter_is_skipped() -> None:
    gate = ThreadGate(CpuLane())
    first = await gate.enter()
    cancelled = asyncio.create_task(gate.enter())
    second = asyncio.create_task(gate.enter())
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await asyncio.sleep(0.01)

    gate.leave(first)
    thread = await asyncio.wait_for(second, 1)
    assert gate.running == 1
    gate.leave(thread)


async def test_short_sample_keeps_decision() -> None:
    gate = ThreadGate(CpuLane())
    thread = await gate.enter()
    sample_gates([gate], process_busy=False)  # the thread has not run long enough to judge
    assert gate.serial
    gate.leave(thread)



def _executor(pool: ThreadPoolExecutor, cancelled: set[int], deadlines: list[float]) -> Executor:
    return Executor(
        threads=pool,
        import_roots=(),
        supervised=False,
        cancel_check=lambda entry: entry in cancelled,
        on_deadline=lambda _entry, _timeout: deadlines.append(time.monotonic()),
    )


async def test_cancelled_waiting_job_never_starts() -> None:
    gate = ThreadGate(CpuLane())
    cancelled: set[int] = set()
    with ThreadPoolExecutor(2) as pool:
        executor = _executor(pool, cancelled, [])
        running = await gate.enter()  # another job of the queue has the thread
        job = Job(workers.SyncNoop.__obanpro_name__, {}, id=1, attempt=1)
        task = asyncio.create_task(executor.run(job, 1, gate))
        await asyncio.sleep(0.05)
        assert not task.done()

        cancelled.add(1)
        gate.leave(running)
        action = await asyncio.wait_for(task, 5)

    assert action.state == "cancelled"
    assert action.error is not None and action.error["error"] == "cancelled before it started"
    assert gate.running == 0


async def test_timeout_counts_from_gate() -> None:
    gate = ThreadGate(CpuLane())
    deadlines: list[float] = []
    with ThreadPoolExecutor(2) as pool:
        executor = _executor(pool, set(), deadlines)
        running = await gate.enter()
        job = Job(workers.Spin.__obanpro_name__, {"seconds": 0.1, "timeout": 0.4}, id=2, attempt=1, max_attempts=2)
        task = asyncio.create_task(executor.run(job, 2, gate))
        await asyncio.sleep(0.6)  # longer than the job's timeout, spent waiting
        released = time.monotonic()
        gate.leave(running)
        action = await asyncio.wait_for(task, 5)

    assert action.state == "completed"
    assert deadlines and deadlines[0] >= released


async def test_drained_waiting_job_goes_back() -> None:
    gate = ThreadGate(CpuLane())
    with ThreadPoolExecutor(2) as pool:
        executor = _executor(pool, set(), [])
        running = await gate.enter()
        job = Job(workers.SyncNoop.__obanpro_name__, {}, id=3, attempt=1)
        task = asyncio.create_task(executor.run(job, 3, gate))
        await asyncio.sleep(0.05)
        assert executor.waiting == {3}

        gate.lane.drain()
        action = await asyncio.wait_for(task, 5)
        gate.leave(running)

    assert action.state == "available"
    assert action.attempt_change == -1
    assert action.error is None
    assert executor.waiting == set()


async def test_waiting_job_cancelled_at_once() -> None:
    gate = ThreadGate(CpuLane())
    cancelled: set[int] = set()
    with ThreadPoolExecutor(2) as pool:
        executor = _executor(pool, cancelled, [])
        running = await gate.enter()  # a long job ahead of it, which never checks for cancellation
        job = Job(workers.SyncNoop.__obanpro_name__, {}, id=4, attempt=1)
        task = asyncio.create_task(executor.run(job, 4, gate))
        await asyncio.sleep(0.05)

        cancelled.add(4)
        task.cancel()  # as the runtime does for a job in `executor.waiting`
        action = await asyncio.wait_for(task, 5)
        gate.leave(running)

    assert action.state == "cancelled"
    assert action.error is not None and action.error["error"] == "cancelled before it started"


async def test_cancelled_wakeup_passes_turn_on() -> None:
    lane = CpuLane()
    gate = ThreadGate(lane)
    first = await gate.enter()
    woken = asyncio.create_task(gate.enter())
    behind = asyncio.create_task(gate.enter())
    await asyncio.sleep(0.01)

    gate.leave(first)  # wakes `woken` ...
    woken.cancel()  # ... which is cancelled before it runs
    thread = await asyncio.wait_for(behind, 1)
    assert woken.cancelled()
    assert lane.busy
    gate.leave(thread)
