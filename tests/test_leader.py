"""Leader election in oban_leaders: one lease per instance name, renewal, expiry, resignation."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from obanpro import telemetry
from obanpro.leader import Leader, make_identity
from obanpro.oban import Oban

from .conftest import wait_for


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=6)
    yield pool
    await pool.close()


@pytest.fixture
async def leaders(pool: asyncpg.Pool, prefix: str) -> AsyncIterator[list[Leader]]:
    """Leaders the test builds; every one is stopped at teardown."""
    built: list[Leader] = []
    yield built
    for leader in built:
        await leader.stop()


def _leader(built: list[Leader], pool: asyncpg.Pool, prefix: str, **options) -> Leader:
    options.setdefault("name", "Oban")
    options.setdefault("node", "web-1")
    leader = Leader(pool, prefix, **options)
    built.append(leader)
    return leader


async def _lease(conn: asyncpg.Connection, prefix: str, name: str = "Oban") -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT node, elected_at, expires_at FROM {prefix}.oban_leaders WHERE name = $1", name)


def test_identity_is_unique_per_call() -> None:
    first = make_identity("web-1")
    second = make_identity("web-1")

    assert first != second
    assert first.startswith(f"web-1/{os.getpid()}-")


async def test_identity_made_at_start(pool: asyncpg.Pool, prefix: str, leaders: list[Leader]) -> None:
    leader = _leader(leaders, pool, prefix, enabled=False)
    assert leader.identity == ""

    leader.start()
    assert leader.identity.startswith("web-1/")


async def test_one_of_three_leads(pool: asyncpg.Pool, prefix: str, leaders: list[Leader], conn: asyncpg.Connection) -> None:
    contenders = [_leader(leaders, pool, prefix, node=f"web-{index}") for index in range(3)]
    for leader in contenders:
        leader.start()

    results = await asyncio.gather(*(leader.elect() for leader in contenders))

    assert sorted(results) == [False, False, True]
    winner = contenders[results.index(True)]
    assert [leader.is_leader for leader in contenders] == results
    assert (await _lease(conn, prefix))["node"] == winner.identity


async def test_same_node_name_two_instances(pool: asyncpg.Pool, prefix: str, leaders: list[Leader]) -> None:
    first = _leader(leaders, pool, prefix, enabled=False)
    second = _leader(leaders, pool, prefix, enabled=False)
    first.start()
    second.start()

    assert await first.elect() is True
    assert await second.elect() is False
    assert second.is_leader is False


async def test_names_elect_separately(pool: asyncpg.Pool, prefix: str, leaders: list[Leader]) -> None:
    default = _leader(leaders, pool, prefix, enabled=False)
    other = _leader(leaders, pool, prefix, name="Other", enabled=False)
    default.start()
    other.start()

    assert await default.elect() is True
    assert await other.elect() is True


async def test_renewal_keeps_elected_at(
    pool: asyncpg.Pool, prefix: str, leaders: list[Leader], conn: asyncpg.Connection
) -> None:
    leader = _leader(leaders, pool, prefix, enabled=False, interval=30)
    leader.start()
    await leader.elect()
    before = await _lease(conn, prefix)

    await asyncio.sleep(0.01)
    assert await leader.elect() is True
    after = await _lease(conn, prefix)

    assert after["elected_at"] == before["elected_at"]
    assert after["expires_at"] > before["expires_at"]
    assert after["expires_at"] - after["elected_at"] >= timedelta(seconds=30)


async def test_expired_lease_changes_hands(
    pool: asyncpg.Pool, prefix: str, leaders: list[Leader], conn: asyncpg.Connection
) -> None:
    old = _leader(leaders, pool, prefix, enabled=False)
    new = _leader(leaders, pool, prefix, node="web-2", enabled=False)
    old.start()
    new.start()
    assert await old.elect() is True
    first_election = (await _lease(conn, prefix))["elected_at"]

    await conn.execute(f"UPDATE {prefix}.oban_leaders SET expires_at = timezone('UTC', now()) - interval '1 second'")

    assert await new.elect() is True
    lease = await _lease(conn, prefix)
    assert lease["node"] == new.identity
    assert lease["elected_at"] > first_election
    assert await old.elect() is False
    assert old.is_leader is False


async def test_own_lapsed_lease_restarts_election(
    pool: asyncpg.Pool, prefix: str, leaders: list[Leader], conn: asyncpg.Connection
) -> None:
    leader = _leader(leaders, pool, prefix, enabled=False)
    leader.start()
    await leader.elect()
    first_election = (await _lease(conn, prefix))["elected_at"]
    await conn.execute(f"UPDATE {prefix}.oban_leaders SET expires_at = timezone('UTC', now()) - interval '1 second'")

    assert await leader.elect() is True
    assert (await _lease(conn, prefix))["elected_at"] > first_election


async def test_blocked_renewal_drops_leadership(
    pool: asyncpg.Pool, prefix: str, leaders: list[Leader], dsn: str
) -> None:
    leader = _leader(leaders, pool, prefix, interval=1.0)
    leader.start()
    await wait_for(lambda: leader.is_leader)

    # Holding the lease row's lock makes every renewal wait, as a stalled connection would.
    blocker = await asyncpg.connect(dsn)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute(f"SELECT * FROM {prefix}.oban_leaders FOR UPDATE")

        await wait_for(lambda: not leader.is_leader, timeout=3.0)
        assert leader.elected_at is None
        await transaction.rollback()
    finally:
        await blocker.close()

    await wait_for(lambda: leader.is_leader, timeout=5.0)


async def test_failed_election_drops_leadership(pool: asyncpg.Pool, prefix: str, leaders: list[Leader]) -> None:
    leader = _leader(leaders, pool, prefix, enabled=False)
    leader.start()
    assert await leader.elect() is True
    leader._elect_sql = "SELECT $1::text, $2::text, $3::float8, 1 / 0 AS node"

    with pytest.raises(asyncpg.DivisionByZeroError):
        await leader.elect()
    assert leader.is_leader is False


async def test_stop_resigns_and_notifies(
    pool: asyncpg.Pool, prefix: str, leaders: list[Leader], conn: asyncpg.Connection
) -> None:
    received: list[str] = []
    await conn.add_listener(f"{prefix}.oban_leader", lambda *args: received.append(args[3]))
    leader = _leader(leaders, pool, prefix)
    leader.start()
    await wait_for(lambda: leader.is_leader)

    await leader.stop()

    assert await _lease(conn, prefix) is None
    assert leader.is_leader is False
    await wait_for(lambda: received)
    assert json.loads(received[0]) == {"action": "resign", "node": leader.identity, "name": "Oban"}


async def test_resignation_elects_follower(
    pool: asyncpg.Pool, prefix: str, leaders: list[Leader], dsn: str
) -> None:
    first = _leader(leaders, pool, prefix, dsn=dsn, interval=30)
    first.start()
    await wait_for(lambda: first.is_leader)
    second = _leader(leaders, pool, prefix, node="web-2", dsn=dsn, interval=30)
    second.start()
    await wait_for(lambda: second._notifier is not None)
    assert second.is_leader is False

    await first.stop()

    # Without the notification the follower would wait its full 30 s interval.
    await wait_for(lambda: second.is_leader, timeout=5.0)


async def test_node_hears_resignation_on_signal_connection(dsn: str, prefix: str, conn: asyncpg.Connection) -> None:
    # A node's leader has no LISTEN connection of its own: the leader channel
    # shares the signal listener's, which Oban.start waits for.
    first = Oban(dsn=dsn, prefix=prefix, node="web-1", queues={"default": 1})
    second = Oban(dsn=dsn, prefix=prefix, node="web-2", queues={"default": 1})
    await first.start()
    try:
        await wait_for(lambda: first.is_leader)
        # An idle connection shows its last statement; the workers' own LISTEN is on oban_insert.
        node_listeners = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND query NOT LIKE '%oban_insert%'",
            f'LISTEN "{prefix}.oban_%',
        )
        assert node_listeners == 1
        await second.start()
        assert second.is_leader is False

        await first.stop()

        # Without the notification the follower would wait its full 30 s interval.
        await wait_for(lambda: second.is_leader, timeout=5.0)
    finally:
        await first.stop()
        await second.stop()


async def test_disabled_leader_never_leads(pool: asyncpg.Pool, prefix: str, leaders: list[Leader], conn) -> None:
    leader = _leader(leaders, pool, prefix, enabled=False)
    leader.start()
    await asyncio.sleep(0.2)

    assert leader.is_leader is False
    assert await _lease(conn, prefix) is None


async def test_oban_py_lease_is_respected(
    pool: asyncpg.Pool, prefix: str, leaders: list[Leader], conn: asyncpg.Connection
) -> None:
    # An oban-py node writes its node name ("host.pid" by default) into the same row.
    await conn.execute(
        f"INSERT INTO {prefix}.oban_leaders (name, node, elected_at, expires_at) "
        "VALUES ('Oban', 'web-9.4021', timezone('UTC', now()), timezone('UTC', now()) + interval '30 seconds')"
    )
    leader = _leader(leaders, pool, prefix, enabled=False)
    leader.start()

    assert await leader.elect() is False

    await conn.execute(f"UPDATE {prefix}.oban_leaders SET expires_at = timezone('UTC', now()) - interval '1 second'")
    assert await leader.elect() is True


async def test_oban_py_cannot_take_live_lease(
    pool: asyncpg.Pool, prefix: str, leaders: list[Leader], conn: asyncpg.Connection
) -> None:
    leader = _leader(leaders, pool, prefix, enabled=False)
    leader.start()
    await leader.elect()

    # oban-py's election: delete expired leases, then insert or renew its own.
    async with conn.transaction():
        await conn.execute(f"DELETE FROM {prefix}.oban_leaders WHERE expires_at < timezone('UTC', now())")
        holder = await conn.fetchval(
            f"INSERT INTO {prefix}.oban_leaders (name, node, elected_at, expires_at) "
            "VALUES ('Oban', 'web-9.4021', timezone('UTC', now()), timezone('UTC', now()) + interval '30 seconds') "
            f"ON CONFLICT (name) DO UPDATE SET expires_at = EXCLUDED.expires_at "
            f"WHERE {prefix}.oban_leaders.node = EXCLUDED.node RETURNING node"
        )

    assert holder is None
    assert (await _lease(conn, prefix))["node"] == leader.identity


async def test_election_telemetry(pool: asyncpg.Pool, prefix: str, leaders: list[Leader]) -> None:
    events: list[tuple[str, dict]] = []
    telemetry.attach(
        "test-leader",
        ["oban.leader.election.start", "oban.leader.election.stop"],
        lambda name, meta: events.append((name, meta)),
    )
    try:
        leader = _leader(leaders, pool, prefix, enabled=False)
        leader.start()
        await leader.elect()
    finally:
        telemetry.detach("test-leader")

    assert [name for name, _meta in events] == ["oban.leader.election.start", "oban.leader.election.stop"]
    assert events[0][1]["leader"] is False
    assert events[1][1]["leader"] is True
    assert events[1][1]["duration"] > 0


def test_invalid_interval() -> None:
    with pytest.raises(ValueError, match="invalid leader interval 0"):
        Leader(None, "public", name="Oban", node="web-1", interval=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="invalid leader interval '5'"):
        Leader(None, "public", name="Oban", node="web-1", interval="5")  # type: ignore[arg-type]
