"""Installing, removing and checking the Oban tables in a schema (the prefix)."""

from __future__ import annotations

from typing import Any

import asyncpg

from . import queries

REQUIRED_TABLES = ("oban_jobs", "oban_leaders", "oban_producers")


class SchemaError(RuntimeError):
    """Raised when the Oban tables are missing or unusable; the message says how to fix it."""


def install_sql(prefix: str = "public") -> str:
    """Return the idempotent SQL that creates the tables, for migration tools (Alembic, Django)."""
    return queries.load("install", prefix)


def uninstall_sql(prefix: str = "public") -> str:
    """Return the SQL that drops the tables and the state enum."""
    return queries.load("uninstall", prefix)


async def install(executor: asyncpg.Connection | asyncpg.Pool, prefix: str = "public") -> None:
    """Create the schema, the enum, the tables and the indexes that are missing; leave the rest as it is."""
    await executor.execute(install_sql(prefix))


async def uninstall(executor: asyncpg.Connection | asyncpg.Pool, prefix: str = "public") -> None:
    """Drop the Oban tables, and the schema too when it is not ``public`` and nothing else is left in it."""
    await executor.execute(uninstall_sql(prefix))

    if prefix != "public":
        leftover = await executor.fetchval(
            """
            SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1
            """,
            prefix,
        )
        types = await executor.fetchval(
            "SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = $1",
            prefix,
        )
        if leftover == 0 and types == 0:
            await executor.execute(f"DROP SCHEMA IF EXISTS {queries.check_prefix(prefix)}")


async def missing_tables(executor: Any, prefix: str) -> list[str]:
    rows = await executor.fetch(queries.load("verify_structure", prefix), prefix)
    present = {row[0] for row in rows}
    return [table for table in REQUIRED_TABLES if table not in present]


async def verify(executor: Any, prefix: str) -> None:
    """Raise SchemaError naming ``obanpro install`` when tables are missing from ``prefix``."""
    missing = await missing_tables(executor, prefix)
    if missing:
        raise SchemaError(
            f"the Oban tables {', '.join(missing)} are missing from schema {prefix!r}; "
            f"run `obanpro install --prefix {prefix}` with the same database first"
        )
