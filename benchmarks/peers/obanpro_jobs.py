"""obanpro: the workers (sync `def process` for CPU work, async for the rest) and the driver adapter."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from obanpro import worker

from . import work


@worker(queue="default", max_attempts=1)
class Digest:
    def process(self, job):
        started = time.time()
        work.sha256_rounds(f"job-{job.args['seq']}", job.args["rounds"])
        if job.args.get("stamp"):
            work.stamp("cpu", job.args["seq"], started, time.time())


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
    bulk_api = "Oban.enqueue_many (one COPY per batch)"
    one_api = "Worker.enqueue"

    def __init__(self, options) -> None:
        self.options = options
        self.dsn = None
        self.oban = None
        self.conn = None
        # The console script next to this interpreter: the project's .venv.
        self.executable = str(Path(sys.executable).with_name("obanpro"))

    def supports(self, scenario, options):
        return True

    async def open(self) -> None:
        from obanpro import Oban, schema

        from . import pg

        self.dsn = await pg.ensure_database(self.options.pg, "bench_obanpro")
        self.conn = await pg.connect(self.dsn)
        await schema.install(self.conn.raw)
        self.oban = Oban(dsn=self.dsn, pool_min_size=1, pool_max_size=2)
        await self.oban.start()

    async def close(self) -> None:
        if self.oban is not None:
            await self.oban.stop()
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
        return [
            [
                self.executable,
                "start",
                "--dsn",
                self.dsn,
                "--import",
                __name__,
                "-q",
                queues,
                "-p",
                str(processes),
                "--log-level",
                "WARNING",
            ]
        ]

    def describe(self, processes, limits):
        return " ".join(self.commands(processes, limits)[0][1:]).replace(
            self.dsn, "$DSN"
        )
