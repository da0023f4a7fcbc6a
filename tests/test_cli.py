"""The obanpro command: bad input, start and stop, signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import asyncpg
import pytest

from obanpro.oban import Oban

from . import workers
from .conftest import ROOT, wait_for


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "obanpro", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("default:abc", "'default:abc': the limit must be a positive integer, as in 'default:20'"),
        ("default:0", "'default:0': the limit must be a positive integer"),
        (":5", "':5': the queue name is missing, as in 'default:20'"),
    ],
)
def test_bad_queue_spec_exits_2(spec: str, fragment: str) -> None:
    result = run_cli("start", "-q", spec, "--dsn", "postgresql://nobody@127.0.0.1:1/none")

    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_database_is_named_without_password() -> None:
    result = run_cli("start", "-q", "default:1", "--dsn", "postgresql://app:s3cret-pw@127.0.0.1:1/jobs")

    assert result.returncode == 1
    assert "127.0.0.1:1/jobs" in result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_missing_tables_name_install(dsn: str) -> None:
    result = run_cli("start", "-q", "default:1", "--dsn", dsn, "--prefix", "no_such_schema_here")

    assert result.returncode == 1
    assert "obanpro install --prefix no_such_schema_here" in result.stderr


def test_bad_setup_hook_is_named(dsn: str) -> None:
    result = run_cli("start", "-q", "default:1", "--dsn", dsn, "--setup", "tests.workers.Noop")

    assert result.returncode == 2
    assert "invalid --setup 'tests.workers.Noop': expected an async function" in result.stderr


def test_unimportable_module_is_named(dsn: str) -> None:
    result = run_cli("start", "-q", "default:1", "--dsn", dsn, "--import", "tests.no_such_module")

    assert result.returncode == 1
    assert "cannot import worker module 'tests.no_such_module'" in result.stderr
    assert "on PYTHONPATH" in result.stderr
    assert "<frozen" not in result.stderr


def test_worker_without_process_points_at_class(dsn: str) -> None:
    result = run_cli("start", "-q", "default:1", "--dsn", dsn, "--import", "tests.bad_worker_module")

    assert result.returncode == 1
    assert "cannot import worker module 'tests.bad_worker_module'" in result.stderr
    assert "tests/bad_worker_module.py, line 6" in result.stderr


def test_dry_run_prints_plan(dsn: str) -> None:
    result = run_cli(
        "start", "--dry-run", "-q", "default:3", "-p", "2", "--import", "tests.workers", "--dsn", "postgresql://a:pw@h/db"
    )

    assert result.returncode == 0, result.stderr
    assert "queues: default:3" in result.stdout
    assert "processes: 2" in result.stdout
    assert "tests.workers.Noop" in result.stdout
    assert "pw@" not in result.stdout


def test_version_prints() -> None:
    result = run_cli("version")

    assert result.returncode == 0
    assert result.stdout.startswith("obanpro ")


def test_install_then_uninstall(dsn: str) -> None:
    prefix = "cli_install_check"
    try:
        assert run_cli("install", "--dsn", dsn, "--prefix", prefix).returncode == 0
        assert run_cli("install", "--dsn", dsn, "--prefix", prefix).returncode == 0
        result = run_cli("uninstall", "--dsn", dsn, "--prefix", prefix, "--yes")
        assert result.returncode == 0, result.stderr
    finally:
        run_cli("uninstall", "--dsn", dsn, "--prefix", prefix, "--yes")


async def test_start_runs_jobs_and_stops_cleanly(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    jobs = await oban.enqueue_many([workers.Noop.new({"i": i}) for i in range(200)])

    node = start_node("start", "--import", "tests.workers", "-q", "default:10", "-p", "2")
    await wait_for(lambda: _count(conn, prefix, "completed", len(jobs)), timeout=30)

    assert node.stop() == 0
    assert "Traceback" not in node.output()


async def test_sigterm_lets_running_jobs_finish(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:5", "-p", "1", "--grace-period", "10")
    await oban.enqueue_many([workers.Sleep.new({"seconds": 1.5}) for _ in range(3)])
    await wait_for(lambda: _count(conn, prefix, "executing", 3), timeout=30)

    node.signal(signal.SIGTERM)
    await wait_for(lambda: "stopping intake" in node.output(), timeout=10)
    node.signal(signal.SIGTERM)

    assert node.wait(30) == 0
    assert await _count(conn, prefix, "completed", 3)
    assert "received SIGTERM again: node" in node.output()


async def test_sigterm_while_starting_exits_0(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    job = await workers.Noop.enqueue()
    node = start_node(
        "start", "--import", "tests.slow_import", "--import", "tests.workers", "-q", "default:5", "-p", "1",
        env={"OBANPRO_TEST_IMPORT_DELAY": "3"},
    )
    await asyncio.sleep(1.0)

    node.signal(signal.SIGTERM)

    assert node.wait(30) == 0
    assert "received SIGTERM while starting" in node.output()
    assert "starting 1 worker processes" not in node.output()
    assert await _count(conn, prefix, "available", 1)
    assert await conn.fetchval(f"SELECT attempt FROM {prefix}.oban_jobs WHERE id = $1", job.id) == 0


async def test_jobs_past_grace_period_are_retried(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:5", "-p", "1", "--grace-period", "0.5")
    job = await workers.Sleep.enqueue({"seconds": 60})
    await wait_for(lambda: _count(conn, prefix, "executing", 1), timeout=30)

    node.signal(signal.SIGTERM)

    assert node.wait(30) == 0
    row = await conn.fetchrow(f"SELECT state::text, errors FROM {prefix}.oban_jobs WHERE id = $1", job.id)
    assert row["state"] == "retryable"
    assert "stopped at shutdown with the job still running" in json.loads(row["errors"])[0]["error"]


async def test_second_interrupt_exits_at_once(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:5", "-p", "1", "--grace-period", "60")
    await workers.Sleep.enqueue({"seconds": 60})
    await wait_for(lambda: _count(conn, prefix, "executing", 1), timeout=30)

    job_id = await conn.fetchval(f"SELECT id FROM {prefix}.oban_jobs")
    node.signal(signal.SIGINT)
    await wait_for(lambda: "stopping intake" in node.output(), timeout=10)
    node.signal(signal.SIGINT)

    assert node.wait(10) != 0
    assert "second interrupt" in node.output()
    row = await conn.fetchrow(f"SELECT state::text, errors FROM {prefix}.oban_jobs WHERE id = $1", job_id)
    assert row["state"] == "retryable"
    error = json.loads(row["errors"])[-1]["error"]
    assert "was killed by SIGKILL" in error
    assert "when a second interrupt stopped the node" in error


async def _count(conn: asyncpg.Connection, prefix: str, state: str, expected: int) -> bool:
    count = await conn.fetchval(f"SELECT count(*) FROM {prefix}.oban_jobs WHERE state = $1::text::{prefix}.oban_job_state", state)
    return count == expected
