"""Checks run before a node forks: the database accepts connections and has the Oban tables."""

from __future__ import annotations

import asyncio
import logging
import socket

import asyncpg

from . import schema
from .db import CONNECT_TIMEOUT
from .dsn import describe_dsn

log = logging.getLogger(__name__)


class DatabaseUnavailableError(RuntimeError):
    """Raised when the database cannot be reached; the message shows where, never the password."""


async def connect(dsn: str) -> asyncpg.Connection:
    """Open one connection, turning every failure into DatabaseUnavailableError."""
    where = describe_dsn(dsn)
    try:
        return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    except (OSError, socket.gaierror) as error:
        reason = error.strerror or str(error)
        raise DatabaseUnavailableError(f"cannot connect to PostgreSQL at {where}: {reason}") from None
    except asyncio.TimeoutError:
        raise DatabaseUnavailableError(
            f"cannot connect to PostgreSQL at {where}: no response within {CONNECT_TIMEOUT:g} s"
        ) from None
    except asyncpg.InvalidPasswordError:
        raise DatabaseUnavailableError(f"cannot connect to PostgreSQL at {where}: password authentication failed") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise DatabaseUnavailableError(f"cannot connect to PostgreSQL at {where}: {error}") from None
    except ValueError as error:
        raise DatabaseUnavailableError(f"invalid DSN for {where}: {error}") from None


async def check(dsn: str, prefix: str, connections: int = 0) -> None:
    """Raise DatabaseUnavailableError or schema.SchemaError when the node cannot run.

    ``connections`` is how many connections the node will open. A warning is
    logged when the server has fewer free, because processes that cannot
    connect are restarted in a loop.
    """
    conn = await connect(dsn)
    try:
        await schema.verify(conn, prefix)
        if connections:
            await _check_connection_room(conn, dsn, connections)
    finally:
        await conn.close()


async def _check_connection_room(conn: asyncpg.Connection, dsn: str, needed: int) -> None:
    limit = int(await conn.fetchval("SHOW max_connections"))
    reserved = int(await conn.fetchval("SHOW superuser_reserved_connections"))
    in_use = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
    free = limit - reserved - in_use
    if needed > free:
        log.warning(
            "the node opens about %d connections but %s allows %d more (max_connections %d, %d in use): "
            "lower --processes or raise max_connections",
            needed,
            describe_dsn(dsn),
            max(free, 0),
            limit,
            in_use,
        )
