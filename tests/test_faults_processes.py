"""Process faults: jobs that kill their process, shutdown while another node rescues, SIGTERM during acks, shared memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from obanpro import slots
from obanpro.oban import Oban

from . import workers
from .conftest import ROOT, Node, job_states, wait_for

FAST_RESCUE = """
[lifeline]
interval = 0.25
rescue_after = 0.5

[refresher]
interval = 0.5
max_age = 2.0
"""
"""Node settings under which the leader rescues a job 0.5 s after its attempt once its producer's row is 2 s old."""


async def _segment(node: Node) -> slots.Segment:
    """Attach to the live slot table of ``node`` once its supervisor created it."""

    def find() -> str | None:
        names = [name for name in slots.segment_names() if f".{node.pid}." in name]
        return names[0] if names else None

    return slots.attach(await wait_for(find, timeout=20))


async def _running_workers(segment: slots.Segment, count: int) -> list[int]:
    table = segment.table

    def running() -> list[int] | None:
        pids = [table.worker_pid(i) for i in range(table.max_workers) if table.worker_state(i) == 2]
        return pids if len(pids) == count else None

    return await wait_for(running, timeout=20)


async def _rows(conn: asyncpg.Connection, prefix: str, ids: list[int]) -> dict[int, asyncpg.Record]:
    rows = await conn.fetch(
        f"SELECT id, state::text, attempt, errors, meta, attempted_by FROM {prefix}.oban_jobs WHERE id = ANY($1::bigint[])",
        ids,
    )
    return {row["id"]: row for row in rows}


async def _count(conn: asyncpg.Connection, prefix: str, state: str) -> int:
    return (await job_states(conn, prefix)).get(state, 0)


def _status(dsn: str, prefix: str, node: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "obanpro", "status", "--json", "--node", node, "--dsn", dsn, "--prefix", prefix],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


# A job that kills its own process


async def test_job_killing_its_process_ends_discarded(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:1", "-p", "1")
    killers = await oban.enqueue_many(
        [workers.KillLoop.new({"how": how}) for how in ("exit", "sigkill", "abort")]
        + [workers.KillSelf.new({"how": "segfault"}, max_attempts=1)]
    )
    causes = ["exited with code 9", "was killed by SIGKILL", "was killed by SIGABRT", "was killed by SIGSEGV"]
    ids = [job.id for job in killers]

    async def settled() -> dict[int, asyncpg.Record] | None:
        rows = await _rows(conn, prefix, ids)
        return rows if all(row["state"] == "discarded" for row in rows.values()) else None

    rows = await wait_for(settled, timeout=90)

    for job, cause in zip(killers, causes):
        row = rows[job.id]
        errors = json.loads(row["errors"])
        assert row["attempt"] == job.max_attempts
        assert [entry["attempt"] for entry in errors] == list(range(1, job.max_attempts + 1))
        for entry in errors:
            assert cause in entry["error"], entry

    # The node keeps running jobs, and the discarded jobs are not tried again.
    later = await workers.Noop.enqueue()
    await wait_for(lambda: _state_of(conn, prefix, later.id, "completed"), timeout=30)
    assert {job_id: row["attempt"] for job_id, row in (await _rows(conn, prefix, ids)).items()} == {
        job.id: job.max_attempts for job in killers
    }
    assert node.stop() == 0


async def _state_of(conn: asyncpg.Connection, prefix: str, job_id: int, state: str) -> bool:
    return await conn.fetchval(f"SELECT state::text FROM {prefix}.oban_jobs WHERE id = $1", job_id) == state


# Shutdown while another node rescues


@pytest.mark.slow
async def test_shutdown_during_rescue_keeps_completion(
    start_node, oban: Oban, conn: asyncpg.Connection, prefix: str, tmp_path: Path
) -> None:
    config = tmp_path / "oban.toml"
    config.write_text(FAST_RESCUE)
    rescuer = start_node("start", "--config", str(config), "--import", "tests.workers", "-q", "other:1", "-p", "1", "--node", "rescuer")
    await wait_for(lambda: "rescuer" in rescuer.output() and "is now leader" in rescuer.output(), timeout=20)

    # The rescuer's lifeline works: a job whose producer never had a row is made available again.
    orphan = await conn.fetchval(
        f"INSERT INTO {prefix}.oban_jobs (state, worker, queue, args, attempt, attempted_at, attempted_by) "
        "VALUES ('executing', 'tests.workers.Noop', 'orphans', '{}', 1, timezone('UTC', now()), "
        "ARRAY['gone', '00000000-0000-0000-0000-000000000000']) RETURNING id"
    )
    await wait_for(lambda: _state_of(conn, prefix, orphan, "available"), timeout=20)

    stopping = start_node(
        "start", "--config", str(config), "--import", "tests.workers", "-q", "default:4", "-p", "2",
        "--node", "stopping", "--grace-period", "15",
    )
    jobs = await oban.enqueue_many([workers.Sleep.new({"seconds": 3}) for _ in range(4)])
    await wait_for(lambda: _executing_since(conn, prefix, 4, 1.0), timeout=20)

    stopping.signal(signal.SIGTERM)
    assert stopping.wait(30) == 0

    rows = await _rows(conn, prefix, [job.id for job in jobs])
    for row in rows.values():
        assert row["state"] == "completed", dict(row)
        assert row["attempt"] == 1
        assert json.loads(row["errors"]) == []
        assert "rescued" not in json.loads(row["meta"])
        assert row["attempted_by"][0] == "stopping"
    assert "changed nothing" not in stopping.output()
    rescuer.stop()


async def _executing_since(conn: asyncpg.Connection, prefix: str, count: int, seconds: float) -> bool:
    """Return True when ``count`` jobs have been executing for ``seconds``, past the lifeline's rescue_after."""
    found = await conn.fetchval(
        f"SELECT count(*) FROM {prefix}.oban_jobs WHERE state = 'executing' "
        "AND attempted_at < timezone('UTC', now()) - make_interval(secs => $1)",
        seconds,
    )
    return found == count


@pytest.mark.slow
async def test_restarted_node_rescues_its_old_jobs(
    start_node, oban: Oban, conn: asyncpg.Connection, prefix: str, tmp_path: Path
) -> None:
    config = tmp_path / "oban.toml"
    config.write_text(FAST_RESCUE)
    args = ("start", "--config", str(config), "--import", "tests.workers", "-q", "default:3", "-p", "1", "--node", "same")
    first = start_node(*args)
    jobs = await oban.enqueue_many([workers.SlowFirstAttempt.new({"seconds": 600}) for _ in range(3)])
    await wait_for(lambda: _count_is(conn, prefix, "executing", 3), timeout=20)
    old_producers = {row["attempted_by"][1] for row in (await _rows(conn, prefix, [job.id for job in jobs])).values()}

    # A killed process group cannot rescue anything itself.
    first.kill()
    second = start_node(*args)

    # The old lease runs out (30 s), the new incarnation leads and its lifeline rescues the jobs.
    async def rerun() -> dict[int, asyncpg.Record] | None:
        rows = await _rows(conn, prefix, [job.id for job in jobs])
        return rows if all(row["state"] == "completed" for row in rows.values()) else None

    rows = await wait_for(rerun, timeout=90)
    for row in rows.values():
        assert row["attempt"] == 2
        assert json.loads(row["meta"])["rescued"] == 1
        assert row["attempted_by"][0] == "same"
        assert row["attempted_by"][1] not in old_producers
    assert second.stop() == 0


async def _count_is(conn: asyncpg.Connection, prefix: str, state: str, expected: int) -> bool:
    return await _count(conn, prefix, state) == expected


# SIGTERM while acks are written


@pytest.mark.slow
async def test_sigterm_during_acks_stores_every_result(
    start_node, oban: Oban, conn: asyncpg.Connection, prefix: str, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    node = start_node("start", "--import", "tests.workers", "-q", "default:20", "-p", "2")
    segment = await _segment(node)
    await oban.enqueue_many([workers.MarkDone.new({"marks": str(marks)}) for _ in range(4000)])
    await wait_for(lambda: _count_at_least(conn, prefix, "completed", 500), timeout=60)

    node.signal(signal.SIGTERM)
    assert node.wait(30) == 0

    ran = [int(line) for line in marks.read_text().split()]
    states = await job_states(conn, prefix)
    completed = {row["id"] for row in await conn.fetch(f"SELECT id FROM {prefix}.oban_jobs WHERE state = 'completed'")}
    assert "executing" not in states
    assert set(ran) == completed
    assert len(ran) == len(completed)
    assert states.get("available", 0) == 4000 - len(completed)
    assert segment.table.counts(0)[1] == 0
    assert segment.name not in slots.segment_names()
    assert "rescued" not in node.output()
    segment.close()


async def _count_at_least(conn: asyncpg.Connection, prefix: str, state: str, count: int) -> bool:
    return await _count(conn, prefix, state) >= count


async def test_sigterm_waits_for_blocked_ack(
    start_node, oban: Oban, conn: asyncpg.Connection, prefix: str, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    node = start_node("start", "--import", "tests.workers", "-q", "default:2", "-p", "1", "--grace-period", "1")
    job = await workers.MarkDone.enqueue({"marks": str(marks), "seconds": 0.5})
    await wait_for(lambda: _state_of(conn, prefix, job.id, "executing"), timeout=20)

    # A lock on the row holds the job's ack, as a slow or contended database would.
    async with conn.transaction():
        await conn.execute(f"SELECT 1 FROM {prefix}.oban_jobs WHERE id = $1 FOR UPDATE", job.id)
        await wait_for(lambda: marks.exists(), timeout=10)
        node.signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        # Past the grace period, but well within the margin the supervisor leaves for the last acks.
        await wait_for(lambda: time.monotonic() - stopped_at > 2.5, timeout=10)

    assert node.wait(30) == 0
    row = (await _rows(conn, prefix, [job.id]))[job.id]
    assert row["state"] == "completed", json.loads(row["errors"])
    assert json.loads(row["errors"]) == []
    assert "rescued" not in node.output()


# Shared memory


async def test_killed_node_segment_replaced_on_restart(start_node, dsn: str, prefix: str) -> None:
    args = ("start", "--import", "tests.workers", "-q", "default:3", "-p", "2", "--node", "shm-node")
    first = start_node(*args)
    stale = await _segment(first)
    await _running_workers(stale, 2)
    stale_name = stale.name
    stale.close()
    first.kill()
    assert stale_name in slots.segment_names()

    second = start_node(*args)
    fresh = await _segment(second)
    await _running_workers(fresh, 2)

    assert stale_name not in slots.segment_names()
    assert f"removed slot table {stale_name} left by supervisor pid {first.pid}" in second.output()
    report = _status(dsn, prefix, "shm-node")
    assert [node["supervisor_pid"] for node in report["nodes"]] == [second.pid]
    assert [queue["limit"] for queue in report["nodes"][0]["queues"]] == [3]
    assert second.stop() == 0
    fresh.close()


async def test_two_nodes_on_one_host_keep_own_limits(start_node, oban: Oban, conn: asyncpg.Connection, dsn: str, prefix: str) -> None:
    # Even under one node name, each `obanpro start` has its own table and its own limit.
    args = ("start", "--import", "tests.workers", "-q", "default:2", "-p", "2", "--node", "twin")
    first, second = start_node(*args), start_node(*args)
    tables = [await _segment(first), await _segment(second)]
    for segment in tables:
        await _running_workers(segment, 2)
        assert os.stat(slots.SHM_DIR / segment.name.lstrip("/")).st_mode & 0o777 == 0o600

    await oban.enqueue_many([workers.Sleep.new({"seconds": 30}) for _ in range(10)])
    await wait_for(lambda: _count_is(conn, prefix, "executing", 4), timeout=20)
    await wait_for(lambda: all(segment.table.counts(0)[1] == 2 for segment in tables), timeout=10)

    assert tables[0].name != tables[1].name
    report = _status(dsn, prefix, "twin")
    assert sorted(node["supervisor_pid"] for node in report["nodes"]) == sorted([first.pid, second.pid])
    assert [node["queues"][0]["running"] for node in report["nodes"]] == [2, 2]
    assert await _count(conn, prefix, "executing") == 4
    for segment in tables:
        segment.close()


async def test_removed_segment_is_logged(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:2", "-p", "1")
    segment = await _segment(node)
    first_pid = (await _running_workers(segment, 1))[0]

    # What systemd-logind does with RemoveIPC=yes when the node's user logs out.
    os.unlink(slots.SHM_DIR / segment.name.lstrip("/"))
    await wait_for(lambda: "was removed" in node.output(), timeout=30)
    assert segment.name in node.output()

    # The node keeps running and keeps replacing workers from its own mapping.
    os.kill(first_pid, signal.SIGKILL)
    replacement = await wait_for(lambda: _replaced(segment, first_pid), timeout=20)
    job = await workers.Noop.enqueue()
    await wait_for(lambda: _state_of(conn, prefix, job.id, "completed"), timeout=20)
    assert replacement != first_pid
    assert node.stop() == 0
    segment.close()


def _replaced(segment: slots.Segment, old_pid: int) -> int | None:
    table = segment.table
    pid = table.worker_pid(0)
    return pid if pid and pid != old_pid and table.worker_state(0) == 2 else None
