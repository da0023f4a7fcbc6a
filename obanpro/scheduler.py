"""Cron: the leader enqueues each periodic worker's job at the minutes it is due.

Entries come from ``@worker(cron=...)`` and ``@job(cron=...)``: an expression
such as ``"*/5 * * * *"`` or ``{"expr": ..., "timezone": "Europe/Berlin"}``.
Each job gets ``meta = {"cron": true, "cron_expr", "cron_name", "cron_at"}``
as oban-py writes it, and is scheduled at the minute it is due.

Time comes from the database's clock, so every node agrees on which minute it
is whatever its own clock reads. Each node ticks at the top of every minute and
keeps a cursor, the last minute it saw. A tick evaluates the minutes after the
cursor, so a clock that steps back repeats nothing, and only the leader
enqueues. Followers move their cursor too, so a node that becomes leader does
not replay minutes its predecessor already ran.

One job per entry and minute, across processes and nodes, rests on three
guards in the insert transaction:

1. A transaction-scoped advisory lock per prefix and instance name, so
   inserts for cron never overlap.
2. The lease row is locked with ``FOR SHARE`` and must still be this
   leader's, checked on the database's clock. A node that only believes it
   leads inserts nothing, and no node can take the lease over until the
   transaction ends.
3. Minutes at or before the lease's ``elected_at`` are skipped. They belong to
   the previous lease, and whoever held it ran them or lost them. A takeover
   needs the previous lease to have expired, after any minute it ran, so a new
   leader cannot enqueue a minute again, even one whose job has already been
   retried or snoozed. This assumes the database's clock does not step back.

With these, the check in ``insert_cron_jobs.sql`` for an existing job of the
same entry and minute only matters to callers that evaluate without a leader,
such as several `Scheduler.evaluate` calls for one minute.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from . import queries, telemetry
from .cron import Expression, cron_name, due_minutes, load_zone
from .job import Job, encode_object

if TYPE_CHECKING:
    import asyncpg

    from .leader import Leader

log = logging.getLogger(__name__)

ONE_MINUTE = timedelta(minutes=1)
TICK_DELAY = 0.05
"""Seconds past the top of the minute at which a tick runs, so it never lands just before it."""
CRON_OPTION_KEYS = frozenset({"expr", "timezone"})


@dataclass(frozen=True, slots=True)
class CronEntry:
    """A periodic worker: its class, its parsed expression and the name Oban gives the entry."""

    worker: str
    cls: type
    expression: Expression
    timezone: str | None
    """The entry's own IANA zone, or None to use the scheduler's."""
    name: str
    """``cron_name``: 8 hex digits over the expression, the worker and the timezone option."""


def parse_cron_option(worker: str, cls: type, option: Any) -> CronEntry:
    """Check a ``cron=`` option and return the entry it describes.

    ``option`` is an expression string or a mapping with ``expr`` and an
    optional ``timezone``. A function worker (``@job``) must take no required
    arguments, because cron jobs are enqueued with empty args.

    Raises:
        TypeError: the option is neither a str nor a mapping, or its ``expr`` or
            ``timezone`` is not a str.
        ValueError: the expression, the time zone, a key or the worker's job
            options are invalid. The message names the worker and the expression.
    """
    expr, timezone = _split_option(worker, option)

    try:
        expression = Expression.parse(expr)
    except ValueError as error:
        raise ValueError(f"invalid cron option for worker {worker}: {error}") from None

    if timezone is not None:
        try:
            load_zone(timezone)
        except ValueError as error:
            raise ValueError(f"invalid cron option for worker {worker} ({expr!r}): {error}") from None

    _check_no_arguments(worker, cls, expr)
    opts = {"timezone": timezone} if timezone is not None else {}
    entry = CronEntry(worker, cls, expression, timezone, cron_name(expr, worker, opts))

    try:
        build_job(entry, datetime(2000, 1, 1, tzinfo=UTC))
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid cron worker {worker} ({expr!r}): its job options are invalid: {error}") from None

    return entry


def _split_option(worker: str, option: Any) -> tuple[str, str | None]:
    if isinstance(option, str):
        return option, None

    if not isinstance(option, Mapping):
        raise TypeError(
            f"invalid cron option {option!r} for worker {worker}: expected an expression such as "
            "'*/5 * * * *' or {'expr': ..., 'timezone': ...}"
        )

    unknown = set(option) - CRON_OPTION_KEYS
    if unknown:
        raise ValueError(
            f"invalid cron option for worker {worker}: unknown keys {sorted(unknown)}; "
            "the keys are 'expr' and 'timezone'"
        )

    expr = option.get("expr")
    if not isinstance(expr, str):
        raise TypeError(
            f"invalid cron option for worker {worker}: 'expr' must be an expression string "
            f"such as '@daily', got {expr!r}"
        )

    timezone = option.get("timezone")
    if timezone is not None and not isinstance(timezone, str):
        raise TypeError(
            f"invalid cron option for worker {worker} ({expr!r}): 'timezone' must be an IANA "
            f"name such as 'Europe/Berlin', got {timezone!r}"
        )

    return expr, timezone


def _check_no_arguments(worker: str, cls: type, expr: str) -> None:
    signature = cls.__dict__.get("__signature__")
    if not isinstance(signature, inspect.Signature):
        return

    try:
        signature.bind()
    except TypeError:
        required = [
            parameter.name
            for parameter in signature.parameters.values()
            if parameter.default is inspect.Parameter.empty
            and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        raise ValueError(
            f"invalid cron worker {worker} ({expr!r}): cron jobs are enqueued without arguments, "
            f"but the function requires {', '.join(required)}; give them defaults"
        ) from None


def build_job(entry: CronEntry, minute: datetime) -> Job:
    """Return the job ``entry`` enqueues for ``minute``: the worker's defaults plus the cron meta."""
    job = entry.cls.new()
    job.meta = {
        **job.meta,
        "cron": True,
        "cron_expr": entry.expression.text,
        "cron_name": entry.name,
        "cron_at": minute.isoformat(),
    }
    job.scheduled_at = minute
    job.validate()
    return job


def floor_minute(moment: datetime) -> datetime:
    """Return ``moment`` in UTC with seconds and microseconds cut; naive values are taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(second=0, microsecond=0)


class Scheduler:
    """Enqueues cron jobs at the top of every minute while ``leader`` leads.

    Args:
        pool: connections for the clock reads and the inserts.
        prefix: schema of the Oban tables.
        name: Oban instance name, which scopes the cron lock and the lease.
        leader: the node's `Leader`; with None every call evaluates, as when
            only one process runs cron.
        timezone: IANA zone for entries without their own (``[scheduler] timezone``).
        entries: returns worker name to (class, cron option); the registry of
            ``@worker(cron=...)`` by default.

    Raises:
        ValueError: ``timezone`` is not an IANA zone name.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        prefix: str,
        *,
        name: str = "Oban",
        leader: Leader | None = None,
        timezone: str = "UTC",
        entries: Callable[[], Mapping[str, tuple[type, Any]]] | None = None,
    ) -> None:
        try:
            self.zone = load_zone(timezone)
        except ValueError as error:
            raise ValueError(f"invalid scheduler timezone: {error}") from None

        if entries is None:
            from .worker import cron_entries

            entries = cron_entries

        self.name = name
        self.cursor: datetime | None = None
        """The last minute (UTC) this scheduler has seen; None before its first tick."""
        self._pool = pool
        self._prefix = prefix
        self._leader = leader
        self._entries = entries
        self._insert_sql = queries.load("insert_cron_jobs", prefix)
        self._lease_sql = queries.load("check_lease", prefix)
        self._lock_key = f"{prefix}.oban_cron.{name}"
        self._invalid: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._clock: tuple[datetime, float] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="obanpro-scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def entries(self) -> list[CronEntry]:
        """Return the valid cron entries; an invalid one is logged once and left out."""
        result = []
        for worker, (cls, option) in sorted(self._entries().items()):
            try:
                result.append(parse_cron_option(worker, cls, option))
            except (TypeError, ValueError) as error:
                if worker not in self._invalid:
                    self._invalid.add(worker)
                    log.error("skipping cron entry %s: %s", worker, error)
        return result

    async def evaluate(self, minute: datetime) -> list[int]:
        """Enqueue the jobs of the entries due at ``minute`` (UTC); return the new job ids.

        Runs the same guarded insert as a tick, so calling it for a minute that
        already has its jobs enqueues nothing.
        """
        minute = floor_minute(minute)
        return await self._enqueue_window(minute - ONE_MINUTE, minute)

    async def tick(self, now: datetime | None = None) -> list[int]:
        """Move the cursor to ``now`` and, while leading, enqueue the minutes passed since.

        ``now`` defaults to the database's clock. The first tick only sets the
        cursor: minutes before a scheduler starts are not run.
        """
        if now is None:
            now = await self._database_now()

        until = floor_minute(now)
        since = self.cursor
        if since is None or until <= since:
            self.cursor = until if since is None else since
            return []

        if self._leader is not None and not self._leader.is_leader:
            self.cursor = until
            return []

        ids = await self._enqueue_window(since, until)
        self.cursor = until
        return ids

    async def _database_now(self) -> datetime:
        value = await self._pool.fetchval("SELECT clock_timestamp()")
        self._clock = (value, time.monotonic())
        return value

    async def _enqueue_window(self, since: datetime, until: datetime) -> list[int]:
        """Enqueue every entry's minutes in ``(since, until]`` in one guarded transaction."""
        with telemetry.span("oban.scheduler.evaluate", {"cron_at": until.isoformat()}) as span:
            entries = self.entries()
            ids = await self._insert_due(entries, since, until) if entries else []
            span.add({"enqueued_count": len(ids)})

        if ids:
            log.debug("enqueued cron jobs %s for minutes up to %s", ids, until.isoformat())
        return ids

    async def _insert_due(self, entries: list[CronEntry], since: datetime, until: datetime) -> list[int]:
        ids: list[int] = []

        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._lock_key)

            if self._leader is not None:
                elected_at = await conn.fetchval(self._lease_sql, self.name, self._leader.identity)
                if elected_at is None:
                    self._leader.drop("its lease was gone when cron was about to run")
                    return []
                since = max(since, floor_minute(elected_at))

            for minute, due in self._due(entries, since, until):
                jobs = [build_job(entry, minute) for entry in due]
                columns = _columns(jobs, [entry.name for entry in due])
                rows = await conn.fetch(self._insert_sql, *columns, minute.replace(tzinfo=None))
                ids.extend(row["id"] for row in rows)

        return ids

    def _due(self, entries: list[CronEntry], since: datetime, until: datetime) -> list[tuple[datetime, list[CronEntry]]]:
        by_minute: dict[datetime, list[CronEntry]] = {}
        for entry in entries:
            zone = self.zone if entry.timezone is None else load_zone(entry.timezone)
            for minute in due_minutes(entry.expression, zone, since, until):
                by_minute.setdefault(minute, []).append(entry)
        return sorted(by_minute.items())

    async def _loop(self) -> None:
        # Imported here so that importing a module with cron= workers, which
        # loads this module for validation, does not load asyncpg.
        from .db import CONNECTION_ERRORS, Backoff, recover

        backoff = Backoff(first=0.5, maximum=5.0)
        while True:
            try:
                await self.tick()
                backoff.reset()
            except CONNECTION_ERRORS as error:
                log.warning("cron evaluation failed: %r; retrying in %.2f s", error, backoff.delay)
                recover(self._pool, error)
                await backoff.sleep()
                continue
            except Exception:
                log.exception("cron evaluation failed; retrying in %.2f s", backoff.delay)
                await backoff.sleep()
                continue

            await asyncio.sleep(self._seconds_to_next_minute())

    def _seconds_to_next_minute(self) -> float:
        if self._clock is None:
            return 1.0

        database_now, measured = self._clock
        elapsed = time.monotonic() - measured
        next_minute = floor_minute(database_now) + ONE_MINUTE
        remaining = (next_minute - database_now).total_seconds() - elapsed + TICK_DELAY
        return min(60.0, max(TICK_DELAY, remaining))


def _columns(jobs: list[Job], names: list[str]) -> tuple[list[Any], ...]:
    queues, workers, args, metas, tags, attempts, priorities = [], [], [], [], [], [], []

    for job in jobs:
        queues.append(job.queue)
        workers.append(job.worker)
        args.append(encode_object(job.args, "args"))
        metas.append(encode_object(job.meta, "meta"))
        tags.append(json.dumps(job.tags))
        attempts.append(job.max_attempts)
        priorities.append(job.priority)

    return queues, workers, args, metas, tags, attempts, priorities, names
