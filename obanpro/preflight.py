"""Checks run before a node forks: the database answers and holds the Oban tables."""

from __future__ import annotations

import asyncio
import socket

import asyncpg

from . import schema
from .db import CONNECT_TIMEOUT
from .dsn import describe_dsn


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
            f"cannot connect to PostgreSQL at {where}: no answer within {CONNECT_TIMEOUT:g} s"
        ) from None
    except asyncpg.InvalidPasswordError:
        raise DatabaseUnavailableError(f"cannot connect to PostgreSQL at {where}: password authentication failed") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise DatabaseUnavailableError(f"cannot connect to PostgreSQL at {where}: {error}") from None
    except ValueError as error:
        raise DatabaseUnavailableError(f"invalid DSN for {where}: {error}") from None


async def check(dsn: str, prefix: str) -> None:
    """Raise DatabaseUnavailableError or schema.SchemaError when the node cannot run."""
    conn = await connect(dsn)
    try:
        await schema.verify(conn, prefix)
    finally:
        await conn.close()
