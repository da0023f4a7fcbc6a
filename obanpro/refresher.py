"""Producer rows: one ``oban_producers`` row per worker process and queue, with heartbeats.

Each worker process fetches with ``attempted_by = [node, producer uuid]``,
where the producer uuid is ``uuid5(worker uuid, queue)`` and the worker uuid is
in the process's record of the slot table. The refresher runs once per node
(in the duties process, or in the application for an embedded `Oban`), reads
the live workers from the table and writes their rows, so worker processes
spend no connections on it. The lifeline treats a job as orphaned only when its
producer's row is missing or stale.

Every ``poll_interval`` seconds the refresher compares the table with the rows
it last wrote. A worker that started, a queue that was added and a change of
limit or pause are written at once. Otherwise the rows are heartbeated every
``interval`` seconds. A worker that is gone has its rows deleted. A row that
someone else deleted, such as a leader's cleanup after a long pause, is
inserted again. The leader deletes rows of every node that were not heartbeated
for ``max_age`` seconds.

The refresher deletes only rows it wrote itself, so a second instance that
shares the node name, such as the previous run still draining, keeps its rows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg

from . import _core, queries, telemetry
from .db import CONNECTION_ERRORS, QUERY_TIMEOUT, Backoff, recover
from .rescue import producer_uuids

if TYPE_CHECKING:
    from .leader import Leader

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
DEFAULT_MAX_AGE = 60.0
"""Seconds without a heartbeat after which a producer row is stale, unless configured otherwise."""

ProducerRows = dict[str, tuple[str, dict[str, Any]]]
"""Producer uuid to (queue, meta)."""


def _positive(option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"invalid refresher {option} {value!r}: expected seconds as a number")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"invalid refresher {option} {value!r}: must be a positive number of seconds")
    return float(value)


def live_producers(table: _core.SlotTable) -> ProducerRows:
    """Return the producers of the table's live worker processes, with the meta of their rows.

    A queue counts while it runs, and a stopped queue while its slots still
    hold jobs, so those jobs keep a live producer until they finish.
    """
    queues = {}
    for queue, index in table.queues().items():
        if table.queue_state(index) == _core.QUEUE_RUNNING or table.running(index):
            queues[queue] = {"local_limit": table.limit(index), "paused": table.paused(index)}

    rows: ProducerRows = {}
    for index in range(table.max_workers):
        record = table.worker(index)
        if record["pid"] == 0:
            continue

        worker_uuid = uuid.UUID(bytes=record["uuid"])
        for queue, producer_uuid in zip(queues, producer_uuids(worker_uuid, queues)):
            meta = {**queues[queue], "pid": record["pid"], "process": index}
            rows[producer_uuid] = (queue, meta)

    return rows


class Refresher:
    """Writes and heartbeats the node's producer rows; the leader also removes stale ones.

    Args:
        pool: connections for the writes.
        prefix: schema of the Oban tables.
        name: Oban instance name, stored in each row.
        node: node name, stored in each row.
        table: the node's slot table.
        leader: the node's `Leader`, for the cleanup of stale rows; with None
            this refresher also cleans up.
        interval: seconds between heartbeats.
        max_age: seconds without a heartbeat after which a row is stale.

    Raises:
        TypeError, ValueError: for an option that is not a positive number, or
            an ``interval`` that is not below ``max_age``.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        prefix: str,
        *,
        name: str,
        node: str,
        table: _core.SlotTable,
        leader: Leader | None = None,
        interval: float = 15.0,
        max_age: float = DEFAULT_MAX_AGE,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.interval = _positive("interval", interval)
        self.max_age = _positive("max_age", max_age)
        self.poll_interval = _positive("poll_interval", poll_interval)
        if self.interval >= self.max_age:
            raise ValueError(
                f"invalid refresher interval {interval!r}: it must be below max_age {max_age!r}, "
                "or live producers' rows would count as stale between heartbeats"
            )

        self.name = name
        self.node = node
        self._pool = pool
        self._table = table
        self._leader = leader
        self._refresh_sql = queries.load("refresh_producers", prefix)
        self._delete_sql = queries.load("delete_producers", prefix)
        self._cleanup_sql = queries.load("cleanup_producers", prefix)
        self._written: ProducerRows = {}
        self._last_refresh = -math.inf
        self._last_cleanup = -math.inf
        self._task: asyncio.Task[None] | None = None

    @property
    def written(self) -> ProducerRows:
        """The rows this refresher wrote last, by producer uuid."""
        return dict(self._written)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="obanpro-refresher")

    async def stop(self) -> None:
        """Stop heartbeating and delete the rows this refresher wrote."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

        # A refresh cancelled mid-query may have stored rows it never recorded,
        # so the rows of the table's current producers go too.
        producers = set(self._written) | set(live_producers(self._table))
        if not producers:
            return

        try:
            await self._pool.execute(self._delete_sql, list(producers), timeout=QUERY_TIMEOUT)
            self._written = {}
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
            log.warning(
                "could not delete the producer rows of node %s: %r; the leader removes them after %.0f s",
                self.node,
                error,
                self.max_age,
            )

    async def refresh(self) -> dict[str, int]:
        """Write the rows of the live producers and delete those of gone ones; return the counts.

        The counts are ``refreshed_count`` (rows written), ``restored_count``
        (rows this refresher had written that were missing) and ``deleted_count``.
        """
        rows = live_producers(self._table)
        gone = [producer for producer in self._written if producer not in rows]

        with telemetry.span("oban.refresher.refresh", {}) as span:
            restored = 0
            if rows:
                uuids = list(rows)
                result = await self._pool.fetch(
                    self._refresh_sql,
                    self.name,
                    self.node,
                    uuids,
                    [rows[producer][0] for producer in uuids],
                    [json.dumps(rows[producer][1]) for producer in uuids],
                    timeout=QUERY_TIMEOUT,
                )
                restored = sum(1 for row in result if row["inserted"] and row["uuid"] in self._written)

            if gone:
                await self._pool.execute(self._delete_sql, gone, timeout=QUERY_TIMEOUT)

            counts = {"refreshed_count": len(rows), "restored_count": restored, "deleted_count": len(gone)}
            span.add(counts)

        if restored:
            log.warning("wrote %d producer rows of node %s again after they went missing", restored, self.node)

        self._written = rows
        self._last_refresh = time.monotonic()
        return counts

    async def cleanup(self) -> int:
        """Delete rows of any node not heartbeated for ``max_age`` seconds, when leading; return how many."""
        if self._leader is not None and not self._leader.is_leader:
            return 0

        with telemetry.span("oban.refresher.cleanup", {}) as span:
            status = await self._pool.execute(self._cleanup_sql, self.max_age, timeout=QUERY_TIMEOUT)
            deleted = int(status.rpartition(" ")[2])
            span.add({"cleanup_count": deleted})

        if deleted:
            log.info("deleted %d producer rows not heartbeated for %.0f s", deleted, self.max_age)
        self._last_cleanup = time.monotonic()
        return deleted

    def _due(self) -> bool:
        if time.monotonic() - self._last_refresh >= self.interval:
            return True
        return live_producers(self._table) != self._written

    async def _loop(self) -> None:
        backoff = Backoff(first=0.2, maximum=min(5.0, self.interval))

        while True:
            try:
                if self._due():
                    await self.refresh()
                if time.monotonic() - self._last_cleanup >= self.interval:
                    await self.cleanup()
                backoff.reset()
            except CONNECTION_ERRORS as error:
                log.warning("writing producer rows failed: %r; retrying in %.2f s", error, backoff.delay)
                recover(self._pool, error)
                await backoff.sleep()
                continue
            except Exception:
                log.exception("writing producer rows failed; retrying in %.2f s", backoff.delay)
                await backoff.sleep()
                continue

            await asyncio.sleep(self.poll_interval)
