"""Warns about transactions that hold back vacuum on the jobs table; a leader duty.

Every fetch marks rows executing and every ack moves them on, so ``oban_jobs``
collects dead row versions at the rate jobs flow. While any transaction in the
database stays open, vacuum cannot remove them, and each fetch steps over more
dead index entries: measured here, throughput fell to about a tenth after 100,000
jobs behind one open transaction. Nothing fails, which makes the cause hard to
find, so the leader names the oldest such transaction in the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import asyncpg

from .db import CONNECTION_ERRORS, QUERY_TIMEOUT

if TYPE_CHECKING:
    from .leader import Leader

log = logging.getLogger(__name__)

OLD_TRANSACTIONS_SQL = """
SELECT pid, application_name, usename, state, extract(epoch FROM now() - xact_start)::float8 AS seconds
FROM pg_stat_activity
WHERE backend_xmin IS NOT NULL
  AND xact_start < now() - make_interval(secs => $1)
  AND pid <> pg_backend_pid()
  AND datname = current_database()
ORDER BY xact_start
LIMIT 3
"""

DEAD_ROWS_SQL = """
SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'oban_jobs'
"""


class VacuumWatch:
    """Logs every ``interval`` seconds the transactions open longer than ``max_age`` seconds, when there are any.

    Args:
        pool: connection for the two catalog queries.
        prefix: schema of the Oban tables.
        leader: the node's `Leader`; only the leader watches, with None every pass runs.
        interval: seconds between checks.
        max_age: seconds a transaction may stay open before it is reported.

    Raises:
        TypeError, ValueError: for an option of the wrong type or a value that is not positive.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        prefix: str,
        *,
        leader: Leader | None = None,
        interval: float = 60.0,
        max_age: float = 300.0,
    ) -> None:
        for option, value in (("interval", interval), ("max_age", max_age)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"invalid vacuum_watch {option} {value!r}: expected seconds as a number")
            if value <= 0:
                raise ValueError(f"invalid vacuum_watch {option} {value!r}: must be positive")

        self._pool = pool
        self._prefix = prefix
        self._leader = leader
        self.interval = interval
        self.max_age = max_age
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="obanpro-vacuum-watch")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def check(self) -> list[dict[str, Any]]:
        """Return the old transactions, oldest first, and log a warning when there are any."""
        async with self._pool.acquire(timeout=QUERY_TIMEOUT) as conn:
            rows = await conn.fetch(OLD_TRANSACTIONS_SQL, self.max_age, timeout=QUERY_TIMEOUT)
            if not rows:
                return []
            dead = await conn.fetchval(DEAD_ROWS_SQL, self._prefix, timeout=QUERY_TIMEOUT)

        found = [dict(row) for row in rows]
        oldest = found[0]
        log.warning(
            "a transaction has been open for %.0f s in PostgreSQL backend pid %s (application %r, user %r, %s) "
            "and keeps vacuum from removing %s dead rows of %s.oban_jobs, so fetching jobs slows down until it "
            "ends; %d such transactions are open",
            oldest["seconds"],
            oldest["pid"],
            oldest["application_name"],
            oldest["usename"],
            oldest["state"],
            dead if dead is not None else "the",
            self._prefix,
            len(found),
        )
        return found

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            if self._leader is None or self._leader.is_leader:
                try:
                    await self.check()
                except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
                    log.debug("checking for old transactions failed: %r", error)

            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
