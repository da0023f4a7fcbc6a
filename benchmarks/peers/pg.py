"""A tiny PostgreSQL helper over asyncpg or psycopg 3, whichever the tool's venv has."""

from __future__ import annotations


class Connection:
    """``val`` returns the first column of the first row; ``run`` executes a statement (autocommit)."""

    def __init__(self, raw, kind: str) -> None:
        self.raw = raw
        self.kind = kind

    async def val(self, sql: str):
        if self.kind == "asyncpg":
            return await self.raw.fetchval(sql)
        cursor = await self.raw.execute(sql)
        row = await cursor.fetchone()
        return None if row is None else row[0]

    async def run(self, sql: str) -> None:
        await self.raw.execute(sql)

    async def close(self) -> None:
        await self.raw.close()


async def connect(dsn: str) -> Connection:
    try:
        import asyncpg
    except ImportError:
        import psycopg

        return Connection(
            await psycopg.AsyncConnection.connect(dsn, autocommit=True), "psycopg"
        )
    return Connection(await asyncpg.connect(dsn), "asyncpg")


async def ensure_database(server: str, name: str) -> str:
    """Create database ``name`` on ``server`` (a DSN without a database) unless it exists; return its DSN."""
    if not name.startswith("bench_"):
        raise ValueError(
            f"refusing to manage database {name!r}: benchmark databases are named bench_<tool>"
        )
    admin = await connect(f"{server.rstrip('/')}/postgres")
    try:
        exists = await admin.val(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
        if not exists:
            await admin.run(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return f"{server.rstrip('/')}/{name}"
