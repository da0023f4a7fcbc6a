"""Soak: mixed jobs through ``obanpro start -p 2`` for 30 minutes; memory, connections and open files must not grow.

    .venv/bin/python -m benchmarks.faults.soak [--minutes 30] [--warmup 5] [--rate 100] [--processes 2] [--dsn DSN]

The driver enqueues about ``--rate`` jobs a second in a fixed mix. It holds no-ops,
CPU work in threads, short sleeps, jobs that fail once and retry, snoozes, jobs that
enqueue jobs, results stored in meta, and async jobs that overrun their timeout.
The pruner deletes finished jobs after 60 s, so the table stays small. Every 10 s
it samples the resident memory and open file descriptors of the supervisor, the
duties process and each worker process, and the node's connections in
pg_stat_activity. After the warm-up it prints, per process, the first and last
sample, the range and the trend, and whether each stayed below 10% over its first
sample. A leak shows as growth, so a fall passes: the connection pools close
connections that stay idle, and their file descriptors go with them. Without
``--dsn`` it starts a throwaway embedded PostgreSQL (fsync off).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from obanpro import slots
from obanpro.oban import Oban

from . import workloads
from .common import (
    Database,
    Node,
    drop_schema,
    machine,
    new_schema,
    open_files,
    rss_bytes,
)

SAMPLE_INTERVAL = 10.0
TOLERANCE = 0.10
DRIVER_APPLICATION = "obanpro-soak-driver"
NODE_CONFIG = """
[pruner]
max_age = 60
interval = 10
"""

MIX = [
    (40, lambda: workloads.Noop.new()),
    (15, lambda: workloads.Crunch.new({"rounds": 2_000})),
    (18, lambda: workloads.Nap.new({"seconds": 0.05})),
    (5, lambda: workloads.Flaky.new()),
    (5, lambda: workloads.SnoozeOnce.new()),
    (5, lambda: workloads.Chain.new()),
    (10, lambda: workloads.Report.new({"size": 1024})),
    (2, lambda: workloads.Overrun.new()),
]


@dataclass
class Series:
    """Samples of one measure of one process (or of the whole node), as (seconds since start, value)."""

    name: str
    samples: list[tuple[float, float]] = field(default_factory=list)

    def after(self, warmup: float) -> list[tuple[float, float]]:
        return [sample for sample in self.samples if sample[0] >= warmup]

    def summary(self, warmup: float, unit: str, scale: float = 1.0) -> tuple[str, bool]:
        steady = self.after(warmup)
        if len(steady) < 2:
            return f"{self.name}: too few samples after the warm-up", False

        values = [value for _moment, value in steady]
        first, last, low, high = values[0], values[-1], min(values), max(values)
        growth = (last - first) / first if first else 0.0
        spread = (high - low) / low if low else 0.0
        hours = (steady[-1][0] - steady[0][0]) / 3600
        slope = _slope(steady) * 3600 / scale if hours else 0.0
        rise = (high - first) / first if first else 0.0
        no_growth = rise <= TOLERANCE
        if not no_growth:
            verdict = "GREW"
        elif abs(growth) <= TOLERANCE and spread <= TOLERANCE:
            verdict = "flat"
        else:
            verdict = "fell"
        line = (
            f"{self.name}: first {first / scale:.1f} {unit}, last {last / scale:.1f}, "
            f"min {low / scale:.1f}, max {high / scale:.1f}, change {growth:+.1%}, range {spread:.1%}, "
            f"trend {slope:+.2f} {unit}/h -> {verdict}"
        )
        return line, no_growth


def _slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of value over seconds."""
    times = [moment for moment, _value in samples]
    values = [value for _moment, value in samples]
    mean_time, mean_value = statistics.fmean(times), statistics.fmean(values)
    denominator = sum((moment - mean_time) ** 2 for moment in times)
    if not denominator:
        return 0.0
    return sum((moment - mean_time) * (value - mean_value) for moment, value in samples) / denominator


class Sampler:
    """Reads memory and open files of the node's processes, keyed by their role."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.series: dict[str, Series] = {}
        self.respawns: list[str] = []
        self._segment: slots.Segment | None = None
        self._pids: dict[str, int] = {}

    def roles(self) -> dict[str, int]:
        if self._segment is None:
            names = [name for name in slots.segment_names() if f".{self.node.pid}." in name]
            if not names:
                return {}
            self._segment = slots.attach(names[0], writable=False)

        table = self._segment.table
        workers = {f"worker {index}": table.worker_pid(index) for index in range(table.max_workers)}
        workers = {role: pid for role, pid in workers.items() if pid}
        duties = [pid for pid in self.node.children() if pid not in workers.values()]
        roles = {"supervisor": self.node.pid, **workers}
        if duties:
            roles["duties"] = duties[0]
        return roles

    def sample(self, moment: float) -> None:
        if self._segment is not None:
            # A read-only attachment is a copy; attach again to see the current table.
            self._segment.close()
            self._segment = None

        for role, pid in self.roles().items():
            previous = self._pids.get(role)
            if previous is not None and previous != pid:
                self.respawns.append(f"{role}: pid {previous} replaced by {pid} at {moment:.0f} s")
            self._pids[role] = pid

            rss, files = rss_bytes(pid), open_files(pid)
            if rss is not None:
                self.series.setdefault(f"RSS {role}", Series(f"RSS {role} (pid {pid})")).samples.append((moment, rss))
            if files is not None:
                self.series.setdefault(f"files {role}", Series(f"open files {role}")).samples.append((moment, files))

    def close(self) -> None:
        if self._segment is not None:
            self._segment.close()


async def drive(oban: Oban, rate: float, stop_at: float) -> int:
    """Enqueue the mix at about ``rate`` jobs a second until ``stop_at``; return how many were enqueued."""
    weights = [weight for weight, _make in MIX]
    makers = [make for _weight, make in MIX]
    random_source = random.Random(12345)
    tick = 0.1
    enqueued = 0
    owed = 0.0

    while time.monotonic() < stop_at:
        owed += rate * tick
        count = int(owed)
        owed -= count
        if count:
            batch = [maker() for maker in random_source.choices(makers, weights, k=count)]
            await oban.enqueue_many(batch)
            enqueued += count
        await asyncio.sleep(tick)

    return enqueued


async def soak(args: argparse.Namespace, dsn: str, directory: Path) -> tuple[Sampler, Series, dict, int, float, int]:
    prefix = await new_schema(dsn, "soak")
    config = directory / "oban.toml"
    config.write_text(NODE_CONFIG)
    node = Node(
        dsn, prefix,
        ["--config", str(config), "-q", f"default:{args.limit}", "-p", str(args.processes), "--log-level", "WARNING"],
        directory / "node.log",
    )
    sampler = Sampler(node)
    connections = Series("node connections")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, server_settings={"application_name": DRIVER_APPLICATION})
    oban = Oban(pool=pool, prefix=prefix)
    monitor = await asyncpg.connect(dsn, server_settings={"application_name": DRIVER_APPLICATION})
    started = time.monotonic()
    stop_at = started + args.minutes * 60

    try:
        await oban.start()
        driver = asyncio.create_task(drive(oban, args.rate, stop_at))

        next_sample = started
        while not driver.done():
            if node.process.poll() is not None:
                raise RuntimeError(f"the node exited with code {node.process.returncode}; see {node.log_path}")
            now = time.monotonic()
            if now >= next_sample:
                moment = now - started
                sampler.sample(moment)
                count = await monitor.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND backend_type = 'client backend' AND application_name <> $1",
                    DRIVER_APPLICATION,
                )
                connections.samples.append((moment, count))
                next_sample += SAMPLE_INTERVAL
                print(f"  {moment:6.0f} s: {_progress(sampler, count)}", flush=True)
            await asyncio.sleep(0.5)

        enqueued = await driver
        states = {row[0]: row[1] for row in await monitor.fetch(f"SELECT state::text, count(*) FROM {prefix}.oban_jobs GROUP BY 1")}
        elapsed = time.monotonic() - started
    finally:
        await oban.stop()
        await pool.close()
        exit_code = node.stop()
        sampler.close()
        await monitor.close()
        await drop_schema(dsn, prefix)

    return sampler, connections, states, enqueued, elapsed, exit_code


def _progress(sampler: Sampler, connections: int) -> str:
    parts = []
    for name, series in sampler.series.items():
        if name.startswith("RSS") and series.samples:
            parts.append(f"{name[4:]} {series.samples[-1][1] / 1048576:.1f} MB")
    return ", ".join(parts) + f"; {connections} connections"


def report(args: argparse.Namespace, database: str, results: tuple) -> bool:
    sampler, connections, states, enqueued, elapsed, exit_code = results
    warmup = args.warmup * 60
    print(f"\nsoak: {elapsed / 60:.1f} min of mixed jobs at about {args.rate:g} jobs/s, "
          f"obanpro start -p {args.processes} -q default:{args.limit}; warm-up {args.warmup:g} min")
    print(f"machine: {machine()}; database: {database}")
    print(f"jobs enqueued by the driver: {enqueued}; rows left (the pruner keeps 60 s): {states}")
    print(f"node exit code: {exit_code}")
    if sampler.respawns:
        print("processes replaced during the run: " + "; ".join(sampler.respawns))

    everything_flat = not sampler.respawns and exit_code == 0
    for name, series in sorted(sampler.series.items()):
        if name.startswith("RSS"):
            line, flat = series.summary(warmup, "MB", 1048576)
        else:
            line, flat = series.summary(warmup, "fds")
        everything_flat &= flat
        print("  " + line)

    line, flat = connections.summary(warmup, "connections")
    everything_flat &= flat
    print("  " + line)
    print(f"\nresult: {'no measure grew 10% or more' if everything_flat else 'a measure GREW 10% or more'}")
    return everything_flat


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run in minutes (default 30)")
    parser.add_argument("--warmup", type=float, default=5.0, help="minutes before measures must stay flat (default 5)")
    parser.add_argument("--rate", type=float, default=100.0, help="jobs enqueued per second (default 100)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--limit", type=int, default=20, help="limit of queue default (default 20)")
    parser.add_argument("--dsn", help="PostgreSQL to use; default: a throwaway embedded server")
    args = parser.parse_args()
    if args.warmup >= args.minutes:
        parser.error(f"--warmup {args.warmup:g} must be shorter than --minutes {args.minutes:g}")

    database = Database(args.dsn)
    dsn = database.start()
    try:
        with tempfile.TemporaryDirectory(prefix="obanpro-soak-") as directory:
            results = await soak(args, dsn, Path(directory))
            flat = report(args, database.describe(), results)
    finally:
        database.stop()

    raise SystemExit(0 if flat else 1)


if __name__ == "__main__":
    asyncio.run(main())
