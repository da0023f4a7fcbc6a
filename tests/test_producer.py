"""A producer's demand: its share of the queue's limit, and the wakes it sends its siblings."""

from __future__ import annotations

import uuid

from obanpro.producer import Producer
from obanpro.thread_gate import CpuLane


class _Slots:
    def __init__(self) -> None:
        self.free = 16

    def limit(self, _queue: int) -> int:
        return 20

    def counts(self, _queue: int) -> tuple[int, int]:
        return self.free, 20 - self.free


class _Runtime:
    """What a producer reads of its process when it computes its demand."""

    prefix = "public"
    node = "test-node"
    uuid = uuid.uuid4()

    def __init__(self) -> None:
        self.slots = _Slots()
        self.lane = CpuLane()
        self.sibling_wakes = 0

    def live_workers(self) -> int:
        return 2

    def cpu_idle_since(self, _since_ns: int) -> bool:
        return False

    def remaining_jobs(self) -> None:
        return None

    def wake_siblings(self) -> None:
        self.sibling_wakes += 1


async def test_limited_producer_wakes_siblings_once() -> None:
    runtime = _Runtime()
    producer = Producer(runtime, "default", 0)  # type: ignore[arg-type]
    producer.held = 10  # its share of 20 over two processes: limited

    for _ in range(5):  # a sibling's wake, the poll, the monitor: nothing changed
        assert producer._demand() == 0
    assert runtime.sibling_wakes == 1

    runtime.slots.free = 17  # it finished a job and left the slot free
    producer._demand()
    producer._demand()
    assert runtime.sibling_wakes == 2

    producer.held = 4  # below its share again: no longer limited
    assert producer._demand() > 0
    producer.held = 10
    producer._demand()
    assert runtime.sibling_wakes == 3
