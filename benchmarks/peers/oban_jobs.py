"""oban 0.7.0 (oban-py): the workers and the driver adapter.

oban-py awaits every `process`, so CPU work runs in `asyncio.to_thread`, the
way to keep its event loop (acks, notifications) going while hashing.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from oban import worker

from . import work


def _digest(seq, rounds, stamp):
    started = time.time()
    work.sha256_rounds(f"job-{seq}", rounds)
    if stamp:
        work.stamp("cpu", seq, started, time.time())


@worker(queue="default", max_attempts=1)
class Digest:
    async def process(self, job):
        await asyncio.to_thread(
            _digest, job.args["seq"], job.args["rounds"], job.args.get("stamp")
        )


@worker(queue="default", max_attempts=1)
class Noop:
    async def process(self, job):
        return None


@worker(queue="default", max_attempts=1)
class Stamp:
    async def process(self, job):
        work.stamp("start", job.args["seq"], time.time())


@worker(queue="io", max_attempts=1)
class Sleep:
    async def process(self, job):
        started = time.time()
        await asyncio.sleep(work.IO_SLEEP)
        work.stamp("io", job.args["seq"], started, time.time())


KINDS = {"cpu": Digest, "noop": Noop, "stamp": Stamp, "io": Sleep}
PENDING = "state IN ('available', 'scheduled', 'executing', 'retryable')"


class Adapter:
    bulk_api = "Oban.enqueue_many (one statement per batch)"
    one_api = "Worker.enqueue"

    def __init__(self, options) -> None:
        self.options = options
        self.dsn = None
        self.pool = None
        self.oban = None
        self.conn = None
        self.executable = str(Path(sys.executable).with_name("oban"))

    def supports(self, scenario, options):
        if options.processes != 1:
            return "oban 0.7.0 runs every queue in one process (`oban start` has no process option)"
        return True

    async def open(self) -> None:
        from oban import Oban
        from oban.schema import install
        from psycopg_pool import AsyncConnectionPool

        from . import pg

        self.dsn = await pg.ensure_database(self.options.pg, "bench_oban")
        self.conn = await pg.connect(self.dsn)
        self.pool = AsyncConnectionPool(self.dsn, min_size=1, max_size=2, open=False)
        await self.pool.open()
        if not await self.conn.val(
            "SELECT to_regclass('public.oban_jobs') IS NOT NULL"
        ):
            await install(self.pool)
        self.oban = Oban(pool=self.pool)
        await self.oban.start()

    async def close(self) -> None:
        if self.oban is not None:
            await self.oban.stop()
        if self.pool is not None:
            await self.pool.close()
        if self.conn is not None:
            await self.conn.close()

    async def reset(self) -> None:
        await self.conn.run("TRUNCATE oban_jobs RESTART IDENTITY")

    async def insert(self, kind, args_list, queue) -> None:
        cls = KINDS[kind]
        await self.oban.enqueue_many([cls.new(args, queue=queue) for args in args_list])

    async def insert_one(self, kind, args, queue) -> None:
        await KINDS[kind].enqueue(args, queue=queue)

    async def pending(self) -> int:
        return await self.conn.val(
            f"SELECT count(*) FROM (SELECT 1 FROM oban_jobs WHERE {PENDING} LIMIT 1) s"
        )

    async def count(self) -> int:
        return await self.conn.val("SELECT count(*) FROM oban_jobs")

    async def completed(self) -> int:
        return await self.conn.val(
            "SELECT count(*) FROM oban_jobs WHERE state = 'completed'"
        )

    def commands(self, processes, limits):
        queues = ",".join(f"{name}:{limit}" for name, limit in limits.items())
        # --cron-modules names the worker module, so `oban start` imports it at
        # start (as obanpro's --import does) instead of scanning the directory.
        return [
            [
                self.executable,
                "start",
                "--dsn",
                self.dsn,
                "--queues",
                queues,
                "--cron-modules",
                __name__,
                "--log-level",
                "WARNING",
            ]
        ]
