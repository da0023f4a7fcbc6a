"""PgQueuer: the entrypoints and the driver adapter.

PgQueuer runs async entrypoints only (sync ones are refused), so CPU work runs
in `asyncio.to_thread`, as its own error message advises. One `pgq run` is one
process; more processes are more `pgq run` commands side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

from . import work

ENTRYPOINTS = {"cpu": "digest", "noop": "noop", "stamp": "stamp", "io": "sleep"}


def _digest(args):
    started = time.time()
    work.sha256_rounds(f"job-{args['seq']}", args["rounds"])
    if args.get("stamp"):
        work.stamp("cpu", args["seq"], started, time.time())


@contextlib.asynccontextmanager
async def create_pgqueuer():
    """The factory `pgq run` calls in each worker process."""
    import asyncpg
    from pgqueuer import AsyncpgDriver, PgQueuer

    connection = await asyncpg.connect(os.environ["BENCH_DSN"])
    pgq = PgQueuer(AsyncpgDriver(connection))
    # With two queues (the mixed load) each queue's limit becomes a per-entrypoint
    # limit, which PgQueuer enforces in its dequeue query across processes. With
    # one queue, --max-concurrent-tasks alone is the limit (0: no entrypoint limit),
    # which spares the dequeue that extra work.
    limits = json.loads(os.environ.get("BENCH_LIMITS", "{}"))
    default = 0 if len(limits) < 2 else limits.get("default", 0)

    @pgq.entrypoint("digest", concurrency_limit=limits.get("cpu", default))
    async def digest(job):
        await asyncio.to_thread(_digest, json.loads(job.payload))

    @pgq.entrypoint("noop", concurrency_limit=default)
    async def noop(job):
        return None

    @pgq.entrypoint("stamp", concurrency_limit=default)
    async def stamp(job):
        work.stamp("start", json.loads(job.payload)["seq"], time.time())

    @pgq.entrypoint("sleep", concurrency_limit=limits.get("io", default))
    async def sleep(job):
        started = time.time()
        await asyncio.sleep(work.IO_SLEEP)
        work.stamp("io", json.loads(job.payload)["seq"], started, time.time())

    try:
        yield pgq
    finally:
        await connection.close()


class Adapter:
    bulk_api = "Queries.enqueue with lists (one statement per batch)"
    one_api = "Queries.enqueue"

    def __init__(self, options) -> None:
        self.options = options
        self.dsn = None
        self.conn = None
        self.queries = None
        self.executable = str(Path(sys.executable).with_name("pgq"))

    def supports(self, scenario, options):
        return True

    async def open(self) -> None:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        from . import pg

        self.dsn = await pg.ensure_database(self.options.pg, "bench_pgqueuer")
        os.environ["BENCH_DSN"] = self.dsn
        self.conn = await pg.connect(self.dsn)
        self.enqueuer = await asyncpg.connect(self.dsn)
        self.queries = Queries(AsyncpgDriver(self.enqueuer))
        if not await self.queries.schema_is_installed():
            await self.queries.install()

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        if getattr(self, "enqueuer", None) is not None:
            await self.enqueuer.close()

    async def reset(self) -> None:
        await self.conn.run("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")

    async def insert(self, kind, args_list, queue) -> None:
        n = len(args_list)
        await self.queries.enqueue(
            [ENTRYPOINTS[kind]] * n,
            [json.dumps(args).encode() for args in args_list],
            [0] * n,
        )

    async def insert_one(self, kind, args, queue) -> None:
        await self.queries.enqueue(ENTRYPOINTS[kind], json.dumps(args).encode())

    async def pending(self) -> int:
        return await self.conn.val(
            "SELECT count(*) FROM (SELECT 1 FROM pgqueuer LIMIT 1) s"
        )

    async def count(self) -> int:
        return await self.conn.val("SELECT count(*) FROM pgqueuer")

    async def completed(self) -> int:
        return await self.conn.val(
            "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"
        )

    def commands(self, processes, limits):
        # The entrypoints of both queues are in every process; the limit is split between processes.
        # It needs max_concurrent_tasks >= 2 x batch size; the batch stays at its default of 10 when it can.
        os.environ["BENCH_LIMITS"] = json.dumps(limits)
        per_process = max(2, math.ceil(sum(limits.values()) / processes))
        batch = max(1, min(10, per_process // 2))
        return [
            [
                self.executable,
                "run",
                f"{__name__}:create_pgqueuer",
                "--max-concurrent-tasks",
                str(per_process),
                "--batch-size",
                str(batch),
                "--log-level",
                "WARNING",
            ]
            for _ in range(processes)
        ]
