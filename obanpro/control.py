"""Queue and job control: what `Oban`'s control methods and ``obanpro jobs`` do.

Queue control sends signals on ``<prefix>.oban_signal`` in the form oban-py
and Elixir Oban read (see `obanpro.signals`). An `Oban` that runs queues in
this process applies a change to its own slot table at once, as oban-py
does, and sends the signal only when other nodes are addressed. An `Oban`
without queues, such as the one inside each ``obanpro start`` worker process,
always sends it, and the node's duties process applies it.

Job control runs one statement per call. The functions that take a pool or a
connection and a prefix serve the command line; the ones that take an `Oban`
back its methods.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from . import _core, queries
from .job import Job, encode_object
from .notifier import channel_name, encode_payload
from .refresher import DEFAULT_MAX_AGE as PRODUCER_MAX_AGE
from .rescue import producer_uuids
from .signals import (
    QueueControl,
    SignalListener,
    check_limit,
    check_queue_name,
    scope_ident,
)

if TYPE_CHECKING:
    from .oban import Oban

Queryable = asyncpg.Pool | asyncpg.Connection


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """The state of a queue that runs in this process, as `Oban.check_queue` returns it."""

    limit: int
    meta: dict[str, Any]
    node: str
    paused: bool
    queue: str
    running: list[int]
    """Ids of the jobs running now."""
    started_at: datetime | None
    uuid: str
    """The producer uuid this process writes to ``attempted_by`` for the queue."""


# Signals


async def send_signals(executor: Queryable, prefix: str, payloads: Sequence[Mapping[str, Any]]) -> None:
    """NOTIFY each payload on ``<prefix>.oban_signal``, encoded as oban-py and Elixir Oban read it."""
    if not payloads:
        return

    encoded = [encode_payload(dict(payload)) for payload in payloads]
    await executor.execute(queries.load("send_notifications", prefix), channel_name(prefix, "signal"), encoded)


def local_control(oban: Oban) -> QueueControl | None:
    """Return the control of the queues ``oban`` runs in this process, or None when it runs none."""
    services = getattr(oban, "_services", None)
    if services is None:
        return None

    for service in services.services:
        if isinstance(service, SignalListener):
            return service.control
    return None


async def control_queue(oban: Oban, payload: dict[str, Any], node: str | None) -> None:
    """Apply ``payload`` here when it concerns this process's queues, and signal the other nodes.

    Raises:
        TypeError: when ``node`` is not a string or None.
        ValueError: for an invalid queue or limit, or a change this node's slot table cannot take.
    """
    if node is not None and (not isinstance(node, str) or not node):
        raise TypeError(f"invalid node {node!r}: expected a node name or None for every node")

    local = local_control(oban)
    if local is not None and node in (None, oban.node):
        local.apply(payload)

    if local is None or node != oban.node:
        await send_signals(_pool(oban), oban.prefix, [{**payload, "ident": scope_ident(oban.name, node)}])


def queue_payload(action: str, queue: Any, *, allow_all: bool = False) -> dict[str, Any]:
    return {"action": action, "queue": check_queue_name(queue, allow_all=allow_all)}


def start_payload(queue: Any, limit: Any, paused: Any) -> dict[str, Any]:
    queue = check_queue_name(queue)
    if not isinstance(paused, bool):
        raise TypeError(f"invalid paused {paused!r} for queue {queue!r}: expected True or False")
    return {"action": "start", "queue": queue, "limit": check_limit(limit, queue), "paused": paused}


def scale_payload(queue: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    queue = check_queue_name(queue)
    if not options:
        raise TypeError(f"scale_queue for queue {queue!r} needs an option to change, such as limit=10")
    if "limit" in options:
        check_limit(options["limit"], queue)
    return {"action": "scale", "queue": queue, **options}


def check_queue(oban: Oban, queue: str) -> QueueInfo | None:
    """Return the state of ``queue`` when it runs in this process, else None."""
    local = local_control(oban)
    if local is None:
        return None

    table = local.context.table
    index = table.queue_index(queue)
    if index < 0 or table.queue_state(index) != _core.QUEUE_RUNNING:
        return None

    options = oban.queues.get(queue, {})
    meta = {key: value for key, value in options.items() if key not in ("limit", "paused")}
    meta.update(local.queue_meta.get(queue, {}))
    started_at = local.started_at.get(queue) or datetime.fromtimestamp(table.created_at_ns / 1e9, UTC)
    worker_uuid = uuid.UUID(bytes=table.worker(0)["uuid"])

    return QueueInfo(
        limit=table.limit(index),
        meta=meta,
        node=oban.node,
        paused=table.paused(index),
        queue=queue,
        running=sorted(entry["job_id"] for entry in table.running(index) if entry["job_id"]),
        started_at=started_at,
        uuid=producer_uuids(worker_uuid, [queue])[0],
    )


def check_all_queues(oban: Oban) -> list[QueueInfo]:
    """Return the state of every queue running in this process."""
    local = local_control(oban)
    if local is None:
        return []

    infos = (check_queue(oban, name) for name in local.context.table.queues())
    return [info for info in infos if info is not None]


# Jobs by id, for any caller


async def cancel_jobs(
    executor: Queryable, prefix: str, ids: Sequence[int], producer_max_age: float = PRODUCER_MAX_AGE
) -> tuple[int, list[int], list[int]]:
    """Cancel the jobs that have not started; return (jobs cancelled or executing, executing ids, orphaned ids).

    Executing jobs attempted more than ``producer_max_age`` seconds ago whose
    producer row is missing or older than that run nowhere, so they are
    cancelled too and come back as orphaned. The other executing jobs are left
    unchanged. Send every executing job a pkill signal (`pkill_payloads`),
    because a producer whose row is late may still run one.
    """
    rows = await executor.fetch(queries.load("cancel_jobs", prefix), list(ids), float(producer_max_age))
    executing = [row[0] for row in rows if row[1] == "executing"]
    orphaned = [row[0] for row in rows if row[2]]
    return len(rows), executing, orphaned


def pkill_payloads(job_ids: Iterable[int]) -> list[dict[str, Any]]:
    return [{"action": "pkill", "job_id": job_id} for job_id in job_ids]


async def retry_jobs(executor: Queryable, prefix: str, ids: Sequence[int]) -> list[int]:
    """Make the jobs available now, except available and executing ones; return the ids retried."""
    rows = await executor.fetch(queries.load("retry_jobs", prefix), list(ids))
    return [row[0] for row in rows]


async def delete_jobs(executor: Queryable, prefix: str, ids: Sequence[int]) -> list[int]:
    """Delete the jobs, except executing ones; return the ids deleted."""
    rows = await executor.fetch(queries.load("delete_jobs", prefix), list(ids))
    return [row[0] for row in rows]


async def update_jobs(
    pool: asyncpg.Pool,
    prefix: str,
    ids: Sequence[int],
    changes: Mapping[str, Any] | Callable[[Job], Mapping[str, Any]],
) -> list[Job]:
    """Apply ``changes`` (a dict, or a function of the job returning one) to each job; return them updated.

    The rows are locked while the changes are computed and written, in one transaction.

    Raises:
        ValueError: when a job does not exist or a change is invalid (the message names the job
            and the field); no job is changed then.
    """
    from .oban import job_from_row

    unique_ids = list(dict.fromkeys(ids))
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(queries.load("lock_jobs_for_update", prefix), unique_ids)
        found = {row["id"]: job_from_row(row) for row in rows}

        missing = [job_id for job_id in unique_ids if job_id not in found]
        if missing:
            raise ValueError(f"cannot update jobs {missing}: not found in schema {prefix}")

        updated = [_changed(found[job_id], changes) for job_id in unique_ids]
        rows = await conn.fetch(queries.load("update_jobs", prefix), *_update_columns(updated))

    result = {row["id"]: job_from_row(row) for row in rows}
    return [result[job_id] for job_id in ids]


def _changed(job: Job, changes: Mapping[str, Any] | Callable[[Job], Mapping[str, Any]]) -> Job:
    values = changes(job) if callable(changes) else changes
    if not isinstance(values, Mapping):
        raise TypeError(f"invalid changes {values!r} for job {job.id}: expected a dict of fields to change")

    values = dict(values)
    # oban-py 0.7 names the relative form scheduled_in and keeps schedule_in as an alias.
    if "scheduled_in" in values:
        values.setdefault("schedule_in", values.pop("scheduled_in"))

    try:
        job.update(values)
    except (TypeError, ValueError) as error:
        raise type(error)(f"invalid update of job {job.id}: {error}") from None

    if job.attempt > job.max_attempts:
        raise ValueError(
            f"invalid update of job {job.id}: max_attempts {job.max_attempts} is below its attempt {job.attempt}"
        )
    return job


def _update_columns(jobs: list[Job]) -> tuple[list[Any], ...]:
    return (
        [job.id for job in jobs],
        [encode_object(job.args, "args") for job in jobs],
        [job.max_attempts for job in jobs],
        [encode_object(job.meta, "meta") for job in jobs],
        [job.priority for job in jobs],
        [job.queue for job in jobs],
        [job.scheduled_at.astimezone(UTC).replace(tzinfo=None) for job in jobs],
        [json.dumps(job.tags) for job in jobs],
        [job.worker for job in jobs],
    )


# Jobs through an Oban instance


def job_id_of(job: Job | int, action: str) -> int:
    """Return the id of a Job or an id; raise when the job was never enqueued."""
    if isinstance(job, Job):
        if job.id is None:
            raise ValueError(f"cannot {action} {job!r}: it has no id because it was never enqueued")
        return job.id

    if isinstance(job, bool) or not isinstance(job, int):
        raise TypeError(f"invalid job {job!r}: expected a Job or a job id")
    return job


async def cancel_many(oban: Oban, jobs: Iterable[Job | int]) -> int:
    ids = [job_id_of(job, "cancel") for job in jobs]
    if not ids:
        return 0

    pool = _pool(oban)
    max_age = oban._service_options["refresher"].get("max_age", PRODUCER_MAX_AGE)
    count, executing, _orphaned = await cancel_jobs(pool, oban.prefix, ids, max_age)

    # Jobs running in this process are stopped at once; the others get a signal.
    local = local_control(oban)
    elsewhere = [job_id for job_id in executing if local is None or not local.pkill(job_id)]
    await send_signals(pool, oban.prefix, pkill_payloads(elsewhere))
    return count


async def retry_many(oban: Oban, jobs: Iterable[Job | int]) -> int:
    ids = [job_id_of(job, "retry") for job in jobs]
    return len(await retry_jobs(_pool(oban), oban.prefix, ids)) if ids else 0


async def delete_many(oban: Oban, jobs: Iterable[Job | int]) -> int:
    ids = [job_id_of(job, "delete") for job in jobs]
    return len(await delete_jobs(_pool(oban), oban.prefix, ids)) if ids else 0


async def update_many(
    oban: Oban,
    jobs: Iterable[Job | int],
    changes: Mapping[str, Any] | Callable[[Job], Mapping[str, Any]],
) -> list[Job]:
    originals = list(jobs)
    ids = [job_id_of(job, "update") for job in originals]
    if not ids:
        return []

    updated = await update_jobs(_pool(oban), oban.prefix, ids, changes)

    # oban-py updates the instances it was given; keep that for callers that hold on to them.
    for original, fresh in zip(originals, updated):
        if isinstance(original, Job):
            for field in ("state", "queue", "worker", "max_attempts", "priority", "args", "meta", "tags", "scheduled_at"):
                setattr(original, field, getattr(fresh, field))
    return updated


def _pool(oban: Oban) -> asyncpg.Pool:
    return oban._require_pool()
