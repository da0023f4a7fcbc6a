"""Dramatiq on Redis: the actors and the driver adapter.

Dramatiq acks a message after its actor ran, so an empty message hash is a
finished queue. It has no bulk enqueue: the insert scenarios call `send` once
per job. Each process runs a pool of threads; threads x processes is the limit.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from . import work

REDIS_DB = 14
"""The Redis database this benchmark owns and flushes; no other key is touched."""

QUEUES = ("default", "cpu", "io")

broker = RedisBroker(
    url=os.environ.get("BENCH_DRAMATIQ_BROKER", f"redis://127.0.0.1:6379/{REDIS_DB}")
)
dramatiq.set_broker(broker)


@dramatiq.actor(max_retries=0, queue_name="default")
def digest(seq, rounds, stamp=False):
    started = time.time()
    work.sha256_rounds(f"job-{seq}", rounds)
    if stamp:
        work.stamp("cpu", seq, started, time.time())


@dramatiq.actor(max_retries=0, queue_name="default")
def noop(seq):
    return None


@dramatiq.actor(max_retries=0, queue_name="default")
def stamp(seq):
    work.stamp("start", seq, time.time())


@dramatiq.actor(max_retries=0, queue_name="io")
def sleep(seq):
    started = time.time()
    time.sleep(work.IO_SLEEP)  # Dramatiq actors are sync
    work.stamp("io", seq, started, time.time())


# Dramatiq binds an actor to one queue, so the jobs that the mixed scenario sends
# to other queues have their own actors there, with the same bodies.
digest_cpu = dramatiq.actor(
    digest.fn, actor_name="digest_cpu", queue_name="cpu", max_retries=0
)
stamp_io = dramatiq.actor(
    stamp.fn, actor_name="stamp_io", queue_name="io", max_retries=0
)

KINDS = {
    ("cpu", "default"): digest,
    ("cpu", "cpu"): digest_cpu,
    ("noop", "default"): noop,
    ("stamp", "default"): stamp,
    ("stamp", "io"): stamp_io,
    ("io", "io"): sleep,
}


class Adapter:
    bulk_api = "send per job (Dramatiq has no bulk enqueue)"
    one_api = "send"

    def __init__(self, options) -> None:
        self.options = options
        self.redis = None
        self.executable = str(Path(sys.executable).with_name("dramatiq"))

    def supports(self, scenario, options):
        return True

    async def open(self) -> None:
        import redis

        global broker
        url = f"{self.options.redis.rstrip('/')}/{REDIS_DB}"
        os.environ["BENCH_DRAMATIQ_BROKER"] = url
        broker = RedisBroker(url=url)
        dramatiq.set_broker(broker)
        for actor in set(KINDS.values()):
            actor.broker = broker
            broker.declare_actor(actor)
        self.redis = redis.Redis.from_url(url)
        self.redis.ping()

    async def close(self) -> None:
        if self.redis is not None:
            self.redis.close()

    async def reset(self) -> None:
        self.redis.flushdb()  # database REDIS_DB only

    async def insert(self, kind, args_list, queue) -> None:
        actor = KINDS[kind, queue]
        for args in args_list:
            actor.send(**args)

    async def insert_one(self, kind, args, queue) -> None:
        await self.insert(kind, [args], queue)

    async def pending(self) -> int:
        pipe = self.redis.pipeline()
        for queue in QUEUES:
            pipe.hlen(f"dramatiq:{queue}.msgs")
        return sum(pipe.execute())

    async def count(self) -> int:
        return await self.pending()

    async def completed(self):
        failed = sum(self.redis.hlen(f"dramatiq:{queue}.XQ.msgs") for queue in QUEUES)
        if failed:
            raise RuntimeError(f"{failed} messages went to the dead-letter queue")

    def commands(self, processes, limits):
        threads = max(1, math.ceil(sum(limits.values()) / processes))
        return [
            [
                self.executable,
                __name__,
                "--processes",
                str(processes),
                "--threads",
                str(threads),
                "--queues",
                *limits,
            ]
        ]
