"""Workers the tests run, in this process and in `obanpro start` subprocesses (--import tests.workers)."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import signal
import time

from obanpro import Cancel, Record, Snooze, current_job, job, worker


@worker(queue="default")
class Noop:
    async def process(self, job):
        return None


@worker(queue="default")
class SyncNoop:
    def process(self, job):
        return None


@worker(queue="default", max_attempts=3)
class Fail:
    async def process(self, job):
        raise ValueError(f"failing on purpose: {job.args.get('note', '')}")


@worker(queue="default", max_attempts=3)
class FastRetry:
    """Fails until the attempt named in args, retrying after zero seconds."""

    async def process(self, job):
        if job.attempt < job.args.get("succeed_on", 99):
            raise RuntimeError(f"attempt {job.attempt} failed")
        return Record({"attempt": job.attempt})

    def backoff(self, job):
        return 0


@worker(queue="default")
class Snoozer:
    async def process(self, job):
        return Snooze(job.args.get("seconds", 60), meta=job.args.get("meta"))


@worker(queue="default")
class Canceller:
    async def process(self, job):
        return Cancel(job.args.get("reason", "not needed"))


@worker(queue="default")
class Recorder:
    async def process(self, job):
        return Record(job.args.get("value"))


@worker(queue="default", timeout=0.2)
class SlowAsync:
    async def process(self, job):
        await asyncio.sleep(job.args.get("seconds", 5))


@worker(queue="default")
class Sleep:
    """Sleeps asynchronously and records which process ran it and when."""

    async def process(self, job):
        started = time.time()
        await asyncio.sleep(job.args.get("seconds", 0.05))
        return Record({"pid": os.getpid(), "start": started, "stop": time.time()})


@worker(queue="default")
class Digest:
    """CPU-bound sync work; records which process ran it and when."""

    def process(self, job):
        started = time.time()
        value = str(job.args.get("seed", "")).encode()
        for _ in range(job.args.get("rounds", 100_000)):
            value = hashlib.sha256(value).digest()
        return Record({"pid": os.getpid(), "start": started, "stop": time.time(), "digest": value.hex()})


@worker(queue="default", max_attempts=2)
class Spin:
    """A sync CPU loop that never yields, for hard timeouts."""

    def timeout(self, job):
        return job.args.get("timeout", 0.5)

    def process(self, job):
        end = time.monotonic() + job.args.get("seconds", 3600)
        while time.monotonic() < end:
            pass


@worker(queue="default", max_attempts=2)
class KillSelf:
    """Ends its own process in the way args name."""

    def process(self, job):
        how = job.args.get("how", "exit")
        if how == "exit":
            os._exit(job.args.get("code", 7))
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "segfault":
            ctypes.string_at(0)
        raise ValueError(f"unknown way {how!r}")

    def backoff(self, job):
        return 0


@worker(queue="default")
class Blocker:
    """Runs until cancelled; reports whether job.cancelled() turned true."""

    async def process(self, job):
        for _ in range(int(job.args.get("seconds", 30) / 0.01)):
            await asyncio.sleep(0.01)
        return None


@job(queue="default")
def add(a: int, b: int):
    return Record(a + b)


@job(queue="default")
async def async_add(a: int, b: int):
    return Record({"sum": a + b, "attempt": current_job().attempt})


async def failing_setup():
    raise RuntimeError("model file missing")


async def failing_teardown():
    raise RuntimeError("cleanup exploded")


async def marking_setup():
    """Writes this process's pid into the file named by OBANPRO_TEST_MARKS, one line per call."""
    with open(os.environ["OBANPRO_TEST_MARKS"], "a") as marks:
        marks.write(f"setup {os.getpid()}\n")


async def marking_teardown():
    with open(os.environ["OBANPRO_TEST_MARKS"], "a") as marks:
        marks.write(f"teardown {os.getpid()}\n")


@worker(queue="default")
class WaitForCancel:
    """A sync job that polls job.cancelled() and returns Cancel once it turns true."""

    def process(self, job):
        deadline = time.monotonic() + job.args.get("seconds", 30)
        while time.monotonic() < deadline:
            if job.cancelled():
                return Cancel("noticed the cancel request")
            time.sleep(0.01)
        return Record("never cancelled")


@worker(queue="default")
class Enqueuer:
    """Enqueues a Noop job in the queue named by args, for draining recursively."""

    async def process(self, job):
        await Noop.enqueue({"from": job.id}, queue=job.args.get("queue", "default"))


@worker(queue="default")
class Tracked:
    """Sleeps and writes each run's start and end into ``<OBAN_PREFIX>.test_runs``, which the test creates."""

    async def process(self, job):
        from obanpro.oban import Oban

        pool = Oban.get_instance().pool
        table = f"{os.environ['OBAN_PREFIX']}.test_runs"
        run_id = await pool.fetchval(
            f"INSERT INTO {table} (job_id, attempt, node, pid, started_at) "
            "VALUES ($1, $2, $3, $4, clock_timestamp()) RETURNING id",
            job.id,
            job.attempt,
            job.attempted_by[0],
            os.getpid(),
        )
        await asyncio.sleep(job.args.get("seconds", 0.05))
        await pool.execute(f"UPDATE {table} SET finished_at = clock_timestamp() WHERE id = $1", run_id)


# A cron entry only for `obanpro start` nodes that tests start with OBANPRO_TEST_CRON=1,
# so schedulers in the test process itself never enqueue it.
if os.environ.get("OBANPRO_TEST_CRON"):

    @worker(queue="default", cron="* * * * *")
    class EveryMinute:
        async def process(self, job):
            return None


@worker(queue="default")
class BlockLoop:
    """CPU work inside an async function: it blocks the worker's event loop."""

    async def process(self, job):
        end = time.monotonic() + job.args.get("seconds", 60)
        while time.monotonic() < end:
            pass


@worker(queue="hold")
class HoldConnection:
    """Holds a connection of the job-code pool (``Oban.get_instance().pool``) until the file named in args exists."""

    async def process(self, job):
        from obanpro import Oban

        async with Oban.get_instance().pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
            while not os.path.exists(job.args["release"]):
                await asyncio.sleep(0.02)


@worker(queue="default")
class MarkDone:
    """Appends its job id to the file named in args, then finishes; the file lists the jobs that ran."""

    async def process(self, job):
        await asyncio.sleep(job.args.get("seconds", 0))
        with open(job.args["marks"], "a") as marks:
            marks.write(f"{job.id}\n")


@worker(queue="default")
class EchoArgs:
    """Records the args it received with the Python type of each value, to show they stay plain data."""

    async def process(self, job):
        import json

        encoded = json.dumps(job.args, sort_keys=True, separators=(",", ":"))
        return Record({
            "sha256": hashlib.sha256(encoded.encode()).hexdigest(),
            "size": len(encoded),
            "types": {key: type(value).__name__ for key, value in job.args.items()},
        })


@worker(queue="default", max_attempts=2)
class KillLoop:
    """Ends its own process from the event loop thread, in the way args name."""

    async def process(self, job):
        how = job.args.get("how", "exit")
        if how == "exit":
            os._exit(9)
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "abort":
            os.abort()
        raise ValueError(f"unknown way {how!r}")

    def backoff(self, job):
        return 0


@worker(queue="default", max_attempts=3)
class SlowFirstAttempt:
    """Sleeps the seconds in args on its first attempt and finishes at once on later ones."""

    async def process(self, job):
        if job.attempt == 1:
            await asyncio.sleep(job.args.get("seconds", 60))
        return Record({"attempt": job.attempt, "pid": os.getpid()})
