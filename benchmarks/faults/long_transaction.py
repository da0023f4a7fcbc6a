"""A long transaction elsewhere holds back vacuum while 100,000 jobs flow through a node.

    .venv/bin/python -m benchmarks.faults.long_transaction [--jobs 100000] [--processes 2] [--limit 20] [--dsn DSN]

Runs the same flow twice on fresh schemas, first as a baseline. In the second run
another connection keeps a REPEATABLE READ transaction open from before the first
fetch to after the last ack, so no row version that the flow leaves behind can be
vacuumed. Jobs are inserted in batches of 2,000 so that about 5,000 wait at any
time. For each run it prints the throughput per 10,000 completed jobs, the plan
of obanpro's fetch statement (EXPLAIN ANALYZE, rolled back) at the start, the
middle and the end, and the dead row versions left in the jobs table. After the
long transaction ends, 30,000 more jobs show how fast throughput recovers. Without
``--dsn`` it starts a throwaway embedded PostgreSQL (fsync off) whose autovacuum
wakes every second, so that vacuum keeps up in the baseline. With the default of
60 s, no vacuum would run during a baseline that lasts under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from obanpro import queries

from .common import Database, Node, drop_schema, machine, new_schema

WINDOW = 10_000
RECOVERY_JOBS = 30_000
RECOVERY_WINDOW = 10_000
BATCH = 2_000
BACKLOG = 5_000
SAMPLE_INTERVAL = 0.25
FETCH_INDEX = "oban_jobs_state_queue_priority_scheduled_at_id_index"


@dataclass
class Plan:
    """The fetch statement's plan at one point of a run."""

    completed: int
    nodes: list[str]
    buffers: int
    milliseconds: float
    rows: int


@dataclass
class Run:
    label: str
    jobs: int
    seconds: float = 0.0
    windows: list[float] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)
    dead_rows: int = 0
    live_rows: int = 0
    vacuums: int = 0
    index_reads_per_job: float = 0.0
    horizon_held: bool = False
    recovery: list[float] = field(default_factory=list)

    @property
    def jobs_per_second(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0


class Flow:
    """Inserts jobs in batches ahead of the node and samples how many completed."""

    def __init__(self, monitor: asyncpg.Connection, inserter: asyncpg.Connection, prefix: str) -> None:
        self.monitor = monitor
        self.inserter = inserter
        self.prefix = prefix
        self.inserted = 0
        self.insert_sql = (
            f"INSERT INTO {prefix}.oban_jobs (worker, queue, args) "
            "SELECT 'benchmarks.faults.workloads.Noop', 'default', jsonb_build_object('seq', n) "
            "FROM generate_series($1::int, $2::int) n"
        )

    async def insert_up_to(self, target: int, completed: int) -> None:
        while self.inserted < target and self.inserted - completed < BACKLOG:
            count = min(BATCH, target - self.inserted)
            await self.inserter.execute(self.insert_sql, self.inserted + 1, self.inserted + count)
            self.inserted += count

    async def completed(self) -> int:
        return await self.monitor.fetchval(f"SELECT count(*) FROM {self.prefix}.oban_jobs WHERE state = 'completed'")

    async def run_until(
        self, node: Node, target: int, window: int, plan_points: set[int], plans: list[Plan]
    ) -> tuple[float, list[float]]:
        """Feed the node until ``target`` jobs completed; return the seconds taken and jobs/s per ``window`` jobs."""
        started = time.monotonic()
        first = await self.completed()
        samples = [(started, first)]

        while True:
            completed = await self.completed()
            samples.append((time.monotonic(), completed))
            if completed >= target:
                break
            if node.process.poll() is not None:
                raise RuntimeError(f"the node exited with code {node.process.returncode}; see {node.log_path}")

            await self.insert_up_to(target, completed)
            for point in sorted(plan_points):
                if completed >= point:
                    plans.append(await _explain_fetch(self.monitor, self.prefix, completed))
                    plan_points.discard(point)
                    break

            await asyncio.sleep(SAMPLE_INTERVAL)

        moments = [_crossing(samples, boundary) for boundary in range(first + window, target + 1, window)]
        rates = [window / max(later - earlier, 1e-9) for earlier, later in itertools.pairwise([started, *moments])]
        return samples[-1][0] - started, rates


def _crossing(samples: list[tuple[float, int]], count: int) -> float:
    """Return the moment the completed count reached ``count``, interpolated between two samples."""
    for (earlier, before), (later, after) in itertools.pairwise(samples):
        if before < count <= after:
            return earlier + (later - earlier) * (count - before) / (after - before)
    return samples[-1][0]


async def run_flow(dsn: str, label: str, jobs: int, processes: int, limit: int, hold: bool, log_dir: Path) -> Run:
    prefix = await new_schema(dsn, label)
    run = Run(label, jobs)
    monitor = await asyncpg.connect(dsn)
    inserter = await asyncpg.connect(dsn)
    holder = await asyncpg.connect(dsn) if hold else None
    flow = Flow(monitor, inserter, prefix)
    node: Node | None = None

    try:
        await flow.insert_up_to(BATCH, 0)

        if holder is not None:
            # The snapshot taken here keeps every row version written afterwards from being vacuumed.
            await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            await holder.fetchval(f"SELECT count(*) FROM {prefix}.oban_jobs")
            run.horizon_held = await monitor.fetchval(
                "SELECT backend_xmin IS NOT NULL FROM pg_stat_activity WHERE pid = $1", holder.get_server_pid()
            )

        reads_before = await _index_reads(monitor, prefix)
        node = Node(dsn, prefix, ["-q", f"default:{limit}", "-p", str(processes), "--log-level", "WARNING"], log_dir / f"{label}.log")
        plan_points = {min(1_000, jobs), jobs // 2, jobs - 2 * BATCH}
        run.seconds, run.windows = await flow.run_until(node, jobs, WINDOW, plan_points, run.plans)
        run.index_reads_per_job = (await _index_reads(monitor, prefix) - reads_before) / jobs
        stats = await monitor.fetchrow(
            "SELECT n_dead_tup, n_live_tup, autovacuum_count + vacuum_count AS vacuums FROM pg_stat_user_tables "
            "WHERE schemaname = $1 AND relname = 'oban_jobs'",
            prefix,
        )
        run.dead_rows, run.live_rows, run.vacuums = stats["n_dead_tup"], stats["n_live_tup"], stats["vacuums"]

        if holder is not None:
            # The transaction ends: vacuum may now remove what piled up, and the flow goes on.
            await holder.execute("COMMIT")
            _seconds, run.recovery = await flow.run_until(node, jobs + RECOVERY_JOBS, RECOVERY_WINDOW, set(), [])
    finally:
        if node is not None:
            node.stop()
        if holder is not None:
            await holder.close()
        await inserter.close()
        await monitor.close()
        await drop_schema(dsn, prefix)

    return run


async def _index_reads(conn: asyncpg.Connection, prefix: str) -> int:
    # Backends flush statistics at most once a second, and clearing the snapshot makes each read fetch new figures.
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return await conn.fetchval(
        "SELECT coalesce(idx_tup_read, 0) FROM pg_stat_user_indexes WHERE schemaname = $1 AND indexrelname = $2",
        prefix,
        FETCH_INDEX,
    )


async def _explain_fetch(conn: asyncpg.Connection, prefix: str, completed: int) -> Plan:
    """EXPLAIN ANALYZE obanpro's own fetch statement inside a transaction that is rolled back."""
    sql = queries.load("fetch_jobs", prefix)
    transaction = conn.transaction()
    await transaction.start()
    try:
        raw = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", "default", 20, ["bench", "explain"])
    finally:
        await transaction.rollback()

    document = json.loads(raw)[0]
    nodes: list[str] = []

    def walk(node: dict) -> None:
        name = node["Node Type"]
        if "Index Name" in node:
            name += f" using {node['Index Name']}"
        elif "Relation Name" in node:
            name += f" on {node['Relation Name']}"
        nodes.append(name)
        for child in node.get("Plans", []):
            walk(child)

    walk(document["Plan"])
    top = document["Plan"]
    buffers = top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)
    return Plan(completed, nodes, buffers, document["Execution Time"], top.get("Actual Rows", 0))


def report(runs: list[Run], args: argparse.Namespace, database: str, settings: dict[str, str]) -> None:
    print(f"\nlong transaction benchmark: {args.jobs} Noop jobs, obanpro start -p {args.processes} -q default:{args.limit}")
    print(f"machine: {machine()}; database: {database}")
    print("server settings: " + ", ".join(f"{name} {value}" for name, value in settings.items()))
    for run in runs:
        held = f" (xmin horizon held: {run.horizon_held})" if run.label == "long_transaction" else ""
        print(f"\n[{run.label}]{held}")
        print(f"  total: {run.seconds:.1f} s, {run.jobs_per_second:.0f} jobs/s")
        print("  jobs/s per 10,000 completed: " + ", ".join(f"{rate:.0f}" for rate in run.windows))
        if run.windows:
            print(f"  first window {run.windows[0]:.0f} jobs/s, last {run.windows[-1]:.0f} jobs/s, median {statistics.median(run.windows):.0f}")
        print(f"  fetch index entries read per job: {run.index_reads_per_job:.1f}")
        if run.recovery:
            print(
                f"  after the transaction ended, jobs/s per {RECOVERY_WINDOW:,} of {RECOVERY_JOBS:,} more jobs: "
                + ", ".join(f"{rate:.0f}" for rate in run.recovery)
            )
        print(f"  dead row versions at the end: {run.dead_rows}, live: {run.live_rows}; vacuums of the jobs table: {run.vacuums}")
        for plan in run.plans:
            seq = " SEQUENTIAL SCAN" if any(node.startswith("Seq Scan") for node in plan.nodes) else ""
            print(
                f"  fetch plan at {plan.completed} completed: {plan.milliseconds:.2f} ms, {plan.buffers} buffers, "
                f"{plan.rows} rows{seq}\n    " + " > ".join(plan.nodes)
            )

    if len(runs) == 2 and runs[0].jobs_per_second:
        print(f"\nthroughput with the long transaction / baseline: {runs[1].jobs_per_second / runs[0].jobs_per_second:.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs per run (default 100000)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--limit", type=int, default=20, help="limit of queue default (default 20)")
    parser.add_argument("--dsn", help="PostgreSQL to use; default: a throwaway embedded server")
    args = parser.parse_args()

    database = Database(args.dsn)
    dsn = database.start()
    try:
        await database.tune({"autovacuum_naptime": "1s"})
        settings = await database.settings(["server_version", "autovacuum_naptime", "autovacuum_vacuum_cost_limit"])
        with tempfile.TemporaryDirectory(prefix="obanpro-long-tx-") as logs:
            runs = []
            for label, hold in (("baseline", False), ("long_transaction", True)):
                print(f"running {label} ...", flush=True)
                runs.append(await run_flow(dsn, label, args.jobs, args.processes, args.limit, hold, Path(logs)))
            report(runs, args, database.describe(), settings)
    finally:
        database.stop()


if __name__ == "__main__":
    asyncio.run(main())
