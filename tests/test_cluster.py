"""Several ``obanpro start`` nodes on one schema: jobs run once, limits hold per node, one leader."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections import Counter
from collections.abc import Callable

import asyncpg
import pytest

from .conftest import Node, wait_for

NODES = ("cluster-1", "cluster-2", "cluster-3")
LIMIT = 8


class Sampler:
    """Samples the executing jobs per node and the leader lease until stopped."""

    def __init__(self, dsn: str, prefix: str) -> None:
        self.dsn = dsn
        self.prefix = prefix
        self.executing: list[dict[str, int]] = []
        self.leases: list[list[str]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task:
            await self._task

    async def _run(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not self._stop.is_set():
                rows = await conn.fetch(
                    f"SELECT attempted_by[1] AS node, count(*) FROM {self.prefix}.oban_jobs "
                    "WHERE state = 'executing' GROUP BY 1"
                )
                self.executing.append({row["node"]: row["count"] for row in rows})
                leases = await conn.fetch(
                    f"SELECT node FROM {self.prefix}.oban_leaders "
                    "WHERE name = 'Oban' AND expires_at > timezone('UTC', now())"
                )
                self.leases.append([row["node"] for row in leases])
                await asyncio.sleep(0.02)
        finally:
            await conn.close()


def _start(start_node: Callable[..., Node], name: str, grace: float = 15.0) -> Node:
    return start_node(
        "start",
        "-p",
        "2",
        "-q",
        f"default:{LIMIT}",
        "--import",
        "tests.workers",
        "--node",
        name,
        "--grace-period",
        str(grace),
        env={"OBANPRO_TEST_CRON": "1"},
    )


async def _producers_up(conn: asyncpg.Connection, prefix: str, nodes: tuple[str, ...]) -> bool:
    rows = await conn.fetch(f"SELECT node, count(*) FROM {prefix}.oban_producers GROUP BY 1")
    return {row["node"]: row["count"] for row in rows} == {node: 2 for node in nodes}


async def _enqueue(conn: asyncpg.Connection, prefix: str, worker: str, count: int, args: dict) -> None:
    await conn.execute(
        f"INSERT INTO {prefix}.oban_jobs (worker, queue, args) "
        "SELECT $1, 'default', $2::jsonb FROM generate_series(1, $3)",
        worker,
        json.dumps(args),
        count,
    )
    await conn.execute(f"SELECT pg_notify('{prefix}.oban_insert', '{{\"queue\":\"default\"}}')")


async def _count(conn: asyncpg.Connection, prefix: str, condition: str) -> int:
    return await conn.fetchval(f"SELECT count(*) FROM {prefix}.oban_jobs WHERE {condition}")


def _check_samples(sampler: Sampler) -> dict[str, int]:
    """Assert the per-node limit and the single lease in every sample; return each node's peak."""
    assert sampler.executing, "the sampler took no samples"
    peaks = Counter()
    for sample in sampler.executing:
        for node, count in sample.items():
            assert node in NODES
            assert count <= LIMIT, f"node {node} ran {count} jobs at once, over its limit of {LIMIT}"
            peaks[node] = max(peaks[node], count)

    for leases in sampler.leases:
        assert len(leases) <= 1
        assert all(lease.split("/")[0] in NODES for lease in leases)

    return dict(peaks)


async def _check_cron(conn: asyncpg.Connection, prefix: str) -> int:
    minutes = await conn.fetch(
        f"SELECT meta->>'cron_at' AS minute, count(*) FROM {prefix}.oban_jobs "
        "WHERE worker = 'tests.workers.EveryMinute' GROUP BY 1"
    )
    for row in minutes:
        assert row["count"] == 1, f"cron minute {row['minute']} was enqueued {row['count']} times"
    return len(minutes)


@pytest.mark.slow
async def test_three_nodes_run_each_job_once(
    dsn: str, prefix: str, conn: asyncpg.Connection, start_node, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = [_start(start_node, name) for name in NODES]
    await wait_for(lambda: _producers_up(conn, prefix, NODES), timeout=30)
    sampler = Sampler(dsn, prefix)
    sampler.start()

    started = time.monotonic()
    await _enqueue(conn, prefix, "tests.workers.Sleep", 5_000, {"seconds": 0.02})
    try:
        await wait_for(lambda: _all_completed(conn, prefix, 5_000), timeout=240)
    finally:
        elapsed = time.monotonic() - started
        await sampler.stop()

    assert await _count(conn, prefix, "worker = 'tests.workers.Sleep' AND attempt <> 1") == 0
    per_node = await conn.fetch(
        f"SELECT attempted_by[1] AS node, count(*) FROM {prefix}.oban_jobs "
        "WHERE worker = 'tests.workers.Sleep' GROUP BY 1 ORDER BY 1"
    )
    assert [row["node"] for row in per_node] == list(NODES)
    peaks = _check_samples(sampler)
    cron_minutes = await _check_cron(conn, prefix)

    # Each resignation at stop elects the next node, so leadership is counted before stopping.
    elected = sum(node.output().count("is now leader of Oban") for node in nodes)
    assert elected == 1
    for node in nodes:
        assert node.stop() == 0
    for node in nodes:
        _check_no_traceback(node)

    with capsys.disabled():
        print(
            f"\n5,000 jobs on 3 nodes x 2 processes in {elapsed:.1f} s; per node {[row['count'] for row in per_node]}; "
            f"{len(sampler.executing)} samples, peak executing per node {peaks}; {cron_minutes} cron minutes"
        )


async def _describe_repeats(
    conn: asyncpg.Connection, prefix: str, by_job: dict[int, list[asyncpg.Record]], nodes: list[Node]
) -> str:
    """Return the runs, errors and node log lines of every job that ran more than once."""
    lines = []
    for job_id, job_runs in by_job.items():
        if len(job_runs) < 2:
            continue
        errors = await conn.fetchval(f"SELECT to_jsonb(errors)::text FROM {prefix}.oban_jobs WHERE id = $1", job_id)
        lines.append(f"job {job_id}: errors {errors}")
        lines.extend(f"  run {dict(run)}" for run in job_runs)
        for node in nodes:
            lines.extend(f"  {node.log_path.name}: {line}" for line in node.output().splitlines() if str(job_id) in line)
    return f"{len(lines)} lines on jobs that ran more than once across drained restarts:\n" + "\n".join(lines)


def _check_no_traceback(node: Node) -> None:
    output = node.output()
    assert "Traceback" not in output, output[max(0, output.index("Traceback") - 2_000) :][:6_000]


async def _all_completed(conn: asyncpg.Connection, prefix: str, total: int) -> bool:
    return await _count(conn, prefix, "worker = 'tests.workers.Sleep' AND state = 'completed'") == total


@pytest.mark.slow
@pytest.mark.parametrize("grace", [15.0, 0.05], ids=["drained", "cut-short"])
async def test_restarting_nodes_lose_no_job(
    dsn: str, prefix: str, conn: asyncpg.Connection, start_node, capsys: pytest.CaptureFixture[str], grace: float
) -> None:
    """SIGTERM and restart nodes under load.

    With a long grace period every job runs once. With a short one, jobs cut off are retried,
    and no two runs of one job overlap.
    """
    await conn.execute(
        f"""
        CREATE TABLE {prefix}.test_runs (
            id bigserial PRIMARY KEY,
            job_id bigint NOT NULL,
            attempt int NOT NULL,
            node text NOT NULL,
            pid int NOT NULL,
            started_at timestamptz NOT NULL,
            finished_at timestamptz
        )
        """
    )
    nodes = {name: _start(start_node, name, grace) for name in NODES}
    await wait_for(lambda: _producers_up(conn, prefix, NODES), timeout=30)
    sampler = Sampler(dsn, prefix)
    sampler.start()
    total = 3_000
    await _enqueue(conn, prefix, "tests.workers.Tracked", total, {"seconds": 0.1})

    restarts = 0
    stopped: list[Node] = []
    try:
        for name in (*NODES, NODES[0], NODES[1]):
            # Restart under load: wait until this node is running jobs, then stop it gracefully.
            await wait_for(lambda name=name: _executing_on(conn, prefix, name), timeout=60)
            node = nodes[name]
            stopped.append(node)
            node.signal(signal.SIGTERM)
            assert await asyncio.to_thread(node.wait, 60) == 0
            _check_no_traceback(node)
            nodes[name] = _start(start_node, name, grace)
            restarts += 1

        await wait_for(lambda: _tracked_completed(conn, prefix, total), timeout=300)
    finally:
        await sampler.stop()

    assert await _count(conn, prefix, "worker = 'tests.workers.Tracked' AND state <> 'completed'") == 0
    runs = await conn.fetch(
        f"SELECT job_id, attempt, node, pid, started_at, finished_at FROM {prefix}.test_runs ORDER BY job_id, started_at"
    )
    by_job: dict[int, list[asyncpg.Record]] = {}
    for run in runs:
        by_job.setdefault(run["job_id"], []).append(run)
    assert len(by_job) == total
    for job_id, job_runs in by_job.items():
        assert job_runs[-1]["finished_at"] is not None
        for earlier, later in itertools.pairwise(job_runs):
            # A run cut off at shutdown may finish after the grace period without its ack stored.
            # Then the job runs again as its next attempt, but never while the earlier run goes on.
            assert later["attempt"] == earlier["attempt"] + 1
            assert earlier["finished_at"] is None or earlier["finished_at"] <= later["started_at"], (
                f"job {job_id} ran twice at once: {earlier} and {later}"
            )
    repeated = sum(1 for job_runs in by_job.values() if len(job_runs) > 1)
    if grace > 1:
        assert repeated == 0, await _describe_repeats(conn, prefix, by_job, [*stopped, *nodes.values()])

    peaks = _check_samples(sampler)
    cron_minutes = await _check_cron(conn, prefix)
    for node in nodes.values():
        assert node.stop() == 0

    with capsys.disabled():
        print(f"\n{total} jobs across {restarts} restarts (grace {grace} s), {repeated} retried; {cron_minutes} cron minutes; {len(sampler.executing)} samples, peaks {peaks}")


async def _executing_on(conn: asyncpg.Connection, prefix: str, node: str) -> bool:
    return await _count(conn, prefix, f"state = 'executing' AND attempted_by[1] = '{node}'") > 0


async def _tracked_completed(conn: asyncpg.Connection, prefix: str, total: int) -> bool:
    return await _count(conn, prefix, "worker = 'tests.workers.Tracked' AND state = 'completed'") == total
