"""``obanpro jobs``: listing, filtering, showing, retrying and cancelling from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import asyncpg
import pytest

from obanpro.job import Record
from obanpro.oban import Oban

from . import workers
from .conftest import ROOT, wait_for


def jobs_cli(dsn: str, prefix: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "obanpro", "jobs", *args, "--dsn", dsn, "--prefix", prefix],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        input=input,
        timeout=60,
        check=False,
    )


async def _set_state(conn: asyncpg.Connection, prefix: str, job_id: int, state: str, attempt: int = 1) -> None:
    await conn.execute(f"UPDATE {prefix}.oban_jobs SET state = $2, attempt = $3 WHERE id = $1", job_id, state, attempt)


async def _state(conn: asyncpg.Connection, prefix: str, job_id: int) -> str:
    return await conn.fetchval(f"SELECT state::text FROM {prefix}.oban_jobs WHERE id = $1", job_id)


@pytest.fixture
async def sample(oban: Oban, conn: asyncpg.Connection, prefix: str) -> dict[str, int]:
    """Jobs in several states, queues and workers."""
    jobs = {
        "available": await workers.Noop.enqueue(),
        "mail": await workers.Noop.enqueue(queue="mailers"),
        "discarded": await workers.Fail.enqueue({"note": "x"}),
        "completed": await workers.Sleep.enqueue(),
        "scheduled": await workers.Noop.enqueue(schedule_in=3600),
    }
    await _set_state(conn, prefix, jobs["discarded"].id, "discarded", attempt=3)
    await conn.execute(
        f"""UPDATE {prefix}.oban_jobs SET errors = '[{{"attempt": 3, "at": "2024-01-01T00:00:00", "error": "boom\\nline two"}}]'
        WHERE id = $1""",
        jobs["discarded"].id,
    )
    await _set_state(conn, prefix, jobs["completed"].id, "completed")
    return {name: job.id for name, job in jobs.items()}


def test_list_filters_by_state_queue_and_worker(dsn: str, prefix: str, sample: dict[str, int]) -> None:
    by_state = jobs_cli(dsn, prefix, "list", "--state", "available", "--json")
    by_queue = jobs_cli(dsn, prefix, "list", "--queue", "mailers", "--json")
    by_worker = jobs_cli(dsn, prefix, "list", "--worker", "tests.workers.Fail", "--worker", "tests.workers.Sleep", "--json")
    combined = jobs_cli(dsn, prefix, "list", "--state", "available", "--queue", "default", "--json")

    assert by_state.returncode == 0, by_state.stderr
    assert [job["id"] for job in json.loads(by_state.stdout)] == [sample["mail"], sample["available"]]
    assert [job["id"] for job in json.loads(by_queue.stdout)] == [sample["mail"]]
    assert [job["id"] for job in json.loads(by_worker.stdout)] == [sample["completed"], sample["discarded"]]
    assert [job["id"] for job in json.loads(combined.stdout)] == [sample["available"]]


def test_list_text_shows_a_table_and_the_limit(dsn: str, prefix: str, sample: dict[str, int]) -> None:
    result = jobs_cli(dsn, prefix, "list", "--limit", "2")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "STATE", "QUEUE", "WORKER", "ATTEMPT"]
    assert lines[1].split()[:4] == [str(sample["scheduled"]), "scheduled", "default", "tests.workers.Noop"]
    assert len(lines) == 4
    assert lines[3] == "showing 2 of 5 matching jobs; raise --limit to see more"


def test_list_without_matches(dsn: str, prefix: str, sample: dict[str, int]) -> None:
    result = jobs_cli(dsn, prefix, "list", "--queue", "nothing-here")

    assert result.returncode == 0
    assert result.stdout.strip() == f"no jobs match in schema {prefix}"


def test_list_rejects_unknown_state(dsn: str, prefix: str) -> None:
    result = jobs_cli(dsn, prefix, "list", "--state", "done")

    assert result.returncode == 2
    assert "'done' is not one of" in result.stderr


def test_show_prints_fields_and_errors(dsn: str, prefix: str, sample: dict[str, int]) -> None:
    text = jobs_cli(dsn, prefix, "show", str(sample["discarded"]))
    as_json = jobs_cli(dsn, prefix, "show", str(sample["discarded"]), "--json")

    assert text.returncode == 0, text.stderr
    assert f"id:           {sample['discarded']}" in text.stdout
    assert "state:        discarded" in text.stdout
    assert "attempt:      3 of 3" in text.stdout
    assert 'args:         {"note": "x"}' in text.stdout
    assert "  attempt 3 at 2024-01-01T00:00:00:\n    boom\n    line two" in text.stdout
    job = json.loads(as_json.stdout)
    assert job["worker"] == "tests.workers.Fail"
    assert job["errors"][0]["error"] == "boom\nline two"


def test_show_missing_job_fails(dsn: str, prefix: str) -> None:
    result = jobs_cli(dsn, prefix, "show", "424242")

    assert result.returncode == 1
    assert f"job 424242 not found in schema {prefix}" in result.stderr


async def test_retry_by_id(dsn: str, prefix: str, sample: dict[str, int], conn: asyncpg.Connection) -> None:
    result = jobs_cli(dsn, prefix, "retry", str(sample["discarded"]), str(sample["available"]), "--yes", "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"retried": [sample["discarded"]]}
    row = await conn.fetchrow(f"SELECT state::text, max_attempts FROM {prefix}.oban_jobs WHERE id = $1", sample["discarded"])
    assert row["state"] == "available"
    assert row["max_attempts"] == 4


async def test_retry_by_filter_asks_first(dsn: str, prefix: str, sample: dict[str, int], conn: asyncpg.Connection) -> None:
    declined = jobs_cli(dsn, prefix, "retry", "--state", "completed", "--state", "discarded", input="n\n")

    assert declined.returncode == 1
    assert "Retry 2 jobs in schema" in declined.stderr
    assert "aborted; no job was changed" in declined.stderr
    assert await _state(conn, prefix, sample["completed"]) == "completed"

    accepted = jobs_cli(dsn, prefix, "retry", "--state", "completed", "--state", "discarded", input="y\n")

    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip() == "retried 2 jobs"
    assert await _state(conn, prefix, sample["completed"]) == "available"
    assert await _state(conn, prefix, sample["discarded"]) == "available"


async def test_retry_without_answer_changes_nothing(dsn: str, prefix: str, sample: dict[str, int], conn: asyncpg.Connection) -> None:
    result = jobs_cli(dsn, prefix, "retry", str(sample["completed"]), input="")

    assert result.returncode == 1
    assert await _state(conn, prefix, sample["completed"]) == "completed"


def test_retry_needs_ids_or_filters(dsn: str, prefix: str) -> None:
    result = jobs_cli(dsn, prefix, "retry", "--yes")

    assert result.returncode == 2
    assert "give job ids, --state, --queue or --worker" in result.stderr


async def test_cancel_by_queue(dsn: str, prefix: str, sample: dict[str, int], conn: asyncpg.Connection) -> None:
    result = jobs_cli(dsn, prefix, "cancel", "--queue", "default", "--yes")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cancelled 2 jobs that had not started"
    assert await _state(conn, prefix, sample["available"]) == "cancelled"
    assert await _state(conn, prefix, sample["scheduled"]) == "cancelled"
    assert await _state(conn, prefix, sample["mail"]) == "available"
    assert await _state(conn, prefix, sample["completed"]) == "completed"


async def test_cancel_stops_executing_job(dsn: str, prefix: str, conn: asyncpg.Connection) -> None:
    async with Oban(dsn=dsn, prefix=prefix, queues={"default": 2}, grace_period=2):
        job = await workers.Blocker.enqueue({"seconds": 30})
        await wait_for(lambda: _is(conn, prefix, job.id, "executing"), timeout=10)

        result = jobs_cli(dsn, prefix, "cancel", str(job.id), "--yes", "--json")

        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"cancelled": 1, "signalled": [job.id], "orphaned": []}
        await wait_for(lambda: _is(conn, prefix, job.id, "cancelled"), timeout=10)


async def test_cancel_ends_job_no_node_runs(dsn: str, prefix: str, conn: asyncpg.Connection) -> None:
    # As after a killed node: executing, by a producer whose row is gone.
    job_id = await conn.fetchval(
        f"INSERT INTO {prefix}.oban_jobs (state, queue, worker, args, attempt, attempted_at, attempted_by) "
        "VALUES ('executing', 'default', 'tests.workers.Noop', '{}', 1, timezone('UTC', now()) - interval '5 minutes', "
        "ARRAY['gone-node', '00000000-0000-0000-0000-000000000001']) RETURNING id"
    )

    result = jobs_cli(dsn, prefix, "cancel", str(job_id), "--yes")

    assert result.returncode == 0, result.stderr
    assert f"cancelled jobs {job_id}, left executing by a node that stopped" in result.stdout
    assert await _state(conn, prefix, job_id) == "cancelled"


async def _is(conn: asyncpg.Connection, prefix: str, job_id: int, state: str) -> bool:
    return await _state(conn, prefix, job_id) == state


def test_unreachable_database_hides_the_password(prefix: str) -> None:
    result = jobs_cli("postgresql://app:s3cret-pw@127.0.0.1:1/jobs", prefix, "list")

    assert result.returncode == 1
    assert "127.0.0.1:1/jobs" in result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_missing_tables_name_install(dsn: str) -> None:
    result = jobs_cli(dsn, "no_such_schema_here", "list")

    assert result.returncode == 1
    assert "obanpro install --prefix no_such_schema_here" in result.stderr


async def test_show_decodes_recorded_value(dsn: str, prefix: str, oban: Oban, conn: asyncpg.Connection) -> None:
    recorded = await workers.Recorder.enqueue()
    broken = await workers.Recorder.enqueue()
    await conn.execute(
        f"""UPDATE {prefix}.oban_jobs SET state = 'completed', meta = jsonb_build_object('recorded', true, 'return', $2::text)
        WHERE id = $1""",
        recorded.id,
        Record({"rows": [1, 2], "ok": True}).encoded,
    )
    await conn.execute(
        f"""UPDATE {prefix}.oban_jobs SET state = 'completed', meta = '{{"recorded": true, "return": "%%%"}}'
        WHERE id = $1""",
        broken.id,
    )

    text = jobs_cli(dsn, prefix, "show", str(recorded.id))
    broken_text = jobs_cli(dsn, prefix, "show", str(broken.id))

    assert text.returncode == 0, text.stderr
    assert "recorded:     {'rows': [1, 2], 'ok': True}" in text.stdout
    assert broken_text.returncode == 0, broken_text.stderr
    assert "recorded:     (meta.return could not be decoded:" in broken_text.stdout
