"""Connections: pool creation, the errors worth retrying, and retry delays."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.TooManyConnectionsError,
)
"""Errors after which the same query may succeed on a fresh connection: a restart,
a terminated backend, a failover that left the old primary read-only."""

CONNECT_TIMEOUT = 10.0
QUERY_TIMEOUT = 30.0


class Backoff:
    """Jittered exponential delays for retry loops: ``await backoff.sleep()``, ``backoff.reset()``."""

    def __init__(self, first: float = 0.05, maximum: float = 5.0) -> None:
        self._first = first
        self._maximum = maximum
        self.delay = first

    def reset(self) -> None:
        self.delay = self._first

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self._maximum) * (0.75 + random.random() / 2)


def recover(pool: asyncpg.Pool, error: BaseException) -> None:
    """Drop a pool's connections after an error that says they point at the wrong server."""
    if isinstance(error, (asyncpg.ReadOnlySQLTransactionError, asyncpg.OperatorInterventionError)):
        pool.expire_connections()


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on release, which costs a round trip per query."""


async def create_pool(dsn: str, *, min_size: int, max_size: int, internal: bool = False, **kwargs: Any) -> asyncpg.Pool:
    """Open an asyncpg pool whose connections are closed after 10 idle minutes.

    ``internal`` pools serve obanpro's own queries, which change no session
    state, so releasing a connection skips the reset round trip. Pools that
    job code uses keep asyncpg's reset.
    """
    if internal:
        kwargs["reset"] = _keep_session

    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=CONNECT_TIMEOUT,
        max_inactive_connection_lifetime=600.0,
        max_queries=1_000_000,
        **kwargs,
    )
