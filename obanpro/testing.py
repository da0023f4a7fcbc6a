"""Helpers for testing code that enqueues and runs jobs, with the names and signatures of oban-py's.

- ``with mode("inline"):`` runs every job at enqueue, in this process, without
  touching the database; ``mode("manual")`` (the default) inserts jobs.
- `process_job` runs one job's ``process`` and returns what it returns.
- `all_enqueued`, `assert_enqueued` and `refute_enqueued` look at the jobs
  waiting to run.
- `drain_queue` runs a queue's jobs one at a time in this process.
- `reset_oban` empties the Oban tables of an instance's prefix.

The helpers that read the database take ``oban``, the name of a started
`Oban` instance or the instance itself.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from . import queries
from ._core import decode_jobs
from .acker import ack_columns
from .executor import AckAction, Executor, JobCancelledError, _current_job
from .job import Job, JobState, encode_object, schedule_time
from .worker import resolve, worker_name

if TYPE_CHECKING:
    from .oban import Oban

MODES = ("inline", "manual")

SCHEDULED_IN_TOLERANCE = 1.0
"""Seconds a job's scheduled_at may differ from now + ``scheduled_in`` and still match."""

POLL_INTERVAL = 0.01

_FILTERS = frozenset(
    {
        "id",
        "state",
        "queue",
        "worker",
        "attempt",
        "max_attempts",
        "priority",
        "args",
        "meta",
        "errors",
        "tags",
        "attempted_by",
        "inserted_at",
        "scheduled_at",
        "scheduled_in",
        "attempted_at",
    }
)

_mode: ContextVar[str | None] = ContextVar("obanpro_testing_mode", default=None)


# Modes


@contextmanager
def mode(testing_mode: str) -> Iterator[None]:
    """Set the testing mode inside the block: ``"inline"`` or ``"manual"``.

    In inline mode ``enqueue`` and ``enqueue_many`` run each job at once in
    this process, through the same executor as a worker process, and insert
    nothing. Args and meta go through JSON and back first, as they would
    through the database. The returned job shows the outcome: its state
    (completed, retryable, discarded, cancelled or scheduled), attempt, errors
    and meta. A job that raises is not retried and the error is not raised to
    the caller: it is in ``job.errors``.

    NOTE: a worker's ``enqueue`` still looks up its started `Oban` instance,
    and starting one opens a pool, so inline mode needs a reachable database
    even though it writes nothing (oban-py registers instances unstarted).

    Raises:
        ValueError: for a mode other than "inline" or "manual".
    """
    if testing_mode not in MODES:
        raise ValueError(f"invalid testing mode {testing_mode!r}: expected 'inline' or 'manual'")

    token = _mode.set(testing_mode)
    try:
        yield
    finally:
        _mode.reset(token)


def inline_mode() -> bool:
    """Return True inside ``mode("inline")``."""
    return _mode.get() == "inline"


async def run_inline(jobs: list[Job]) -> list[Job]:
    """Run each job now, in order, and update it with its outcome; used by `Oban.enqueue_many`."""
    for job in jobs:
        job.validate()
        _prepare(job)
        job.state = JobState.EXECUTING
        executor = _CapturingExecutor()
        action = await executor.run(job, -1)
        _apply(job, action)

    return jobs


def process_job(job: Job) -> Any:
    """Run ``job`` with its worker's ``process`` and return what it returns; exceptions propagate.

    Args and meta go through JSON and back; a missing id, attempt or timestamp
    is filled in. Inside a running event loop this returns a coroutine to
    await, else it runs the job to completion.

    Raises:
        UnknownWorkerError: when no worker is registered under ``job.worker``.
    """
    _prepare(job)

    async def run() -> Any:
        cls = resolve(job.worker)
        token = _current_job.set(job)
        try:
            result = cls().process(job)
            if inspect.isawaitable(result):
                result = await result
            # A sync function may hand back a coroutine, as @job on an async callable does.
            if inspect.isawaitable(result):
                result = await result
            return result
        finally:
            _current_job.reset(token)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run())
    return run()


class _CapturingExecutor(Executor):
    """The worker processes' executor, keeping the exception a job raised so a caller can re-raise it."""

    def __init__(self, import_roots: tuple[str, ...] = ()) -> None:
        super().__init__(
            threads=None,  # type: ignore[arg-type]  # None runs sync jobs in the loop's default thread pool
            import_roots=import_roots,
            supervised=False,
            cancel_check=lambda _entry: False,
            on_deadline=lambda _entry, _timeout: None,
        )
        self.error: BaseException | None = None

    def _ack_for(self, job: Job, entry: int, result: Any, tb: str | None, instance: Any) -> AckAction:
        if isinstance(result, BaseException) and not isinstance(result, JobCancelledError):
            self.error = result
        return super()._ack_for(job, entry, result, tb, instance)


def _prepare(job: Job) -> None:
    now = datetime.now(UTC)
    job.args = json.loads(encode_object(job.args, "args"))
    job.meta = json.loads(encode_object(job.meta, "meta"))

    if job.id is None:
        job.id = id(job)
    if job.attempt == 0:
        job.attempt = 1
    if job.attempted_at is None:
        job.attempted_at = now
    if job.scheduled_at is None:
        job.scheduled_at = now
    if job.inserted_at is None:
        job.inserted_at = now


def _apply(job: Job, action: AckAction) -> None:
    now = datetime.now(UTC)
    job.state = JobState(action.state)
    job.attempt += action.attempt_change

    if action.schedule_in is not None:
        job.scheduled_at = now + timedelta(seconds=action.schedule_in)
    if action.error is not None:
        job.errors = [*job.errors, action.error]
    if action.meta:
        job.meta = {**job.meta, **action.meta}

    if job.state == JobState.COMPLETED:
        job.completed_at = now
    elif job.state == JobState.CANCELLED:
        job.cancelled_at = now
    elif job.state == JobState.DISCARDED:
        job.discarded_at = now


# Enqueued jobs


async def all_enqueued(*, oban: str | Oban = "Oban", **filters: Any) -> list[Job]:
    """Return the jobs waiting to run (available, scheduled or suspended) that match ``filters``, newest first.

    Filters are job fields compared for equality, with three exceptions.
    ``worker`` may be the worker class or function itself. ``args`` and
    ``meta`` match when they contain the given keys with equal values.
    ``scheduled_in`` (seconds or a timedelta) matches a job scheduled that far
    from now, within a second.

    Raises:
        ValueError: for a filter that is not a job field.
    """
    instance = _instance(oban)
    expected = _normalize_filters(filters)
    rows = await instance._require_pool().fetch(queries.load("enqueued_jobs", instance.prefix))

    from .oban import job_from_row

    jobs = [job_from_row(row) for row in rows]
    return [job for job in jobs if _matches(job, expected)]


async def assert_enqueued(*, oban: str | Oban = "Oban", timeout: float = 0, **filters: Any) -> None:
    """Fail unless a job matching ``filters`` waits to run, checking every 10 ms for up to ``timeout`` seconds.

    Raises:
        AssertionError: listing the jobs that do wait, when none matched in time.
    """
    if await _poll(lambda: all_enqueued(oban=oban, **filters), timeout, until_found=True):
        return

    waiting = await all_enqueued(oban=oban)
    within = f" within {timeout:g} s" if timeout > 0 else ""
    raise AssertionError(
        f"expected a job matching {filters} to be enqueued{within}; the jobs waiting to run are:\n"
        + _listing(waiting)
    )


async def refute_enqueued(*, oban: str | Oban = "Oban", timeout: float = 0, **filters: Any) -> None:
    """Fail when a job matching ``filters`` waits to run now or appears within ``timeout`` seconds.

    Raises:
        AssertionError: listing the matching jobs.
    """
    matching = await _poll(lambda: all_enqueued(oban=oban, **filters), timeout, until_found=True)
    if not matching:
        return

    within = f" within {timeout:g} s" if timeout > 0 else ""
    raise AssertionError(f"expected no job matching {filters} to be enqueued{within}; found:\n" + _listing(matching))


async def _poll(fetch: Any, timeout: float, *, until_found: bool) -> list[Job]:
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        found = await fetch()
        if found and until_found:
            return found
        if time.monotonic() >= deadline:
            return found
        await asyncio.sleep(POLL_INTERVAL)


def _listing(jobs: list[Job]) -> str:
    if not jobs:
        return "  (none)"
    return "\n".join(f"  {job!r}" for job in jobs)


def _normalize_filters(filters: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(filters) - _FILTERS)
    if unknown:
        raise ValueError(f"invalid filters {unknown}: filter by job fields, one of {sorted(_FILTERS)}")

    expected = dict(filters)
    if "worker" in expected and not isinstance(expected["worker"], str):
        target = expected["worker"]
        expected["worker"] = getattr(target, "__obanpro_name__", None) or worker_name(target)
    for field in ("args", "meta"):
        if field in expected:
            expected[field] = json.loads(encode_object(expected[field], field))
    if "scheduled_in" in expected:
        expected["scheduled_in"] = schedule_time(expected["scheduled_in"])
    return expected


def _matches(job: Job, expected: dict[str, Any]) -> bool:
    for field, value in expected.items():
        if field in ("args", "meta"):
            actual = getattr(job, field)
            if not all(key in actual and actual[key] == item for key, item in value.items()):
                return False
        elif field == "scheduled_in":
            if job.scheduled_at is None or abs((job.scheduled_at - value).total_seconds()) > SCHEDULED_IN_TOLERANCE:
                return False
        elif getattr(job, field) != value:
            return False
    return True


# Draining


async def drain_queue(
    queue: str = "default",
    oban: str | Oban = "Oban",
    with_recursion: bool = True,
    with_safety: bool = False,
    with_scheduled: bool = True,
) -> dict[str, int]:
    """Run the jobs of ``queue`` in this process, one at a time, and count their final states.

    Args:
        queue: the queue to drain.
        oban: name of a started `Oban`, or the instance.
        with_recursion: keep going until the queue is empty, so jobs that the
            drained jobs enqueue, and retries, run too. When False, one pass runs
            the jobs that were available (after staging) when the drain began.
        with_safety: when False, the first exception a job raises is raised
            here, after its failure is stored; when True, failures are only counted.
        with_scheduled: make scheduled and retryable jobs available first,
            whatever their time. With recursion this includes snoozed jobs again,
            so a job that always snoozes makes the drain run forever.

    Returns:
        Counts by state: ``{"cancelled", "completed", "discarded", "retryable", "scheduled"}``.
    """
    instance = _instance(oban)
    pool = instance._require_pool()
    prefix = instance.prefix
    attempted_by = [instance.node, "drain"]
    summary = {"cancelled": 0, "completed": 0, "discarded": 0, "retryable": 0, "scheduled": 0}

    if with_scheduled:
        await pool.execute(queries.load("drain_stage_jobs", prefix), queue)
    last_id = None if with_recursion else await pool.fetchval(queries.load("drain_last_job_id", prefix), queue)
    if not with_recursion and last_id is None:
        return summary

    while True:
        if with_scheduled and with_recursion:
            await pool.execute(queries.load("drain_stage_jobs", prefix), queue)

        rows = await pool.fetch(queries.load("drain_fetch_job", prefix), queue, attempted_by, last_id)
        if not rows:
            return summary

        job = decode_jobs(rows, Job, JobState.EXECUTING)[0]
        executor = _CapturingExecutor(getattr(instance, "_import_roots", ()))
        action = await executor.run(job, -1)
        await pool.fetch(queries.load("ack_jobs", prefix), *ack_columns([action]))
        summary[action.state] += 1

        if executor.error is not None and not with_safety:
            raise executor.error


# Reset


async def reset_oban(oban: str | Oban = "Oban") -> None:
    """Empty the jobs, leaders and producers tables of the instance's prefix and restart job ids at 1."""
    instance = _instance(oban)
    await instance._require_pool().execute(queries.load("reset_tables", instance.prefix))


reset = reset_oban
"""The same as `reset_oban`."""


def _instance(oban: str | Oban) -> Oban:
    from .oban import Oban

    if isinstance(oban, Oban):
        return oban
    if not isinstance(oban, str):
        raise TypeError(f"invalid oban {oban!r}: expected an Oban instance or the name of a started one")
    return Oban.get_instance(oban)
