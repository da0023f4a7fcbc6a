"""Runs one measurement of one scenario for one tool and prints the result as one JSON line.

    <tool venv>/bin/python -m benchmarks.peers.driver --tool obanpro --scenario cpu --processes 2

It runs inside the tool's own virtual environment (standard library plus that
tool), so `benchmarks.compare` can drive every peer the same way. The tool's
adapter, in ``benchmarks/peers/<tool>_jobs.py``, knows how to reset its
database or broker, insert jobs and start its workers; the scenarios here are
written once for all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

from . import work

ROOT = Path(__file__).resolve().parents[2]
POLL = 0.02
"""Seconds between checks for 'all done': the same for every tool."""


class Unsupported(Exception):
    """The tool cannot run this scenario; the message says why."""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class Workers:
    """The worker processes of one measurement: started in their own session, stopped by pid."""

    def __init__(
        self, commands: list[list[str]], env: dict[str, str], log_path: str
    ) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.log_start = self.log.tell()
        self.procs = [
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            for command in commands
        ]

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def check_alive(self) -> None:
        for proc in self.procs:
            code = proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"worker command {proc.args[:4]} exited early with code {code}: "
                    f"{self.last_error()}"
                )

    def last_error(self) -> str:
        """The last line of the workers' output that names an error, from this run's part of the log."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self.log_start)
                lines = handle.read().decode(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line.strip() for line in lines if "Error" in line or "error" in line]
        return (
            errors[-1][:300] if errors else (lines[-1][:300] if lines else "no output")
        )

    def stop(self, timeout: float = 20.0) -> list[int | None]:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        # Anything left in the sessions these commands started (a pool child that
        # outlived its parent, a SIGTERM that was ignored) goes too, by group id.
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.log.close()
        return codes


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc/<pid>/task/*/children."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in children:
                found.append(int(child))
                stack.append(int(child))
    return found


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Driver:
    def __init__(self, adapter, options: argparse.Namespace) -> None:
        self.adapter = adapter
        self.options = options
        with tempfile.NamedTemporaryFile(
            prefix="bench-stamps-", suffix=".txt", delete=False
        ) as handle:
            self.stamps = handle.name
        self.log_path = options.log or os.devnull
        os.environ["BENCH_STAMPS"] = self.stamps

    def start(self, processes: int, limits: dict[str, int]) -> Workers:
        commands = self.adapter.commands(processes, limits)
        env = {
            **os.environ,  # after the adapter opened, so what it exported for its workers is there
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), os.environ.get("PYTHONPATH", "")]
            ).rstrip(os.pathsep),
            "PYTHONUNBUFFERED": "1",
        }
        return Workers(commands, env, self.log_path)

    async def insert_bulk(
        self,
        kind: str,
        count: int,
        queue: str = "default",
        first_seq: int = 0,
        extra: dict | None = None,
    ) -> float:
        """Insert ``count`` jobs with the tool's bulk API in batches; return the seconds it took."""
        batch = self.options.batch
        started = time.perf_counter()
        for offset in range(0, count, batch):
            args = [
                {"seq": first_seq + i, **(extra or {})}
                for i in range(offset, min(count, offset + batch))
            ]
            await self.adapter.insert(kind, args, queue)
        return time.perf_counter() - started

    async def wait_done(self, workers: Workers | None, timeout: float) -> float:
        """Poll until no job is left; return time.time() at the first poll that found none."""
        deadline = time.monotonic() + timeout
        checks = 0
        while True:
            if await self.adapter.pending() == 0:
                return time.time()
            checks += 1
            if workers is not None and checks % 25 == 0:
                workers.check_alive()
            if time.monotonic() > deadline:
                left = await self.adapter.pending()
                raise TimeoutError(f"{left} jobs still pending after {timeout:.0f} s")
            await asyncio.sleep(POLL)

    async def verify(self, expected: int) -> None:
        done = await self.adapter.completed()
        if done is not None and done != expected:
            raise RuntimeError(
                f"{done} of {expected} jobs completed: jobs lost or failed"
            )

    async def warm(self, workers: Workers, queue: str = "default") -> None:
        """Run one job through the started node so it is connected and idle, then settle."""
        await self.adapter.insert_one("stamp", {"seq": -1}, queue)
        await self.wait_done(workers, 60)
        await asyncio.sleep(0.5)

    # Scenarios

    async def cpu(self) -> dict:
        o = self.options
        await self.adapter.reset()
        await self.insert_bulk("cpu", o.jobs, extra={"rounds": o.rounds, "stamp": True})
        started = time.time()
        workers = self.start(o.processes, {"default": o.limit})
        try:
            finished = await self.wait_done(workers, o.timeout)
        finally:
            codes = workers.stop()
        await self.verify(o.jobs)
        # Where the wall time went, from each job's own start and end stamps (pid included):
        # start-up until the first job ran, and the tail from the moment the first busy
        # process ran out of jobs for good until the last job ended (an idle core).
        stamps = [
            s for s in work.read_stamps(self.stamps, with_pid=True) if s[0] == "cpu"
        ]
        last_end: dict[int, float] = {}
        per_pid: dict[int, int] = {}
        for _, _, begun, ended, pid in stamps:
            last_end[pid] = max(last_end.get(pid, 0.0), ended)
            per_pid[pid] = per_pid.get(pid, 0) + 1
        result = {"wall_s": finished - started, "exit_codes": codes}
        if stamps:
            result.update(
                first_job_s=min(s[2] for s in stamps) - started,
                last_job_end_s=max(last_end.values()) - started,
                idle_tail_s=max(last_end.values()) - min(last_end.values())
                if len(last_end) > 1
                else 0.0,
                jobs_per_process=sorted(per_pid.values(), reverse=True),
                job_s_median=statistics.median(s[3] - s[2] for s in stamps),
            )
        return result

    async def noop(self) -> dict:
        o = self.options
        await self.adapter.reset()
        insert_s = await self.insert_bulk("noop", o.jobs)
        started = time.time()
        workers = self.start(o.processes, {"default": o.limit})
        try:
            finished = await self.wait_done(workers, o.timeout)
        finally:
            codes = workers.stop()
        await self.verify(o.jobs)
        wall = finished - started
        return {
            "wall_s": wall,
            "jobs_per_s": o.jobs / wall,
            "insert_s": insert_s,
            "insert_jobs_per_s": o.jobs / insert_s,
            "exit_codes": codes,
        }

    async def insert(self) -> dict:
        o = self.options
        await self.adapter.reset()
        seconds = await self.insert_bulk("noop", o.jobs)
        count = await self.adapter.count()
        if count is not None and count != o.jobs:
            raise RuntimeError(f"{count} of {o.jobs} inserted jobs found")
        return {
            "insert_s": seconds,
            "jobs_per_s": o.jobs / seconds,
            "api": self.adapter.bulk_api,
        }

    async def latency(self) -> dict:
        o = self.options
        await self.adapter.reset()
        workers = self.start(o.processes, {"default": o.limit})
        try:
            await self.warm(workers)
            inserted = {}
            for seq in range(o.jobs):
                inserted[seq] = time.time()
                await self.adapter.insert_one("stamp", {"seq": seq}, "default")
                await asyncio.sleep(o.gap)
            await self.wait_done(workers, o.timeout)
        finally:
            codes = workers.stop()
        await self.verify(o.jobs + 1)
        started = {
            seq: t
            for kind, seq, t, _ in work.read_stamps(self.stamps)
            if kind == "start" and seq >= 0
        }
        missing = [seq for seq in inserted if seq not in started]
        if missing:
            raise RuntimeError(f"{len(missing)} jobs never recorded their start")
        ms = [(started[seq] - inserted[seq]) * 1000 for seq in inserted]
        return {
            "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms),
            "exit_codes": codes,
        }

    async def mixed(self) -> dict:
        o = self.options
        await self.adapter.reset()
        workers = self.start(o.processes, {"cpu": o.limit, "io": o.io_limit})
        try:
            await self.warm(workers, "io")
            begun = time.time()
            await self.insert_bulk(
                "cpu", o.jobs, queue="cpu", extra={"rounds": o.rounds, "stamp": True}
            )
            inserted = {}
            for seq in range(o.jobs):
                inserted[seq] = time.time()
                await self.adapter.insert_one("io", {"seq": seq}, "io")
                await asyncio.sleep(o.gap)
            finished = await self.wait_done(workers, o.timeout)
        finally:
            codes = workers.stop()
        await self.verify(2 * o.jobs + 1)
        stamps = work.read_stamps(self.stamps)
        io = {seq: (s, f) for kind, seq, s, f in stamps if kind == "io" and seq >= 0}
        cpu = [(s, f) for kind, seq, s, f in stamps if kind == "cpu"]
        if len(io) != o.jobs:
            raise RuntimeError(f"{len(io)} of {o.jobs} I/O jobs recorded")
        start_ms = [(io[seq][0] - inserted[seq]) * 1000 for seq in inserted]
        done_ms = [(io[seq][1] - inserted[seq]) * 1000 for seq in inserted]
        # How many I/O jobs started while CPU jobs were still running.
        cpu_end = max(f for _, f in cpu) if cpu else begun
        under_load = sum(1 for s, _ in io.values() if s < cpu_end)
        return {
            "io_start_p50_ms": percentile(start_ms, 50),
            "io_start_p99_ms": percentile(start_ms, 99),
            "io_done_p50_ms": percentile(done_ms, 50),
            "io_done_p99_ms": percentile(done_ms, 99),
            "io_under_cpu_load": under_load,
            "cpu_wall_s": cpu_end - begun,
            "wall_s": finished - begun,
            "exit_codes": codes,
        }

    async def startup(self) -> dict:
        o = self.options
        await self.adapter.reset()
        await self.adapter.insert_one("stamp", {"seq": 0}, "default")
        started = time.time()
        workers = self.start(o.processes, {"default": o.limit})
        try:
            first = None
            deadline = time.monotonic() + o.timeout
            while first is None:
                for kind, seq, t, _ in work.read_stamps(self.stamps):
                    if kind == "start" and seq == 0:
                        first = t
                if first is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the first job never started")
                    workers.check_alive()
                    await asyncio.sleep(0.005)
            await self.wait_done(workers, o.timeout)
            await asyncio.sleep(1.0)
            rss = {}
            for pid in workers.pids:
                rss[pid] = {
                    "rss_kib": rss_kib(pid),
                    "children": {c: rss_kib(c) for c in descendants(pid)},
                }
        finally:
            codes = workers.stop()
        children = [
            kib for entry in rss.values() for kib in entry["children"].values() if kib
        ]
        tops = [entry["rss_kib"] for entry in rss.values()]
        # With one process per command (no children), the command itself is the worker.
        per_worker = children if children else tops
        return {
            "first_job_s": first - started,
            "worker_processes": len(per_worker),
            "rss_per_worker_mib": statistics.median(per_worker) / 1024
            if per_worker
            else 0.0,
            "rss_total_mib": (sum(tops) + sum(children)) / 1024,
            "rss_parent_mib": statistics.median(tops) / 1024 if children else 0.0,
            "exit_codes": codes,
        }


async def main_async(options: argparse.Namespace) -> dict:
    module = importlib.import_module(f"benchmarks.peers.{options.tool}_jobs")
    adapter = module.Adapter(options)
    driver = Driver(adapter, options)
    try:
        await adapter.open()
        scenario = getattr(driver, options.scenario)
        support = adapter.supports(options.scenario, options)
        if support is not True:
            raise Unsupported(support)
        return await scenario()
    finally:
        try:
            await adapter.close()
        finally:
            try:
                os.unlink(driver.stamps)
            except OSError:
                pass


def _terminate(signum, frame):
    # SIGTERM from benchmarks.compare (or a user) unwinds through the finally
    # blocks, so the workers this driver started are stopped, not orphaned.
    raise SystemExit(f"stopped by signal {signum}")


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", required=True)
    parser.add_argument(
        "--scenario",
        required=True,
        choices=["cpu", "noop", "insert", "latency", "mixed", "startup"],
    )
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--io-limit", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=work.ROUNDS)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--gap", type=float, default=0.01)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument(
        "--pg",
        default=os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432"),
    )
    parser.add_argument(
        "--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")
    )
    parser.add_argument("--log", help="file that receives the workers' output")
    options = parser.parse_args()

    try:
        result = {"ok": True, **asyncio.run(main_async(options))}
    except Unsupported as reason:
        result = {"ok": False, "unsupported": str(reason)}
    except Exception as error:  # noqa: BLE001 - reported to compare, which shows it in the table
        result = {
            "ok": False,
            "error": f"{type(error).__name__}: {error}",
            "trace": traceback.format_exc()[-2000:],
        }
    print("BENCH-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
