"""Testing helpers: inline and manual modes, process_job, enqueue assertions, drain_queue and reset."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

from obanpro import Record, erlang_term, testing
from obanpro.oban import Oban

from . import workers


async def _count(conn: asyncpg.Connection, prefix: str) -> int:
    return await conn.fetchval(f"SELECT count(*) FROM {prefix}.oban_jobs")


# Modes


def test_mode_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="invalid testing mode 'eager'"), testing.mode("eager"):
        pass


async def test_inline_runs_jobs_without_inserting(oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    with testing.mode("inline"):
        job = await workers.add.enqueue(2, 3)

    assert job.state == "completed"
    assert job.attempt == 1
    assert job.completed_at is not None
    assert job.meta["recorded"] is True
    assert erlang_term.decode_base64(job.meta["return"]) == 5
    assert await _count(conn, prefix) == 0


async def test_inline_records_failures(oban: Oban) -> None:
    with testing.mode("inline"):
        retryable = await workers.Fail.enqueue({"note": "inline"})
        discarded = await workers.Fail.enqueue({"note": "last"}, max_attempts=1)

    assert retryable.state == "retryable"
    assert "ValueError: failing on purpose: inline" in retryable.errors[0]["error"]
    assert retryable.scheduled_at > retryable.attempted_at
    assert discarded.state == "discarded"
    assert discarded.discarded_at is not None


async def test_inline_outcomes_of_return_values(oban: Oban) -> None:
    with testing.mode("inline"):
        snoozed, cancelled, digest = await oban.enqueue_many(
            workers.Snoozer.new({"seconds": 30}),
            workers.Canceller.new({"reason": "not today"}),
            workers.Digest.new({"seed": "a", "rounds": 10}),
        )

    assert snoozed.state == "scheduled"
    assert snoozed.attempt == 0
    assert snoozed.meta["snoozed"] == 1
    assert cancelled.state == "cancelled"
    assert cancelled.errors[-1]["error"] == "not today"
    assert digest.state == "completed"


async def test_inline_round_trips_args_through_json(oban: Oban) -> None:
    with testing.mode("inline"):
        job = await workers.Noop.enqueue({"pair": (1, 2), "nested": {"x": None}})

        with pytest.raises(ValueError, match="invalid args"):
            await workers.Noop.enqueue({"when": object()})

    assert job.args == {"pair": [1, 2], "nested": {"x": None}}


async def test_manual_mode_inserts(oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    with testing.mode("inline"), testing.mode("manual"):
        job = await workers.Noop.enqueue()

    assert job.state == "available"
    assert await _count(conn, prefix) == 1


# process_job


def test_process_job_outside_a_loop() -> None:
    result = testing.process_job(workers.add.new(4, 5))

    assert isinstance(result, Record)
    assert result.value == 9


async def test_process_job_inside_a_loop() -> None:
    job = workers.async_add.new(1, 1)

    result = await testing.process_job(job)

    assert result.value == {"sum": 2, "attempt": 1}
    assert job.id is not None
    assert job.attempted_at is not None


async def test_process_job_raises_the_job_error() -> None:
    with pytest.raises(ValueError, match="failing on purpose: direct"):
        await testing.process_job(workers.Fail.new({"note": "direct"}))


# Enqueued jobs


async def test_all_enqueued_filters(oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    first = await workers.Noop.enqueue({"id": 1, "kind": "a"}, queue="alpha")
    second = await workers.Noop.enqueue({"id": 2, "kind": "a"}, schedule_in=3600)
    other = await workers.Sleep.enqueue({"id": 3})
    done = await workers.Noop.enqueue({"id": 4})
    await conn.execute(f"UPDATE {prefix}.oban_jobs SET state = 'completed' WHERE id = $1", done.id)

    assert [job.id for job in await testing.all_enqueued()] == [other.id, second.id, first.id]
    assert [job.id for job in await testing.all_enqueued(worker=workers.Noop)] == [second.id, first.id]
    assert [job.id for job in await testing.all_enqueued(worker="tests.workers.Sleep")] == [other.id]
    assert [job.id for job in await testing.all_enqueued(args={"kind": "a"})] == [second.id, first.id]
    assert [job.id for job in await testing.all_enqueued(args={"kind": "a", "id": 1})] == [first.id]
    assert [job.id for job in await testing.all_enqueued(queue="alpha")] == [first.id]
    assert [job.id for job in await testing.all_enqueued(scheduled_in=3600)] == [second.id]
    assert [job.id for job in await testing.all_enqueued(scheduled_in=timedelta(minutes=5))] == []
    assert await testing.all_enqueued(oban=oban, state="completed") == []


async def test_all_enqueued_rejects_unknown_filters(oban: Oban) -> None:
    with pytest.raises(ValueError, match=r"invalid filters \['colour'\]"):
        await testing.all_enqueued(colour="red")


async def test_all_enqueued_needs_a_started_instance() -> None:
    with pytest.raises(RuntimeError, match="no started Oban instance named 'Elsewhere'"):
        await testing.all_enqueued(oban="Elsewhere")


async def test_assert_enqueued_passes_and_fails(oban: Oban) -> None:
    await workers.Noop.enqueue({"to": "a@example.com"})

    await testing.assert_enqueued(worker=workers.Noop, args={"to": "a@example.com"})
    with pytest.raises(AssertionError) as failure:
        await testing.assert_enqueued(worker=workers.Noop, args={"to": "b@example.com"})

    assert "expected a job matching" in str(failure.value)
    assert "a@example.com" in str(failure.value)


async def test_assert_enqueued_waits_up_to_timeout(oban: Oban) -> None:
    async def later() -> None:
        await asyncio.sleep(0.1)
        await workers.Noop.enqueue({"late": True})

    task = asyncio.create_task(later())
    await testing.assert_enqueued(args={"late": True}, timeout=5)
    await task


async def test_refute_enqueued_passes_and_fails(oban: Oban) -> None:
    await testing.refute_enqueued(worker=workers.Noop)
    await workers.Noop.enqueue({"n": 1})

    with pytest.raises(AssertionError, match="expected no job matching"):
        await testing.refute_enqueued(worker=workers.Noop)


async def test_refute_enqueued_watches_for_timeout(oban: Oban) -> None:
    async def later() -> None:
        await asyncio.sleep(0.1)
        await workers.Noop.enqueue({"late": True})

    task = asyncio.create_task(later())
    with pytest.raises(AssertionError, match="within 5 s"):
        await testing.refute_enqueued(args={"late": True}, timeout=5)
    await task


# drain_queue


async def test_drain_counts_final_states(oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    await oban.enqueue_many(
        workers.Noop.new(),
        workers.Canceller.new(),
        workers.Fail.new({"note": "drained"}),
        workers.Noop.new(schedule_in=3600),
    )

    summary = await testing.drain_queue(with_safety=True)

    assert summary == {"cancelled": 1, "completed": 2, "discarded": 1, "retryable": 2, "scheduled": 0}
    rows = await conn.fetch(f"SELECT state::text, attempt FROM {prefix}.oban_jobs WHERE worker = 'tests.workers.Fail'")
    assert [(row["state"], row["attempt"]) for row in rows] == [("discarded", 3)]


async def test_drain_without_safety_raises_after_storing(oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.Fail.enqueue({"note": "unsafe"})

    with pytest.raises(ValueError, match="failing on purpose: unsafe"):
        await testing.drain_queue(queue="default")

    row = await conn.fetchrow(f"SELECT state::text, errors FROM {prefix}.oban_jobs WHERE id = $1", job.id)
    assert row["state"] == "retryable"
    assert "unsafe" in row["errors"]


async def test_drain_recursion_runs_jobs_enqueued_meanwhile(oban: Oban) -> None:
    await workers.Enqueuer.enqueue()

    assert (await testing.drain_queue(with_recursion=True))["completed"] == 2


async def test_drain_single_pass_leaves_new_jobs(oban: Oban) -> None:
    await workers.Enqueuer.enqueue()
    await workers.Noop.enqueue()

    summary = await testing.drain_queue(with_recursion=False)

    assert summary["completed"] == 2
    assert [job.worker for job in await testing.all_enqueued()] == ["tests.workers.Noop"]


async def test_drain_without_scheduled_leaves_them(oban: Oban) -> None:
    later = await workers.Noop.enqueue(schedule_in=3600)

    assert (await testing.drain_queue(with_scheduled=False))["completed"] == 0
    assert [job.id for job in await testing.all_enqueued()] == [later.id]
    assert (await testing.drain_queue(with_scheduled=True))["completed"] == 1


async def test_drain_only_its_queue(oban: Oban) -> None:
    other = await workers.Noop.enqueue(queue="other")

    assert (await testing.drain_queue())["completed"] == 0
    assert [job.id for job in await testing.all_enqueued()] == [other.id]


# reset


async def test_reset_empties_tables_and_restarts_ids(oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    await oban.enqueue_many([workers.Noop.new() for _ in range(3)])
    await conn.execute(f"INSERT INTO {prefix}.oban_leaders (name, node, elected_at, expires_at) VALUES ('Oban', 'x', now(), now())")

    await testing.reset_oban(oban)

    assert await _count(conn, prefix) == 0
    assert await conn.fetchval(f"SELECT count(*) FROM {prefix}.oban_leaders") == 0
    assert (await workers.Noop.enqueue()).id == 1
