"""Writes finished jobs' states in batches, one UPDATE per batch.

Acks collect while the previous batch is in flight, so under load one round
trip acks many jobs and an idle worker acks each job at once. A slot is
returned only after its job's state is written, so a worker killed in between
leaves the job in a slot entry for the supervisor to rescue. A batch that
fails on the connection is retried with backoff until it lands; a batch the
server rejects is split so one bad ack cannot block the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import _core, queries, telemetry
from .db import CONNECTION_ERRORS, QUERY_TIMEOUT, Backoff, recover
from .executor import AckAction, error_entry
from .job import Job, JobState

log = logging.getLogger(__name__)



def _json(value: object) -> str | None:
    if value is None:
        return None

    # PostgreSQL's jsonb rejects the NUL character, which tracebacks of binary data can contain.
    return json.dumps(value, separators=(",", ":"), default=repr).replace("\\u0000", "\\ufffd")


@dataclass(slots=True)
class Refill:
    """New jobs of one queue to fetch in the statement that acks a batch, for slots the batch frees."""

    queue: str
    entries: list[int]
    attempted_by: list[str]
    lost: Callable[[], None]
    """Called when the statement failed or its reply was lost, so the producer looks for jobs it
    fetched unknowingly."""


class Acker:
    """Batches `AckAction`s and writes them, calling ``on_acked`` once they are stored.

    With ``plan_refill``, a batch that frees slots a producer wants again also
    fetches that producer's next jobs in the same statement, which saves a
    round trip and a commit per batch under load.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        prefix: str,
        on_acked: Callable[[list[AckAction], Refill | None, list[Job]], None],
        plan_refill: Callable[[list[AckAction]], Refill | None] | None = None,
    ) -> None:
        self._pool = pool
        self._sql = queries.load("ack_jobs", prefix)
        self._plan_refill = plan_refill
        self._on_acked = on_acked
        self._pending: list[AckAction] = []
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._in_flight = 0
        self.failures = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Acks taken from the queue and not stored yet."""
        return self._in_flight

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="obanpro-acker")

    def add(self, action: AckAction) -> None:
        self._pending.append(action)
        self._idle.clear()
        self._arrived.set()

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every ack added so far is stored; return False when ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        backoff = Backoff()

        while True:
            await self._arrived.wait()
            self._arrived.clear()
            batch, self._pending = self._pending, []

            while batch:
                self._in_flight = len(batch)
                try:
                    await self._write(batch)
                    backoff.reset()
                    batch = []
                except CONNECTION_ERRORS as error:
                    self.failures += 1
                    log.warning(
                        "acking %d jobs failed: %r; retrying in %.2f s", len(batch), error, backoff.delay
                    )
                    recover(self._pool, error)
                    await backoff.sleep()
                    batch.extend(self._pending)
                    self._pending = []
                except asyncpg.PostgresError as error:
                    log.error("the server rejected a batch of %d acks: %r; acking one by one", len(batch), error)
                    await self._write_each(batch)
                    batch = []
                except Exception:
                    # A bug here must not end the loop: the jobs would stay executing
                    # and their slots held while the process looks alive.
                    self.failures += 1
                    log.exception("acking %d jobs failed; retrying in %.2f s", len(batch), backoff.delay)
                    await backoff.sleep()
                    batch.extend(self._pending)
                    self._pending = []

            self._in_flight = 0
            if not self._pending:
                self._idle.set()

    async def _write(self, batch: list[AckAction], *, refill_allowed: bool = True) -> None:
        refill = self._plan_refill(batch) if self._plan_refill and refill_allowed else None

        with telemetry.span("oban.producer.ack", {"count": len(batch)}) as span:
            try:
                async with _acquire(self._pool) as conn:
                    rows = await conn.fetch(self._sql, *ack_columns(batch, refill), timeout=QUERY_TIMEOUT)
                stored = set(rows[0]["acked_ids"])
            except BaseException:
                if refill is not None:
                    refill.lost()
                raise

            jobs = [] if refill is None else _core.decode_jobs([row for row in rows if row[0] is not None], Job, JobState.EXECUTING)
            span.add({"fetched": len(jobs)})

        if len(stored) != len(batch):
            for action in batch:
                if action.job.id not in stored:
                    log.warning(
                        "ack of job %s (%s) to %s changed nothing: the row is no longer executing attempt %s",
                        action.job.id,
                        action.job.worker,
                        action.state,
                        action.job.attempt,
                    )

        self._on_acked(batch, refill, jobs)

    async def _write_each(self, batch: list[AckAction]) -> None:
        for action in batch:
            try:
                await self._write([action], refill_allowed=False)
                continue
            except CONNECTION_ERRORS:
                self._pending.append(action)
                self._arrived.set()
                continue
            except asyncpg.PostgresError as error:
                log.error("ack of job %s was rejected: %r; recording the failure instead", action.job.id, error)
                rejection = repr(error)

            fallback = AckAction(
                action.job,
                action.entry,
                "discarded" if action.job.attempt >= action.job.max_attempts else "retryable",
                schedule_in=60.0,
                error=error_entry(action.job, f"storing the job's result failed: {rejection}"),
            )
            try:
                await self._write([fallback], refill_allowed=False)
            except (asyncpg.PostgresError, *CONNECTION_ERRORS) as second:
                log.error(
                    "job %s stays executing until the lifeline rescues it: its ack failed twice (%r)",
                    action.job.id,
                    second,
                )
                self._on_acked([action], None, [])


class AcquireError(ConnectionError):
    """Raised when no connection could be opened for an ack, whatever the server answered."""


@contextlib.asynccontextmanager
async def _acquire(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    # An error while opening a connection (for example "the database system is
    # starting up") says nothing about the ack itself, so it is retried as a
    # connection error instead of being taken as a rejected ack.
    try:
        conn = await pool.acquire(timeout=QUERY_TIMEOUT)
    except asyncpg.PostgresError as error:
        raise AcquireError(f"opening a connection failed: {error!r}") from error

    try:
        yield conn
    finally:
        await pool.release(conn)


def ack_columns(batch: list[AckAction], refill: Refill | None = None) -> tuple[Any, ...]:
    """Return the parameters of ack_jobs.sql for ``batch``, fetching for ``refill`` when given."""
    fetch = (refill.queue, len(refill.entries), refill.attempted_by) if refill else ("", 0, [])
    return (
        [action.job.id for action in batch],
        [action.job.attempt for action in batch],
        [action.state for action in batch],
        [action.attempt_change for action in batch],
        [action.schedule_in for action in batch],
        [_json(action.error) for action in batch],
        [_json(action.meta) for action in batch],
        *fetch,
    )
