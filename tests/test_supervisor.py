"""Multi-process nodes: the limit holds across processes, and no job or slot is lost when processes die."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from obanpro import erlang_term, slots
from obanpro.oban import Oban

from . import workers
from .conftest import ROOT, Node, wait_for


async def _table(node: Node) -> slots.Segment:
    """Attach to the live slot table of ``node`` once its supervisor created it."""

    def find() -> slots.Segment | None:
        names = [name for name in slots.segment_names() if f".{node.pid}." in name]
        if not names:
            return None
        try:
            return slots.attach(names[0])
        except ValueError:
            return None  # the supervisor has not finished writing the header yet

    return await wait_for(find, timeout=20)


async def _workers(segment: slots.Segment, count: int) -> list[int]:
    table = segment.table

    def running() -> list[int] | None:
        pids = [table.worker_pid(i) for i in range(table.max_workers) if table.worker_state(i) == 2]
        return pids if len(pids) == count else None

    return await wait_for(running, timeout=20)


async def _states(conn: asyncpg.Connection, prefix: str) -> dict[str, int]:
    rows = await conn.fetch(f"SELECT state::text, count(*) FROM {prefix}.oban_jobs GROUP BY 1")
    return {row[0]: row[1] for row in rows}


async def _all_completed(conn: asyncpg.Connection, prefix: str, total: int) -> bool:
    return (await _states(conn, prefix)) == {"completed": total}


@pytest.mark.slow
async def test_limit_holds_across_processes(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    await oban.enqueue_many([workers.Sleep.new({"seconds": 0.002}) for _ in range(2_000)])
    node = start_node("start", "--import", "tests.workers", "-q", "default:5", "-p", "4", "--log-level", "WARNING")
    segment = await _table(node)
    queue = segment.table.queue_index("default")
    max_slots = max_executing = samples = 0

    deadline = time.monotonic() + 120
    while not await _all_completed(conn, prefix, 2_000):
        assert time.monotonic() < deadline, await _states(conn, prefix)
        _free, used, _enabled = segment.table.counts(queue)
        executing = await conn.fetchval(f"SELECT count(*) FROM {prefix}.oban_jobs WHERE state = 'executing'")
        max_slots, max_executing = max(max_slots, used), max(max_executing, executing)
        samples += 1

    assert samples > 20
    assert max_slots <= 5
    assert max_executing <= 5
    assert max_slots >= 2
    assert node.stop() == 0
    segment.close()


async def test_killed_worker_returns_slots_and_jobs(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:4", "-p", "2")
    segment = await _table(node)
    table = segment.table
    await _workers(segment, 2)
    jobs = await oban.enqueue_many([workers.Sleep.new({"seconds": 60}) for _ in range(4)])
    await wait_for(lambda: len([entry for entry in table.running(0) if entry["job_id"]]) == 4)

    victim = next(pid for pid in (table.owner(entry["index"]) for entry in table.running(0)) if pid)
    held = [entry["job_id"] for entry in table.running(0) if entry["pid"] == victim]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    await wait_for(lambda: all(entry["pid"] != victim for entry in table.running(0)), timeout=5)
    assert time.monotonic() - killed_at < 1.0

    async def rescued() -> list[asyncpg.Record] | None:
        rows = await conn.fetch(
            f"SELECT id, state::text, errors FROM {prefix}.oban_jobs WHERE id = ANY($1::bigint[])", held
        )
        return rows if all(row["state"] == "retryable" for row in rows) else None

    rows = await wait_for(rescued)
    for row in rows:
        assert f"worker process {victim} was killed by SIGKILL" in json.loads(row["errors"])[-1]["error"]
    pids = await _workers(segment, 2)
    assert victim not in pids
    assert "was killed by SIGKILL" in node.output()
    assert len(jobs) == 4
    node.kill()
    segment.close()


async def test_job_that_kills_its_process_is_discarded(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:1", "-p", "1")
    exits = await oban.enqueue_many(
        [workers.KillSelf.new({"how": how}) for how in ("exit", "sigkill", "segfault")] + [workers.Noop.new()]
    )

    async def settled() -> list[asyncpg.Record] | None:
        rows = await conn.fetch(f"SELECT id, state::text, attempt, errors FROM {prefix}.oban_jobs ORDER BY id")
        return rows if all(row["state"] in ("discarded", "completed") for row in rows) else None

    rows = await wait_for(settled, timeout=60)
    causes = {row["id"]: [entry["error"] for entry in json.loads(row["errors"])] for row in rows}
    assert "exited with code 7" in causes[exits[0].id][0]
    assert "was killed by SIGKILL" in causes[exits[1].id][0]
    assert "was killed by SIGSEGV" in causes[exits[2].id][0]
    assert [row["attempt"] for row in rows[:3]] == [2, 2, 2]
    assert rows[3]["state"] == "completed"
    node.stop()


@pytest.mark.parametrize("code", [0, 3, 4, 5])
async def test_job_exit_code_is_a_crash(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str, code: int) -> None:
    # obanpro's worker processes exit with these codes themselves: a clean
    # stop, a failed setup hook, a recycle and a failed start.
    node = start_node("start", "--import", "tests.workers", "-q", "default:1", "-p", "2")
    job = await workers.KillSelf.enqueue({"how": "exit", "code": code}, max_attempts=1)
    after = await workers.Noop.enqueue(schedule_in=1)

    await wait_for(lambda: _job_in(conn, prefix, after.id, "completed"), timeout=30)

    row = await conn.fetchrow(f"SELECT state::text, errors FROM {prefix}.oban_jobs WHERE id = $1", job.id)
    assert row["state"] == "discarded"
    error = json.loads(row["errors"])[0]["error"]
    assert f"exited with code {code} while running jobs" in error
    assert "setup hook" not in error
    assert node.process.poll() is None
    assert "stopping node" not in node.output()
    assert "recycled" not in node.output()
    assert node.stop() == 0


async def test_killed_supervisor_takes_workers_down(start_node, conn: asyncpg.Connection, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:2", "-p", "2")
    segment = await _table(node)
    pids = await _workers(segment, 2)
    name = segment.name
    segment.close()

    os.kill(node.pid, signal.SIGKILL)
    node.process.wait(5)

    def gone() -> bool:
        return not any(_alive(pid) for pid in pids)

    await wait_for(gone, timeout=5)
    assert name in slots.segment_names()

    second = start_node("start", "--import", "tests.workers", "-q", "default:2", "-p", "1")
    await wait_for(lambda: name not in slots.segment_names(), timeout=20)
    assert f"removed slot table {name}" in second.output() or name not in slots.segment_names()
    second.stop()


async def test_orphan_with_blocked_loop_exits(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:2", "-p", "1")
    segment = await _table(node)
    pid = (await _workers(segment, 1))[0]
    segment.close()
    await workers.BlockLoop.enqueue({"seconds": 120})
    await wait_for(lambda: _executing_count(conn, prefix), timeout=20)

    os.kill(node.pid, signal.SIGKILL)
    node.process.wait(5)

    await wait_for(lambda: not _alive(pid), timeout=8)


async def _executing_count(conn: asyncpg.Connection, prefix: str) -> int:
    return await conn.fetchval(f"SELECT count(*) FROM {prefix}.oban_jobs WHERE state = 'executing'")


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


async def test_next_start_rescues_killed_node_jobs(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:3", "-p", "2")
    jobs = await oban.enqueue_many([workers.Sleep.new({"seconds": 60}) for _ in range(3)])
    await wait_for(lambda: _executing_count(conn, prefix), timeout=20)
    await wait_for(lambda: _all_executing(conn, prefix, 3), timeout=20)

    node.kill()
    second = start_node("start", "--import", "tests.workers", "-q", "default:3", "-p", "1")

    async def rescued() -> list[asyncpg.Record] | None:
        rows = await conn.fetch(
            f"SELECT state::text, errors FROM {prefix}.oban_jobs WHERE id = ANY($1::bigint[])", [job.id for job in jobs]
        )
        return rows if all(json.loads(row["errors"]) for row in rows) else None

    rows = await wait_for(rescued, timeout=20)
    for row in rows:
        assert "was killed with its supervisor" in json.loads(row["errors"])[-1]["error"]
    second.stop()


async def _all_executing(conn: asyncpg.Connection, prefix: str, expected: int) -> bool:
    return await _executing_count(conn, prefix) == expected


async def test_failing_setup_stops_node(start_node) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:2", "-p", "2", "--setup", "tests.workers.failing_setup")

    code = node.wait(30)

    output = node.output()
    assert code != 0
    assert "setup hook tests.workers.failing_setup failed" in output
    assert "model file missing" in output
    assert 'tests/workers.py", line' in output
    assert output.count("obanpro.worker_process: setup hook tests.workers.failing_setup failed") <= 2
    assert output.count("stopping node") == 1
    assert "restarting worker process" not in output


async def test_failing_teardown_is_logged(start_node, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    node = start_node(
        "start", "--import", "tests.workers", "-q", "default:2", "-p", "2",
        "--setup", "tests.workers.marking_setup", "--teardown", "tests.workers.failing_teardown",
        env={"OBANPRO_TEST_MARKS": str(marks)},
    )
    await wait_for(lambda: marks.exists() and marks.read_text().count("setup") == 2, timeout=20)

    assert node.stop() == 0
    assert node.output().count("teardown hook tests.workers.failing_teardown failed") == 2
    assert "cleanup exploded" in node.output()


async def test_hooks_run_once_per_process(start_node, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    node = start_node(
        "start", "--import", "tests.workers", "-q", "default:2", "-p", "3",
        "--setup", "tests.workers.marking_setup", "--teardown", "tests.workers.marking_teardown",
        env={"OBANPRO_TEST_MARKS": str(marks)},
    )
    await wait_for(lambda: marks.exists() and marks.read_text().count("setup") == 3, timeout=20)

    assert node.stop() == 0
    lines = marks.read_text().split()
    setups = {lines[i + 1] for i in range(0, len(lines), 2) if lines[i] == "setup"}
    teardowns = {lines[i + 1] for i in range(0, len(lines), 2) if lines[i] == "teardown"}
    assert len(setups) == 3
    assert setups == teardowns
    assert str(node.pid) not in setups


async def test_two_nodes_have_separate_tables(start_node) -> None:
    first = start_node("start", "--import", "tests.workers", "-q", "default:3", "-p", "1", "--node", "one")
    second = start_node("start", "--import", "tests.workers", "-q", "default:3", "-p", "1", "--node", "two")
    table_one = await _table(first)
    table_two = await _table(second)

    assert table_one.name != table_two.name
    assert table_one.table.node == "one"
    assert table_two.table.node == "two"
    await _workers(table_one, 1)
    await _workers(table_two, 1)
    assert table_one.table.worker_pid(0) != table_two.table.worker_pid(0)
    first.stop()
    second.stop()
    table_one.close()
    table_two.close()


@pytest.mark.slow
async def test_cpu_jobs_spread_over_processes(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    await oban.enqueue_many([workers.Digest.new({"seed": str(i), "rounds": 60_000}) for i in range(100)])
    node = start_node("start", "--import", "tests.workers", "-q", "default:20", "-p", "2", "--log-level", "WARNING")

    await wait_for(lambda: _all_completed(conn, prefix, 100), timeout=180)

    rows = await conn.fetch(f"SELECT meta FROM {prefix}.oban_jobs")
    runs = [erlang_term.decode_base64(json.loads(row["meta"])["return"]) for row in rows]
    by_pid: dict[int, list[dict]] = {}
    for run in runs:
        by_pid.setdefault(run["pid"], []).append(run)
    assert len(by_pid) == 2
    end = max(run["stop"] for run in runs)
    start = min(run["start"] for run in runs)
    for pid, pid_runs in by_pid.items():
        assert len(pid_runs) >= 30, f"pid {pid} ran only {len(pid_runs)} of 100 jobs"
        # Busy until the end: each process finishes its last job in the last tenth of the run.
        assert max(run["stop"] for run in pid_runs) > end - (end - start) * 0.1
        # Once the first jobs showed them CPU-bound, a process runs them one after
        # the other rather than in threads that share its GIL.
        later = sorted((run for run in pid_runs if run["start"] > start + (end - start) / 2), key=lambda run: run["start"])
        overlapping = sum(1 for before, after in zip(later, later[1:]) if after["start"] < before["stop"])
        assert overlapping <= len(later) // 5, f"pid {pid}: {overlapping} of {len(later)} later jobs overlapped another"
    node.stop()


async def test_stop_returns_unstarted_sync_jobs(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    jobs = await oban.enqueue_many([workers.Spin.new({"seconds": 1.0, "timeout": 30}) for _ in range(4)])
    node = start_node("start", "--import", "tests.workers", "-q", "default:4", "-p", "1", "--grace-period", "5")

    # One job computes; the others wait in the gate, fetched but not started.
    async def all_fetched() -> bool:
        return (await _states(conn, prefix)).get("executing") == 4

    await wait_for(all_fetched, timeout=20)
    await asyncio.sleep(0.3)
    assert node.stop() == 0

    rows = await conn.fetch(f"SELECT state::text, attempt, errors FROM {prefix}.oban_jobs WHERE id = ANY($1)", [job.id for job in jobs])
    states = sorted(row["state"] for row in rows)
    assert states == ["available", "available", "available", "completed"], node.output()
    for row in rows:
        if row["state"] == "available":
            assert row["attempt"] == 0
            assert json.loads(row["errors"]) == []


async def test_io_jobs_may_fill_one_process(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:20", "-p", "2")
    segment = await _table(node)
    pids = await _workers(segment, 2)
    table = segment.table

    # Stop one process from taking work, at a moment when it holds no slot (it
    # holds some briefly during each empty fetch): the other alone must then
    # reach the whole limit.
    while True:
        os.kill(pids[1], signal.SIGSTOP)
        await wait_for(lambda: _state(pids[1]) == "T", timeout=5)
        if not table.owned_by(pids[1]):
            break
        os.kill(pids[1], signal.SIGCONT)
        time.sleep(0.01)
    try:
        await oban.enqueue_many([workers.Sleep.new({"seconds": 3}) for _ in range(20)])
        await wait_for(lambda: table.counts(0)[1] == 20, timeout=20)
        owners = {entry["pid"] for entry in table.running(0)}
        assert owners == {pids[0]}
    finally:
        os.kill(pids[1], signal.SIGCONT)
    node.stop()
    segment.close()


async def test_hard_timeout_kills_and_replaces_worker(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:3", "-p", "1")
    segment = await _table(node)
    first_pid = (await _workers(segment, 1))[0]
    spin = await workers.Spin.enqueue({"timeout": 0.5})
    neighbour = await workers.Sleep.enqueue({"seconds": 60})

    async def rescued() -> dict[int, asyncpg.Record] | None:
        rows = await conn.fetch(f"SELECT id, state::text, attempt, errors FROM {prefix}.oban_jobs")
        by_id = {row["id"]: row for row in rows}
        done = by_id[spin.id]["state"] == "retryable" and json.loads(by_id[neighbour.id]["errors"])
        return by_id if done else None

    rows = await wait_for(rescued, timeout=30)
    assert json.loads(rows[spin.id]["errors"])[-1]["error"] == "timed out after 0.5 s"
    neighbour_error = json.loads(rows[neighbour.id]["errors"])[-1]["error"]
    assert f"worker process {first_pid} was killed by SIGKILL after job {spin.id} timed out" in neighbour_error
    assert "this attempt does not count" in neighbour_error
    # The neighbour lost no attempt: it is available again, or already running its first attempt anew.
    assert rows[neighbour.id]["attempt"] <= 1
    new_pid = (await _workers(segment, 1))[0]
    assert new_pid != first_pid
    node.stop()
    segment.close()


async def test_recycled_workers_lose_no_job(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    await oban.enqueue_many([workers.Sleep.new({"seconds": 0.01}) for _ in range(300)])
    node = start_node("start", "--import", "tests.workers", "-q", "default:10", "-p", "2", "--max-jobs-per-process", "40")

    await wait_for(lambda: _all_completed(conn, prefix, 300), timeout=60)

    assert node.output().count("recycled after") >= 5
    assert node.output().count("recycled after") == node.output().count("recycled after 40 jobs")
    assert await conn.fetchval(f"SELECT max(attempt) FROM {prefix}.oban_jobs") == 1
    node.stop()


async def test_status_reads_running_node(start_node, dsn: str, prefix: str, oban: Oban) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:4", "-p", "2", "--node", "status-node")
    segment = await _table(node)
    await _workers(segment, 2)
    await oban.enqueue_many([workers.Sleep.new({"seconds": 30}) for _ in range(3)])
    await wait_for(lambda: segment.table.counts(0)[1] == 3)

    result = subprocess.run(
        [sys.executable, "-m", "obanpro", "status", "--json", "--node", "status-node", "--dsn", dsn, "--prefix", prefix],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["nodes"]) == 1
    status = report["nodes"][0]
    assert status["supervisor_pid"] == node.pid
    assert status["prefix"] == prefix
    assert len(status["processes"]) == 2
    assert all(process["rss_mb"] > 0 for process in status["processes"])
    assert status["queues"][0]["running"] == 3
    assert status["queues"][0]["limit"] == 4
    assert report["jobs"]["default"]["executing"] == 3
    assert report["orphaned"] == {}
    node.kill()
    segment.close()


def _status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "obanpro", "status", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


async def test_status_explains_jobs_no_node_runs(dsn: str, prefix: str, conn: asyncpg.Connection) -> None:
    # As after a killed node: executing for 5 minutes, by a producer whose row is gone.
    await conn.execute(
        f"INSERT INTO {prefix}.oban_jobs (state, queue, worker, args, attempt, attempted_at, attempted_by) "
        "VALUES ('executing', 'default', 'tests.workers.Noop', '{}', 1, timezone('UTC', now()) - interval '5 minutes', "
        "ARRAY['gone-node', '00000000-0000-0000-0000-000000000001'])"
    )

    result = _status("--dsn", dsn, "--prefix", prefix)

    assert "1 executing job of node gone-node has had no live producer" in result.stdout
    assert "obanpro start --node gone-node" in result.stdout


def test_status_names_install_for_missing_tables(dsn: str) -> None:
    result = _status("--dsn", dsn, "--prefix", "no_tables_here")

    assert "schema no_tables_here has no Oban tables" in result.stdout
    assert "obanpro install --prefix no_tables_here" in result.stdout


async def _job_in(conn: asyncpg.Connection, prefix: str, job_id: int, state: str) -> bool:
    return await conn.fetchval(f"SELECT state::text FROM {prefix}.oban_jobs WHERE id = $1", job_id) == state
