"""Accurate rescue: the jobs of one dead worker process become retryable at once.

Every job a worker fetches carries ``attempted_by = [node, producer uuid]``,
and each worker process has its own producer uuids. So the jobs a dead worker
left ``executing`` are exactly the rows with one of its uuids, including any
whose fetch committed just before the process died. They get an error entry
stating how the process died and follow the retry rules, with the worker's
own ``backoff`` when it has one, without waiting for the time-based lifeline.
When the process was killed because one job overran its timeout, the other
jobs it ran lose no attempt: they become available again at once.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Mapping

import asyncpg

from . import queries
from .acker import ack_columns
from .executor import AckAction, error_entry, retry_delay, timeout_message
from .job import Job, JobState, to_utc
from .worker import lookup

log = logging.getLogger(__name__)


def producer_uuids(worker_uuid: uuid.UUID, queues: Iterable[str]) -> list[str]:
    """Return the producer uuids a worker process writes to ``attempted_by``, one per queue."""
    return [str(uuid.uuid5(worker_uuid, queue)) for queue in queues]


async def rescue_jobs(
    pool: asyncpg.Pool,
    prefix: str,
    uuids: list[str],
    cause: str,
    timed_out: Mapping[int, float] | None = None,
) -> list[tuple[int, str]]:
    """Make the executing jobs of ``uuids`` retryable or discarded; return ``[(job id, new state)]``.

    ``cause`` becomes the error, except for jobs in ``timed_out`` (job id to
    timeout in seconds), whose error states that they timed out.
    """
    timed_out = timed_out or {}

    return await _rescue(pool, prefix, queries.load("lock_rescuable", prefix), (uuids,), cause, timed_out)


async def rescue_node_orphans(
    pool: asyncpg.Pool, prefix: str, node: str, live_uuids: list[str], producer_max_age: float
) -> list[tuple[int, str]]:
    """Rescue the executing jobs a previous run of ``node`` left when it was killed.

    The jobs of processes that are not this run's (``live_uuids``) and have no
    fresh producer row become retryable or discarded, without waiting for the
    lifeline's ``rescue_after``.
    """
    cause = f"a previous run of node {node} stopped without storing this job's result"
    sql = queries.load("lock_node_orphans", prefix)
    return await _rescue(pool, prefix, sql, (node, live_uuids, producer_max_age), cause, {})


async def _rescue(
    pool: asyncpg.Pool, prefix: str, lock_sql: str, arguments: tuple, cause: str, timed_out: Mapping[int, float]
) -> list[tuple[int, str]]:
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(lock_sql, *arguments)
        actions = [_action(row, cause, timed_out) for row in rows]
        if actions:
            await conn.fetch(queries.load("ack_jobs", prefix), *ack_columns(actions))

    rescued = [(action.job.id, action.state) for action in actions]
    if rescued:
        log.warning("rescued the jobs of a dead worker (%s): %s", cause, ", ".join(f"{job_id} {state}" for job_id, state in rescued))
    return rescued


def _action(row: asyncpg.Record, cause: str, timed_out: Mapping[int, float]) -> AckAction:
    job = Job.__new__(Job)
    job.id = row["id"]
    job.worker = row["worker"]
    job.queue = row["queue"]
    job.attempt = row["attempt"]
    job.max_attempts = row["max_attempts"]
    job.priority = row["priority"]
    job.args = json.loads(row["args"])
    job.meta = json.loads(row["meta"])
    job.errors = []
    job.tags = row["tags"]
    job.attempted_by = row["attempted_by"]
    job.state = JobState.EXECUTING
    job.scheduled_at = to_utc(row["scheduled_at"])
    job.attempted_at = to_utc(row["attempted_at"]) if row["attempted_at"] else None
    job.inserted_at = job.cancelled_at = job.completed_at = job.discarded_at = None
    job.extra = {}
    job._cancel_check = None

    rescued = int(job.meta.get("rescued", 0) or 0) + 1 if isinstance(job.meta, dict) else 1
    meta = {"rescued": rescued}

    if timed_out and job.id not in timed_out:
        # The process died for another job's timeout, so this attempt was no
        # fault of this job: it runs again at once without losing the attempt.
        error = error_entry(job, f"{cause}; interrupted, so this attempt does not count")
        return AckAction(job, -1, "available", attempt_change=-1, schedule_in=0.0, error=error, meta=meta)

    error = error_entry(job, timeout_message(timed_out[job.id]) if job.id in timed_out else cause)
    if job.attempt >= job.max_attempts:
        return AckAction(job, -1, "discarded", error=error, meta=meta)

    return AckAction(job, -1, "retryable", error=error, meta=meta, schedule_in=_backoff(job))


def _backoff(job: Job) -> float:
    cls = lookup(job.worker)
    try:
        instance = cls() if cls is not None else None
    except Exception:
        instance = None
    return retry_delay(job, instance)
