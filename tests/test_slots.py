"""The slot table: its documented layout, lock-free take and return, scaling, and repair after kills."""

from __future__ import annotations

import os
import random
import re
import signal
import stat
import time

import pytest

from obanpro import _core, slots

QUEUES = {"default": {"limit": 5, "paused": False}, "other": {"limit": 2, "paused": False}}


def _documented_layout() -> dict[str, dict[str, int]]:
    """Parse the layout block of _core's docstring: record headings and 'offset type name' lines."""
    records: dict[str, dict[str, int]] = {}
    current = None

    for line in _core.__doc__.splitlines():
        heading = re.match(r"    (Header|Queue records|Worker records|Entries), .*?(\d+) bytes", line)
        if heading:
            current = {"Header": "Header", "Queue records": "QueueRecord", "Worker records": "WorkerRecord", "Entries": "Entry"}[heading.group(1)]
            records[current] = {"size": int(heading.group(2))}
            continue

        field = re.match(r"        (\d+)\s+(u64|i64|u32|i32|char|u8)\s+(\w+)", line)
        if field and current:
            records[current][field.group(3)] = int(field.group(1))

    return records


def test_layout_matches_documentation() -> None:
    documented = _documented_layout()
    actual = _core.layout()

    assert set(documented) == {"Header", "QueueRecord", "WorkerRecord", "Entry"}
    for record, fields in actual.items():
        assert documented[record] == fields, record


def test_record_sizes_keep_alignment() -> None:
    layout = _core.layout()

    for record in layout.values():
        assert record["size"] % 8 == 0


def _table(entries: int = 2000, workers: int = 4) -> _core.SlotTable:
    table = _core.SlotTable.format(bytearray(_core.table_size(8, workers, entries)), "n", 8, workers, entries, 1)
    table.add_queue("default", 5, 20)
    return table


def test_take_respects_limit() -> None:
    table = _table()

    first = table.take(0, 100, 3)
    second = table.take(0, 200, 10)

    assert len(first) == 3
    assert len(second) == 2
    assert table.take(0, 300, 1) == []
    assert table.counts(0) == (0, 5, 5)


def test_release_by_other_pid_is_rejected() -> None:
    table = _table()
    entry = table.take(0, 100, 1)[0]

    with pytest.raises(ValueError, match="not owned by pid 200"):
        table.release(entry, 200)


def test_paused_and_stopping_take_nothing() -> None:
    table = _table()

    table.set_paused(0, True)
    assert table.take(0, 100, 5) == []
    table.set_paused(0, False)
    table.set_stopping()
    assert table.take(0, 100, 5) == []


def test_scale_down_waits_for_running_jobs() -> None:
    table = _table()
    held = table.take(0, 100, 5)

    table.scale(0, 2)

    assert table.counts(0) == (0, 5, 2)
    for entry in held[:3]:
        table.release(entry, 100)
    assert table.counts(0) == (0, 2, 2)
    assert table.take(0, 200, 5) == []
    table.release(held[3], 100)
    assert table.counts(0) == (1, 1, 2)
    assert len(table.take(0, 200, 5)) == 1


def test_scale_up_reenables_slots() -> None:
    table = _table()
    held = table.take(0, 100, 5)
    table.scale(0, 1)

    table.scale(0, 8)

    assert table.counts(0) == (3, 5, 8)
    for entry in held:
        table.release(entry, 100)
    assert table.counts(0) == (8, 0, 8)


def test_scale_beyond_capacity_is_rejected() -> None:
    table = _table()

    with pytest.raises(ValueError, match="reserved 20 slots"):
        table.scale(0, 21)


def test_reclaim_frees_dead_owner_slots() -> None:
    table = _table()
    entries = table.take(0, 4242, 3)
    table.set_job(entries[0], 77, 1, 0, 0.0)

    found = table.reclaim(4242)

    assert sorted(entry for entry, _q, _job, _attempt in found) == sorted(entries)
    assert (entries[0], 0, 77, 1) in found
    assert table.counts(0) == (5, 0, 5)


def test_overdue_reports_jobs_past_deadline() -> None:
    table = _table()
    entry = table.take(0, 55, 1)[0]
    table.set_job(entry, 9, 1, 0, 0.001)
    time.sleep(0.01)

    assert table.overdue(0) == [(entry, 55, 9, 0.001)]


def test_cancel_request_reaches_owner() -> None:
    table = _table()
    entry = table.take(0, 66, 1)[0]
    table.set_job(entry, 12, 1, 0, 0.0)

    assert table.request_cancel(12) == 66
    assert table.cancel_requested(entry)
    assert table.request_cancel(13) == 0


def test_segment_is_private_and_unique() -> None:
    first = slots.create("node-a", QUEUES, 2)
    second = slots.create("node-b", QUEUES, 2)
    try:
        assert first.name != second.name
        mode = os.stat(f"/dev/shm/{first.name.lstrip('/')}").st_mode
        assert stat.S_IMODE(mode) == 0o600

        first.table.take(first.table.queue_index("default"), 123, 5)
        assert second.table.counts(second.table.queue_index("default")) == (5, 0, 5)
        assert first.table.node == "node-a"
    finally:
        for segment in (first, second):
            segment.unlink()
            segment.close()


def test_stale_segment_is_removed() -> None:
    pid = os.fork()
    if pid == 0:
        segment = slots.create("dead-node", QUEUES, 1)
        with open(f"/tmp/obanpro-test-segment-{os.getpid()}", "w") as out:
            out.write(segment.name)
        os._exit(0)

    os.waitpid(pid, 0)
    marker = f"/tmp/obanpro-test-segment-{pid}"
    name = open(marker).read()
    os.unlink(marker)
    assert name in slots.segment_names()

    removed = {segment.name: segment for segment in slots.remove_stale()}

    assert name in removed
    assert removed[name].node == "dead-node"
    assert removed[name].supervisor_pid == pid
    assert sorted(removed[name].queues) == ["default", "other"]
    assert name not in slots.segment_names()


def _stress_child(table: _core.SlotTable, queue: int, seed: int) -> None:
    rng = random.Random(seed)
    pid = os.getpid()
    held: list[int] = []

    while True:
        if held and rng.random() < 0.5:
            entry = held.pop(rng.randrange(len(held)))
            if table.owner(entry) != pid:
                os._exit(3)
            table.release(entry, pid)
        else:
            for entry in table.take(queue, pid, rng.randint(1, 3), rng.randrange(50)):
                if table.owner(entry) != pid:
                    os._exit(3)
                table.set_job(entry, pid, 1, 0, 0.0)
                held.append(entry)


@pytest.mark.slow
def test_random_kills_leave_no_slot_lost() -> None:
    segment = slots.create("stress", {"default": {"limit": 7, "paused": False}}, 8)
    table = segment.table
    queue = table.queue_index("default")
    children: set[int] = set()
    rng = random.Random(1234)
    kills = 0
    max_used = 0

    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            while len(children) < 6:
                pid = os.fork()
                if pid == 0:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    _stress_child(table, queue, rng.randrange(1 << 30))
                children.add(pid)

            time.sleep(rng.uniform(0.0005, 0.02))
            victim = rng.choice(sorted(children))
            os.kill(victim, signal.SIGKILL)
            _pid, status = os.waitpid(victim, 0)
            assert os.WIFSIGNALED(status), f"child {victim} exited with {status}: it saw a slot owned twice"
            children.discard(victim)
            table.reclaim(victim)
            kills += 1

            free, used, enabled = table.counts(queue)
            max_used = max(max_used, used)
            assert enabled == 7
            assert free + used == 7
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        for pid in children:
            os.waitpid(pid, 0)
            table.reclaim(pid)

    assert kills > 100
    assert max_used <= 7
    assert table.counts(queue) == (7, 0, 7)
    segment.unlink()
    segment.close()
