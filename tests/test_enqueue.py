"""Inserting jobs: single, bulk, transactional, scheduled, and bad input."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import pytest

from obanpro import oban as oban_module
from obanpro.oban import Oban
from obanpro.notifier import channel_name

from . import workers
from .conftest import job_states


@pytest.fixture(params=["insert", "copy"])
def insert_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once through each way a batch is written: INSERT ... SELECT unnest, and COPY."""
    monkeypatch.setattr(oban_module, "COPY_MIN_BATCH", 1 if request.param == "copy" else 1_000_000)
    return request.param


async def test_enqueue_returns_inserted_job(oban: Oban, conn: asyncpg.Connection, prefix: str, insert_path: str) -> None:
    job = await workers.Noop.enqueue({"a": 1}, priority=3, tags=["B", " a ", "b", ""], meta={"m": True}, max_attempts=7)

    row = await conn.fetchrow(f"SELECT * FROM {prefix}.oban_jobs WHERE id = $1", job.id)
    assert row["worker"] == "tests.workers.Noop"
    assert row["state"] == "available"
    assert row["priority"] == 3
    assert row["max_attempts"] == 7
    assert row["tags"] == ["a", "b"]
    assert row["args"] == '{"a": 1}'
    assert row["meta"] == '{"m": true}'
    assert job.state == "available"
    assert job.inserted_at.tzinfo is not None


@pytest.mark.parametrize(("count", "inserts", "reservations"), [(150, 1, 0), (2_000, 0, 1)], ids=["insert", "copy"])
async def test_enqueue_many_writes_one_batch(
    oban: Oban, conn: asyncpg.Connection, prefix: str, count: int, inserts: int, reservations: int
) -> None:
    statements: list[str] = []

    async with oban.pool.acquire() as pooled:
        pooled.add_query_logger(lambda record: statements.append(record.query))
        jobs = await oban.enqueue_many([workers.Noop.new({"i": i}) for i in range(count)], conn=pooled)

    # A COPY does not reach the query logger, but the statement that reserves its ids does.
    assert sum(f"INSERT INTO {prefix}.oban_jobs" in statement for statement in statements) == inserts
    assert sum("nextval" in statement for statement in statements) == reservations
    assert [job.args["i"] for job in jobs] == list(range(count))
    assert [job.id for job in jobs] == sorted(job.id for job in jobs)
    rows = await conn.fetch(f"SELECT id, args->>'i' AS i FROM {prefix}.oban_jobs ORDER BY id")
    assert [(row["id"], int(row["i"])) for row in rows] == [(job.id, job.args["i"]) for job in jobs]


async def test_enqueue_many_accepts_varargs(oban: Oban) -> None:
    jobs = await oban.enqueue_many(workers.Noop.new(), workers.Noop.new())

    assert len(jobs) == 2
    assert all(job.id for job in jobs)


async def test_enqueue_many_sets_fields_as_stored(oban: Oban, conn: asyncpg.Connection, prefix: str, insert_path: str) -> None:
    now = datetime.now(UTC)
    jobs = [
        workers.Noop.new(),
        workers.Noop.new(scheduled_at=now - timedelta(minutes=5)),
        workers.Noop.new(scheduled_at=now + timedelta(minutes=5)),
        workers.Noop.new(),
    ]
    jobs[3].scheduled_at = (now + timedelta(hours=2)).replace(tzinfo=None)  # naive, set after construction: UTC

    await oban.enqueue_many(jobs)

    rows = await conn.fetch(
        f"SELECT id, state::text, inserted_at, scheduled_at FROM {prefix}.oban_jobs WHERE id = ANY($1) ORDER BY id",
        [job.id for job in jobs],
    )
    assert [row["id"] for row in rows] == [job.id for job in jobs]
    for job, row in zip(jobs, rows):
        assert job.state == row["state"]
        assert job.inserted_at == row["inserted_at"].replace(tzinfo=UTC)
        assert job.scheduled_at == row["scheduled_at"].replace(tzinfo=UTC)
    assert [job.state for job in jobs] == ["available", "available", "scheduled", "scheduled"]
    assert jobs[0].scheduled_at == jobs[0].inserted_at


async def test_tags_set_later_are_normalised(oban: Oban, conn: asyncpg.Connection, prefix: str, insert_path: str) -> None:
    job = workers.Noop.new()
    job.tags = ["Beta", 7, " alpha ", "beta"]

    await oban.enqueue_many([job])

    assert job.tags == ["7", "alpha", "beta"]
    assert await conn.fetchval(f"SELECT tags FROM {prefix}.oban_jobs WHERE id = $1", job.id) == ["7", "alpha", "beta"]


async def test_schedule_in_makes_job_scheduled(oban: Oban) -> None:
    later = await workers.Noop.enqueue(schedule_in=60)
    at = await workers.Noop.enqueue(scheduled_at=datetime.now(UTC) + timedelta(hours=1))
    past = await workers.Noop.enqueue(scheduled_at=datetime.now(UTC) - timedelta(hours=1))

    assert later.state == "scheduled"
    assert at.state == "scheduled"
    assert past.state == "available"
    assert abs((later.scheduled_at - datetime.now(UTC)).total_seconds() - 60) < 5


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([1, 2], "expected a JSON object"),
        ("text", "expected a JSON object"),
        ({"when": datetime(2020, 1, 1)}, "args['when'] (datetime is not JSON-serialisable)"),
        ({"outer": {"inner": {1, 2}}}, "args['outer']['inner'] (set is not JSON-serialisable)"),
        ({"nan": float("nan")}, "args['nan']"),
        ({1: "int key"}, "keys must be strings"),
        ({"a": 1, 2: "second key"}, "keys must be strings"),
        ({"rows": [{3: "nested"}]}, "keys must be strings"),
        ({"text": "{[", 4: "after brackets in a string"}, "keys must be strings"),
    ],
)
async def test_bad_args_raise_and_insert_nothing(
    oban: Oban, conn: asyncpg.Connection, prefix: str, args: object, fragment: str, insert_path: str
) -> None:
    good = workers.Noop.new({"ok": True})
    bad = workers.Noop.new()
    bad.args = args

    with pytest.raises(ValueError) as raised:
        await oban.enqueue_many([good, bad])

    assert fragment in str(raised.value)
    assert await job_states(conn, prefix) == {}


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("priority", 10, ValueError),
        ("priority", -1, ValueError),
        ("priority", "1", TypeError),
        ("max_attempts", 0, ValueError),
        ("priority", True, TypeError),
        ("max_attempts", 2.0, TypeError),
        ("queue", "", ValueError),
        ("queue", " \t ", ValueError),
        ("queue", 7, TypeError),
        ("queue", "q" * 128, ValueError),
        ("tags", "one", TypeError),
        ("queue", "mail\x00", ValueError),
        ("queue", "mail\ud800", ValueError),
        ("tags", ["a\x00b"], ValueError),
        ("tags", ["\udc00"], ValueError),
        ("scheduled_at", "2030-01-01", TypeError),
        ("scheduled_at", datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))), ValueError),
    ],
)
def test_invalid_field_names_it(field: str, value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=field):
        workers.Noop.new({}, **{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [("queue", "q\x00"), ("worker", "w\udfff"), ("tags", ["ok", "bad\x00"]), ("scheduled_at", "tomorrow")],
)
async def test_bad_field_set_later_raises_at_insert(
    oban: Oban, conn: asyncpg.Connection, prefix: str, insert_path: str, field: str, value: object
) -> None:
    jobs = [workers.Noop.new({"i": i}) for i in range(3)]
    setattr(jobs[1], field, value)

    with pytest.raises((TypeError, ValueError), match=f"invalid {field}"):
        await oban.enqueue_many(jobs)

    assert await job_states(conn, prefix) == {}


async def test_rollback_leaves_no_job_and_no_notification(oban: Oban, dsn: str, prefix: str, conn: asyncpg.Connection, insert_path: str) -> None:
    received: list[str] = []
    listener = await asyncpg.connect(dsn)
    await listener.add_listener(channel_name(prefix, "insert"), lambda *args: received.append(args[3]))

    try:
        async with oban.pool.acquire() as pooled:
            transaction = pooled.transaction()
            await transaction.start()
            await workers.Noop.enqueue({"x": 1}, conn=pooled)
            await transaction.rollback()

        await workers.Noop.enqueue({"after": True}, queue="marker")
        await _wait_until(lambda: received)
        assert received == ['{"queue":"marker"}']
        assert await job_states(conn, prefix) == {"available": 1}
    finally:
        await listener.close()


async def test_commit_notifies_each_queue_once(oban: Oban, dsn: str, prefix: str, insert_path: str) -> None:
    received: list[str] = []
    listener = await asyncpg.connect(dsn)
    await listener.add_listener(channel_name(prefix, "insert"), lambda *args: received.append(args[3]))

    try:
        async with oban.pool.acquire() as pooled, pooled.transaction():
            await oban.enqueue_many([workers.Noop.new(queue="a") for _ in range(5)] + [workers.Noop.new(queue="b")], conn=pooled)
            await workers.Noop.enqueue(queue="later", schedule_in=60, conn=pooled)
            await asyncio.sleep(0.1)
            assert received == []

        await _wait_until(lambda: len(received) >= 2)
        assert sorted(received) == ['{"queue":"a"}', '{"queue":"b"}']
    finally:
        await listener.close()


async def test_large_args_do_not_reach_the_notification(oban: Oban, dsn: str, prefix: str, conn: asyncpg.Connection) -> None:
    received: list[str] = []
    listener = await asyncpg.connect(dsn)
    await listener.add_listener(channel_name(prefix, "insert"), lambda *args: received.append(args[3]))

    try:
        job = await workers.Noop.enqueue({"blob": "x" * 5_000_000})
        await _wait_until(lambda: received)
        assert all(len(payload) < 100 for payload in received)
        assert await conn.fetchval(f"SELECT length(args->>'blob') FROM {prefix}.oban_jobs WHERE id = $1", job.id) == 5_000_000
    finally:
        await listener.close()


async def test_worker_enqueue_without_instance_explains() -> None:
    with pytest.raises(RuntimeError, match="no started Oban instance named 'Oban'"):
        await workers.Noop.enqueue()


async def test_function_job_binds_arguments(oban: Oban) -> None:
    job = await workers.add.enqueue(1, b=2)

    assert job.args == {"a": 1, "b": 2}
    assert job.worker == "tests.workers.add"
    with pytest.raises(TypeError, match="tests.workers.add"):
        workers.add.new(1, 2, 3)


async def _wait_until(condition, timeout: float = 5.0) -> None:
    from .conftest import wait_for

    await wait_for(condition, timeout)
