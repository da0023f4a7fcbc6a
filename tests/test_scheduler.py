"""Cron: option checks at decoration, enqueueing per minute, the cursor, and exactly-once guards."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from obanpro import job, telemetry, worker
from obanpro.cron import cron_name
from obanpro.leader import Leader
from obanpro.scheduler import Scheduler, floor_minute, parse_cron_option
from obanpro.worker import cron_entries, lookup

from .conftest import wait_for


@worker(queue="cron", priority=2, meta={"team": "ops"}, tags=["nightly"])
class Report:
    async def process(self, job):
        return None


@worker(queue="other")
class Cleanup:
    async def process(self, job):
        return None


@job(queue="cron")
def ping(note: str = "hello"):
    return None


MINUTE = datetime(2030, 3, 4, 5, 6, tzinfo=UTC)


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=12)
    yield pool
    await pool.close()


def _entries(**options: Any):
    """An entries callable for the given worker name (Report, Cleanup, ping) to cron option."""
    classes = {"Report": Report, "Cleanup": Cleanup, "ping": ping}
    return lambda: {classes[key].__obanpro_name__: (classes[key], option) for key, option in options.items()}


async def _cron_jobs(conn: asyncpg.Connection, prefix: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT id, state::text, queue, worker, priority, tags, meta, scheduled_at FROM {prefix}.oban_jobs ORDER BY id"
    )


# Checking options


def test_option_string() -> None:
    entry = parse_cron_option("app.Report", Report, "*/5 * * * *")

    assert entry.expression.minutes == frozenset(range(0, 60, 5))
    assert entry.timezone is None
    assert entry.name == cron_name("*/5 * * * *", "app.Report", {})


def test_option_mapping_with_zone() -> None:
    entry = parse_cron_option("app.Report", Report, {"expr": "@daily", "timezone": "Europe/Berlin"})

    assert entry.timezone == "Europe/Berlin"
    assert entry.name == cron_name("@daily", "app.Report", {"timezone": "Europe/Berlin"})


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("61 * * * *", "invalid cron option for worker app.Report: invalid cron expression '61 \\* \\* \\* \\*'"),
        ("* * *", "expected 5 fields"),
        ({"expr": "@daily", "timezone": "Mars/Olympus"}, "app.Report \\('@daily'\\): invalid time zone 'Mars/Olympus'"),
        ({"expr": "@daily", "tz": "UTC"}, "unknown keys \\['tz'\\]"),
    ],
)
def test_option_invalid(option: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cron_option("app.Report", Report, option)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (5, "invalid cron option 5 for worker app.Report"),
        ({"timezone": "UTC"}, "'expr' must be an expression string"),
        ({"expr": "@daily", "timezone": 5}, "'timezone' must be an IANA name"),
    ],
)
def test_option_wrong_type(option: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        parse_cron_option("app.Report", Report, option)


def test_decorator_rejects_bad_expression() -> None:
    with pytest.raises(ValueError, match="invalid cron option for worker .*Hourly.*minute 60 is out of range"):

        @worker(cron="60 * * * *")
        class Hourly:
            async def process(self, job):
                return None

    assert lookup(f"{__name__}.test_decorator_rejects_bad_expression.<locals>.Hourly") is None
    assert not any("Hourly" in name for name in cron_entries())


def test_decorator_rejects_required_arguments() -> None:
    with pytest.raises(ValueError, match="requires user_id; give them defaults"):

        @job(cron="@hourly")
        def notify(user_id: int):
            return None


def test_decorator_rejects_bad_job_options() -> None:
    with pytest.raises(ValueError, match="its job options are invalid: .*priority"):

        @worker(cron="@hourly", priority=12)
        class Urgent:
            async def process(self, job):
                return None


def test_scheduler_rejects_bad_zone() -> None:
    with pytest.raises(ValueError, match="invalid scheduler timezone: invalid time zone 'Nowhere/Land'"):
        Scheduler(None, "public", timezone="Nowhere/Land")  # type: ignore[arg-type]


# Evaluating a minute


async def test_evaluate_enqueues_due_entries(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    scheduler = Scheduler(pool, prefix, entries=_entries(Report="6 5 * * *", Cleanup="7 5 * * *", ping="*/2 * * * *"))

    ids = await scheduler.evaluate(MINUTE + timedelta(seconds=42))

    rows = await _cron_jobs(conn, prefix)
    assert [row["id"] for row in rows] == ids
    assert sorted(row["worker"] for row in rows) == sorted([ping.__obanpro_name__, Report.__obanpro_name__])
    report = next(row for row in rows if row["worker"] == Report.__obanpro_name__)
    assert report["queue"] == "cron"
    assert report["priority"] == 2
    assert report["tags"] == ["nightly"]
    assert report["scheduled_at"] == MINUTE.replace(tzinfo=None)
    assert report["state"] == "scheduled"
    assert json.loads(report["meta"]) == {
        "team": "ops",
        "cron": True,
        "cron_expr": "6 5 * * *",
        "cron_name": cron_name("6 5 * * *", Report.__obanpro_name__, {}),
        "cron_at": "2030-03-04T05:06:00+00:00",
    }


async def test_evaluate_past_minute_is_available(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    received: list[str] = []
    await conn.add_listener(f"{prefix}.oban_insert", lambda *args: received.append(args[3]))
    scheduler = Scheduler(pool, prefix, entries=_entries(Report="* * * * *"))

    await scheduler.evaluate(datetime(2020, 1, 1, tzinfo=UTC))

    assert [row["state"] for row in await _cron_jobs(conn, prefix)] == ["available"]
    await wait_for(lambda: received)
    assert json.loads(received[0]) == {"queue": "cron"}


async def test_evaluate_entry_zone(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    # 05:06 UTC is 14:06 in Tokyo.
    scheduler = Scheduler(
        pool,
        prefix,
        entries=_entries(Report={"expr": "6 14 * * *", "timezone": "Asia/Tokyo"}, Cleanup="6 14 * * *"),
    )

    await scheduler.evaluate(MINUTE)

    rows = await _cron_jobs(conn, prefix)
    assert [row["worker"] for row in rows] == [Report.__obanpro_name__]
    assert json.loads(rows[0]["meta"])["cron_name"] == cron_name(
        "6 14 * * *", Report.__obanpro_name__, {"timezone": "Asia/Tokyo"}
    )


async def test_evaluate_scheduler_zone(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    scheduler = Scheduler(pool, prefix, timezone="Asia/Tokyo", entries=_entries(Cleanup="6 14 * * *"))

    await scheduler.evaluate(MINUTE)

    assert len(await _cron_jobs(conn, prefix)) == 1


async def test_evaluate_same_minute_twice(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    scheduler = Scheduler(pool, prefix, entries=_entries(Report="* * * * *", Cleanup="* * * * *"))

    first = await scheduler.evaluate(MINUTE)
    second = await scheduler.evaluate(MINUTE)
    third = await scheduler.evaluate(MINUTE + timedelta(minutes=1))

    assert len(first) == 2
    assert second == []
    assert len(third) == 2


async def test_concurrent_schedulers_one_job_per_minute(
    pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection
) -> None:
    entries = _entries(Report="* * * * *", Cleanup="* * * * *", ping="* * * * *")
    schedulers = [Scheduler(pool, prefix, entries=entries) for _ in range(8)]
    minutes = [MINUTE + timedelta(minutes=offset) for offset in range(3)]

    for minute in minutes:
        results = await asyncio.gather(*(scheduler.evaluate(minute) for scheduler in schedulers))
        assert sum(len(ids) for ids in results) == 3

    rows = await _cron_jobs(conn, prefix)
    keys = [(row["worker"], row["scheduled_at"]) for row in rows]
    assert len(keys) == 9
    assert len(set(keys)) == 9


async def test_invalid_registry_entry_skipped(
    pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    registry = {"app.Broken": (Report, "not cron"), Cleanup.__obanpro_name__: (Cleanup, "* * * * *")}
    scheduler = Scheduler(pool, prefix, entries=lambda: registry)

    await scheduler.evaluate(MINUTE)
    await scheduler.evaluate(MINUTE + timedelta(minutes=1))

    assert [row["worker"] for row in await _cron_jobs(conn, prefix)] == [Cleanup.__obanpro_name__] * 2
    errors = [record for record in caplog.records if "skipping cron entry app.Broken" in record.getMessage()]
    assert len(errors) == 1


async def test_evaluate_telemetry(pool: asyncpg.Pool, prefix: str) -> None:
    events: list[dict] = []
    telemetry.attach("test-scheduler", ["oban.scheduler.evaluate.stop"], lambda _name, meta: events.append(meta))
    try:
        scheduler = Scheduler(pool, prefix, entries=_entries(Report="* * * * *"))
        await scheduler.evaluate(MINUTE)
    finally:
        telemetry.detach("test-scheduler")

    assert len(events) == 1
    assert events[0]["enqueued_count"] == 1
    assert events[0]["cron_at"] == "2030-03-04T05:06:00+00:00"


# The cursor


async def test_first_tick_only_sets_cursor(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    scheduler = Scheduler(pool, prefix, entries=_entries(Report="* * * * *"))

    assert await scheduler.tick(MINUTE + timedelta(seconds=30)) == []

    assert scheduler.cursor == MINUTE
    assert await _cron_jobs(conn, prefix) == []


async def test_tick_each_minute_once(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    scheduler = Scheduler(pool, prefix, entries=_entries(Report="* * * * *"))
    await scheduler.tick(MINUTE)

    assert await scheduler.tick(MINUTE + timedelta(seconds=59)) == []
    assert len(await scheduler.tick(MINUTE + timedelta(minutes=1, seconds=1))) == 1
    assert await scheduler.tick(MINUTE + timedelta(minutes=1, seconds=30)) == []

    assert len(await _cron_jobs(conn, prefix)) == 1
    assert scheduler.cursor == MINUTE + timedelta(minutes=1)


async def test_clock_step_back_repeats_nothing(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    scheduler = Scheduler(pool, prefix, entries=_entries(Report="* * * * *"))
    await scheduler.tick(MINUTE)
    await scheduler.tick(MINUTE + timedelta(minutes=3))
    assert len(await _cron_jobs(conn, prefix)) == 3

    # The clock steps back two minutes, then runs forward again.
    for seconds in range(0, 180, 20):
        await scheduler.tick(MINUTE + timedelta(minutes=1, seconds=seconds))
    assert scheduler.cursor == MINUTE + timedelta(minutes=3)
    assert len(await _cron_jobs(conn, prefix)) == 3

    await scheduler.tick(MINUTE + timedelta(minutes=4))
    rows = await _cron_jobs(conn, prefix)
    assert [row["scheduled_at"] for row in rows] == [
        (MINUTE + timedelta(minutes=offset)).replace(tzinfo=None) for offset in range(1, 5)
    ]


async def test_tick_from_database_clock(pool: asyncpg.Pool, prefix: str) -> None:
    scheduler = Scheduler(pool, prefix, entries=_entries(Report="* * * * *"))

    await scheduler.tick()

    database_now = await pool.fetchval("SELECT clock_timestamp()")
    assert scheduler.cursor is not None
    assert scheduler.cursor <= database_now < scheduler.cursor + timedelta(minutes=2)


@pytest.mark.parametrize(
    ("day", "expression", "runs"),
    [
        # 2030-03-10: New York skips 02:00-02:59. 02:30 runs once, at 03:00 local.
        (datetime(2030, 3, 10, 5, tzinfo=UTC), "30 2 * * *", [datetime(2030, 3, 10, 7, 0)]),
        # 2030-11-03: New York repeats 01:00-01:59. 01:30 runs at its first occurrence only.
        (datetime(2030, 11, 3, 4, tzinfo=UTC), "30 1 * * *", [datetime(2030, 11, 3, 5, 30)]),
    ],
)
async def test_daylight_saving_runs_once(
    pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection, day: datetime, expression: str, runs: list[datetime]
) -> None:
    scheduler = Scheduler(pool, prefix, timezone="America/New_York", entries=_entries(Report=expression))
    await scheduler.tick(day)

    # Ticks every 7 minutes across the whole local day, plus a step back after the change.
    moment = day
    while moment < day + timedelta(hours=24):
        moment += timedelta(minutes=7)
        await scheduler.tick(moment)
        if moment.hour == 8 and moment.minute < 7:
            await scheduler.tick(moment - timedelta(hours=1, minutes=30))

    assert [row["scheduled_at"] for row in await _cron_jobs(conn, prefix)] == runs


async def test_hourly_across_fall_back(pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection) -> None:
    day = datetime(2030, 11, 3, 4, tzinfo=UTC)
    scheduler = Scheduler(pool, prefix, timezone="America/New_York", entries=_entries(Report="@hourly"))
    await scheduler.tick(day)

    await scheduler.tick(day + timedelta(hours=25))

    # The local day has 25 hours; the repeated hour gets no second run.
    scheduled = [row["scheduled_at"] for row in await _cron_jobs(conn, prefix)]
    assert len(scheduled) == 24
    assert len(set(scheduled)) == 24


# Leadership


@pytest.fixture
async def leaders(pool: asyncpg.Pool) -> AsyncIterator[list[Leader]]:
    built: list[Leader] = []
    yield built
    for leader in built:
        await leader.stop()


def _leader(built: list[Leader], pool: asyncpg.Pool, prefix: str, node: str) -> Leader:
    leader = Leader(pool, prefix, name="Oban", node=node, enabled=False)
    leader.start()
    built.append(leader)
    return leader


async def test_follower_tick_moves_cursor_only(
    pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection, leaders: list[Leader]
) -> None:
    follower = _leader(leaders, pool, prefix, "web-1")
    scheduler = Scheduler(pool, prefix, leader=follower, entries=_entries(Report="* * * * *"))
    now = await pool.fetchval("SELECT clock_timestamp()")
    await scheduler.tick(now)

    assert await scheduler.tick(now + timedelta(minutes=2)) == []
    assert scheduler.cursor == floor_minute(now + timedelta(minutes=2))
    assert await _cron_jobs(conn, prefix) == []


async def test_leader_skips_minutes_before_election(
    pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection, leaders: list[Leader]
) -> None:
    leader = _leader(leaders, pool, prefix, "web-1")
    scheduler = Scheduler(pool, prefix, leader=leader, entries=_entries(Report="* * * * *"))
    before = await pool.fetchval("SELECT clock_timestamp()")
    await scheduler.tick(before - timedelta(minutes=5))
    assert await leader.elect() is True

    # The minutes up to the election belong to the previous lease.
    assert await scheduler.evaluate(before) == []
    assert await scheduler.tick(before) == []
    ids = await scheduler.tick(before + timedelta(minutes=2))

    rows = await _cron_jobs(conn, prefix)
    assert [row["id"] for row in rows] == ids
    assert [row["scheduled_at"] for row in rows] == [
        (floor_minute(before) + timedelta(minutes=offset)).replace(tzinfo=None) for offset in (1, 2)
    ]


async def test_stale_leader_inserts_nothing(
    pool: asyncpg.Pool, prefix: str, conn: asyncpg.Connection, leaders: list[Leader]
) -> None:
    real = _leader(leaders, pool, prefix, "web-1")
    stale = _leader(leaders, pool, prefix, "web-2")
    assert await stale.elect() is True
    await conn.execute(f"UPDATE {prefix}.oban_leaders SET expires_at = timezone('UTC', now()) - interval '1 second'")
    assert await real.elect() is True
    # The stale leader's local deadline has not passed, so it still believes it leads.
    assert stale.is_leader is True

    entries = _entries(Report="* * * * *")
    minute = floor_minute(await pool.fetchval("SELECT clock_timestamp()")) + timedelta(minutes=1)
    stale_scheduler = Scheduler(pool, prefix, leader=stale, entries=entries)
    real_scheduler = Scheduler(pool, prefix, leader=real, entries=entries)

    assert await stale_scheduler.evaluate(minute) == []
    assert stale.is_leader is False
    assert len(await real_scheduler.evaluate(minute)) == 1
    assert len(await _cron_jobs(conn, prefix)) == 1


async def test_scheduler_service_ticks(pool: asyncpg.Pool, prefix: str) -> None:
    scheduler = Scheduler(pool, prefix, entries=_entries(Report="* * * * *"))
    scheduler.start()
    try:
        await wait_for(lambda: scheduler.cursor is not None)
    finally:
        await scheduler.stop()
