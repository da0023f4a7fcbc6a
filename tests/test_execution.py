"""Running jobs in an embedded Oban: results, errors, retries, timeouts, bad rows."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from obanpro import acker, erlang_term
from obanpro.backoff import MAX_BACKOFF, clamp_backoff, default_backoff
from obanpro.oban import Oban

from . import workers
from .conftest import wait_for


@pytest.fixture
async def running(dsn: str, prefix: str):
    oban = Oban(dsn=dsn, prefix=prefix, queues={"default": 5}, import_roots=["tests"], grace_period=2)
    await oban.start()
    yield oban
    await oban.stop()


async def _row(conn: asyncpg.Connection, prefix: str, job_id: int) -> asyncpg.Record:
    return await conn.fetchrow(
        f"SELECT state::text, attempt, max_attempts, errors, meta, scheduled_at, attempted_by, completed_at "
        f"FROM {prefix}.oban_jobs WHERE id = $1",
        job_id,
    )


async def _settled(conn: asyncpg.Connection, prefix: str, job_id: int, states: tuple[str, ...]) -> asyncpg.Record:
    async def check() -> Any:
        row = await _row(conn, prefix, job_id)
        return row if row["state"] in states else None

    return await wait_for(check)


async def test_async_job_completes(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.Noop.enqueue()

    row = await _settled(conn, prefix, job.id, ("completed",))
    assert row["attempt"] == 1
    assert row["completed_at"] is not None
    assert row["attempted_by"][0] == running.node
    assert len(row["attempted_by"]) == 2


async def test_sync_and_function_jobs_complete(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    sync = await workers.SyncNoop.enqueue()
    function = await workers.add.enqueue(2, 3)
    async_function = await workers.async_add.enqueue(4, 5)

    await _settled(conn, prefix, sync.id, ("completed",))
    row = await _settled(conn, prefix, function.id, ("completed",))
    assert erlang_term.decode_base64(json.loads(row["meta"])["return"]) == 5
    row = await _settled(conn, prefix, async_function.id, ("completed",))
    assert erlang_term.decode_base64(json.loads(row["meta"])["return"]) == {"sum": 9, "attempt": 1}


async def test_record_stores_erlang_term(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.Recorder.enqueue({"value": {"rows": [1, 2], "ok": True, "name": "x"}})

    row = await _settled(conn, prefix, job.id, ("completed",))
    meta = json.loads(row["meta"])
    assert meta["recorded"] is True
    assert not meta["return"].endswith("=")
    assert erlang_term.decode_base64(meta["return"]) == {"rows": [1, 2], "ok": True, "name": "x"}


async def test_snooze_reschedules_without_attempt(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.Snoozer.enqueue({"seconds": 120, "meta": {"why": "busy"}})

    row = await _settled(conn, prefix, job.id, ("scheduled",))
    assert row["attempt"] == 0
    meta = json.loads(row["meta"])
    assert meta["snoozed"] == 1
    assert meta["why"] == "busy"
    delay = (row["scheduled_at"].replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds()
    assert 100 < delay <= 120


async def test_cancel_records_reason(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.Canceller.enqueue({"reason": "user left"})

    row = await _settled(conn, prefix, job.id, ("cancelled",))
    errors = json.loads(row["errors"])
    assert errors[-1]["error"] == "user left"
    assert errors[-1]["attempt"] == 1


async def test_exception_retries_with_backoff(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.Fail.enqueue({"note": "first"})

    row = await _settled(conn, prefix, job.id, ("retryable",))
    errors = json.loads(row["errors"])
    assert len(errors) == 1
    assert errors[0]["attempt"] == 1
    assert "ValueError: failing on purpose: first" in errors[0]["error"]
    assert datetime.fromisoformat(errors[0]["at"]).tzinfo is not None
    delay = (row["scheduled_at"].replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds()
    assert 10 < delay < 20


async def test_last_attempt_discards(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.Fail.enqueue({"note": "last"}, max_attempts=1)

    row = await _settled(conn, prefix, job.id, ("discarded",))
    assert row["attempt"] == 1
    assert "failing on purpose: last" in json.loads(row["errors"])[0]["error"]


async def test_custom_backoff_and_retry_until_success(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.FastRetry.enqueue({"succeed_on": 3})

    row = await wait_for(lambda: _done(conn, prefix, job.id), timeout=15)
    assert row["attempt"] == 3
    assert [entry["attempt"] for entry in json.loads(row["errors"])] == [1, 2]


async def _done(conn: asyncpg.Connection, prefix: str, job_id: int) -> Any:
    row = await _row(conn, prefix, job_id)
    return row if row["state"] == "completed" else None


async def test_timeout_fails_with_message(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.SlowAsync.enqueue({"seconds": 5})

    row = await _settled(conn, prefix, job.id, ("retryable",))
    assert json.loads(row["errors"])[0]["error"] == "timed out after 0.2 s"


async def test_array_args_fail_and_queue_continues(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    bad = await workers.Noop.enqueue()
    await conn.execute(f"UPDATE {prefix}.oban_jobs SET args = '[1, 2]', state = 'scheduled' WHERE id = $1", bad.id)
    await conn.execute(f"UPDATE {prefix}.oban_jobs SET state = 'available' WHERE id = $1", bad.id)
    good = await workers.Noop.enqueue()

    # No attempt can succeed with these args, so the job is discarded at once.
    row = await _settled(conn, prefix, bad.id, ("discarded",))
    assert "expected a JSON object, got list" in json.loads(row["errors"])[0]["error"]
    await _settled(conn, prefix, good.id, ("completed",))


async def test_unknown_worker_fails_and_retries(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job_id = await conn.fetchval(
        f"INSERT INTO {prefix}.oban_jobs (worker, queue, args) VALUES ('tests.missing_module.Gone', 'default', '{{}}') RETURNING id"
    )
    good = await workers.Noop.enqueue()

    row = await _settled(conn, prefix, job_id, ("retryable",))
    error = json.loads(row["errors"])[0]["error"]
    assert "unknown worker 'tests.missing_module.Gone'" in error
    await _settled(conn, prefix, good.id, ("completed",))


async def test_worker_outside_imports_is_never_imported(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    import sys

    job_id = await conn.fetchval(
        f"INSERT INTO {prefix}.oban_jobs (worker, queue, args) VALUES ('antigravity.Fly', 'default', '{{}}') RETURNING id"
    )

    row = await _settled(conn, prefix, job_id, ("retryable",))
    assert "outside the imported packages" in json.loads(row["errors"])[0]["error"]
    assert "antigravity" not in sys.modules


async def test_priority_orders_fetch(dsn: str, prefix: str, conn: asyncpg.Connection) -> None:
    async with Oban(dsn=dsn, prefix=prefix) as oban:
        jobs = await oban.enqueue_many([workers.Noop.new({"i": i}, priority=9 - i % 10) for i in range(10)])

    async with Oban(dsn=dsn, prefix=prefix, queues={"default": 1}):
        await wait_for(lambda: _count_completed(conn, prefix, 10))

    rows = await conn.fetch(f"SELECT priority FROM {prefix}.oban_jobs ORDER BY attempted_at, id")
    assert [row["priority"] for row in rows] == sorted(job.priority for job in jobs)


async def _count_completed(conn: asyncpg.Connection, prefix: str, expected: int) -> bool:
    return await conn.fetchval(f"SELECT count(*) FROM {prefix}.oban_jobs WHERE state = 'completed'") == expected


async def test_stager_runs_due_scheduled_jobs(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.Noop.enqueue(schedule_in=0.5)

    assert job.state == "scheduled"
    await _settled(conn, prefix, job.id, ("completed",))


async def test_stop_flushes_acks(dsn: str, prefix: str, conn: asyncpg.Connection) -> None:
    oban = Oban(dsn=dsn, prefix=prefix, queues={"default": 20}, grace_period=5)
    await oban.start()
    await oban.enqueue_many([workers.Sleep.new({"seconds": 0.3}) for _ in range(20)])
    await wait_for(lambda: _executing(conn, prefix, 20))

    await oban.stop()

    assert await _count_completed(conn, prefix, 20)


async def test_stop_runs_jobs_fetched_by_ack_in_flight(
    dsn: str, prefix: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ack of the first job also fetches the second. Holding that statement
    # until the node drains makes the second job start after the drain began.
    in_flight = asyncio.Event()
    original = acker._acquire

    @contextlib.asynccontextmanager
    async def slow_acquire(pool: asyncpg.Pool):
        async with original(pool) as pooled:
            in_flight.set()
            await asyncio.sleep(0.5)
            yield pooled

    monkeypatch.setattr(acker, "_acquire", slow_acquire)
    oban = Oban(dsn=dsn, prefix=prefix, queues={"default": 1}, grace_period=5)
    await oban.start()
    first, second = await oban.enqueue_many([workers.Sleep.new({"seconds": 0.05}) for _ in range(2)])
    await asyncio.wait_for(in_flight.wait(), 10)

    await oban.stop()

    rows = await conn.fetch(f"SELECT id, state::text, attempt FROM {prefix}.oban_jobs ORDER BY id")
    assert [(row["id"], row["state"], row["attempt"]) for row in rows] == [
        (first.id, "completed", 1),
        (second.id, "completed", 1),
    ]


async def _executing(conn: asyncpg.Connection, prefix: str, expected: int) -> bool:
    return await conn.fetchval(f"SELECT count(*) FROM {prefix}.oban_jobs WHERE state = 'executing'") == expected


def test_default_backoff_never_overflows() -> None:
    for attempt in (1, 5, 20, 21, 100, 10_000, 2**31):
        for max_attempts in (1, 20, 21, 32_767):
            delay = default_backoff(attempt, max_attempts)
            assert 15 <= delay <= (15 + 2**20) * 1.1


def test_clamp_backoff_bounds_values() -> None:
    assert clamp_backoff(-5) == 0
    assert clamp_backoff(10**30) == MAX_BACKOFF
    assert clamp_backoff(1.5) == 1.5
    with pytest.raises(TypeError, match="backoff must return seconds"):
        clamp_backoff("soon")
