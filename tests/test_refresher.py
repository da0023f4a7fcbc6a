"""Producer rows: one per live worker process and queue, heartbeated, and removed when gone."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from obanpro import _core, telemetry
from obanpro.leader import Leader
from obanpro.oban import Oban
from obanpro.refresher import Refresher, live_producers

from . import workers
from .conftest import wait_for


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=6)
    yield pool
    await pool.close()


def _table(workers_count: int = 3) -> _core.SlotTable:
    """A private table with queues default:5 and mailers:2 and ``workers_count`` registered workers."""
    table = _core.SlotTable.format(bytearray(_core.table_size(8, workers_count, 2048)), "web-1", 8, workers_count, 2048, 1)
    table.add_queue("default", 5, 256)
    table.add_queue("mailers", 2, 256, True)
    for index in range(workers_count):
        table.register_worker(index, 1000 + index, uuid.uuid4().bytes)
    return table


def _refresher(pool: asyncpg.Pool, prefix: str, table: _core.SlotTable, **options) -> Refresher:
    options.setdefault("name", "Oban")
    options.setdefault("node", "web-1")
    return Refresher(pool, prefix, table=table, **options)


async def _rows(conn: asyncpg.Connection, prefix: str) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch(f"SELECT uuid::text, name, node, queue, meta, started_at, updated_at FROM {prefix}.oban_producers")
    return {row["uuid"]: row for row in rows}


def test_live_producers_match_fetch_uuids() -> None:
    table = _table(2)

    rows = live_producers(table)

    expected = {}
    for index in range(2):
        worker_uuid = uuid.UUID(bytes=table.worker(index)["uuid"])
        for queue, limit, paused in (("default", 5, False), ("mailers", 2, True)):
            meta = {"local_limit": limit, "paused": paused, "pid": 1000 + index, "process": index}
            expected[str(uuid.uuid5(worker_uuid, queue))] = (queue, meta)
    assert rows == expected


def test_live_producers_skip_gone_workers_and_stopped_queues() -> None:
    table = _table(3)
    table.clear_worker(1)
    table.set_queue_state(table.queue_index("mailers"), _core.QUEUE_STOPPED)

    rows = live_producers(table)

    assert sorted((queue, meta["process"]) for queue, meta in rows.values()) == [("default", 0), ("default", 2)]


def test_stopped_queue_with_running_job_kept() -> None:
    table = _table(1)
    default = table.queue_index("default")
    [entry] = table.take(default, 1000, 1)
    table.set_job(entry, 42, 1, 0, 0.0)
    table.set_queue_state(default, _core.QUEUE_STOPPED)
    table.set_queue_state(table.queue_index("mailers"), _core.QUEUE_STOPPED)

    assert [queue for queue, _meta in live_producers(table).values()] == ["default"]


async def test_refresh_writes_rows(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    table = _table(2)
    refresher = _refresher(pool, prefix, table)

    counts = await refresher.refresh()

    assert counts == {"refreshed_count": 4, "restored_count": 0, "deleted_count": 0}
    rows = await _rows(conn, prefix)
    assert set(rows) == set(live_producers(table))
    for producer, (queue, meta) in live_producers(table).items():
        assert rows[producer]["name"] == "Oban"
        assert rows[producer]["node"] == "web-1"
        assert rows[producer]["queue"] == queue
        assert json.loads(rows[producer]["meta"]) == meta


async def test_refresh_heartbeats(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    refresher = _refresher(pool, prefix, _table(1))
    await refresher.refresh()
    before = await _rows(conn, prefix)

    await refresher.refresh()

    after = await _rows(conn, prefix)
    for producer, row in after.items():
        assert row["started_at"] == before[producer]["started_at"]
        assert row["updated_at"] > before[producer]["updated_at"]


async def test_gone_worker_rows_deleted(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    table = _table(2)
    refresher = _refresher(pool, prefix, table)
    await refresher.refresh()
    gone = {producer for producer, (_queue, meta) in live_producers(table).items() if meta["process"] == 1}

    table.clear_worker(1)
    table.register_worker(1, 2000, uuid.uuid4().bytes)
    counts = await refresher.refresh()

    assert counts["deleted_count"] == 2
    rows = await _rows(conn, prefix)
    assert not gone & set(rows)
    assert set(rows) == set(live_producers(table))
    assert sorted(json.loads(row["meta"])["pid"] for row in rows.values()) == [1000, 1000, 2000, 2000]


async def test_missing_row_restored(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    refresher = _refresher(pool, prefix, _table(1))
    await refresher.refresh()
    await conn.execute(f"DELETE FROM {prefix}.oban_producers WHERE queue = 'mailers'")

    counts = await refresher.refresh()

    assert counts["restored_count"] == 1
    assert sorted(row["queue"] for row in (await _rows(conn, prefix)).values()) == ["default", "mailers"]


async def test_loop_writes_changes_promptly(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    table = _table(1)
    refresher = _refresher(pool, prefix, table, interval=30, max_age=120, poll_interval=0.05)
    refresher.start()
    try:
        await wait_for(lambda: _row_count(conn, prefix, 2))
        table.scale(table.queue_index("default"), 9)
        table.set_paused(table.queue_index("default"), True)

        async def scaled() -> bool:
            rows = await _rows(conn, prefix)
            metas = [json.loads(row["meta"]) for row in rows.values() if row["queue"] == "default"]
            return metas == [{"local_limit": 9, "paused": True, "pid": 1000, "process": 0}]

        await wait_for(scaled, timeout=5)
    finally:
        await refresher.stop()

    assert await _rows(conn, prefix) == {}


async def _row_count(conn: asyncpg.Connection, prefix: str, count: int) -> bool:
    return await conn.fetchval(f"SELECT count(*) FROM {prefix}.oban_producers") == count


async def test_stop_keeps_other_instance_rows(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    # A previous run with the same node name, still draining, keeps its rows.
    previous = _refresher(pool, prefix, _table(1))
    current = _refresher(pool, prefix, _table(1))
    await previous.refresh()
    await current.refresh()

    await current.stop()

    assert set(await _rows(conn, prefix)) == set(previous.written)


async def test_cleanup_by_leader_only(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    await conn.execute(
        f"""
        INSERT INTO {prefix}.oban_producers (uuid, name, node, queue, updated_at) VALUES
            (gen_random_uuid(), 'Oban', 'gone-1', 'default', timezone('UTC', now()) - interval '5 minutes'),
            (gen_random_uuid(), 'Oban', 'live-1', 'default', timezone('UTC', now()) - interval '10 seconds')
        """
    )
    leader = Leader(pool, prefix, name="Oban", node="web-1", enabled=False)
    leader.start()

    assert await _refresher(pool, prefix, _table(1), leader=leader).cleanup() == 0
    assert await leader.elect() is True
    assert await _refresher(pool, prefix, _table(1), leader=leader).cleanup() == 1

    assert [row["node"] for row in (await _rows(conn, prefix)).values()] == ["live-1"]
    await leader.stop()


async def test_telemetry(pool: asyncpg.Pool, prefix: str) -> None:
    events: list[tuple[str, dict]] = []
    telemetry.attach(
        "test-refresher",
        ["oban.refresher.refresh.stop", "oban.refresher.cleanup.stop"],
        lambda name, meta: events.append((name, meta)),
    )
    try:
        refresher = _refresher(pool, prefix, _table(1))
        await refresher.refresh()
        await refresher.cleanup()
    finally:
        telemetry.detach("test-refresher")

    assert [name for name, _meta in events] == ["oban.refresher.refresh.stop", "oban.refresher.cleanup.stop"]
    assert events[0][1]["refreshed_count"] == 2
    assert events[1][1]["cleanup_count"] == 0


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"interval": 60, "max_age": 60}, ValueError, "invalid refresher interval 60: it must be below max_age 60"),
        ({"interval": 0}, ValueError, "invalid refresher interval 0"),
        ({"max_age": "1m"}, TypeError, "invalid refresher max_age '1m'"),
    ],
)
def test_invalid_options(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        Refresher(None, "public", name="Oban", node="web-1", table=_table(1), **options)  # type: ignore[arg-type]


async def test_embedded_rows_match_attempted_by(dsn: str, prefix: str, conn: asyncpg.Connection) -> None:
    oban = Oban(dsn=dsn, prefix=prefix, queues={"default": 2}, import_roots=["tests"], node="embedded-1")
    await oban.start()
    try:
        job = await workers.Sleep.enqueue({"seconds": 1.0})

        async def attempted_by() -> list[str] | None:
            row = await conn.fetchrow(f"SELECT state::text, attempted_by FROM {prefix}.oban_jobs WHERE id = $1", job.id)
            return row["attempted_by"] if row["state"] == "executing" else None

        node, producer = await wait_for(attempted_by)
        rows = await wait_for(lambda: _rows(conn, prefix))
    finally:
        await oban.stop()

    assert node == "embedded-1"
    assert rows[producer]["node"] == "embedded-1"
    assert rows[producer]["queue"] == "default"
    assert json.loads(rows[producer]["meta"]) == {"local_limit": 2, "paused": False, "pid": os.getpid(), "process": 0}
    assert await _rows(conn, prefix) == {}


async def test_node_rows_follow_worker_processes(
    prefix: str, conn: asyncpg.Connection, start_node, tmp_path: Path
) -> None:
    config = tmp_path / "obanpro.toml"
    config.write_text("[refresher]\ninterval = 0.5\nmax_age = 10\n")
    node = start_node(
        "start", "--config", str(config), "-p", "2", "-q", "default:4,mailers:1", "--import", "tests.workers", "--node", "rows-1"
    )

    async def rows_for_children() -> dict | None:
        rows = await _rows(conn, prefix)
        pids = {json.loads(row["meta"])["pid"] for row in rows.values()}
        return rows if len(rows) == 4 and len(pids) == 2 and pids <= set(node.children()) else None

    first = await wait_for(rows_for_children, timeout=20)
    victim = json.loads(next(iter(first.values()))["meta"])["pid"]
    os.kill(victim, signal.SIGKILL)

    async def replaced() -> dict | None:
        rows = await rows_for_children()
        return rows if rows and victim not in {json.loads(row["meta"])["pid"] for row in rows.values()} else None

    second = await wait_for(replaced, timeout=20)
    assert len(set(first) & set(second)) == 2
    assert {row["node"] for row in second.values()} == {"rows-1"}
    assert sorted(row["queue"] for row in second.values()) == ["default", "default", "mailers", "mailers"]

    assert node.stop() == 0
    assert await _rows(conn, prefix) == {}

