"""Queue and job control through `Oban`: local effect, the signals sent, and job state changes."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from obanpro import Job
from obanpro.control import QueueInfo
from obanpro.notifier import decode_payload
from obanpro.oban import Oban

from . import workers
from .conftest import wait_for


@pytest.fixture
async def running(dsn: str, prefix: str):
    oban = Oban(dsn=dsn, prefix=prefix, queues={"default": 5, "mailers": {"limit": 2, "region": "eu"}}, node="n1", grace_period=2)
    await oban.start()
    yield oban
    await oban.stop()


class Signals:
    """Collects the payloads NOTIFYed on a prefix's signal channel."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []

    def on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.payloads.append(decode_payload(payload))

    async def until_marker(self, oban: Oban) -> list[dict[str, Any]]:
        """Send a marker after the calls under test and return what arrived before it.

        NOTIFYs reach listeners in commit order, so everything committed before the marker arrives first.
        """
        await oban.resume_queue("marker", node="nowhere")
        await wait_for(lambda: any(payload.get("queue") == "marker" for payload in self.payloads), timeout=5)
        return [payload for payload in self.payloads if payload.get("queue") != "marker"]


@pytest.fixture
async def signals(dsn: str, prefix: str):
    listener = await asyncpg.connect(dsn)
    collected = Signals()
    await listener.add_listener(f"{prefix}.oban_signal", collected.on_notify)
    yield collected
    await listener.close()


async def _row(conn: asyncpg.Connection, prefix: str, job_id: int) -> asyncpg.Record:
    return await conn.fetchrow(
        f"SELECT state::text, attempt, max_attempts, meta, errors, scheduled_at, completed_at, cancelled_at, "
        f"discarded_at, priority, tags, queue FROM {prefix}.oban_jobs WHERE id = $1",
        job_id,
    )


async def _state(conn: asyncpg.Connection, prefix: str, job_id: int) -> str | None:
    return await conn.fetchval(f"SELECT state::text FROM {prefix}.oban_jobs WHERE id = $1", job_id)


# Queues in this process


async def test_check_queue_reports_local_state(running: Oban) -> None:
    info = running.check_queue("mailers")

    assert isinstance(info, QueueInfo)
    assert info.limit == 2
    assert info.paused is False
    assert info.node == "n1"
    assert info.queue == "mailers"
    assert info.running == []
    assert info.meta == {"region": "eu"}
    assert info.started_at is not None
    assert info.started_at <= datetime.now(UTC)
    assert len(info.uuid) == 36
    assert sorted(queue.queue for queue in running.check_all_queues()) == ["default", "mailers"]
    assert running.check_queue("unknown") is None


async def test_check_queue_lists_running_jobs(running: Oban) -> None:
    job = await workers.Blocker.enqueue({"seconds": 30})

    await wait_for(lambda: running.check_queue("default").running == [job.id], timeout=10)
    await running.cancel_job(job)


async def test_oban_without_queues_checks_nothing(oban: Oban) -> None:
    assert oban.check_queue("default") is None
    assert oban.check_all_queues() == []


async def test_pause_applies_locally_and_signals_all(running: Oban, signals: Signals) -> None:
    await running.pause_queue("default")

    assert running.check_queue("default").paused is True
    assert running.check_queue("mailers").paused is False
    assert await signals.until_marker(running) == [{"action": "pause", "queue": "default", "ident": "any"}]

    await running.resume_queue("default")
    assert running.check_queue("default").paused is False


async def test_call_for_this_node_sends_no_signal(running: Oban, signals: Signals) -> None:
    await running.pause_all_queues(node="n1")

    assert all(info.paused for info in running.check_all_queues())
    assert await signals.until_marker(running) == []


async def test_call_for_other_node_only_signals(running: Oban, signals: Signals) -> None:
    await running.scale_queue(queue="default", limit=9, node="n2")
    await running.pause_all_queues(node="n2")

    assert running.check_queue("default").limit == 5
    assert running.check_queue("default").paused is False
    assert await signals.until_marker(running) == [
        {"action": "scale", "queue": "default", "limit": 9, "ident": "Oban.n2"},
        {"action": "pause", "queue": "*", "ident": "Oban.n2"},
    ]


async def test_signals_from_oban_without_queues(oban: Oban, signals: Signals) -> None:
    await oban.start_queue(queue="media", limit=4, paused=True)
    await oban.stop_queue("media", node=oban.node)
    await oban.scale_queue(queue="media", limit=2, global_limit=10)

    assert await signals.until_marker(oban) == [
        {"action": "start", "queue": "media", "limit": 4, "paused": True, "ident": "any"},
        {"action": "stop", "queue": "media", "ident": f"Oban.{oban.node}"},
        {"action": "scale", "queue": "media", "limit": 2, "global_limit": 10, "ident": "any"},
    ]


async def test_scale_queue_locally(running: Oban) -> None:
    await running.scale_queue(queue="default", limit=11)

    assert running.check_queue("default").limit == 11
    with pytest.raises(ValueError, match="reserved"):
        await running.scale_queue(queue="default", limit=100_000)


async def test_start_and_stop_queue_locally(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.Noop.enqueue(queue="media")

    await running.start_queue(queue="media", limit=3)

    await wait_for(lambda: _is(conn, prefix, job.id, "completed"), timeout=10)
    assert running.check_queue("media").limit == 3

    await running.stop_queue("media")
    assert running.check_queue("media") is None


async def _is(conn: asyncpg.Connection, prefix: str, job_id: int, state: str) -> bool:
    return await _state(conn, prefix, job_id) == state


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda oban: oban.pause_queue(""), ValueError, "invalid queue"),
        (lambda oban: oban.pause_queue(7), ValueError, "invalid queue"),
        (lambda oban: oban.stop_queue("*"), ValueError, "only pause and resume"),
        (lambda oban: oban.start_queue(queue="media", limit=0), ValueError, "invalid limit"),
        (lambda oban: oban.start_queue(queue="media", limit=2, paused="yes"), TypeError, "invalid paused"),
        (lambda oban: oban.scale_queue(queue="default"), TypeError, "needs an option"),
        (lambda oban: oban.scale_queue(queue="default", limit="10"), ValueError, "invalid limit"),
        (lambda oban: oban.pause_queue("default", node=""), TypeError, "invalid node"),
    ],
)
async def test_invalid_queue_calls_raise(running: Oban, call, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        await call(running)


# Cancelling


async def test_cancel_jobs_that_have_not_started(oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    available = await workers.Noop.enqueue()
    scheduled = await workers.Noop.enqueue(schedule_in=3600)
    retryable = await workers.Noop.enqueue()
    done = await workers.Noop.enqueue()
    await conn.execute(f"UPDATE {prefix}.oban_jobs SET state = 'retryable' WHERE id = $1", retryable.id)
    await conn.execute(f"UPDATE {prefix}.oban_jobs SET state = 'completed' WHERE id = $1", done.id)

    count = await oban.cancel_many_jobs([available, scheduled.id, retryable, done])

    assert count == 3
    for job in (available, scheduled, retryable):
        row = await _row(conn, prefix, job.id)
        assert row["state"] == "cancelled"
        assert row["cancelled_at"] is not None
        assert "cancel_attempted_at" in json.loads(row["meta"])
    assert await _state(conn, prefix, done.id) == "completed"


async def test_cancel_unknown_or_empty_counts_nothing(oban: Oban) -> None:
    assert await oban.cancel_many_jobs([]) == 0
    assert await oban.cancel_many_jobs([123_456]) == 0


async def test_cancel_needs_an_enqueued_job(oban: Oban) -> None:
    with pytest.raises(ValueError, match="never enqueued"):
        await oban.cancel_job(workers.Noop.new())
    with pytest.raises(TypeError, match="expected a Job or a job id"):
        await oban.cancel_job("12")


async def test_cancel_running_async_job(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.Blocker.enqueue({"seconds": 30})
    await wait_for(lambda: _is(conn, prefix, job.id, "executing"), timeout=10)

    assert await running.cancel_many_jobs([job]) == 1

    await wait_for(lambda: _is(conn, prefix, job.id, "cancelled"), timeout=10)
    row = await _row(conn, prefix, job.id)
    assert json.loads(row["errors"])[-1]["error"] == "cancelled while executing"
    assert "cancel_attempted_at" not in json.loads(row["meta"])


async def test_cancel_running_sync_job_sets_flag(running: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.WaitForCancel.enqueue({"seconds": 30})
    await wait_for(lambda: _is(conn, prefix, job.id, "executing"), timeout=10)

    await running.cancel_job(job.id)

    await wait_for(lambda: _is(conn, prefix, job.id, "cancelled"), timeout=10)
    row = await _row(conn, prefix, job.id)
    assert json.loads(row["errors"])[-1]["error"] == "noticed the cancel request"


async def test_cancel_reaches_worker_processes(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    start_node("start", "--import", "tests.workers", "-q", "default:4", "-p", "2")
    jobs = await oban.enqueue_many(
        [workers.Blocker.new({"seconds": 60}), workers.WaitForCancel.new({"seconds": 60})]
    )
    for job in jobs:
        await wait_for(lambda job_id=job.id: _is(conn, prefix, job_id, "executing"), timeout=20)

    # The node's listener may start after its workers; pkill signals are only acted on once it listens.
    async def cancelled() -> bool:
        await oban.cancel_many_jobs(jobs)
        await asyncio.sleep(0.3)
        return all([await _is(conn, prefix, job.id, "cancelled") for job in jobs])

    await wait_for(cancelled, timeout=20)
    errors = [json.loads((await _row(conn, prefix, job.id))["errors"])[-1]["error"] for job in jobs]
    assert errors == ["cancelled while executing", "noticed the cancel request"]


# Retrying and deleting


async def test_retry_makes_jobs_available(oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    discarded = await workers.Noop.enqueue(max_attempts=1, meta={"uniq_bmp": [1, 2], "keep": 1})
    cancelled = await workers.Noop.enqueue()
    available = await workers.Noop.enqueue()
    await conn.execute(
        f"UPDATE {prefix}.oban_jobs SET state = 'discarded', attempt = 1, discarded_at = now() WHERE id = $1",
        discarded.id,
    )
    await conn.execute(f"UPDATE {prefix}.oban_jobs SET state = 'cancelled', cancelled_at = now() WHERE id = $1", cancelled.id)

    count = await oban.retry_many_jobs([discarded, cancelled.id, available])

    assert count == 2
    row = await _row(conn, prefix, discarded.id)
    assert row["state"] == "available"
    assert row["max_attempts"] == 2
    assert row["discarded_at"] is None
    assert json.loads(row["meta"]) == {"uniq_bmp": [], "keep": 1}
    row = await _row(conn, prefix, cancelled.id)
    assert row["state"] == "available"
    assert row["cancelled_at"] is None
    assert row["max_attempts"] == 20
    assert json.loads(row["meta"]) == {}


async def test_retry_skips_executing_jobs(oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.Noop.enqueue()
    await conn.execute(f"UPDATE {prefix}.oban_jobs SET state = 'executing', attempt = 1 WHERE id = $1", job.id)

    await oban.retry_job(job)

    assert await _state(conn, prefix, job.id) == "executing"


async def test_delete_skips_executing_jobs(oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    kept = await workers.Noop.enqueue()
    deleted = await workers.Noop.enqueue()
    await conn.execute(f"UPDATE {prefix}.oban_jobs SET state = 'executing', attempt = 1 WHERE id = $1", kept.id)

    assert await oban.delete_many_jobs([kept, deleted.id]) == 1

    assert await _state(conn, prefix, kept.id) == "executing"
    assert await _state(conn, prefix, deleted.id) is None
    await oban.delete_job(kept.id)
    assert await _state(conn, prefix, kept.id) == "executing"


# Updating


async def test_update_job_with_dict(oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.Noop.enqueue({"a": 1})

    updated = await oban.update_job(job, {"priority": 3, "tags": ["Urgent", " b "], "args": {"a": 2}, "queue": "other"})

    assert updated.priority == 3
    assert updated.tags == ["b", "urgent"]
    assert updated.args == {"a": 2}
    assert updated.state == "available"
    row = await _row(conn, prefix, job.id)
    assert row["priority"] == 3
    assert row["tags"] == ["b", "urgent"]
    assert row["queue"] == "other"
    assert job.queue == "other"


async def test_update_job_with_function(oban: Oban) -> None:
    job = await workers.Noop.enqueue(meta={"n": 1})

    updated = await oban.update_job(job.id, lambda current: {"meta": {**current.meta, "n": current.meta["n"] + 1}})

    assert updated.meta == {"n": 2}


async def test_update_schedule_moves_state(oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.Noop.enqueue()

    later = await oban.update_job(job, {"scheduled_in": 600})
    assert later.state == "scheduled"
    assert later.scheduled_at > datetime.now(UTC) + timedelta(seconds=590)

    now = await oban.update_job(job, {"scheduled_at": datetime.now(UTC) - timedelta(seconds=1)})
    assert now.state == "available"
    assert await _state(conn, prefix, job.id) == "available"


async def test_update_many_changes_all_or_none(oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    first = await workers.Noop.enqueue()
    second = await workers.Noop.enqueue()

    updated = await oban.update_many_jobs([first, second.id], {"max_attempts": 5})
    assert [job.max_attempts for job in updated] == [5, 5]

    with pytest.raises(ValueError, match="invalid update of job"):
        await oban.update_many_jobs([first, second], lambda job: {"priority": 1 if job.id == first.id else 99})
    assert (await _row(conn, prefix, first.id))["priority"] == 0

    with pytest.raises(ValueError, match="not found"):
        await oban.update_many_jobs([first, 999_999], {"priority": 1})
    assert (await _row(conn, prefix, first.id))["priority"] == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"state": "completed"}, "invalid field 'state'"),
        ({"priority": 10}, "priority"),
        ({"args": [1]}, "args"),
        ({"max_attempts": 1}, "below its attempt"),
    ],
)
async def test_update_rejects_invalid_changes(oban: Oban, conn: asyncpg.Connection, prefix: str, changes, message) -> None:
    job = await workers.Noop.enqueue()
    await conn.execute(f"UPDATE {prefix}.oban_jobs SET attempt = 2, max_attempts = 5 WHERE id = $1", job.id)

    with pytest.raises(ValueError, match=message):
        await oban.update_job(job, changes)


async def test_update_returns_jobs_in_given_order(oban: Oban) -> None:
    jobs = await oban.enqueue_many([workers.Noop.new({"i": i}) for i in range(3)])

    updated = await oban.update_many_jobs([jobs[2], jobs[0], jobs[1]], {"priority": 4})

    assert [job.args["i"] for job in updated] == [2, 0, 1]
    assert all(isinstance(job, Job) for job in updated)
