"""The lifeline: rescuing executing jobs whose producer is gone, and never those of a live one."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from obanpro import telemetry
from obanpro.leader import Leader
from obanpro.lifeline import Lifeline
from obanpro.oban import Oban

from . import workers
from .conftest import wait_for


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=6)
    yield pool
    await pool.close()


async def _executing(
    conn: asyncpg.Connection,
    prefix: str,
    producer: str,
    attempted_ago: str,
    *,
    attempt: int = 1,
    max_attempts: int = 3,
    meta: dict | None = None,
) -> int:
    """Insert an executing job fetched by ``producer`` the interval ``attempted_ago`` in the past."""
    return await conn.fetchval(
        f"""
        INSERT INTO {prefix}.oban_jobs (state, worker, attempt, max_attempts, meta, attempted_by, attempted_at)
        VALUES ('executing', 'tests.workers.Noop', $1, $2, $3::jsonb, ARRAY['web-1', $4],
                timezone('UTC', now()) - $5::text::interval)
        RETURNING id
        """,
        attempt,
        max_attempts,
        json.dumps(meta or {}),
        producer,
        attempted_ago,
    )


async def _producer(conn: asyncpg.Connection, prefix: str, updated_ago: str) -> str:
    """Insert a producer row last heartbeated ``updated_ago`` (an interval) ago; return its uuid."""
    producer = str(uuid.uuid4())
    await conn.execute(
        f"""
        INSERT INTO {prefix}.oban_producers (uuid, name, node, queue, updated_at)
        VALUES ($1::uuid, 'Oban', 'web-1', 'default', timezone('UTC', now()) - $2::text::interval)
        """,
        producer,
        updated_ago,
    )
    return producer


async def _job(conn: asyncpg.Connection, prefix: str, job_id: int) -> asyncpg.Record:
    return await conn.fetchrow(
        f"SELECT state::text, attempt, meta, errors, discarded_at FROM {prefix}.oban_jobs WHERE id = $1", job_id
    )


async def test_fresh_producer_protects_old_job(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    producer = await _producer(conn, prefix, "5 seconds")
    job_id = await _executing(conn, prefix, producer, "2 hours")

    assert await Lifeline(pool, prefix).rescue() == []
    assert (await _job(conn, prefix, job_id))["state"] == "executing"


async def test_stale_producer_job_rescued(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    producer = await _producer(conn, prefix, "2 minutes")
    job_id = await _executing(conn, prefix, producer, "10 minutes")

    assert await Lifeline(pool, prefix).rescue() == [(job_id, "available")]

    row = await _job(conn, prefix, job_id)
    assert row["state"] == "available"
    assert row["attempt"] == 1
    assert json.loads(row["meta"]) == {"rescued": 1}
    assert json.loads(row["errors"]) == []


async def test_missing_producer_waits_rescue_after(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    old = await _executing(conn, prefix, str(uuid.uuid4()), "6 minutes")
    recent = await _executing(conn, prefix, str(uuid.uuid4()), "4 minutes")
    unnamed = await conn.fetchval(
        f"INSERT INTO {prefix}.oban_jobs (state, worker, attempt, attempted_at) "
        "VALUES ('executing', 'w', 1, timezone('UTC', now()) - interval '1 hour') RETURNING id"
    )

    rescued = await Lifeline(pool, prefix, rescue_after=300).rescue()

    assert sorted(rescued) == [(old, "available"), (unnamed, "available")]
    assert (await _job(conn, prefix, recent))["state"] == "executing"


async def test_stale_producer_waits_rescue_after(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    producer = await _producer(conn, prefix, "10 minutes")
    job_id = await _executing(conn, prefix, producer, "1 minute")

    assert await Lifeline(pool, prefix, rescue_after=300).rescue() == []
    assert (await _job(conn, prefix, job_id))["state"] == "executing"


async def test_producer_max_age_decides_staleness(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    producer = await _producer(conn, prefix, "90 seconds")
    job_id = await _executing(conn, prefix, producer, "10 minutes")

    assert await Lifeline(pool, prefix, producer_max_age=120).rescue() == []
    assert await Lifeline(pool, prefix, producer_max_age=60).rescue() == [(job_id, "available")]


async def test_last_attempt_discarded(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    producer = str(uuid.uuid4())
    job_id = await _executing(conn, prefix, producer, "10 minutes", attempt=3, max_attempts=3)

    assert await Lifeline(pool, prefix).rescue() == [(job_id, "discarded")]

    row = await _job(conn, prefix, job_id)
    assert row["discarded_at"] is not None
    assert json.loads(row["meta"]) == {"rescued": 1}
    errors = json.loads(row["errors"])
    assert len(errors) == 1
    assert errors[0]["attempt"] == 3
    assert producer in errors[0]["error"]
    assert "no attempts left" in errors[0]["error"]
    assert errors[0]["at"].endswith("+00:00")


@pytest.mark.parametrize(("meta", "expected"), [({"rescued": 2, "k": "v"}, {"rescued": 3, "k": "v"}), ({"rescued": "x"}, {"rescued": 1})])
async def test_rescued_count_increments(
    pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection, meta: dict, expected: dict
) -> None:
    job_id = await _executing(conn, prefix, str(uuid.uuid4()), "10 minutes", meta=meta)

    await Lifeline(pool, prefix).rescue()

    assert json.loads((await _job(conn, prefix, job_id))["meta"]) == expected


async def test_locked_job_skipped(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection, dsn: str) -> None:
    job_id = await _executing(conn, prefix, str(uuid.uuid4()), "10 minutes")
    holder = await asyncpg.connect(dsn)
    try:
        transaction = holder.transaction()
        await transaction.start()
        # An ack in flight locks the row, then completes the job.
        await holder.execute(
            f"UPDATE {prefix}.oban_jobs SET state = 'completed', completed_at = timezone('UTC', now()) WHERE id = $1",
            job_id,
        )

        assert await asyncio.wait_for(Lifeline(pool, prefix).rescue(), timeout=10) == []
        await transaction.commit()
    finally:
        await holder.close()

    assert await Lifeline(pool, prefix).rescue() == []
    assert (await _job(conn, prefix, job_id))["state"] == "completed"


async def test_follower_rescues_nothing(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    job_id = await _executing(conn, prefix, str(uuid.uuid4()), "10 minutes")
    follower = Leader(pool, prefix, name="Oban", node="web-1", enabled=False)
    follower.start()

    assert await Lifeline(pool, prefix, leader=follower).rescue() == []
    assert (await _job(conn, prefix, job_id))["state"] == "executing"


async def test_rescue_telemetry(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    await _executing(conn, prefix, str(uuid.uuid4()), "10 minutes")
    await _executing(conn, prefix, str(uuid.uuid4()), "10 minutes")
    events: list[dict] = []
    telemetry.attach("test-lifeline", ["oban.lifeline.rescue.stop"], lambda _name, meta: events.append(meta))
    try:
        await Lifeline(pool, prefix).rescue()
    finally:
        telemetry.detach("test-lifeline")

    assert [event["rescued_count"] for event in events] == [2]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"interval": 0}, ValueError, "invalid lifeline interval 0: must be a positive number of seconds"),
        ({"rescue_after": "5m"}, TypeError, "invalid lifeline rescue_after '5m'"),
        ({"producer_max_age": float("nan")}, ValueError, "invalid lifeline producer_max_age nan"),
    ],
)
def test_invalid_options(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        Lifeline(None, "public", **options)  # type: ignore[arg-type]


async def test_live_embedded_job_never_rescued(dsn: str, prefix: str, conn: asyncpg.Connection) -> None:
    # rescue_after is far below the job's run time: only the producer row protects it.
    oban = Oban(
        dsn=dsn,
        prefix=prefix,
        queues={"default": 2},
        import_roots=["tests"],
        lifeline={"interval": 0.1, "rescue_after": 0.2},
        refresher={"interval": 0.5, "max_age": 2.0},
    )
    await oban.start()
    try:
        await wait_for(lambda: oban._services.leader.is_leader)
        job = await workers.Sleep.enqueue({"seconds": 3.0})

        async def finished() -> asyncpg.Record | None:
            row = await conn.fetchrow(f"SELECT state::text, attempt, meta FROM {prefix}.oban_jobs WHERE id = $1", job.id)
            return row if row["state"] == "completed" else None

        row = await wait_for(finished, timeout=15)
    finally:
        await oban.stop()

    assert row["attempt"] == 1
    assert "rescued" not in json.loads(row["meta"])
