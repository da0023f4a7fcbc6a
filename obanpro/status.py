"""``obanpro status``: the nodes running on this host, read from their slot tables, and job counts.

Processes and slots come from shared memory without asking the node anything,
so the command works while a node is busy or stuck. Job counts per queue and
state come from the database.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import click

from . import _core, queries, slots
from .config import Config
from .dsn import describe_dsn
from .refresher import DEFAULT_MAX_AGE as PRODUCER_MAX_AGE

WORKER_STATES = {
    _core.WORKER_EMPTY: "empty",
    _core.WORKER_STARTING: "starting",
    _core.WORKER_RUNNING: "running",
    _core.WORKER_DRAINING: "draining",
    _core.WORKER_EXITING: "exiting",
}


def snapshot(table: _core.SlotTable, segment_name: str) -> dict[str, Any]:
    """Return a node's processes and queues as plain data."""
    now_ns = time.time_ns()
    processes = []
    for index in range(table.max_workers):
        record = table.worker(index)
        if not record["pid"]:
            continue
        processes.append(
            {
                "index": index,
                "pid": record["pid"],
                "state": WORKER_STATES.get(record["state"], str(record["state"])),
                "uptime": round((now_ns - record["started_at_ns"]) / 1e9, 1),
                "jobs_run": record["jobs_run"],
                "rss_mb": round(record["rss_bytes"] / 1048576, 1),
                "cpu_busy": record["cpu_busy"],
            }
        )

    queues = []
    for name, index in table.queues().items():
        free, used, _enabled = table.counts(index)
        queues.append(
            {
                "queue": name,
                "limit": table.limit(index),
                "running": used,
                "free": free,
                "paused": table.paused(index),
                "stopped": table.queue_state(index) == _core.QUEUE_STOPPED,
                "jobs": sorted(entry["job_id"] for entry in table.running(index) if entry["job_id"]),
            }
        )

    return {
        "node": table.node,
        "prefix": table.prefix,
        "supervisor_pid": table.supervisor_pid,
        "segment": segment_name,
        "uptime": round((now_ns - table.created_at_ns) / 1e9, 1),
        "stopping": table.stopping,
        "processes": processes,
        "queues": queues,
    }


async def job_counts(dsn: str, prefix: str) -> dict[str, dict[str, int]]:
    counts, _orphans = await _job_report(dsn, prefix)
    return counts


async def _job_report(dsn: str, prefix: str) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Return the job counts per queue and state, and per node the executing jobs that no live producer runs."""
    from .preflight import connect

    conn = await connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT queue, state::text, count(*) FROM {prefix}.oban_jobs GROUP BY 1, 2 ORDER BY 1, 2")
        orphans = await conn.fetch(queries.load("count_orphaned_jobs", prefix), PRODUCER_MAX_AGE)
    finally:
        await conn.close()

    counts: dict[str, dict[str, int]] = {}
    for queue, state, count in rows:
        counts.setdefault(queue, {})[state] = count
    return counts, {row["node"]: row["count"] for row in orphans}


def show(config: Config, *, data_dir: str | None, node: str | None, as_json: bool) -> int:
    """Print the status; return the exit code (0, or 1 when no node runs here)."""
    nodes = []
    for segment in slots.live_segments():
        if node is None or segment.table.node == node:
            nodes.append(snapshot(segment.table, segment.name))
        segment.close()

    report: dict[str, Any] = {"nodes": nodes, "prefix": config.prefix}
    report.update(_database_part(config, data_dir))

    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_text(report)

    return 0 if nodes else 1


def _database_part(config: Config, data_dir: str | None) -> dict[str, Any]:
    from .embedded import EmbeddedPostgresError, resolve_dsn
    from .preflight import DatabaseUnavailableError

    try:
        dsn, server = resolve_dsn(config.dsn, data_dir=data_dir)
    except EmbeddedPostgresError as error:
        return {"database": None, "jobs": None, "database_error": str(error)}

    try:
        counts, orphans = asyncio.run(_job_report(dsn, config.prefix))
        return {"database": describe_dsn(dsn), "jobs": counts, "orphaned": orphans}
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        return {
            "database": describe_dsn(dsn),
            "jobs": None,
            "database_error": f"schema {config.prefix} has no Oban tables; create them with "
            f"`obanpro install --prefix {config.prefix}`",
        }
    except (DatabaseUnavailableError, OSError) as error:
        return {"database": describe_dsn(dsn), "jobs": None, "database_error": str(error)}
    except Exception as error:  # noqa: BLE001 - status still shows the processes when the query fails
        return {"database": describe_dsn(dsn), "jobs": None, "database_error": f"counting jobs failed: {error}"}
    finally:
        if server is not None:
            server.stop()


def _print_text(report: dict[str, Any]) -> None:
    if not report["nodes"]:
        click.echo("no obanpro node is running on this host")

    for node in report["nodes"]:
        state = " (stopping)" if node["stopping"] else ""
        click.echo(
            f"node {node['node']}{state}: supervisor pid {node['supervisor_pid']}, schema {node['prefix']}, "
            f"up {node['uptime']:.0f} s"
        )
        click.echo(f"  {'process':>7} {'pid':>8} {'state':<9} {'uptime s':>9} {'jobs run':>9} {'RSS MB':>7}")
        for process in node["processes"]:
            click.echo(
                f"  {process['index']:>7} {process['pid']:>8} {process['state']:<9} {process['uptime']:>9.0f} "
                f"{process['jobs_run']:>9} {process['rss_mb']:>7.1f}"
            )
        click.echo(f"  {'queue':<20} {'running':>7} {'limit':>6}  state")
        for queue in node["queues"]:
            flags = "running"
            if queue["paused"]:
                flags = "paused"
            if queue["stopped"]:
                flags = "stopped"
            click.echo(f"  {queue['queue']:<20} {queue['running']:>7} {queue['limit']:>6}  {flags}")

    if report.get("jobs") is not None:
        click.echo(f"jobs in {report['database']} (schema {report['prefix']}):")
        if not report["jobs"]:
            click.echo("  none")
        for queue, states in report["jobs"].items():
            click.echo(f"  {queue:<20} " + ", ".join(f"{state} {count}" for state, count in states.items()))
        for node, count in report.get("orphaned", {}).items():
            click.echo(
                f"{count} executing {'job' if count == 1 else 'jobs'} of node {node} {'has' if count == 1 else 'have'} "
                "had no live producer "
                f"for {PRODUCER_MAX_AGE:.0f} s: the node stopped without storing their results. The next "
                f"`obanpro start --node {node}` rescues them at once; otherwise the leader's lifeline makes "
                "them retryable after its rescue_after (300 s by default)."
            )
    elif report.get("database_error"):
        click.echo(f"job counts unavailable: {report['database_error']}")
