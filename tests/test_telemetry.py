"""The default telemetry logger: what it renders, at which level, and that every event it logs is emitted."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from obanpro import telemetry, telemetry_logger
from obanpro.oban import Oban

from . import workers
from .conftest import wait_for


@pytest.fixture
def events_logger(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG, logger="obanpro.events")
    telemetry_logger.attach()
    yield caplog
    telemetry_logger.detach()


def _records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if getattr(record, "obanpro", {}).get("event") == event]


async def test_job_events_are_logged_by_level(events_logger, dsn: str, prefix: str) -> None:
    async with Oban(dsn=dsn, prefix=prefix, queues={"default": 2}):
        ok = await workers.Noop.enqueue()
        failed = await workers.Fail.enqueue({"note": "logged"})
        await wait_for(lambda: _records(events_logger, "oban.job.exception") and len(_records(events_logger, "oban.job.stop")) >= 1)

    start = next(record for record in _records(events_logger, "oban.job.start") if record.obanpro["id"] == ok.id)
    stop = next(record for record in _records(events_logger, "oban.job.stop") if record.obanpro["id"] == ok.id)
    failure = _records(events_logger, "oban.job.exception")[0]

    assert start.levelno == logging.DEBUG
    assert stop.levelno == logging.DEBUG
    assert stop.obanpro["state"] == "completed"
    assert stop.obanpro["worker"] == "tests.workers.Noop"
    assert isinstance(stop.obanpro["duration"], float)
    assert f"job {ok.id} (tests.workers.Noop)" in stop.getMessage()
    assert failure.levelno == logging.WARNING
    assert failure.obanpro["id"] == failed.id
    assert failure.obanpro["state"] == "retryable"
    assert failure.obanpro["error_type"] == "ValueError"
    assert "failing on purpose: logged" in failure.getMessage()


async def test_span_exception_logged_once_per_interval(events_logger) -> None:
    for attempt in range(3):
        with pytest.raises(ConnectionResetError), telemetry.span("oban.stager.stage", {"queues": ["default"]}):
            raise ConnectionResetError(f"connection lost {attempt}")

    errors = _records(events_logger, "oban.stager.stage.exception")
    assert len(errors) == 1
    assert errors[0].levelno == logging.ERROR
    assert errors[0].obanpro["error_type"] == "ConnectionResetError"
    assert "connection lost 0" in errors[0].getMessage()


async def test_span_stop_is_logged_at_debug(events_logger) -> None:
    with telemetry.span("oban.pruner.prune", {}) as span:
        span.add({"pruned_count": 3})

    [record] = _records(events_logger, "oban.pruner.prune.stop")
    assert record.levelno == logging.DEBUG
    assert record.obanpro["pruned_count"] == 3
    assert "pruned_count 3" in record.getMessage()


async def test_json_format_puts_fields_in_the_message(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="obanpro.events")
    telemetry_logger.attach(fmt="json")
    try:
        with telemetry.span("oban.refresher.refresh", {}) as span:
            span.add({"refreshed_count": 2})
    finally:
        telemetry_logger.detach()

    [record] = [record for record in caplog.records if record.name == "obanpro.events"]
    fields = json.loads(record.getMessage())
    assert fields["event"] == "oban.refresher.refresh.stop"
    assert fields["refreshed_count"] == 2


def test_attach_rejects_unknown_events_and_formats() -> None:
    with pytest.raises(ValueError, match="unknown telemetry events"):
        telemetry_logger.attach(events=["oban.producer.fetch.stop"])
    with pytest.raises(ValueError, match="invalid fmt"):
        telemetry_logger.attach(fmt="yaml")


# Every event the logger subscribes to is emitted by running code


def _find(oban: Oban, class_name: str) -> Any:
    for service in oban._services.services:
        if type(service).__name__ == class_name:
            return service
    return None


async def _rename(conn: asyncpg.Connection, prefix: str, tables: list[str], suffix_from: str, suffix_to: str) -> None:
    for table in tables:
        await conn.execute(f"ALTER TABLE {prefix}.{table}{suffix_from} RENAME TO {table}{suffix_to}")


async def _call(service: Any, method: str, *args: Any) -> None:
    """Run one pass of a node service; a failure is what the exception phase wants."""
    if service is None:
        return
    try:
        await getattr(service, method)(*args)
    except (asyncpg.PostgresError, RuntimeError):
        pass


async def test_every_logged_event_is_emitted(dsn: str, prefix: str, conn: asyncpg.Connection) -> None:
    seen: set[str] = set()
    telemetry.attach("test-every-event", telemetry_logger.EVENTS, lambda name, _metadata: seen.add(name))
    oban = Oban(
        dsn=dsn,
        prefix=prefix,
        queues={"default": 5},
        grace_period=1,
        stager={"interval": 0.1},
        scheduler={"entries": lambda: {"tests.workers.Noop": (workers.Noop, "* * * * *")}},
    )
    await oban.start()
    try:
        await _drive(oban, conn, prefix, seen)
    finally:
        await oban.stop()
        telemetry.detach("test-every-event")

    missing = sorted(set(telemetry_logger.EVENTS) - seen)
    assert missing == [], f"the default logger subscribes to events no running code emitted: {missing}"


async def _drive(oban: Oban, conn: asyncpg.Connection, prefix: str, seen: set[str]) -> None:
    async def until(events: list[str]) -> None:
        await wait_for(lambda: set(events) <= seen, timeout=15)

    leader = _find(oban, "Leader")
    scheduler = _find(oban, "Scheduler")
    pruner = _find(oban, "Pruner")
    lifeline = _find(oban, "Lifeline")
    refresher = _find(oban, "Refresher")
    if leader is not None:
        await wait_for(lambda: leader.is_leader, timeout=15)

    # Successful passes: jobs, fetches, acks, staging, and one pass of each leader duty.
    await workers.Noop.enqueue()
    await workers.Fail.enqueue({"note": "telemetry"})
    await workers.Noop.enqueue(schedule_in=0.2)
    await until(["oban.job.stop", "oban.job.exception", "oban.producer.get.stop", "oban.producer.ack.stop", "oban.stager.stage.stop"])
    await _call(leader, "elect")
    await _call(scheduler, "evaluate", datetime.now(UTC))
    await _call(pruner, "prune")
    await _call(lifeline, "rescue")
    await _call(refresher, "refresh")
    await _call(refresher, "cleanup")

    # Failing passes: with the tables renamed every query fails. A job that runs
    # meanwhile cannot be acked, and the leader table goes last because losing
    # leadership stops the other duties from running at all.
    sleeper = await workers.Sleep.enqueue({"seconds": 0.5})
    await wait_for(lambda: oban.check_queue("default").running == [sleeper.id], timeout=15)
    await _rename(conn, prefix, ["oban_jobs", "oban_producers"], "", "_away")
    try:
        await until(["oban.producer.ack.exception", "oban.producer.get.exception", "oban.stager.stage.exception"])
        await _call(pruner, "prune")
        await _call(lifeline, "rescue")
        await _call(refresher, "refresh")
        await _call(refresher, "cleanup")
        await _rename(conn, prefix, ["oban_leaders"], "", "_away")
        # The scheduler checks the lease in oban_leaders before it inserts anything.
        await _call(scheduler, "evaluate", datetime.now(UTC))
        await _call(leader, "elect")
    finally:
        await _rename(conn, prefix, ["oban_jobs", "oban_producers"], "_away", "")
        if await conn.fetchval("SELECT to_regclass($1)", f"{prefix}.oban_leaders_away"):
            await _rename(conn, prefix, ["oban_leaders"], "_away", "")


async def test_obanpro_start_logs_events_in_every_process(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    node = start_node(
        "start", "--import", "tests.workers", "-q", "default:4", "-p", "2", "--log-level", "DEBUG", "--log-format", "json"
    )
    failed = await workers.Fail.enqueue({"note": "from a worker process"}, max_attempts=1)
    done = await workers.Noop.enqueue()

    def lines() -> list[dict[str, Any]]:
        parsed = []
        for line in node.output().splitlines():
            if line.startswith("{"):
                parsed.append(json.loads(line))
        return parsed

    def event(name: str, **match: Any) -> dict[str, Any] | None:
        for line in lines():
            if line.get("event") == name and all(line.get(key) == value for key, value in match.items()):
                return line
        return None

    failure = await wait_for(lambda: event("oban.job.exception", id=failed.id), timeout=30)
    stop = await wait_for(lambda: event("oban.job.stop", id=done.id), timeout=30)
    staging = await wait_for(lambda: event("oban.stager.stage.stop"), timeout=30)

    assert failure["level"] == "warning"
    assert failure["state"] == "discarded"
    assert "from a worker process" in failure["error_message"]
    assert stop["level"] == "debug"
    assert stop["state"] == "completed"
    workers_pids = set(node.children())
    assert failure["pid"] in workers_pids
    assert stop["pid"] in workers_pids
    assert staging["pid"] in workers_pids
    assert staging["pid"] not in (failure["pid"], stop["pid"])
