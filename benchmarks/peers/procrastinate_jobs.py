"""Procrastinate: the tasks and the driver adapter.

Procrastinate runs sync tasks in a thread and async tasks on its loop; one
`procrastinate worker` is one process with `--concurrency` jobs at once, and
more processes are more worker commands side by side.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from pathlib import Path

import procrastinate

from . import work

DATABASE = "bench_procrastinate"
DSN = f"{os.environ.get('BENCH_PG', 'postgresql://postgres@127.0.0.1:5432').rstrip('/')}/{DATABASE}"

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=DSN))


@app.task(name="digest", queue="default")
def digest(seq, rounds, stamp=False):
    started = time.time()
    work.sha256_rounds(f"job-{seq}", rounds)
    if stamp:
        work.stamp("cpu", seq, started, time.time())


@app.task(name="noop", queue="default")
async def noop(seq):
    return None


@app.task(name="stamp", queue="default")
async def stamp(seq):
    work.stamp("start", seq, time.time())


@app.task(name="sleep", queue="io")
async def sleep(seq):
    started = time.time()
    await asyncio.sleep(work.IO_SLEEP)
    work.stamp("io", seq, started, time.time())


KINDS = {"cpu": digest, "noop": noop, "stamp": stamp, "io": sleep}


class Adapter:
    bulk_api = "Task.batch_defer_async (one statement per batch)"
    one_api = "Task.defer_async"

    def __init__(self, options) -> None:
        self.options = options
        self.dsn = None
        self.conn = None
        self.executable = str(Path(sys.executable).with_name("procrastinate"))

    def supports(self, scenario, options):
        return True

    async def open(self) -> None:
        from . import pg

        if self.options.pg.rstrip("/") != os.environ.get(
            "BENCH_PG", "postgresql://postgres@127.0.0.1:5432"
        ).rstrip("/"):
            raise RuntimeError(
                "pass the PostgreSQL server to the Procrastinate peer in BENCH_PG"
            )
        self.dsn = await pg.ensure_database(self.options.pg, DATABASE)
        self.conn = await pg.connect(self.dsn)
        await app.open_async()
        if not await self.conn.val(
            "SELECT to_regclass('public.procrastinate_jobs') IS NOT NULL"
        ):
            await app.schema_manager.apply_schema_async()

    async def close(self) -> None:
        await app.close_async()
        if self.conn is not None:
            await self.conn.close()

    async def reset(self) -> None:
        await self.conn.run(
            "TRUNCATE procrastinate_jobs, procrastinate_events, procrastinate_periodic_defers, "
            "procrastinate_workers RESTART IDENTITY CASCADE"
        )

    async def insert(self, kind, args_list, queue) -> None:
        await KINDS[kind].configure(queue=queue).batch_defer_async(*args_list)

    async def insert_one(self, kind, args, queue) -> None:
        await KINDS[kind].configure(queue=queue).defer_async(**args)

    async def pending(self) -> int:
        return await self.conn.val(
            "SELECT count(*) FROM (SELECT 1 FROM procrastinate_jobs WHERE status IN ('todo', 'doing') LIMIT 1) s"
        )

    async def count(self) -> int:
        return await self.conn.val("SELECT count(*) FROM procrastinate_jobs")

    async def completed(self) -> int:
        return await self.conn.val(
            "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
        )

    def commands(self, processes, limits):
        concurrency = max(1, math.ceil(sum(limits.values()) / processes))
        return [
            [
                self.executable,
                "--app",
                f"{__name__}.app",
                "--log-level",
                "warning",
                "worker",
                "--concurrency",
                str(concurrency),
                "--queues",
                ",".join(limits),
            ]
            for _ in range(processes)
        ]
