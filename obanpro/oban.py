"""The `Oban` instance: enqueueing, and running queues inside an application.

``async with Oban(dsn=..., queues={"default": 10}):`` runs the queues on the
application's own event loop, in this one process, with a slot table in
private memory. ``obanpro start`` and `obanpro.run` run queues in several
forked processes instead; inside each of them an `Oban` without queues serves
the jobs that enqueue other jobs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, ClassVar

import asyncpg

from . import control, queries, schema, slots, testing
from .config import parse_queues
from .db import create_pool
from .job import Job, JobState, encode_json, encode_object, normalize_tags, scheduled_utc, to_utc
from .runtime import Runtime
from .node import NodeContext, NodeServices, check_options

log = logging.getLogger(__name__)

DEFAULT_NAME = "Oban"
COPY_MIN_BATCH = 200
"""Batches of at least this many jobs are inserted with COPY instead of INSERT ... SELECT unnest."""
SIGNALS_READY_TIMEOUT = 5.0
"""How long `Oban.start` waits for the signal listener before it goes on without it."""


class Oban:
    """Enqueues jobs and, when given queues, runs them in this process.

    Args:
        pool: an asyncpg pool to use; when omitted, one is opened from ``dsn``.
        dsn: connection string, used when ``pool`` is omitted and by the queues' own connections.
            With neither, `start` uses ``OBAN_DSN``, else the embedded PostgreSQL, as ``obanpro start`` does.
        queues: ``{"default": 10}`` or ``"default:10,mailers:5"``; omit to only enqueue.
        name: instance name, used by workers' ``enqueue`` and in signal idents.
        node: node name written to ``attempted_by``; the host name by default.
        prefix: schema of the Oban tables.
        import_roots: packages from which unknown worker names may be imported.
        grace_period: seconds `stop` waits for running jobs.
        stager, lifeline, pruner, refresher, scheduler, vacuum_watch: settings of the node services,
            as in oban-py (for example ``stager={"interval": 1.0, "limit": 20_000}``).
        leadership: whether this instance may become leader; by default when it has queues.
        pool_min_size, pool_max_size: size of the pool opened from ``dsn``.

    Raises:
        TypeError, ValueError: for a bad argument, naming it.
    """

    _instances: ClassVar[dict[str, Oban]] = {}

    def __init__(
        self,
        *,
        pool: asyncpg.Pool | None = None,
        dsn: str | None = None,
        queues: Mapping[str, Any] | str | None = None,
        name: str = DEFAULT_NAME,
        node: str | None = None,
        prefix: str = "public",
        import_roots: Iterable[str] = (),
        grace_period: float = 15.0,
        stager: Mapping[str, Any] | None = None,
        lifeline: Mapping[str, Any] | None = None,
        pruner: Mapping[str, Any] | None = None,
        refresher: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        vacuum_watch: Mapping[str, Any] | None = None,
        leadership: bool | None = None,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
    ) -> None:
        if pool is not None and not isinstance(pool, asyncpg.Pool):
            raise TypeError(f"invalid pool {pool!r}: expected an asyncpg.Pool")
        if not isinstance(name, str) or not name:
            raise ValueError(f"invalid name {name!r}: expected a non-empty string")

        self.name = name
        self.node = node or socket.gethostname()
        self.prefix = queries.check_prefix(prefix)
        self.queues = parse_queues(queues) if queues is not None else {}

        if self.queues and pool is not None and dsn is None:
            raise TypeError("Oban(pool=...) with queues also needs dsn=, for the connections that listen and fetch")
        self.dsn = dsn
        self._embedded: Any = None
        self.pool = pool
        self.grace_period = grace_period
        self._owns_pool = pool is None
        self._import_roots = tuple(import_roots)
        self._service_options = {
            "stager": dict(stager or {}),
            "lifeline": dict(lifeline or {}),
            "pruner": dict(pruner or {}),
            "refresher": dict(refresher or {}),
            "scheduler": dict(scheduler or {}),
            "vacuum_watch": dict(vacuum_watch or {}),
        }
        self._leadership = bool(self.queues) if leadership is None else leadership
        check_options(self._service_options)
        self._pool_sizes = (pool_min_size, pool_max_size)
        self._runtime: Runtime | None = None
        self._services: NodeServices | None = None
        self._insert_sql = queries.load("insert_jobs", self.prefix)
        self._notify_sql = queries.load("notify_inserted", self.prefix)
        self._sequence: Any = _UNKNOWN
        self._started = False

    @property
    def is_leader(self) -> bool:
        """True while this instance holds the leadership of its name (only instances with queues elect)."""
        leader = self._services.leader if self._services else None
        return bool(leader and leader.is_leader)

    @classmethod
    def get_instance(cls, name: str = DEFAULT_NAME) -> Oban:
        """Return the started instance called ``name``; raise RuntimeError when there is none."""
        instance = cls._instances.get(name)
        if instance is None:
            raise RuntimeError(
                f"no started Oban instance named {name!r}: start one with `async with Oban(...)` "
                "or run the job under obanpro start"
            )
        return instance

    # Lifecycle

    async def start(self) -> Oban:
        """Open the pool, register this instance and start its queues, if any."""
        if self._started:
            return self

        if self.pool is None and self.dsn is None:
            # As obanpro start does: OBAN_DSN, else the embedded PostgreSQL,
            # which this instance starts when no other process runs it.
            from .embedded import resolve_dsn

            self.dsn, self._embedded = resolve_dsn()

        if self.pool is None:
            self.pool = await create_pool(
                self.dsn,
                min_size=self._pool_sizes[0],
                max_size=self._pool_sizes[1],
                application_name=f"obanpro {self.node} {self.name}",
            )

        if self.queues:
            await schema.verify(self.pool, self.prefix)
            await self._start_queues()

        Oban._instances[self.name] = self
        self._started = True
        return self

    async def stop(self) -> None:
        """Stop taking jobs, wait up to ``grace_period`` for running ones, store their results, close."""
        if Oban._instances.get(self.name) is self:
            del Oban._instances[self.name]

        # Running jobs finish before the services stop: the refresher keeps
        # their producer rows alive meanwhile, so no lifeline rescues them.
        if self._runtime:
            await self._runtime.drain(self.grace_period)

        if self._services:
            await self._services.stop()
            self._services = None

        if self._runtime:
            await self._runtime.stop()
            self._runtime = None

        if self._owns_pool and self.pool is not None:
            await self.pool.close()
            self.pool = None

        if self._embedded is not None:
            # Stops the server only when this instance started it; a node using
            # it starts it again.
            self._embedded.stop()
            self._embedded = None

        self._started = False

    async def __aenter__(self) -> Oban:
        return await self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    async def _start_queues(self) -> None:
        table = slots.private_table(self.node, self.queues, self.prefix)
        table.register_worker(0, os.getpid(), os.urandom(16))

        self._runtime = Runtime(
            dsn=self.dsn,
            prefix=self.prefix,
            node=self.node,
            slots=table,
            import_roots=self._import_roots,
            supervised=False,
        )
        await self._runtime.start()

        context = NodeContext(
            pool=self.pool,
            dsn=self.dsn,
            prefix=self.prefix,
            name=self.name,
            node=self.node,
            table=table,
            wake_worker=lambda _index: self._runtime.wake_all(),
            request_queue=self._add_queue,
            options=self._service_options,
            leadership=self._leadership,
        )
        self._services = NodeServices(context)
        try:
            await self._services.start()
        except BaseException:
            await self._runtime.stop()
            self._runtime = None
            raise

        # A pkill or scale signal sent by another process after start returns
        # must reach this node, and PostgreSQL delivers a notification only to
        # connections that already listen.
        if not await self._services.wait_listening(SIGNALS_READY_TIMEOUT):
            log.warning(
                "node %s is not listening for signals after %.0f s; signals sent before it connects are lost",
                self.node,
                SIGNALS_READY_TIMEOUT,
            )

    def _add_queue(self, request: Mapping[str, Any]) -> None:
        table = self._runtime.slots
        limit = int(request["limit"])
        table.add_queue(request["queue"], limit, slots.queue_capacity(limit), bool(request.get("paused", False)))

    # Enqueueing

    async def enqueue(self, job: Job, *, conn: asyncpg.Connection | None = None) -> Job:
        """Insert one job; with ``conn``, inside that connection's transaction.

        Raises:
            ValueError: when args or meta are not a JSON object of serialisable values, naming the key.
        """
        return (await self.enqueue_many([job], conn=conn))[0]

    async def enqueue_many(self, *jobs: Job | Iterable[Job], conn: asyncpg.Connection | None = None) -> list[Job]:
        """Insert many jobs in one batch; accepts an iterable or the jobs as arguments.

        A batch of fewer than `COPY_MIN_BATCH` jobs goes in one INSERT statement,
        a larger one in one COPY. With ``conn`` the insert joins that
        connection's transaction: a rollback leaves no job and sends no
        notification.
        """
        batch = _flatten(jobs)
        if not batch:
            return []

        if testing.inline_mode():
            return await testing.run_inline(batch)

        executor = conn if conn is not None else self._require_pool()
        if len(batch) >= COPY_MIN_BATCH:
            sequence = await self._id_sequence(executor)
            if sequence is not None:
                return await self._copy_batch(executor, batch, sequence)

        columns = _columns(batch)
        row = await executor.fetchrow(self._insert_sql, *columns)

        # The same rules as the statement's: scheduled_at defaults to its time,
        # and a job due by then is available.
        now = to_utc(row["now"])
        for job, job_id in zip(batch, row["ids"]):
            job.id = job_id
            job.inserted_at = now
            if job.scheduled_at is None:
                job.scheduled_at = now
            job.state = JobState.AVAILABLE if job.scheduled_at <= now else JobState.SCHEDULED

        return batch

    async def _id_sequence(self, executor: Any) -> str | None:
        """Return the sequence behind ``oban_jobs.id``, or None when the column has none."""
        if self._sequence is _UNKNOWN:
            self._sequence = await executor.fetchval(
                "SELECT pg_get_serial_sequence($1, 'id')", f"{self.prefix}.oban_jobs"
            )
        return self._sequence

    async def _copy_batch(self, executor: Any, batch: list[Job], sequence: str) -> list[Job]:
        """Insert ``batch`` with COPY: reserve its ids, copy the rows, notify the queues with available jobs.

        Three statements instead of one, but for large batches COPY costs the
        server less than INSERT ... SELECT unnest. They run in one transaction,
        the caller's when there is one, so the notification comes with the rows.
        """
        if isinstance(executor, asyncpg.Pool):
            async with executor.acquire() as conn, conn.transaction():
                return await self._copy_batch(conn, batch, sequence)
        if not executor.is_in_transaction():
            async with executor.transaction():
                return await self._copy_batch(executor, batch, sequence)

        # Every job is checked and encoded before any statement runs, as on the INSERT path.
        encoded = [_prepare(job) for job in batch]

        row = await executor.fetchrow(_RESERVE_IDS_SQL, sequence, len(batch))
        now = row["now"]
        records = []
        woken: set[str] = set()
        for job, job_id, (args, meta, scheduled) in zip(batch, row["ids"], encoded):
            if scheduled is None:
                scheduled = now
            state = JobState.AVAILABLE if scheduled <= now else JobState.SCHEDULED
            if state is JobState.AVAILABLE:
                woken.add(job.queue)
            records.append(
                (
                    job_id,
                    state.value,
                    job.queue,
                    job.worker,
                    args,
                    meta,
                    job.tags,
                    job.max_attempts,
                    job.priority,
                    scheduled,
                    now,
                )
            )

        await executor.copy_records_to_table(
            "oban_jobs", schema_name=self.prefix, columns=_COPY_COLUMNS, records=records
        )
        if woken:
            await executor.execute(self._notify_sql, sorted(woken))

        inserted_at = to_utc(now)
        for job, record in zip(batch, records):
            job.id = record[0]
            job.state = JobState(record[1])
            job.scheduled_at = to_utc(record[9])
            job.inserted_at = inserted_at
        return batch

    async def get_job(self, job_id: int) -> Job | None:
        """Return the job with ``job_id``, or None."""
        row = await self._require_pool().fetchrow(
            f"""
            SELECT id, state::text, queue, worker, attempt, max_attempts, priority, args::text, meta::text,
                   to_jsonb(errors)::text AS errors, tags, attempted_by, inserted_at, scheduled_at,
                   attempted_at, cancelled_at, completed_at, discarded_at
            FROM {self.prefix}.oban_jobs WHERE id = $1
            """,
            job_id,
        )
        return None if row is None else job_from_row(row)

    # Job control

    async def cancel_job(self, job: Job | int) -> None:
        """Cancel a job that has not finished; see `cancel_many_jobs`."""
        await self.cancel_many_jobs([job])

    async def cancel_many_jobs(self, jobs: Iterable[Job | int]) -> int:
        """Cancel jobs by Job or id; return how many were cancelled or asked to stop.

        Available, scheduled, retryable and suspended jobs become ``cancelled`` with
        ``meta.cancel_attempted_at``. An executing job keeps its row: the node that
        runs it gets a pkill signal, sets the job's cancel flag so ``job.cancelled()``
        returns True, cancels the task of an async job, and acks it as ``cancelled``.
        Completed, discarded and cancelled jobs are left alone.
        """
        return await control.cancel_many(self, jobs)

    async def retry_job(self, job: Job | int) -> None:
        """Make a job available now; see `retry_many_jobs`."""
        await self.retry_many_jobs([job])

    async def retry_many_jobs(self, jobs: Iterable[Job | int]) -> int:
        """Make jobs available now, except available and executing ones; return how many.

        A job out of attempts gets one more, and its completed, cancelled and
        discarded timestamps are cleared.
        """
        return await control.retry_many(self, jobs)

    async def delete_job(self, job: Job | int) -> None:
        """Delete a job unless it is executing."""
        await self.delete_many_jobs([job])

    async def delete_many_jobs(self, jobs: Iterable[Job | int]) -> int:
        """Delete jobs, except executing ones; return how many were deleted."""
        return await control.delete_many(self, jobs)

    async def update_job(self, job: Job | int, changes: Mapping[str, Any] | Callable[[Job], Mapping[str, Any]]) -> Job:
        """Change a job's fields and return it as stored; see `update_many_jobs`."""
        return (await self.update_many_jobs([job], changes))[0]

    async def update_many_jobs(
        self,
        jobs: Iterable[Job | int],
        changes: Mapping[str, Any] | Callable[[Job], Mapping[str, Any]],
    ) -> list[Job]:
        """Change fields of jobs, locked in one transaction; return them as stored.

        ``changes`` is a dict or a function of the job that returns one, with the
        fields args, max_attempts, meta, priority, queue, scheduled_at (or
        scheduled_in, seconds or a timedelta from now), tags and worker. An
        available job moved into the future becomes scheduled, and a scheduled
        one moved to the past becomes available.

        Raises:
            ValueError: when a job does not exist or a change is invalid; nothing is changed then.
        """
        return await control.update_many(self, jobs, changes)

    # Queue control

    async def pause_queue(self, queue: str, *, node: str | None = None) -> None:
        """Stop taking jobs from ``queue`` on every node, or on ``node``; running jobs finish."""
        await control.control_queue(self, control.queue_payload("pause", queue), node)

    async def resume_queue(self, queue: str, *, node: str | None = None) -> None:
        """Take jobs from a paused ``queue`` again, on every node or on ``node``."""
        await control.control_queue(self, control.queue_payload("resume", queue), node)

    async def pause_all_queues(self, *, node: str | None = None) -> None:
        """Pause every queue, on every node or on ``node``."""
        await control.control_queue(self, control.queue_payload("pause", "*", allow_all=True), node)

    async def resume_all_queues(self, *, node: str | None = None) -> None:
        """Resume every queue, on every node or on ``node``."""
        await control.control_queue(self, control.queue_payload("resume", "*", allow_all=True), node)

    async def start_queue(self, *, queue: str, limit: int, paused: bool = False, node: str | None = None) -> None:
        """Start running ``queue`` with ``limit`` slots per node, on every node or on ``node``.

        A stopped queue restarts with the new limit; a running one is left as it is.
        """
        await control.control_queue(self, control.start_payload(queue, limit, paused), node)

    async def stop_queue(self, queue: str, *, node: str | None = None) -> None:
        """Stop running ``queue`` on every node or on ``node``; running jobs finish."""
        await control.control_queue(self, control.queue_payload("stop", queue), node)

    async def scale_queue(self, *, queue: str, node: str | None = None, **options: Any) -> None:
        """Change a queue's options, such as ``limit``, on every node or on ``node``.

        Scaling down lets running jobs finish; new jobs start only while fewer than
        the new limit run. Options other than ``limit`` are passed on in the signal
        for nodes that know them.
        """
        await control.control_queue(self, control.scale_payload(queue, options), node)

    def check_queue(self, queue: str) -> control.QueueInfo | None:
        """Return the state of ``queue`` when this instance runs it, else None."""
        return control.check_queue(self, queue)

    def check_all_queues(self) -> list[control.QueueInfo]:
        """Return the state of every queue this instance runs."""
        return control.check_all_queues(self)

    def _require_pool(self) -> asyncpg.Pool:
        if self.pool is None:
            raise RuntimeError("this Oban instance is not started: use `async with Oban(...)` or `await oban.start()`")
        return self.pool


def job_from_row(row: Mapping[str, Any]) -> Job:
    """Build a Job from a full ``oban_jobs`` row whose JSON columns were read as text."""
    job = Job.__new__(Job)
    for field in ("id", "queue", "worker", "attempt", "max_attempts", "priority", "tags", "attempted_by"):
        setattr(job, field, row[field])

    job.state = JobState(row["state"])
    job.args = json.loads(row["args"])
    job.meta = json.loads(row["meta"])
    job.errors = json.loads(row["errors"])

    for field in ("inserted_at", "scheduled_at", "attempted_at", "cancelled_at", "completed_at", "discarded_at"):
        value = row[field]
        setattr(job, field, None if value is None else to_utc(value))

    job.extra = {}
    job._cancel_check = None
    return job


def _flatten(jobs: tuple[Job | Iterable[Job], ...]) -> list[Job]:
    if len(jobs) == 1 and not isinstance(jobs[0], Job):
        jobs = tuple(jobs[0])  # type: ignore[arg-type]

    for position, job in enumerate(jobs):
        if not isinstance(job, Job):
            raise TypeError(f"invalid job at position {position}: expected a Job, got {type(job).__name__}")

    return list(jobs)  # type: ignore[arg-type]


_UNKNOWN = object()

# The columns a COPY writes. The others take their defaults, as with INSERT.
_COPY_COLUMNS = (
    "id",
    "state",
    "queue",
    "worker",
    "args",
    "meta",
    "tags",
    "max_attempts",
    "priority",
    "scheduled_at",
    "inserted_at",
)

# nextval is evaluated once per generated row, so one statement reserves the
# whole batch. Its time is the batch's inserted_at, as the INSERT path uses.
_RESERVE_IDS_SQL = """
SELECT array(SELECT nextval($1::regclass) FROM generate_series(1, $2)) AS ids, timezone('UTC', now()) AS now
"""


def _prepare(job: Job) -> tuple[str, str, datetime | None]:
    """Check ``job``; return its encoded args and meta and its naive UTC ``scheduled_at``, for either insert path.

    Fields may have changed since construction, so the tags are normalised
    again and a naive ``scheduled_at`` counts as UTC.
    """
    job.validate()
    job.tags = normalize_tags(job.tags)
    scheduled = None
    if job.scheduled_at is not None:
        job.scheduled_at = scheduled_utc(job.scheduled_at)
        scheduled = job.scheduled_at.replace(tzinfo=None)
    return encode_object(job.args, "args"), encode_object(job.meta, "meta"), scheduled


def _columns(batch: list[Job]) -> tuple[list[Any], ...]:
    queues, workers, args, metas, tags, attempts, priorities, scheduled = [], [], [], [], [], [], [], []

    for job in batch:
        job_args, job_meta, job_scheduled = _prepare(job)
        queues.append(job.queue)
        workers.append(job.worker)
        args.append(job_args)
        metas.append(job_meta)
        tags.append(encode_json(job.tags) if job.tags else "[]")
        attempts.append(job.max_attempts)
        priorities.append(job.priority)
        scheduled.append(job_scheduled)

    return queues, workers, args, metas, tags, attempts, priorities, scheduled

