"""Database faults: a restart, a dead LISTEN connection, an exhausted job pool, a server that turns read-only.

Every test here runs its nodes against a PostgreSQL of its own (an embedded,
throwaway server in the test's temporary directory), because it stops that
server, terminates its backends or changes its configuration.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from obanpro import schema
from obanpro.db import Backoff, create_pool, recover, wake_retries
from obanpro.embedded import EmbeddedPostgres
from obanpro.oban import Oban

from . import workers
from .conftest import Node, job_states, wait_for


class PrivateServer:
    """An embedded PostgreSQL that one test owns, with the test's schema installed."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self.server = EmbeddedPostgres(directory, throwaway=True)
        self.prefix = prefix
        self.dsn = ""

    async def start(self) -> str:
        self.dsn = self.server.ensure_running()
        return self.dsn

    def stop(self) -> None:
        self.server.stop()

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn)

    async def set_system(self, setting: str, value: str) -> None:
        """Change a setting with ALTER SYSTEM and reload the configuration."""
        conn = await self.connect()
        try:
            await conn.execute(f"ALTER SYSTEM SET {setting} = '{value}'")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()


@pytest.fixture
async def private(tmp_path: Path, prefix: str) -> AsyncIterator[PrivateServer]:
    server = PrivateServer(tmp_path / "pg", prefix)
    await server.start()
    conn = await server.connect()
    try:
        await schema.install(conn, prefix)
    finally:
        await conn.close()

    yield server

    server.stop()


@pytest.fixture
def private_node(private: PrivateServer, start_node: Callable[..., Node]) -> Callable[..., Node]:
    """Start ``obanpro start`` against the private server; nodes are killed before the server stops."""

    def start(*args: str, env: dict[str, str] | None = None) -> Node:
        return start_node("start", "--import", "tests.workers", *args, env={"OBAN_DSN": private.dsn, **(env or {})})

    return start


@pytest.fixture
async def private_oban(private: PrivateServer) -> AsyncIterator[Oban]:
    """An Oban without queues on the private server, registered for ``Worker.enqueue``."""
    oban = Oban(dsn=private.dsn, prefix=private.prefix, pool_min_size=1, pool_max_size=2)
    await oban.start()
    yield oban
    await oban.stop()


async def _listen_backends(conn: asyncpg.Connection, prefix: str) -> set[int]:
    """Return the backends whose last statement was a LISTEN on one of ``prefix``'s channels."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()",
        f'LISTEN "{prefix}.oban_%',
    )
    return {row["pid"] for row in rows}


async def _pickup_delay(conn: asyncpg.Connection, prefix: str, job_id: int) -> float | None:
    """Return seconds from a job's insert to its start, once it has started."""
    return await conn.fetchval(
        f"SELECT extract(epoch FROM attempted_at - inserted_at)::float8 FROM {prefix}.oban_jobs "
        "WHERE id = $1 AND attempted_at IS NOT NULL",
        job_id,
    )


@pytest.mark.slow
async def test_database_restart_loses_no_job(private: PrivateServer, private_node, private_oban: Oban) -> None:
    prefix = private.prefix
    node = private_node("-q", "default:10", "-p", "2")
    conn = await private.connect()
    await wait_for(lambda: _listen_count(conn, prefix, 3), timeout=20)
    before = await private_oban.enqueue_many([workers.Sleep.new({"seconds": 0.5}) for _ in range(20)])
    await wait_for(lambda: _executing(conn, prefix), timeout=10)
    await conn.close()

    private.stop()
    await asyncio.sleep(2)
    await private.start()
    conn = await private.connect()

    # Both worker processes and the duties process listen again.
    listeners: set[int] = set()

    async def relistened() -> bool:
        listeners.update(await _listen_backends(conn, prefix))
        return len(listeners) >= 3

    await wait_for(relistened, timeout=20)
    await wait_for(lambda: "re-established" in node.output(), timeout=20)

    after = await private_oban.enqueue_many([workers.Noop.new() for _ in range(5)])
    total = len(before) + len(after)

    async def settled() -> bool:
        return (await job_states(conn, prefix)).get("completed", 0) == total

    await wait_for(settled, timeout=60)
    assert await job_states(conn, prefix) == {"completed": total}
    assert await conn.fetchval(f"SELECT max(attempt) FROM {prefix}.oban_jobs") == 1
    await conn.close()
    assert node.stop() == 0


@pytest.mark.slow
async def test_jobs_start_promptly_after_restart(private: PrivateServer) -> None:
    """Retry loops that backed off during an outage resume once a LISTEN connection is back."""
    prefix = private.prefix
    queues = {f"q{index}": 1 for index in range(16)}
    oban = Oban(dsn=private.dsn, prefix=prefix, queues=queues, import_roots=["tests"], grace_period=1)
    await oban.start()
    try:
        notifier = oban._runtime._notifier
        conn = await private.connect()
        await oban.enqueue_many([workers.Noop.new(queue=queue) for queue in queues])
        await wait_for(lambda: _completed(conn, prefix, len(queues)), timeout=10)
        await conn.close()

        # Seven seconds down: every producer's backoff grows to its five-second maximum.
        private.stop()
        await asyncio.sleep(7)
        await private.start()
        at_restart = await oban.enqueue_many([workers.Noop.new(queue=queue) for queue in queues])
        await wait_for(lambda: notifier.reconnects >= 1, timeout=20)
        after_listen = await oban.enqueue_many([workers.Noop.new(queue=queue) for queue in queues])

        conn = await private.connect()
        await wait_for(lambda: _completed(conn, prefix, 3 * len(queues)), timeout=30)
        restart_delays = {job.queue: await _pickup_delay(conn, prefix, job.id) for job in at_restart}
        listen_delays = {job.queue: await _pickup_delay(conn, prefix, job.id) for job in after_listen}
        await conn.close()
    finally:
        await oban.stop()

    # The notifier retries at least every 1.25 s (RECONNECT_MAX_DELAY with jitter), and
    # its reconnection wakes every producer, so jobs waiting at the restart start soon after.
    late = {queue: round(delay, 3) for queue, delay in restart_delays.items() if delay >= 2.0}
    assert late == {}, f"jobs inserted at the restart started 2 s or more after their insert: {late}"
    late = {queue: round(delay, 3) for queue, delay in listen_delays.items() if delay >= 1.0}
    assert late == {}, f"jobs inserted after LISTEN was back started a second or more after their insert: {late}"


async def _listen_count(conn: asyncpg.Connection, prefix: str, expected: int) -> bool:
    return len(await _listen_backends(conn, prefix)) >= expected


async def _executing(conn: asyncpg.Connection, prefix: str) -> bool:
    return (await job_states(conn, prefix)).get("executing", 0) > 0


async def _completed(conn: asyncpg.Connection, prefix: str, expected: int) -> bool:
    return (await job_states(conn, prefix)).get("completed", 0) == expected


async def _create_app_role(private: PrivateServer) -> str:
    """Create a non-superuser role ``app`` that owns the test's tables; return a DSN that logs in as it.

    Connection limits apply only to roles without superuser rights.
    """
    conn = await private.connect()
    try:
        await conn.execute("CREATE ROLE app LOGIN")
        await conn.execute(f"GRANT ALL ON SCHEMA {private.prefix} TO app")
        await conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA {private.prefix} TO app")
        await conn.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA {private.prefix} TO app")
    finally:
        await conn.close()
    return private.dsn.replace("postgresql://postgres@", "postgresql://app@", 1)


async def test_listen_connection_loss_keeps_polling(private: PrivateServer, private_node, private_oban: Oban) -> None:
    prefix = private.prefix
    app_dsn = await _create_app_role(private)
    node = private_node("-q", "default:5", "-p", "2", env={"OBAN_DSN": app_dsn})
    conn = await private.connect()
    listeners = await _stable_listeners(conn, prefix)

    # The role may open no new connection, so the LISTEN connections stay down while the pools keep theirs.
    await conn.execute("ALTER ROLE app CONNECTION LIMIT 0")
    terminated = await conn.fetchval(
        "SELECT count(*) FROM unnest($1::int[]) AS p WHERE pg_terminate_backend(p)", sorted(listeners)
    )
    assert terminated == len(listeners)
    await wait_for(lambda: "too many connections for role" in node.output(), timeout=10)

    jobs = await private_oban.enqueue_many([workers.Noop.new() for _ in range(10)])
    await wait_for(lambda: _completed(conn, prefix, len(jobs)), timeout=20)
    assert await _app_listeners(conn, prefix) == set()

    await conn.execute("ALTER ROLE app CONNECTION LIMIT -1")
    relistened = await wait_for(lambda: _at_least(_app_listeners(conn, prefix), len(listeners)), timeout=20)
    assert relistened.isdisjoint(listeners)
    await wait_for(lambda: node.output().count("re-established") >= len(listeners), timeout=10)

    more = await private_oban.enqueue_many([workers.Noop.new() for _ in range(5)])
    await wait_for(lambda: _completed(conn, prefix, len(jobs) + len(more)), timeout=20)
    await conn.close()
    assert node.stop() == 0


async def _app_listeners(conn: asyncpg.Connection, prefix: str) -> set[int]:
    """Return the LISTEN backends of role ``app``: their last statement was a LISTEN or the notifier's heartbeat."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND (query LIKE $1 OR query = 'SELECT 1')",
        f'LISTEN "{prefix}.oban_%',
    )
    return {row["pid"] for row in rows}


async def _at_least(pids: Awaitable[set[int]], count: int) -> set[int] | None:
    found = await pids
    return found if len(found) >= count else None


async def _stable_listeners(conn: asyncpg.Connection, prefix: str) -> set[int]:
    """Return the LISTEN backends once both worker processes and the duties process listen and no more appear."""
    seen: list[set[int]] = []

    async def stable() -> set[int] | None:
        seen.append(await _app_listeners(conn, prefix))
        if len(seen) >= 2 and len(seen[-1]) >= 3 and seen[-1] == seen[-2]:
            return seen[-1]
        return None

    return await wait_for(stable, timeout=20, interval=0.5)


async def test_job_pool_exhaustion_spares_acks(
    private: PrivateServer, private_node, private_oban: Oban, tmp_path: Path
) -> None:
    prefix = private.prefix
    release = tmp_path / "release"
    node = private_node("-q", "default:5,hold:4", "-p", "1", "--pool-max-size", "2")
    conn = await private.connect()

    holders = await private_oban.enqueue_many([workers.HoldConnection.new({"release": str(release)}) for _ in range(4)])
    await wait_for(lambda: _state_count(conn, prefix, "executing", 4), timeout=20)

    # Two holders own both connections of the job-code pool and two wait for one.
    others = await private_oban.enqueue_many([workers.Noop.new() for _ in range(20)])
    await wait_for(lambda: _completed(conn, prefix, len(others)), timeout=20)
    assert (await job_states(conn, prefix)) == {"completed": 20, "executing": 4}

    release.touch()
    await wait_for(lambda: _completed(conn, prefix, len(others) + len(holders)), timeout=20)
    await conn.close()
    assert node.stop() == 0


async def _state_count(conn: asyncpg.Connection, prefix: str, state: str, expected: int) -> bool:
    return (await job_states(conn, prefix)).get(state, 0) == expected


async def test_read_only_connections_are_replaced(private: PrivateServer, private_node, private_oban: Oban) -> None:
    prefix = private.prefix
    node = private_node("-q", "default:10", "-p", "2")
    conn = await private.connect()
    warm = await private_oban.enqueue_many([workers.Noop.new() for _ in range(20)])
    await wait_for(lambda: _completed(conn, prefix, len(warm)), timeout=20)
    running = await private_oban.enqueue_many([workers.Sleep.new({"seconds": 1}) for _ in range(10)])
    await wait_for(lambda: _state_count(conn, prefix, "executing", 10), timeout=10)

    # A failover seen from the old primary: sessions open now turn read-only for good,
    # while new sessions get the database-level setting and may write.
    await conn.execute("ALTER DATABASE postgres SET default_transaction_read_only = off")
    await private.set_system("default_transaction_read_only", "on")
    await wait_for(lambda: "ReadOnlySQLTransactionError" in node.output(), timeout=10)

    fresh = await private.connect()
    later = [
        await fresh.fetchval(
            f"INSERT INTO {prefix}.oban_jobs (worker, queue, args) VALUES ('tests.workers.Noop', 'default', '{{}}') RETURNING id"
        )
        for _ in range(10)
    ]
    total = len(warm) + len(running) + len(later)
    await wait_for(lambda: _completed(fresh, prefix, total), timeout=30)
    assert await job_states(fresh, prefix) == {"completed": total}
    assert await fresh.fetchval(f"SELECT max(attempt) FROM {prefix}.oban_jobs") == 1

    await fresh.close()
    await conn.close()
    assert node.stop() == 0


@pytest.mark.slow
async def test_terminated_backends_lose_no_job(private: PrivateServer, private_node, private_oban: Oban) -> None:
    prefix = private.prefix
    app_dsn = await _create_app_role(private)
    node = private_node("-q", "default:10", "-p", "2", env={"OBAN_DSN": app_dsn})
    conn = await private.connect()
    jobs = await private_oban.enqueue_many([workers.Sleep.new({"seconds": 0.01}) for _ in range(400)])

    # Terminate every connection of the node each time another 60 jobs complete.
    terminations = 0
    for threshold in (60, 120, 180, 240, 300):
        await wait_for(lambda threshold=threshold: _completed_at_least(conn, prefix, threshold), timeout=60)
        pids = [row["pid"] for row in await conn.fetch("SELECT pid FROM pg_stat_activity WHERE usename = 'app'")]
        terminations += await conn.fetchval("SELECT count(*) FROM unnest($1::int[]) AS p WHERE pg_terminate_backend(p)", pids)

    await wait_for(lambda: _completed(conn, prefix, len(jobs)), timeout=60)
    assert terminations >= 5 * 4
    assert await job_states(conn, prefix) == {"completed": len(jobs)}
    assert await conn.fetchval(f"SELECT max(attempt) FROM {prefix}.oban_jobs") == 1
    await conn.close()
    assert node.stop() == 0


async def _completed_at_least(conn: asyncpg.Connection, prefix: str, count: int) -> bool:
    return (await job_states(conn, prefix)).get("completed", 0) >= count


async def test_rejected_login_delays_acks(private: PrivateServer, private_node, private_oban: Oban, tmp_path: Path) -> None:
    prefix = private.prefix
    app_dsn = await _create_app_role(private)
    conn = await private.connect()
    await conn.execute("ALTER ROLE app PASSWORD 'first-password'")
    hba = private.server.data_dir / "pg_hba.conf"
    hba.write_text("local all app scram-sha-256\n" + hba.read_text())
    await conn.execute("SELECT pg_reload_conf()")
    app_dsn = app_dsn.replace("postgresql://app@", "postgresql://app:first-password@", 1)

    node = private_node("-q", "default:4", "-p", "1", env={"OBAN_DSN": app_dsn})
    marks = tmp_path / "marks"
    jobs = await private_oban.enqueue_many([workers.MarkDone.new({"marks": str(marks), "seconds": 1}) for _ in range(4)])
    await wait_for(lambda: _state_count(conn, prefix, "executing", 4), timeout=20)

    # The password changes under the running node, and its open connections end: every new login fails.
    await conn.execute("ALTER ROLE app PASSWORD 'second-password'")
    pids = [row["pid"] for row in await conn.fetch("SELECT pid FROM pg_stat_activity WHERE usename = 'app'")]
    await conn.fetchval("SELECT count(*) FROM unnest($1::int[]) AS p WHERE pg_terminate_backend(p)", pids)
    await wait_for(lambda: marks.exists() and len(marks.read_text().split()) == len(jobs), timeout=20)
    await wait_for(lambda: "obanpro.acker" in node.output(), timeout=20)

    # Once the old password works again, every finished job is stored as it ended.
    await conn.execute("ALTER ROLE app PASSWORD 'first-password'")
    await wait_for(lambda: _completed(conn, prefix, len(jobs)), timeout=30)
    assert await job_states(conn, prefix) == {"completed": len(jobs)}
    assert "stays executing" not in node.output()
    await conn.close()
    assert node.stop() == 0


async def test_recover_replaces_pool_connections(dsn: str) -> None:
    pool = await create_pool(dsn, min_size=1, max_size=1, internal=True)
    try:
        before = await pool.fetchval("SELECT pg_backend_pid()")
        recover(pool, asyncpg.ReadOnlySQLTransactionError("cannot execute UPDATE in a read-only transaction"))
        await asyncio.sleep(0)
        after = await pool.fetchval("SELECT pg_backend_pid()")

        recover(pool, asyncpg.UniqueViolationError("duplicate key value violates unique constraint"))
        await asyncio.sleep(0)
        kept = await pool.fetchval("SELECT pg_backend_pid()")
    finally:
        await pool.close()

    assert after != before
    assert kept == after


async def test_wake_retries_ends_backoff_sleeps() -> None:
    backoffs = [Backoff(first=60.0), Backoff(first=60.0)]
    sleepers = [asyncio.create_task(backoff.sleep()) for backoff in backoffs]
    await asyncio.sleep(0)

    wake_retries()

    done, pending = await asyncio.wait(sleepers, timeout=10)
    for task in pending:
        task.cancel()
    assert len(done) == 2
    assert all(task.exception() is None for task in done)
