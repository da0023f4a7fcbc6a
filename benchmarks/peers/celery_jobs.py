"""Celery with the prefork pool on Redis: the tasks and the driver adapter.

Tasks ack late (after they ran), so an acknowledged message is a finished job,
as a completed row is for the PostgreSQL tools. Celery has no bulk publish: the
insert scenarios call `apply_async` once per job over one producer connection.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from celery import Celery

from . import work

REDIS_DB = 13
"""The Redis database this benchmark owns and flushes; no other key is touched."""

BROKER = os.environ.get("BENCH_CELERY_BROKER", f"redis://127.0.0.1:6379/{REDIS_DB}")
QUEUES = ("default", "cpu", "io")

app = Celery("bench", broker=BROKER)
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    task_default_queue="default",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="digest")
def digest(seq, rounds, stamp=False):
    started = time.time()
    work.sha256_rounds(f"job-{seq}", rounds)
    if stamp:
        work.stamp("cpu", seq, started, time.time())


@app.task(name="noop")
def noop(seq):
    return None


@app.task(name="stamp")
def stamp(seq):
    work.stamp("start", seq, time.time())


@app.task(name="sleep")
def sleep(seq):
    started = time.time()
    time.sleep(work.IO_SLEEP)  # Celery tasks are sync
    work.stamp("io", seq, started, time.time())


KINDS = {"cpu": digest, "noop": noop, "stamp": stamp, "io": sleep}


class Adapter:
    bulk_api = "apply_async per job over one producer (Celery has no bulk publish)"
    one_api = "apply_async"

    def __init__(self, options) -> None:
        self.options = options
        self.redis = None
        self.executable = str(Path(sys.executable).with_name("celery"))

    def supports(self, scenario, options):
        return True

    async def open(self) -> None:
        import redis

        url = f"{self.options.redis.rstrip('/')}/{REDIS_DB}"
        os.environ["BENCH_CELERY_BROKER"] = url
        app.conf.broker_url = url
        self.redis = redis.Redis.from_url(url)
        self.redis.ping()

    async def close(self) -> None:
        if self.redis is not None:
            self.redis.close()

    async def reset(self) -> None:
        self.redis.flushdb()  # database REDIS_DB only

    async def insert(self, kind, args_list, queue) -> None:
        task = KINDS[kind]
        with app.producer_or_acquire() as producer:
            for args in args_list:
                task.apply_async(kwargs=args, queue=queue, producer=producer)

    async def insert_one(self, kind, args, queue) -> None:
        KINDS[kind].apply_async(kwargs=args, queue=queue)

    async def pending(self) -> int:
        pipe = self.redis.pipeline()
        for queue in QUEUES:
            pipe.llen(queue)
        pipe.hlen("unacked")
        return sum(pipe.execute())

    async def count(self) -> int:
        return await self.pending()

    async def completed(self):
        return None  # no result backend: an empty queue and no unacked message is the check

    def commands(self, processes, limits):
        return [
            [
                self.executable,
                "-A",
                __name__,
                "worker",
                "--pool",
                "prefork",
                "-c",
                str(processes),
                "-Q",
                ",".join(limits),
                "--loglevel",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        ]
