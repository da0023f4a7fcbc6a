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
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InternalClientError,
)
"""Errors after which the same query may succeed on a fresh connection: a restart,
a terminated backend, a failover that left the old primary read-only.

A rejected login (a changed password, pg_hba.conf) and a missing database only
arise when the pool opens a connection, never from the query, so they too are
retried instead of counting as a rejected statement.

asyncpg 0.32 raises InternalClientError ("cannot switch to state 12; another
operation (2) is in progress") for a query sent on a pooled connection whose
backend was terminated while the connection sat idle, before the pool noticed
the closed socket."""

CONNECT_TIMEOUT = 10.0
QUERY_TIMEOUT = 30.0


_sleeping: set[asyncio.Future[None]] = set()
"""Futures of the `Backoff.sleep` calls in progress in this process, for `wake_retries`."""

_expiring: set[asyncio.Task[None]] = set()
"""Tasks started by `recover`, kept referenced until they finish."""


class Backoff:
    """Jittered exponential delays for retry loops: ``await backoff.sleep()``, ``backoff.reset()``.

    A sleep ends early when `wake_retries` is called, so every retry loop of a
    process tries again as soon as one of its connections reaches the database.
    """

    def __init__(self, first: float = 0.05, maximum: float = 5.0) -> None:
        self._first = first
        self._maximum = maximum
        self.delay = first

    def reset(self) -> None:
        self.delay = self._first

    async def sleep(self) -> None:
        loop = asyncio.get_running_loop()
        woken = loop.create_future()
        timer = loop.call_later(self.delay, _resolve, woken)
        _sleeping.add(woken)
        try:
            await woken
        finally:
            timer.cancel()
            _sleeping.discard(woken)
        self.delay = min(self.delay * 2, self._maximum) * (0.75 + random.random() / 2)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def wake_retries() -> None:
    """End every `Backoff.sleep` in progress in this process, on whichever loop it runs."""
    for future in list(_sleeping):
        try:
            future.get_loop().call_soon_threadsafe(_resolve, future)
        except RuntimeError:
            _sleeping.discard(future)  # its loop was closed without finishing the sleep


def recover(pool: asyncpg.Pool, error: BaseException) -> None:
    """Drop a pool's connections after an error that makes them unfit for reuse.

    Such errors come from a server that turned read-only or is shutting down,
    or from a connection whose protocol state asyncpg cannot continue from. The
    connections close when they are next released or acquired, so the retry
    that follows opens new ones.
    """
    if isinstance(error, (asyncpg.ReadOnlySQLTransactionError, asyncpg.OperatorInterventionError, asyncpg.InternalClientError)):
        # Pool.expire_connections is a coroutine in asyncpg 0.32; it must run to take effect.
        task = asyncio.get_running_loop().create_task(pool.expire_connections())
        _expiring.add(task)
        task.add_done_callback(_expiring.discard)


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on release, which costs a round trip per query."""


def session_settings(application_name: str, **settings: str) -> dict[str, str]:
    """Return server settings that name the connection in ``pg_stat_activity``."""
    # PostgreSQL keeps the first 63 bytes of an application name.
    return {"application_name": application_name[:63], **settings}


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    internal: bool = False,
    application_name: str | None = None,
    **kwargs: Any,
) -> asyncpg.Pool:
    """Open an asyncpg pool whose connections are closed after 10 idle minutes.

    ``internal`` pools serve obanpro's own queries, which change no session
    state, so releasing a connection skips the reset round trip. Pools that
    job code uses keep asyncpg's reset. ``application_name`` shows in
    ``pg_stat_activity``, so an operator can tell which process holds a connection.
    """
    if internal:
        kwargs["reset"] = _keep_session
    if application_name:
        kwargs["server_settings"] = session_settings(application_name, **kwargs.get("server_settings", {}))

    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=CONNECT_TIMEOUT,
        max_inactive_connection_lifetime=600.0,
        max_queries=1_000_000,
        **kwargs,
    )
