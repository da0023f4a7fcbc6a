"""Workers for the fault benchmarks; nodes load them with --import benchmarks.faults.workloads."""

from __future__ import annotations

import asyncio
import hashlib

from obanpro import Record, Snooze, worker


@worker(queue="default", max_attempts=1)
class Noop:
    async def process(self, job):
        return None


@worker(queue="default", max_attempts=1)
class Crunch:
    """CPU work in a thread: ``rounds`` SHA-256 hashes."""

    def process(self, job):
        value = str(job.id).encode()
        for _ in range(job.args.get("rounds", 2_000)):
            value = hashlib.sha256(value).digest()
        return Record(value.hex())


@worker(queue="default", max_attempts=1)
class Nap:
    async def process(self, job):
        await asyncio.sleep(job.args.get("seconds", 0.05))


@worker(queue="default", max_attempts=3)
class Flaky:
    """Fails on its first attempt and retries one second later."""

    async def process(self, job):
        if job.attempt == 1:
            raise RuntimeError("first attempt fails on purpose")

    def backoff(self, job):
        return 1


@worker(queue="default", max_attempts=1)
class SnoozeOnce:
    async def process(self, job):
        if not job.meta.get("snoozed"):
            return Snooze(1)
        return None


@worker(queue="default", max_attempts=1)
class Chain:
    """Enqueues a Noop through the job-code pool of its worker process."""

    async def process(self, job):
        await Noop.enqueue({"parent": job.id})


@worker(queue="default", max_attempts=1)
class Report:
    """Returns a result of about ``size`` bytes, stored in meta."""

    async def process(self, job):
        return Record({"rows": ["x" * 64] * (job.args.get("size", 1024) // 64)})


@worker(queue="default", max_attempts=1, timeout=0.2)
class Overrun:
    """Runs past its 0.2 s timeout and is cancelled."""

    async def process(self, job):
        await asyncio.sleep(1)
