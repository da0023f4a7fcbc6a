"""Queue control signals: payload forms and idents, and their effect on every process of a node."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from obanpro import _core, erlang_term, slots
from obanpro.config import parse_queues
from obanpro.node import NodeContext
from obanpro.oban import Oban
from obanpro.signals import InvalidSignalError, QueueControl, SignalListener

from . import workers
from .conftest import Node, wait_for


def _context(queues: str = "default:5,mailers:2", *, node: str = "n1", dsn: str = "", prefix: str = "public"):
    table = slots.private_table(node, parse_queues(queues))
    woken: list[int] = []
    requested: list[dict[str, Any]] = []
    context = NodeContext(
        pool=None,  # type: ignore[arg-type]
        dsn=dsn,
        prefix=prefix,
        name="Oban",
        node=node,
        table=table,
        wake_worker=woken.append,
        request_queue=requested.append,
    )
    return context, woken, requested


# Applying signals to a slot table


def test_pause_and_resume_one_queue() -> None:
    context, woken, _ = _context()
    control = QueueControl(context)
    table = context.table

    assert control.apply({"action": "pause", "queue": "default", "ident": "any"})
    assert table.paused(table.queue_index("default"))
    assert not table.paused(table.queue_index("mailers"))
    assert woken == [-1]

    assert control.apply({"action": "resume", "queue": "default"})
    assert not table.paused(table.queue_index("default"))


def test_pause_all_queues_with_star_or_no_queue() -> None:
    context, _, _ = _context()
    control = QueueControl(context)
    table = context.table

    control.apply({"action": "pause", "queue": "*"})
    assert all(table.paused(index) for index in table.queues().values())

    control.apply({"action": "resume"})
    assert not any(table.paused(index) for index in table.queues().values())


def test_signal_for_unknown_queue_changes_nothing() -> None:
    context, woken, _ = _context()
    control = QueueControl(context)

    assert not control.apply({"action": "pause", "queue": "elsewhere"})
    assert not control.apply({"action": "scale", "queue": "elsewhere", "limit": 3})
    assert not control.apply({"action": "stop", "queue": "elsewhere"})
    assert woken == []


def test_idents_select_the_node() -> None:
    context, _, _ = _context(node="n1")
    control = QueueControl(context)

    assert control.addressed_here({"action": "pause", "ident": "any"})
    assert control.addressed_here({"action": "pause"})
    assert control.addressed_here({"action": "pause", "ident": "Oban.n1"})
    assert not control.addressed_here({"action": "pause", "ident": "Oban.n2"})
    assert not control.addressed_here({"action": "pause", "ident": "Other.n1"})


def test_scale_changes_the_limit() -> None:
    context, woken, _ = _context()
    control = QueueControl(context)
    table = context.table
    index = table.queue_index("default")

    assert control.apply({"action": "scale", "queue": "default", "limit": 12, "ident": "any"})
    assert table.limit(index) == 12
    assert table.counts(index) == (12, 0, 12)

    control.apply({"action": "scale", "queue": "default", "limit": 1})
    assert table.counts(index) == (1, 0, 1)
    assert woken == [-1, -1]


@pytest.mark.parametrize("limit", [0, -1, "3", 2.5, True, None])
def test_scale_rejects_invalid_limits(limit: Any) -> None:
    context, _, _ = _context()
    control = QueueControl(context)
    payload = {"action": "scale", "queue": "default", "limit": limit}

    if limit is None:
        assert not control.apply(payload)
    else:
        with pytest.raises(InvalidSignalError, match="invalid limit"):
            control.apply(payload)
    assert context.table.limit(context.table.queue_index("default")) == 5


def test_scale_above_reserved_slots_fails() -> None:
    context, _, _ = _context()
    control = QueueControl(context)
    capacity = context.table.capacity(context.table.queue_index("default"))

    with pytest.raises(ValueError, match="reserved"):
        control.apply({"action": "scale", "queue": "default", "limit": capacity + 1})


def test_scale_down_retires_busy_slots() -> None:
    context, _, _ = _context("default:4")
    control = QueueControl(context)
    table = context.table
    index = table.queue_index("default")
    pid = os.getpid()
    taken = table.take(index, pid, 4)

    control.scale("default", 1)

    assert table.counts(index) == (0, 4, 1)
    for entry in taken:
        table.release(entry, pid)
    assert table.counts(index) == (1, 0, 1)


def test_stop_then_start_restarts_in_place() -> None:
    context, _, requested = _context()
    control = QueueControl(context)
    table = context.table
    index = table.queue_index("mailers")

    assert control.apply({"action": "stop", "queue": "mailers"})
    assert table.queue_state(index) == _core.QUEUE_STOPPED
    assert table.take(index, os.getpid(), 1) == []

    assert control.apply({"action": "start", "queue": "mailers", "limit": 7, "paused": True, "ident": "any"})
    assert table.queue_state(index) == _core.QUEUE_RUNNING
    assert table.limit(index) == 7
    assert table.paused(index)
    assert requested == []
    assert "mailers" in control.started_at


def test_start_new_queue_asks_the_table_owner() -> None:
    context, _, requested = _context()
    control = QueueControl(context)

    assert control.apply({"action": "start", "queue": "media", "limit": 3, "global_limit": 10})

    assert requested == [{"queue": "media", "limit": 3, "paused": False}]
    assert control.queue_meta["media"] == {"global_limit": 10}


def test_repeated_start_asks_the_owner_once() -> None:
    context, _, requested = _context()
    control = QueueControl(context)

    assert control.apply({"action": "start", "queue": "media", "limit": 3})
    assert not control.apply({"action": "start", "queue": "media", "limit": 3})

    assert len(requested) == 1


def test_repeated_pause_changes_nothing_twice() -> None:
    context, woken, _ = _context()
    control = QueueControl(context)

    assert control.apply({"action": "pause", "queue": "default"})
    assert not control.apply({"action": "pause", "queue": "default"})
    assert not control.apply({"action": "scale", "queue": "default", "limit": 5})
    assert woken == [-1]


def test_start_running_queue_changes_nothing() -> None:
    context, woken, requested = _context()
    control = QueueControl(context)

    assert not control.apply({"action": "start", "queue": "default", "limit": 50})

    assert context.table.limit(context.table.queue_index("default")) == 5
    assert requested == []
    assert woken == []


@pytest.mark.parametrize(
    "payload",
    [
        {"action": "start", "queue": "media"},
        {"action": "start", "queue": "", "limit": 3},
        {"action": "stop", "queue": "*"},
        {"action": "scale", "queue": 5, "limit": 3},
        {"action": "pause", "queue": None},
        {"action": "pkill", "job_id": "12"},
        {"action": "pkill"},
    ],
)
def test_invalid_payloads_raise(payload: dict[str, Any]) -> None:
    context, _, _ = _context()

    with pytest.raises(InvalidSignalError):
        QueueControl(context).apply(payload)


def test_pkill_sets_cancel_flag_and_wakes_owner() -> None:
    context, woken, _ = _context()
    control = QueueControl(context)
    table = context.table
    pid = os.getpid()
    table.register_worker(0, pid, os.urandom(16))
    entry = table.take(table.queue_index("default"), pid, 1)[0]
    table.set_job(entry, 42, 1, 0, 0.0)

    assert control.apply({"action": "pkill", "job_id": 42})

    assert table.cancel_requested(entry)
    assert woken == [0]


def test_pkill_for_job_running_elsewhere_is_ignored() -> None:
    context, woken, _ = _context()

    assert not QueueControl(context).apply({"action": "pkill", "job_id": 77})
    assert woken == []


def test_unknown_action_is_ignored() -> None:
    context, woken, _ = _context()

    assert not QueueControl(context).apply({"action": "pkill_all", "queue": "default"})
    assert woken == []


# The listener, against PostgreSQL


def _gzip64(payload: dict[str, Any]) -> str:
    return base64.b64encode(gzip.compress(json.dumps(payload).encode())).decode()


@pytest.fixture
async def listener(dsn: str, prefix: str):
    context, _, _ = _context(dsn=dsn, prefix=prefix)
    service = SignalListener(context)
    service.start()
    await asyncio.wait_for(service.listening.wait(), 10)
    yield service
    await service.stop()


async def _notify(conn: asyncpg.Connection, prefix: str, payload: str) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", f"{prefix}.oban_signal", payload)


@pytest.mark.parametrize(
    "encode",
    [json.dumps, _gzip64, lambda payload: "Z:" + _gzip64(payload)],
    ids=["plain", "gzip_base64", "z_prefix"],
)
async def test_listener_reads_every_payload_form(listener: SignalListener, conn, prefix: str, encode) -> None:
    table = listener.context.table
    index = table.queue_index("mailers")

    await _notify(conn, prefix, encode({"action": "pause", "queue": "mailers", "ident": "any"}))

    await wait_for(lambda: table.paused(index), timeout=5)


async def test_started_instance_hears_signals(dsn: str, prefix: str, conn) -> None:
    async with Oban(dsn=dsn, prefix=prefix, queues={"default": 1}) as oban:
        table = oban._runtime.slots
        await _notify(conn, prefix, json.dumps({"action": "pause", "queue": "default", "ident": "any"}))

        await wait_for(lambda: table.paused(table.queue_index("default")), timeout=5)


async def test_listener_skips_bad_signals_and_keeps_listening(listener: SignalListener, conn, prefix: str) -> None:
    table = listener.context.table
    index = table.queue_index("default")

    await _notify(conn, prefix, "not a payload")
    await _notify(conn, prefix, json.dumps({"action": "scale", "queue": "default", "limit": "many"}))
    await _notify(conn, prefix, json.dumps({"action": "scale", "queue": "default", "limit": 10_000}))
    await _notify(conn, prefix, json.dumps({"action": "pause", "queue": "default", "ident": "Oban.other"}))
    await _notify(conn, prefix, json.dumps({"action": "scale", "queue": "default", "limit": 9}))

    await wait_for(lambda: table.limit(index) == 9, timeout=5)
    assert not table.paused(index)
    assert listener.applied == 1


# Nodes under obanpro start


async def _segment(node: Node) -> slots.Segment:
    def find() -> str | None:
        names = [name for name in slots.segment_names() if f".{node.pid}." in name]
        return names[0] if names else None

    return slots.attach(await wait_for(find, timeout=20))


async def _running_workers(table: _core.SlotTable, count: int) -> None:
    def ready() -> bool:
        states = [table.worker_state(index) for index in range(table.max_workers)]
        return states.count(_core.WORKER_RUNNING) == count

    await wait_for(ready, timeout=20)


async def _until(condition: Callable[[], bool], send: Callable[[], Awaitable[None]], timeout: float = 20.0) -> None:
    """Send a signal until ``condition`` holds, because the node may not be listening yet."""
    deadline = time.monotonic() + timeout
    while True:
        await send()
        resend = time.monotonic() + 0.5
        while time.monotonic() < resend:
            if condition():
                return
            await asyncio.sleep(0.02)
        if time.monotonic() > deadline:
            raise AssertionError(f"signal had no effect within {timeout} s")


async def _states(conn: asyncpg.Connection, prefix: str) -> dict[str, int]:
    rows = await conn.fetch(f"SELECT state::text, count(*) FROM {prefix}.oban_jobs GROUP BY 1")
    return {row[0]: row[1] for row in rows}


async def _job_state(conn: asyncpg.Connection, prefix: str, job_id: int) -> str:
    return await conn.fetchval(f"SELECT state::text FROM {prefix}.oban_jobs WHERE id = $1", job_id)


@pytest.mark.slow
async def test_pause_holds_for_every_process(start_node, oban: Oban, conn, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:4", "-p", "2", "--node", "n1")
    segment = await _segment(node)
    table = segment.table
    index = table.queue_index("default")
    await _running_workers(table, 2)

    await _until(lambda: table.paused(index), lambda: oban.pause_queue("default"))
    jobs = await oban.enqueue_many([workers.Noop.new({"i": i}) for i in range(8)])
    # Both processes poll every second; three seconds cover several polls of each.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert await _states(conn, prefix) == {"available": 8}
        await asyncio.sleep(0.1)

    await oban.resume_queue("default")

    await wait_for(lambda: _all_in(conn, prefix, "completed", len(jobs)), timeout=20)
    assert not table.paused(index)


async def _all_in(conn: asyncpg.Connection, prefix: str, state: str, count: int) -> bool:
    return await _states(conn, prefix) == {state: count}


async def test_signal_for_one_node_leaves_others(start_node, oban: Oban, prefix: str) -> None:
    first = await _segment(start_node("start", "--import", "tests.workers", "-q", "default:2", "-p", "1", "--node", "n1"))
    second = await _segment(start_node("start", "--import", "tests.workers", "-q", "default:2", "-p", "1", "--node", "n2"))
    index = first.table.queue_index("default")

    await _until(lambda: first.table.paused(index), lambda: oban.pause_all_queues(node="n1"))
    await _until(lambda: second.table.limit(index) == 7, lambda: oban.scale_queue(queue="default", limit=7, node="n2"))

    assert not second.table.paused(index)
    assert first.table.limit(index) == 2

    await _until(lambda: not first.table.paused(index), lambda: oban.resume_all_queues())
    assert not second.table.paused(index)


def _held_job_ids(table: _core.SlotTable, index: int) -> set[int]:
    return {entry["job_id"] for entry in table.running(index) if entry["job_id"] > 0}


def _intervals(rows: list[asyncpg.Record]) -> list[tuple[float, float]]:
    values = [erlang_term.decode_base64(json.loads(row["meta"])["return"]) for row in rows]
    return [(value["start"], value["stop"]) for value in values]


def _max_overlap(intervals: list[tuple[float, float]], since: float = float("-inf")) -> int:
    events = []
    for start, stop in intervals:
        if stop <= since:
            continue
        events.append((max(start, since), 1))
        events.append((stop, -1))

    # At equal times a stop comes first, since a slot is released before it is taken again.
    running = highest = 0
    for _time, change in sorted(events, key=lambda event: (event[0], event[1])):
        running += change
        highest = max(highest, running)
    return highest


@pytest.mark.slow
async def test_scale_down_lets_jobs_finish_and_holds_limit(start_node, oban: Oban, conn, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:6", "-p", "2", "--node", "n1")
    segment = await _segment(node)
    table = segment.table
    index = table.queue_index("default")
    await _running_workers(table, 2)

    await oban.enqueue_many([workers.Sleep.new({"seconds": 1.0, "i": i}) for i in range(12)])
    # A taken slot gets its job id a moment later, so wait for six ids rather than six taken slots.
    await wait_for(lambda: len(_held_job_ids(table, index)) == 6, timeout=20)

    await _until(lambda: table.limit(index) == 2, lambda: oban.scale_queue(queue="default", limit=2))
    held_ids = _held_job_ids(table, index)
    enabled_samples = set()
    while not await _all_in(conn, prefix, "completed", 12):
        enabled_samples.add(table.counts(index)[2])
        await asyncio.sleep(0.02)

    rows = await conn.fetch(f"SELECT id, attempt, meta FROM {prefix}.oban_jobs")
    assert {row["attempt"] for row in rows} == {1}
    # The jobs holding a slot when the limit dropped run on; every later job waits for the new limit.
    before = _intervals([row for row in rows if row["id"] in held_ids])
    after = _intervals([row for row in rows if row["id"] not in held_ids])
    intervals = before + after
    assert len(held_ids) == 6
    assert after
    assert _max_overlap(after) <= 2
    assert _max_overlap(intervals, since=max(stop for _start, stop in before)) <= 2
    assert enabled_samples == {2}


@pytest.mark.slow
async def test_start_and_stop_queue_on_node(start_node, oban: Oban, conn, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:2", "-p", "2", "--node", "n1")
    segment = await _segment(node)
    table = segment.table
    await _running_workers(table, 2)
    first = await workers.Noop.enqueue(queue="extra")

    await _until(lambda: table.queue_index("extra") >= 0, lambda: oban.start_queue(queue="extra", limit=3))
    await wait_for(lambda: _is(conn, prefix, first.id, "completed"), timeout=20)
    index = table.queue_index("extra")
    assert table.limit(index) == 3

    await _until(lambda: table.queue_state(index) == _core.QUEUE_STOPPED, lambda: oban.stop_queue("extra"))
    second = await workers.Noop.enqueue(queue="extra")
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert await _job_state(conn, prefix, second.id) == "available"
        await asyncio.sleep(0.1)

    await oban.start_queue(queue="extra", limit=1)
    await wait_for(lambda: _is(conn, prefix, second.id, "completed"), timeout=20)
    assert table.limit(index) == 1
    assert table.queue_state(index) == _core.QUEUE_RUNNING


async def _is(conn: asyncpg.Connection, prefix: str, job_id: int, state: str) -> bool:
    return await _job_state(conn, prefix, job_id) == state
