"""Run every benchmark scenario for obanpro and its peers, side by side, and write BENCHMARKS.md.

    python -m benchmarks.compare                      # everything, 5 runs each (about 25 minutes)
    python -m benchmarks.compare --scenario cpu       # one scenario (repeatable)
    python -m benchmarks.compare --quick              # small sizes, 1 run: checks the harness works
    python -m benchmarks.compare --report-only        # rewrite BENCHMARKS.md and the plot from the last run

Each peer runs from its own virtual environment under benchmarks/.venvs/,
created on first use from benchmarks/requirements/<peer>.txt; obanpro runs
from the project's .venv. Within a scenario the rows alternate (A B C, A B C,
...) so that a slow minute of this shared machine hits every tool alike; each
figure is the median of the runs, with the min-max beside it. Standard library
only: the plot is drawn by benchmarks/plot.py inside the tools venv.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = HERE / ".venvs"
REQUIREMENTS = HERE / "requirements"
RESULTS = HERE / "results"
LAST_RUN = HERE / "last-run.json"
PLOT = HERE / "plots" / "benchmarks.png"
REPORT = ROOT / "BENCHMARKS.md"

PG = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")

SCENARIOS = [
    "cpu",
    "noop",
    "insert",
    "latency",
    "mixed",
    "scaling",
    "startup",
    "hotpath",
]
CORES = os.cpu_count() or 1

PEERS = {
    # name: (display name, python version it needs)
    "oban": ("oban 0.7.0", (3, 12)),
    "celery": ("Celery", (3, 11)),
    "dramatiq": ("Dramatiq", (3, 11)),
    "pgqueuer": ("PgQueuer", (3, 11)),
    "procrastinate": ("Procrastinate", (3, 11)),
    "tools": ("plot tools", (3, 11)),
}


class Sizes:
    """Job counts of each scenario; --quick shrinks them."""

    def __init__(self, quick: bool) -> None:
        self.cpu_jobs = 20 if quick else 100
        self.rounds = 100_000
        self.noop_jobs = 5_000 if quick else 50_000
        self.insert_jobs = 10_000 if quick else 100_000
        self.insert_small = 10_000
        self.latency_jobs = 100 if quick else 500
        self.latency_gap = 0.005
        self.mixed_jobs = 40 if quick else 100
        self.mixed_gap = 0.02
        # Tools whose insert API is one call per job, or whose no-op rate is far
        # below the others, run fewer jobs so the whole comparison fits in 30
        # minutes; the row says how many. A per-job API's rate does not depend
        # on the count, and a smaller no-op backlog can only help its rate.
        self.per_job_insert_cap = 2_000 if quick else 10_000
        self.noop_caps = {
            "celery": 2_000 if quick else 10_000,
            "pgqueuer": 5_000 if quick else 20_000,
            "procrastinate": 500 if quick else 2_000,
        }


# Environments


def find_python(version: tuple[int, int]) -> str:
    """A base interpreter of ``version`` or newer-compatible: this one when it matches, else one on this machine."""
    if sys.version_info[:2] == version:
        return getattr(sys, "_base_executable", sys.executable)
    name = f"python{version[0]}.{version[1]}"
    env = os.environ.get(f"BENCH_PYTHON{version[0]}{version[1]}")
    candidates = [env] if env else []
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += sorted(
        (str(p / "bin" / "python") for p in pyenv.glob(f"{version[0]}.{version[1]}.*")),
        reverse=True,
    )
    candidates += [shutil.which(name)]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit(
        f"no Python {version[0]}.{version[1]} found: set BENCH_PYTHON{version[0]}{version[1]} to its path"
    )


def ensure_venv(name: str) -> Path:
    """Create benchmarks/.venvs/<name> from its pinned requirements on first use; reinstall when they change."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    requirements = REQUIREMENTS / f"{name}.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    marker = venv / ".requirements.sha256"
    if python.exists() and marker.exists() and marker.read_text() == digest:
        return python

    base = find_python(PEERS[name][1])
    say(f"setting up {venv.relative_to(ROOT)} ({PEERS[name][0]}) with {base}")
    if not python.exists():
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    done = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            str(requirements),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(
            f"installing {requirements.relative_to(ROOT)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    marker.write_text(digest)
    return python


def project_python() -> Path:
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(
            "no .venv in the project: run `bash ci/test.sh` (or `python3 -m venv .venv && .venv/bin/pip install -e '.[test]'`) first"
        )
    return python


_compiled: set[Path] = set()


def compile_sources(python: Path) -> None:
    """Write the bytecode of the project's sources for ``python`` once per run.

    pip compiles what it installs, but the benchmark's job modules and the
    editable obanpro are imported from the source tree, which an interpreter
    running with PYTHONDONTWRITEBYTECODE would compile again at every start.
    """
    if python in _compiled:
        return
    _compiled.add(python)
    sources = [ROOT / "benchmarks"] + ([ROOT / "obanpro"] if python == project_python() else [])
    subprocess.run([str(python), "-m", "compileall", "-q", *map(str, sources)], capture_output=True, check=False)


def python_for(tool: str) -> Path:
    python = project_python() if tool in ("obanpro", "baseline") else ensure_venv(tool)
    compile_sources(python)
    return python


# Output


def say(message: str) -> None:
    print(message, flush=True)


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.3g}"


# Rows


class Row:
    """One line of a scenario's table: one tool at one setting."""

    def __init__(
        self,
        scenario: str,
        tool: str,
        label: str,
        command: str,
        processes: int = 1,
        jobs: int | None = None,
        extra: list[str] | None = None,
        note: str = "",
        key: str | None = None,
        unsupported: str | None = None,
        driver_scenario: str | None = None,
    ) -> None:
        self.scenario = scenario
        self.tool = tool
        self.label = label
        self.command = command
        self.processes = processes
        self.jobs = jobs
        self.extra = extra or []
        self.note = note
        self.key = key or f"{scenario}:{tool}:p{processes}:{jobs}"
        self.unsupported = unsupported
        self.driver_scenario = driver_scenario or scenario

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def obanpro_processes() -> list[int]:
    """1, 2 and every core (1 to the core count for the scaling curve)."""
    return sorted({1, min(2, CORES), CORES})


def build_rows(scenarios: list[str], sizes: Sizes) -> dict[str, list[Row]]:
    rows: dict[str, list[Row]] = {}
    p2 = min(2, CORES)
    peers_p = p2  # the peers get the same number of processes as obanpro's headline row

    if "cpu" in scenarios:
        n, r = sizes.cpu_jobs, ["--rounds", str(sizes.rounds)]
        q = "-q default:20"
        rows["cpu"] = [
            Row(
                "cpu",
                "oban",
                "oban start (oban 0.7.0)",
                "oban start --queues default:20",
                1,
                n,
                r,
            ),
            *[
                Row(
                    "cpu",
                    "obanpro",
                    f"obanpro start -p {p}",
                    f"obanpro start -p {p} {q}",
                    p,
                    n,
                    r,
                )
                for p in obanpro_processes()
            ],
            Row(
                "cpu",
                "celery",
                f"Celery prefork -c {peers_p}",
                f"celery worker --pool prefork -c {peers_p}",
                peers_p,
                n,
                r,
            ),
            Row(
                "cpu",
                "dramatiq",
                f"Dramatiq --processes {peers_p}",
                f"dramatiq --processes {peers_p} --threads {20 // peers_p}",
                peers_p,
                n,
                r,
            ),
            Row(
                "cpu",
                "pgqueuer",
                f"PgQueuer, {peers_p} x pgq run",
                f"{peers_p} x pgq run --max-concurrent-tasks {20 // peers_p}",
                peers_p,
                n,
                r,
            ),
            Row(
                "cpu",
                "procrastinate",
                f"Procrastinate, {peers_p} x worker",
                f"{peers_p} x procrastinate worker --concurrency {20 // peers_p}",
                peers_p,
                n,
                r,
            ),
            *[
                Row(
                    "cpu",
                    "baseline",
                    f"multiprocessing.Pool({p}), no queue",
                    f"python -m benchmarks.baseline --processes {p}",
                    p,
                    n,
                    r,
                    key=f"cpu:pool:p{p}:{n}",
                )
                for p in sorted({p2, CORES})
                if p > 1
            ],
            Row(
                "cpu",
                "baseline",
                "plain loop, one process, no queue",
                "python -m benchmarks.baseline --processes 0",
                0,
                n,
                r,
                key=f"cpu:loop:p0:{n}",
            ),
        ]
        if CORES == 1:
            rows["cpu"] = [row for row in rows["cpu"] if row.key != f"cpu:pool:p1:{n}"]

    if "noop" in scenarios:
        n = sizes.noop_jobs
        lim = ["--limit", "50"]
        caps = sizes.noop_caps
        note = "fewer jobs: at its rate 50,000 would not fit the 30-minute run"
        rows["noop"] = [
            *[
                Row(
                    "noop",
                    "obanpro",
                    f"obanpro start -p {p}",
                    f"obanpro start -p {p} -q default:50",
                    p,
                    n,
                    lim,
                )
                for p in obanpro_processes()
            ],
            Row(
                "noop",
                "oban",
                "oban start (oban 0.7.0)",
                "oban start --queues default:50",
                1,
                n,
                lim,
            ),
            Row(
                "noop",
                "celery",
                f"Celery prefork -c {peers_p}",
                f"celery worker --pool prefork -c {peers_p}",
                peers_p,
                caps["celery"],
                lim,
                note=note if caps["celery"] < n else "",
            ),
            Row(
                "noop",
                "dramatiq",
                f"Dramatiq --processes {peers_p}",
                f"dramatiq --processes {peers_p} --threads {50 // peers_p}",
                peers_p,
                n,
                lim,
            ),
            Row(
                "noop",
                "pgqueuer",
                f"PgQueuer, {peers_p} x pgq run",
                f"{peers_p} x pgq run --max-concurrent-tasks {50 // peers_p}",
                peers_p,
                caps["pgqueuer"],
                lim,
                note=note if caps["pgqueuer"] < n else "",
            ),
            Row(
                "noop",
                "procrastinate",
                f"Procrastinate, {peers_p} x worker",
                f"{peers_p} x procrastinate worker --concurrency {50 // peers_p}",
                peers_p,
                caps["procrastinate"],
                lim,
                note=note if caps["procrastinate"] < n else "",
            ),
        ]

    if "scaling" in scenarios:
        # Processes 1 to the core count; on this machine these are rows of the CPU and no-op tables.
        n = sizes.cpu_jobs
        rows["scaling"] = [
            *[
                Row(
                    "cpu",
                    "obanpro",
                    f"obanpro start -p {p}",
                    f"obanpro start -p {p} -q default:20",
                    p,
                    n,
                    ["--rounds", str(sizes.rounds)],
                )
                for p in range(1, CORES + 1)
            ],
            *[
                Row(
                    "noop",
                    "obanpro",
                    f"obanpro start -p {p}",
                    f"obanpro start -p {p} -q default:50",
                    p,
                    sizes.noop_jobs,
                    ["--limit", "50"],
                )
                for p in range(1, CORES + 1)
            ],
        ]

    if "insert" in scenarios:
        n, cap = sizes.insert_jobs, sizes.per_job_insert_cap
        per_job = f"no bulk API: one call per job; {cap:,} jobs (the rate of a per-job API does not depend on the count)"
        rows["insert"] = [
            Row(
                "insert",
                "obanpro",
                "obanpro Oban.enqueue_many",
                "enqueue_many, batches of 5,000",
                1,
                n,
            ),
            Row(
                "insert",
                "oban",
                "oban 0.7.0 Oban.enqueue_many",
                "enqueue_many, batches of 5,000",
                1,
                n,
            ),
            Row(
                "insert",
                "pgqueuer",
                "PgQueuer Queries.enqueue(lists)",
                "enqueue with lists, batches of 5,000",
                1,
                n,
            ),
            Row(
                "insert",
                "procrastinate",
                "Procrastinate batch_defer_async",
                "batch_defer_async, batches of 5,000",
                1,
                n,
            ),
            Row(
                "insert",
                "celery",
                "Celery apply_async",
                "apply_async per job, one producer",
                1,
                min(n, cap),
                note=per_job,
            ),
            Row(
                "insert",
                "dramatiq",
                "Dramatiq send",
                "send per job",
                1,
                min(n, cap),
                note=per_job,
            ),
            Row(
                "insert",
                "obanpro",
                "obanpro Oban.enqueue_many, 10,000 jobs",
                "enqueue_many, batches of 5,000",
                1,
                sizes.insert_small,
            ),
            Row(
                "insert",
                "oban",
                "oban 0.7.0 Oban.enqueue_many, 10,000 jobs",
                "enqueue_many, batches of 5,000",
                1,
                sizes.insert_small,
            ),
        ]

    if "latency" in scenarios:
        n, gap = sizes.latency_jobs, ["--gap", str(sizes.latency_gap)]
        rows["latency"] = [
            Row(
                "latency",
                "obanpro",
                f"obanpro start -p {p2}",
                f"obanpro start -p {p2} -q default:20",
                p2,
                n,
                gap,
            ),
            Row(
                "latency",
                "oban",
                "oban start (oban 0.7.0)",
                "oban start --queues default:20",
                1,
                n,
                gap,
            ),
            Row(
                "latency",
                "celery",
                f"Celery prefork -c {peers_p}",
                f"celery worker --pool prefork -c {peers_p}",
                peers_p,
                n,
                gap,
            ),
            Row(
                "latency",
                "dramatiq",
                f"Dramatiq --processes {peers_p}",
                f"dramatiq --processes {peers_p} --threads {20 // peers_p}",
                peers_p,
                n,
                gap,
            ),
            Row(
                "latency",
                "pgqueuer",
                f"PgQueuer, {peers_p} x pgq run",
                f"{peers_p} x pgq run",
                peers_p,
                n,
                gap,
            ),
            Row(
                "latency",
                "procrastinate",
                f"Procrastinate, {peers_p} x worker",
                f"{peers_p} x procrastinate worker",
                peers_p,
                n,
                gap,
            ),
        ]

    if "mixed" in scenarios:
        n = sizes.mixed_jobs
        a = [
            "--rounds",
            str(sizes.rounds),
            "--gap",
            str(sizes.mixed_gap),
            "--limit",
            "20",
            "--io-limit",
            "20",
        ]
        sync_io = "sync tasks only: the I/O job is time.sleep(0.05) in a worker slot"
        rows["mixed"] = [
            Row(
                "mixed",
                "obanpro",
                f"obanpro start -p {p2}",
                f"obanpro start -p {p2} -q cpu:20,io:20",
                p2,
                n,
                a,
            ),
            Row(
                "mixed",
                "oban",
                "oban start (oban 0.7.0)",
                "oban start --queues cpu:20,io:20",
                1,
                n,
                a,
            ),
            Row(
                "mixed",
                "celery",
                f"Celery prefork -c {peers_p}",
                f"celery worker --pool prefork -c {peers_p} -Q cpu,io",
                peers_p,
                n,
                a,
                note=sync_io,
            ),
            Row(
                "mixed",
                "dramatiq",
                f"Dramatiq --processes {peers_p}",
                f"dramatiq --processes {peers_p} --threads 20 --queues cpu io",
                peers_p,
                n,
                a,
                note=sync_io.replace("a worker slot", "a worker thread"),
            ),
            Row(
                "mixed",
                "pgqueuer",
                f"PgQueuer, {peers_p} x pgq run",
                f"{peers_p} x pgq run, entrypoint limits 20 and 20",
                peers_p,
                n,
                a,
            ),
            Row(
                "mixed",
                "procrastinate",
                f"Procrastinate, {peers_p} x worker",
                f"{peers_p} x procrastinate worker --queues cpu,io",
                peers_p,
                n,
                a,
            ),
        ]

    if "startup" in scenarios:
        rows["startup"] = [
            Row(
                "startup",
                "obanpro",
                f"obanpro start -p {p2}",
                f"obanpro start -p {p2} -q default:20",
                p2,
                1,
            ),
            Row(
                "startup",
                "oban",
                "oban start (oban 0.7.0)",
                "oban start --queues default:20",
                1,
                1,
            ),
            Row(
                "startup",
                "celery",
                f"Celery prefork -c {peers_p}",
                f"celery worker --pool prefork -c {peers_p}",
                peers_p,
                1,
            ),
            Row(
                "startup",
                "dramatiq",
                f"Dramatiq --processes {peers_p}",
                f"dramatiq --processes {peers_p}",
                peers_p,
                1,
            ),
            Row(
                "startup",
                "pgqueuer",
                f"PgQueuer, {peers_p} x pgq run",
                f"{peers_p} x pgq run",
                peers_p,
                1,
            ),
            Row(
                "startup",
                "procrastinate",
                f"Procrastinate, {peers_p} x worker",
                f"{peers_p} x procrastinate worker",
                peers_p,
                1,
            ),
        ]

    # The oban 0.7.0 rows that do not exist, listed with the reason rather than dropped.
    missing = (
        "oban 0.7.0 runs every queue in one process: `oban start` has no process option"
    )
    for scenario in ("cpu", "noop"):
        if scenario in rows and p2 > 1:
            rows[scenario].insert(
                1,
                Row(
                    scenario,
                    "oban",
                    f"oban start with {p2} processes",
                    "-",
                    p2,
                    None,
                    unsupported=missing,
                    key=f"{scenario}:oban:p{p2}:none",
                ),
            )
    return rows


# Running


def run_order(row: Row) -> int:
    p2 = min(2, CORES)
    first = [
        ("obanpro", p2),
        ("baseline", p2),
        ("oban", 1),
        ("obanpro", 1),
        ("baseline", 0),
    ]
    key = (row.tool, row.processes)
    return first.index(key) if key in first else len(first)


def run_row(row: Row, timeout: float, log: Path) -> dict:
    """One measurement of one row: a fresh driver process (or the baseline), its JSON result."""
    if row.unsupported:
        return {"ok": False, "unsupported": row.unsupported}

    python = python_for(row.tool)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_PG": PG, "BENCH_REDIS": REDIS}

    if row.tool == "baseline":
        command = [
            str(python),
            "-m",
            "benchmarks.baseline",
            "--processes",
            str(row.processes),
            "--jobs",
            str(row.jobs),
            *row.extra,
        ]
        started = time.time()
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            timeout=timeout,
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.time() - started
        if done.returncode != 0:
            return {
                "ok": False,
                "error": f"exit {done.returncode}: {done.stderr[-500:]}",
            }
        return {"ok": True, "wall_s": wall}

    command = [
        str(python),
        "-m",
        "benchmarks.peers.driver",
        "--tool",
        row.tool,
        "--scenario",
        row.driver_scenario,
        "--processes",
        str(row.processes),
        "--pg",
        PG,
        "--redis",
        REDIS,
        "--log",
        str(log),
        "--timeout",
        str(timeout - 30),
    ]
    if row.jobs is not None:
        command += ["--jobs", str(row.jobs)]
    command += row.extra
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    RUNNING.append(proc)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_driver(proc)
        return {"ok": False, "error": f"no result within {timeout:.0f} s"}
    finally:
        RUNNING.remove(proc)
    for line in reversed(output.splitlines()):
        if line.startswith("BENCH-RESULT "):
            return json.loads(line[len("BENCH-RESULT ") :])
    return {
        "ok": False,
        "error": f"driver exited {proc.returncode} without a result: {output[-500:]}",
    }


RESOURCE_ERRORS = re.compile(
    r"too many clients|TooManyConnections|PoolTimeout|pool initialization incomplete"
)
"""Failures that come from the shared server running out of connections, not from the tool: retried."""

RUNNING: list[subprocess.Popen] = []
"""The driver being measured, so an interrupted comparison can stop it (and so its workers) by pid."""


def stop_driver(proc: subprocess.Popen) -> None:
    """SIGTERM lets the driver stop the workers it started; what is left of its session is killed after 30 s."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.communicate()


def _interrupted(signum, frame):
    raise KeyboardInterrupt


HEADLINE = {
    "cpu": ("wall_s", "s"),
    "noop": ("jobs_per_s", "/s"),
    "insert": ("jobs_per_s", "/s"),
    "latency": ("p50_ms", "ms"),
    "mixed": ("io_start_p50_ms", "ms"),
    "startup": ("first_job_s", "s"),
}


def run_hotpath(runs: int, quick: bool) -> dict:
    """The pytest-benchmark comparison of the Cython hot path with benchmarks/plain_python.py."""
    out = RESULTS / "hotpath.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [
        str(project_python()),
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(HERE / "bench_hotpath.py"),
        f"--benchmark-json={out}",
        "--benchmark-min-rounds=" + str(max(5, runs)),
        "--benchmark-max-time=" + ("0.2" if quick else "1.0"),
        "--benchmark-disable-gc",
    ]
    say("[hotpath] pytest-benchmark: " + " ".join(command[1:]))
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        say(done.stdout[-3000:] + done.stderr[-2000:])
        return {
            "ok": False,
            "error": f"pytest exited {done.returncode}",
            "command": command,
        }
    data = json.loads(out.read_text())
    results = {}
    for bench in data["benchmarks"]:
        per_op = bench["extra_info"].get("ops", 1)
        results[bench["name"]] = {
            "group": bench["group"],
            "impl": bench["extra_info"]["impl"],
            "ops": per_op,
            "median_us": bench["stats"]["median"] * 1e6 / per_op,
            "min_us": bench["stats"]["min"] * 1e6 / per_op,
            "max_us": bench["stats"]["max"] * 1e6 / per_op,
            "rounds": bench["stats"]["rounds"],
        }
    return {
        "ok": True,
        "benchmarks": results,
        "machine_info": data.get("machine_info", {}).get("cpu", {}),
    }


def run(options: argparse.Namespace) -> dict:
    sizes = Sizes(options.quick)
    scenarios = options.scenario or SCENARIOS
    rows = build_rows(scenarios, sizes)
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "workers.log"
    log.write_text("")

    tools = sorted(
        {row.tool for rs in rows.values() for row in rs if not row.unsupported}
        - {"obanpro", "baseline"}
    )
    for tool in [*tools, "tools"]:
        ensure_venv(tool)

    machine = describe_machine()
    say(f"machine: {machine['summary']}")
    result = {
        "command": "python -m benchmarks.compare"
        + "".join(f" --scenario {s}" for s in options.scenario or [])
        + (" --quick" if options.quick else "")
        + (f" --runs {options.runs}" if options.runs != 5 else ""),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "runs": options.runs,
        "requested": scenarios,
        "sizes": sizes.__dict__,
        "rows": {},
        "hotpath": None,
    }
    result["load_before"] = load_average()
    started = time.monotonic()
    seen: set[str] = set()

    for scenario, scenario_rows in rows.items():
        todo = [row for row in scenario_rows if row.key not in seen]
        seen.update(row.key for row in todo)
        for row in todo:
            result["rows"][row.key] = {**row.to_dict(), "runs": []}
        # The rows whose ratios are targets run next to each other in every round, so
        # the machine's drift (this is a shared host) hits both sides of a ratio alike.
        measured = sorted((row for row in todo if not row.unsupported), key=run_order)
        for row in todo:
            if row.unsupported:
                result["rows"][row.key]["runs"].append(
                    {"ok": False, "unsupported": row.unsupported}
                )
        for k in range(1, options.runs + 1):
            for row in measured:
                elapsed = time.monotonic() - started
                say(
                    f"[{scenario}] {row.label}: run {k} of {options.runs} ({elapsed / 60:.1f} min in)"
                )
                outcome = run_row(row, options.timeout, log)
                for retry in range(3):
                    # The PostgreSQL server is shared: when someone else holds every
                    # connection, wait and measure again rather than lose the run.
                    if outcome.get("ok") or not RESOURCE_ERRORS.search(
                        str(outcome.get("error", ""))
                    ):
                        break
                    say(
                        f"    the server has no free connection; retrying in 15 s ({retry + 1} of 3)"
                    )
                    time.sleep(15)
                    outcome = run_row(row, options.timeout, log)
                result["rows"][row.key]["runs"].append(outcome)
                if outcome.get("ok"):
                    metric, unit = HEADLINE[row.scenario]
                    say(f"    {metric} = {fmt(outcome[metric], unit)}")
                else:
                    say(
                        f"    failed: {outcome.get('error') or outcome.get('unsupported')}"
                    )
        save(result)

    if "hotpath" in scenarios:
        result["hotpath"] = run_hotpath(options.runs, options.quick)
        save(result)

    result["elapsed_min"] = (time.monotonic() - started) / 60
    result["load_after"] = load_average()
    save(result)
    say(f"done in {result['elapsed_min']:.1f} min")
    return result


def save(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(result, indent=1))


# The machine


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def describe_machine() -> dict:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass

    def version_of(python: Path) -> str:
        return subprocess.run(
            [str(python), "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()

    pythons = {"obanpro": version_of(project_python())}
    for tool in ("oban", "celery", "dramatiq", "pgqueuer", "procrastinate"):
        python = VENVS / tool / "bin" / "python"
        if python.exists():
            pythons[tool] = version_of(python)

    postgres = (
        subprocess.run(
            [
                str(project_python()),
                "-c",
                (
                    "import asyncio, asyncpg, sys\n"
                    "async def main():\n"
                    "    c = await asyncpg.connect(sys.argv[1] + '/postgres')\n"
                    "    print(await c.fetchval('SHOW server_version'))\n"
                    "    await c.close()\n"
                    "asyncio.run(main())"
                ),
                PG,
            ],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        or "unreachable"
    )
    redis = "unknown"
    celery_python = VENVS / "celery" / "bin" / "python"
    if celery_python.exists():
        redis = (
            subprocess.run(
                [
                    str(celery_python),
                    "-c",
                    "import redis, sys; print(redis.Redis.from_url(sys.argv[1]).info()['redis_version'])",
                    REDIS,
                ],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            or "unreachable"
        )
    versions = {}
    for tool, package in (
        ("oban", "oban"),
        ("celery", "celery"),
        ("dramatiq", "dramatiq"),
        ("pgqueuer", "pgqueuer"),
        ("procrastinate", "procrastinate"),
    ):
        python = VENVS / tool / "bin" / "python"
        if python.exists():
            versions[tool] = subprocess.run(
                [
                    str(python),
                    "-c",
                    f"import importlib.metadata as m; print(m.version('{package}'))",
                ],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
    versions["obanpro"] = subprocess.run(
        [
            str(project_python()),
            "-c",
            "import importlib.metadata as m; print(m.version('obanpro'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "obanpro"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    summary = (
        f"{CORES} cores ({cpu}), {memory} RAM, Linux {platform.release()}, PostgreSQL {postgres}, "
        f"Redis {redis}, Python {pythons.get('obanpro')} (obanpro and peers) / {pythons.get('oban', '?')} (oban)"
    )
    return {
        "cores": CORES,
        "cpu": cpu,
        "memory": memory,
        "kernel": platform.release(),
        "postgres": postgres,
        "redis": redis,
        "pythons": pythons,
        "versions": versions,
        "commit": commit + (" with uncommitted changes in obanpro/" if dirty else ""),
        "summary": summary,
    }


# Entry point


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=5,
        help="runs of each row; the median is reported (default 5)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and 1 run, to check the harness",
    )
    parser.add_argument(
        "--timeout", type=float, default=300, help="seconds one run may take"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite BENCHMARKS.md and the plot from the last run",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="do not touch BENCHMARKS.md or the plot",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="with --quick: write BENCHMARKS.md and the plot anyway",
    )
    options = parser.parse_args()
    if options.quick and options.runs == 5:
        options.runs = 1
    if options.runs < 1:
        parser.error("--runs must be at least 1")

    from . import report

    if options.report_only:
        result = json.loads(LAST_RUN.read_text())
    else:
        signal.signal(signal.SIGTERM, _interrupted)
        try:
            result = run(options)
        except KeyboardInterrupt:
            for proc in RUNNING:
                stop_driver(proc)
            raise SystemExit(
                "interrupted: the running measurement was stopped; BENCHMARKS.md left as it was"
            )
        if options.no_report or (options.quick and not options.report):
            say(
                f"results in {(RESULTS / 'latest.json').relative_to(ROOT)}; BENCHMARKS.md left as it was"
            )
            return
        for row in result["rows"].values():
            for outcome in row["runs"]:
                outcome.pop("trace", None)
        result = report.merge_previous(result, LAST_RUN)
        LAST_RUN.write_text(json.dumps(result, indent=1) + "\n")

    report.write(result, REPORT, PLOT, ensure_venv("tools"))
    say(f"wrote {REPORT.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
