"""The warning about transactions that keep vacuum from cleaning the jobs table."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from obanpro.db import create_pool
from obanpro.vacuum_watch import VacuumWatch

from .conftest import wait_for


@pytest.fixture
async def pool(dsn: str):
    opened = await create_pool(dsn, min_size=1, max_size=2, internal=True)
    yield opened
    await opened.close()


async def test_old_transaction_is_named(dsn: str, prefix: str, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture) -> None:
    holder = await asyncpg.connect(dsn, server_settings={"application_name": "long report"})
    transaction = holder.transaction(isolation="repeatable_read")
    await transaction.start()
    await holder.fetchval("SELECT 1")
    backend = holder.get_server_pid()
    watch = VacuumWatch(pool, prefix, max_age=0.2)

    try:
        with caplog.at_level(logging.WARNING, logger="obanpro.vacuum_watch"):
            found = await wait_for(lambda: _holding(watch, backend), timeout=10)
    finally:
        await transaction.rollback()
        await holder.close()

    assert found["application_name"] == "long report"
    assert found["seconds"] >= 0.2
    assert f"PostgreSQL backend pid {backend}" in caplog.text
    assert f"{prefix}.oban_jobs" in caplog.text


async def _holding(watch: VacuumWatch, backend: int) -> dict | None:
    for row in await watch.check():
        if row["pid"] == backend:
            return row
    return None


async def test_short_transactions_pass_silently(prefix: str, pool: asyncpg.Pool) -> None:
    watch = VacuumWatch(pool, prefix, max_age=3600)

    assert await watch.check() == []


@pytest.mark.parametrize(("options", "error"), [({"max_age": 0}, ValueError), ({"interval": "1"}, TypeError)])
def test_bad_settings_are_named(options: dict, error: type[Exception]) -> None:
    with pytest.raises(error, match="invalid vacuum_watch"):
        VacuumWatch(None, "public", **options)
