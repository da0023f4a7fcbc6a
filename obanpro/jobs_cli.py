"""``obanpro jobs``: list, show, retry and cancel jobs from the command line.

The commands find the database as the other commands do (``--dsn``, then
``OBAN_DSN``, then the embedded PostgreSQL) and never print the DSN. Retry
and cancel take job ids, filters, or both, and ask for confirmation unless
``--yes`` is given. Cancelling an executing job sends a pkill signal, so the
node that runs it stops it as `Oban.cancel_job` does.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import click

from . import control, erlang_term, queries
from .cli import _common, _fail, _load, _resolve, jobs
from .job import Job, JobState
from .refresher import DEFAULT_MAX_AGE as PRODUCER_MAX_AGE

BATCH_SIZE = 5_000
"""Jobs changed per statement by retry and cancel, so no statement locks a whole table's rows."""

DEFAULT_LIMIT = 20

STATES = [state.value for state in JobState]
RETRYABLE_STATES = [state for state in STATES if state not in ("available", "executing")]
CANCELLABLE_STATES = ["executing", "available", "scheduled", "retryable", "suspended"]


def _filters(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--state", "states", multiple=True, type=click.Choice(STATES), help="Only jobs in this state; repeatable."),
        click.option("--queue", "queues", multiple=True, help="Only jobs of this queue; repeatable."),
        click.option("--worker", "worker_names", multiple=True, help="Only jobs of this worker (module.Name); repeatable."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@jobs.command("list")
@_filters
@click.option("--limit", type=click.IntRange(1), default=DEFAULT_LIMIT, show_default=True, help="Maximum number of jobs to show, newest first.")
@_common
def list_jobs(
    states: tuple[str, ...],
    queues: tuple[str, ...],
    worker_names: tuple[str, ...],
    as_json: bool,
    limit: int,
    dsn: str | None,
    prefix: str | None,
    config_path: str | None,
    data_dir: str | None,
) -> None:
    """List jobs, newest first, filtered by state, queue and worker."""
    config = _load(config_path, {"dsn": dsn, "prefix": prefix})
    filters = _filter_values(states, queues, worker_names, ())

    rows = _run(config, data_dir, lambda conn: conn.fetch(queries.load("list_jobs", config.prefix), *filters, limit))
    found = [_job(row) for row in rows]

    if as_json:
        click.echo(json.dumps([job.to_dict() for job in found], indent=2, default=str))
        return

    if not found:
        click.echo(f"no jobs match in schema {config.prefix}")
        return

    click.echo(_table(found))
    total = rows[0]["total"]
    if total > len(found):
        click.echo(f"showing {len(found)} of {total} matching jobs; raise --limit to see more")


@jobs.command("show")
@click.argument("job_id", type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_common
def show_job(job_id: int, as_json: bool, dsn: str | None, prefix: str | None, config_path: str | None, data_dir: str | None) -> None:
    """Show every field of one job, its errors included."""
    config = _load(config_path, {"dsn": dsn, "prefix": prefix})
    rows = _run(config, data_dir, lambda conn: conn.fetch(queries.load("list_jobs", config.prefix), None, None, None, [job_id], 1))

    if not rows:
        _fail(f"job {job_id} not found in schema {config.prefix}")

    job = _job(rows[0])
    if as_json:
        click.echo(json.dumps(job.to_dict(), indent=2, default=str))
    else:
        click.echo(_details(job))


@jobs.command("retry")
@click.argument("job_ids", nargs=-1, type=click.IntRange(1))
@_filters
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_common
def retry(job_ids: tuple[int, ...], yes: bool, **options: Any) -> None:
    """Make jobs available to run now, by id or by filter.

    Available and executing jobs are left as they are. A job out of attempts gets one more.
    """
    _change("retry", job_ids, yes, RETRYABLE_STATES, _retry, **options)


@jobs.command("cancel")
@click.argument("job_ids", nargs=-1, type=click.IntRange(1))
@_filters
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_common
def cancel(job_ids: tuple[int, ...], yes: bool, **options: Any) -> None:
    """Cancel jobs by id or by filter.

    An executing job is asked to stop by the node that runs it. Completed,
    discarded and cancelled jobs are left as they are.
    """
    _change("cancel", job_ids, yes, CANCELLABLE_STATES, _cancel, **options)


# Retry and cancel


async def _retry(conn: asyncpg.Connection, prefix: str, ids: list[int]) -> dict[str, Any]:
    retried: list[int] = []
    for start in range(0, len(ids), BATCH_SIZE):
        retried += await control.retry_jobs(conn, prefix, ids[start : start + BATCH_SIZE])
    return {"retried": retried}


async def _cancel(conn: asyncpg.Connection, prefix: str, ids: list[int]) -> dict[str, Any]:
    count = 0
    signalled: list[int] = []
    orphaned: list[int] = []
    for start in range(0, len(ids), BATCH_SIZE):
        batch_count, batch_executing, batch_orphaned = await control.cancel_jobs(conn, prefix, ids[start : start + BATCH_SIZE])
        count += batch_count
        orphaned_set = set(batch_orphaned)
        signalled += [job_id for job_id in batch_executing if job_id not in orphaned_set]
        orphaned += batch_orphaned
        await control.send_signals(conn, prefix, control.pkill_payloads(batch_executing))
    return {"cancelled": count, "signalled": signalled, "orphaned": orphaned}


def _change(
    action: str,
    job_ids: tuple[int, ...],
    yes: bool,
    eligible: list[str],
    apply: Callable[[asyncpg.Connection, str, list[int]], Awaitable[dict[str, Any]]],
    *,
    states: tuple[str, ...],
    queues: tuple[str, ...],
    worker_names: tuple[str, ...],
    as_json: bool,
    dsn: str | None,
    prefix: str | None,
    config_path: str | None,
    data_dir: str | None,
) -> None:
    if not (job_ids or states or queues or worker_names):
        raise click.UsageError(f"name the jobs to {action}: give job ids, --state, --queue or --worker")

    config = _load(config_path, {"dsn": dsn, "prefix": prefix})
    matched_states = [state for state in eligible if not states or state in states]
    filters = _filter_values(matched_states, queues, worker_names, job_ids)
    resolved, server = _resolve(config, data_dir)

    async def run() -> dict[str, Any] | None:
        conn = await _connect(resolved, config.prefix)
        try:
            ids = [row[0] for row in await conn.fetch(queries.load("match_job_ids", config.prefix), *filters)]
            if not ids:
                return None
            if not yes and not _confirm(action, ids, config.prefix):
                return {"aborted": True}
            return await apply(conn, config.prefix, ids)
        finally:
            await conn.close()

    try:
        result = asyncio.run(run())
    finally:
        if server is not None:
            server.stop()

    _report(action, result, as_json)


def _confirm(action: str, ids: list[int], prefix: str) -> bool:
    noun = "job" if len(ids) == 1 else "jobs"
    try:
        return click.confirm(f"{action.capitalize()} {len(ids)} {noun} in schema {prefix} ({_short(ids)})?", default=False, err=True)
    except click.Abort:
        # A closed standard input counts as declining, so nothing changes.
        return False


def _report(action: str, result: dict[str, Any] | None, as_json: bool) -> None:
    if result is not None and result.get("aborted"):
        click.echo("aborted; no job was changed", err=True)
        sys.exit(1)

    if as_json:
        empty = {"retried": []} if action == "retry" else {"cancelled": 0, "signalled": [], "orphaned": []}
        click.echo(json.dumps(result or empty))
        return

    if result is None:
        click.echo(f"no jobs match that can be {'retried' if action == 'retry' else 'cancelled'}")
    elif action == "retry":
        click.echo(f"retried {len(result['retried'])} jobs")
    else:
        waiting = result["cancelled"] - len(result["signalled"]) - len(result["orphaned"])
        click.echo(f"cancelled {waiting} {'job' if waiting == 1 else 'jobs'} that had not started")
        if result["orphaned"]:
            click.echo(
                f"cancelled jobs {_short(result['orphaned'])}, left executing by a node that stopped "
                f"without storing their results (no producer heartbeat for {PRODUCER_MAX_AGE:.0f} s)"
            )
        if result["signalled"]:
            click.echo(
                f"asked the nodes running jobs {_short(result['signalled'])} to stop them: async jobs stop at once, "
                "sync jobs only where their code checks job.cancelled(), and otherwise run to the end"
            )


def _short(ids: Sequence[int]) -> str:
    return ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


# Database access


def _run(config: Any, data_dir: str | None, query: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    dsn, server = _resolve(config, data_dir)

    async def run() -> Any:
        conn = await _connect(dsn, config.prefix)
        try:
            return await query(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(run())
    finally:
        if server is not None:
            server.stop()


async def _connect(dsn: str, prefix: str) -> asyncpg.Connection:
    from .preflight import DatabaseUnavailableError, connect
    from .schema import SchemaError, verify

    try:
        conn = await connect(dsn)
    except DatabaseUnavailableError as error:
        _fail(str(error))

    try:
        await verify(conn, prefix)
    except SchemaError as error:
        await conn.close()
        _fail(str(error))
    return conn


def _filter_values(
    states: Sequence[str], queues: Sequence[str], worker_names: Sequence[str], job_ids: Sequence[int]
) -> tuple[list[Any] | None, ...]:
    return (
        list(states) or None,
        list(queues) or None,
        list(worker_names) or None,
        list(job_ids) or None,
    )


# Output


def _job(row: asyncpg.Record) -> Job:
    from .oban import job_from_row

    return job_from_row(row)


def _time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _table(found: list[Job]) -> str:
    header = ("ID", "STATE", "QUEUE", "WORKER", "ATTEMPT", "SCHEDULED_AT (UTC)")
    rows = [
        (str(job.id), str(job.state), job.queue, job.worker, f"{job.attempt}/{job.max_attempts}", _time(job.scheduled_at))
        for job in found
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows])


def _recorded(encoded: Any) -> str:
    """Return the value a `Record` stored in ``meta.return`` (base64 of an Erlang term), for reading."""
    try:
        return repr(erlang_term.decode_base64(encoded))
    except (TypeError, ValueError) as error:
        return f"(meta.return could not be decoded: {error})"


def _details(job: Job) -> str:
    lines = [
        f"id:           {job.id}",
        f"state:        {job.state}",
        f"queue:        {job.queue}",
        f"worker:       {job.worker}",
        f"attempt:      {job.attempt} of {job.max_attempts}",
        f"priority:     {job.priority}",
        f"tags:         {', '.join(job.tags) or '-'}",
        f"args:         {json.dumps(job.args)}",
        f"meta:         {json.dumps(job.meta)}",
    ]
    if isinstance(job.meta, dict) and job.meta.get("recorded") and "return" in job.meta:
        lines.append(f"recorded:     {_recorded(job.meta['return'])}")
    lines.append(f"attempted_by: {', '.join(job.attempted_by) or '-'}")
    for field in ("inserted_at", "scheduled_at", "attempted_at", "completed_at", "cancelled_at", "discarded_at"):
        value = getattr(job, field)
        if value is not None:
            lines.append(f"{field + ':':<14}{value.isoformat()}")

    lines.append(f"errors:       {len(job.errors)}")
    for error in job.errors:
        lines.append(f"  attempt {error.get('attempt')} at {error.get('at')}:")
        lines.extend(f"    {line}" for line in str(error.get("error", "")).splitlines())
    return "\n".join(lines)
