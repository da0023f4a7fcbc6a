"""The pruner: which finished jobs it deletes, in bounded batches, without waiting on locks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from obanpro import telemetry
from obanpro.leader import Leader
from obanpro.pruner import Pruner

from .conftest import job_states, wait_for


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=8)
    yield pool
    await pool.close()


async def _insert(conn: asyncpg.Connection, prefix: str, state: str, count: int, age: str, worker: str = "w") -> None:
    """Insert ``count`` jobs in ``state`` whose timestamps all lie ``age`` (an interval) in the past."""
    await conn.execute(
        f"""
        INSERT INTO {prefix}.oban_jobs
            (state, worker, attempt, inserted_at, scheduled_at, attempted_at, completed_at, cancelled_at, discarded_at)
        SELECT $1::{prefix}.oban_job_state, $4,
               CASE WHEN $1 IN ('available', 'scheduled') THEN 0 ELSE 1 END,
               t, t, t,
               CASE WHEN $1 = 'completed' THEN t END,
               CASE WHEN $1 = 'cancelled' THEN t END,
               CASE WHEN $1 = 'discarded' THEN t END
        FROM generate_series(1, $2) i, LATERAL (SELECT timezone('UTC', now()) - $3::text::interval AS t) ts
        """,
        state,
        count,
        age,
        worker,
    )


class RecordingPool:
    """Passes calls to a pool and records the batch size of each prune statement."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.sizes: list[int] = []

    async def execute(self, sql: str, *args: Any, **kwargs: Any) -> str:
        self.sizes.append(args[1])
        return await self.pool.execute(sql, *args, **kwargs)


async def test_prunes_only_old_finished_jobs(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    for state in ("completed", "cancelled", "discarded"):
        await _insert(conn, prefix, state, 3, "2 hours", worker="old")
        await _insert(conn, prefix, state, 2, "30 minutes", worker="fresh")
    for state in ("available", "scheduled", "executing", "retryable"):
        await _insert(conn, prefix, state, 2, "2 hours", worker="unfinished")

    pruned = await Pruner(pool, prefix, max_age=3600).prune()

    assert pruned == 9
    workers = await conn.fetch(f"SELECT worker, count(*) FROM {prefix}.oban_jobs GROUP BY 1 ORDER BY 1")
    assert {row["worker"]: row["count"] for row in workers} == {"fresh": 6, "unfinished": 8}


async def test_limit_bounds_a_pass(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    await _insert(conn, prefix, "completed", 30, "2 days")
    await _insert(conn, prefix, "discarded", 30, "2 days")
    recording = RecordingPool(pool)
    pruner = Pruner(recording, prefix, limit=45, batch_size=10)  # type: ignore[arg-type]

    assert await pruner.prune() == 45

    assert recording.sizes == [10, 10, 10, 10, 5]
    assert await job_states(conn, prefix) == {"discarded": 15}
    assert await pruner.prune() == 15
    assert await job_states(conn, prefix) == {}


async def test_short_batch_ends_pass(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    await _insert(conn, prefix, "cancelled", 12, "2 days")
    recording = RecordingPool(pool)

    assert await Pruner(recording, prefix, batch_size=10).prune() == 12  # type: ignore[arg-type]
    assert recording.sizes == [10, 10]


async def test_locked_rows_are_skipped(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection, dsn: str) -> None:
    await _insert(conn, prefix, "completed", 5, "2 days")
    locked_id = await conn.fetchval(f"SELECT min(id) FROM {prefix}.oban_jobs")
    holder = await asyncpg.connect(dsn)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute(f"SELECT 1 FROM {prefix}.oban_jobs WHERE id = $1 FOR UPDATE", locked_id)

        pruned = await asyncio.wait_for(Pruner(pool, prefix).prune(), timeout=10)

        assert pruned == 4
        await transaction.rollback()
    finally:
        await holder.close()

    assert await conn.fetchval(f"SELECT array_agg(id) FROM {prefix}.oban_jobs") == [locked_id]


async def test_follower_prunes_nothing(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    await _insert(conn, prefix, "completed", 3, "2 days")
    follower = Leader(pool, prefix, name="Oban", node="web-1", enabled=False)
    follower.start()

    assert await Pruner(pool, prefix, leader=follower).prune() == 0
    assert await job_states(conn, prefix) == {"completed": 3}


async def test_two_pruners_share_the_work(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    await _insert(conn, prefix, "completed", 6_000, "2 days")
    await _insert(conn, prefix, "discarded", 6_000, "2 days")
    pruners = [Pruner(pool, prefix, batch_size=500, limit=100_000) for _ in range(2)]

    results = await asyncio.gather(*(pruner.prune() for pruner in pruners))

    assert sum(results) == 12_000
    assert await job_states(conn, prefix) == {}


async def test_prune_telemetry(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    await _insert(conn, prefix, "completed", 4, "2 days")
    events: list[dict] = []
    telemetry.attach("test-pruner", ["oban.pruner.prune.stop"], lambda _name, meta: events.append(meta))
    try:
        await Pruner(pool, prefix).prune()
    finally:
        telemetry.detach("test-pruner")

    assert [event["pruned_count"] for event in events] == [4]


async def test_service_prunes_on_interval(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    pruner = Pruner(pool, prefix, interval=0.1, max_age=60)
    pruner.start()
    try:
        await _insert(conn, prefix, "completed", 3, "2 minutes")
        await wait_for(lambda: _empty(conn, prefix))
    finally:
        await pruner.stop()


async def _empty(conn: asyncpg.Connection, prefix: str) -> bool:
    return await job_states(conn, prefix) == {}


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"max_age": 0}, ValueError, "invalid pruner max_age 0: must be positive"),
        ({"interval": -1}, ValueError, "invalid pruner interval -1"),
        ({"limit": 1.5}, TypeError, "invalid pruner limit 1.5: expected an integer"),
        ({"batch_size": True}, TypeError, "invalid pruner batch_size True"),
        ({"max_age": "1d"}, TypeError, "invalid pruner max_age '1d'"),
    ],
)
def test_invalid_options(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        Pruner(None, "public", **options)  # type: ignore[arg-type]


@pytest.mark.slow
async def test_large_table_while_nodes_run(
    pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection, start_node, capsys: pytest.CaptureFixture[str]
) -> None:
    await _insert(conn, prefix, "completed", 120_000, "3 days", worker="old")
    await _insert(conn, prefix, "cancelled", 40_000, "3 days", worker="old")
    await _insert(conn, prefix, "discarded", 40_000, "3 days", worker="old")
    await _insert(conn, prefix, "completed", 5_000, "1 hour", worker="fresh")
    nodes = [
        start_node("start", "-p", "2", "-q", "default:10", "--import", "tests.workers", "--node", f"prune-{index}")
        for index in range(2)
    ]
    await conn.execute(
        f"INSERT INTO {prefix}.oban_jobs (worker, queue) SELECT 'tests.workers.Noop', 'default' FROM generate_series(1, 3000)"
    )
    await conn.execute(f"SELECT pg_notify('{prefix}.oban_insert', '{{\"queue\":\"default\"}}')")

    durations: list[float] = []
    telemetry.attach(
        "test-large-prune", ["oban.pruner.prune.stop"], lambda _name, meta: durations.append(meta["duration"] / 1e9)
    )
    try:
        pruners = [Pruner(pool, prefix, max_age=86_400, batch_size=2_000, limit=1_000_000) for _ in range(2)]
        started = time.monotonic()
        results = await asyncio.gather(*(pruner.prune() for pruner in pruners))
        elapsed = time.monotonic() - started
    finally:
        telemetry.detach("test-large-prune")

    assert sum(results) == 200_000
    assert await conn.fetchval(f"SELECT count(*) FROM {prefix}.oban_jobs WHERE worker = 'old'") == 0
    assert await conn.fetchval(f"SELECT count(*) FROM {prefix}.oban_jobs WHERE worker = 'fresh'") == 5_000

    await wait_for(lambda: _all_noops_done(conn, prefix), timeout=60)
    for node in nodes:
        assert node.stop() == 0
        assert "Traceback" not in node.output()

    with capsys.disabled():
        print(f"\npruned 200,000 rows with two pruners in {elapsed:.2f} s (passes {[round(d, 2) for d in durations]} s)")


async def _all_noops_done(conn: asyncpg.Connection, prefix: str) -> bool:
    count = await conn.fetchval(
        f"SELECT count(*) FROM {prefix}.oban_jobs WHERE worker = 'tests.workers.Noop' AND state = 'completed'"
    )
    return count == 3000
