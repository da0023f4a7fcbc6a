"""A node on the embedded PostgreSQL keeps it running when the process that started it exits."""

from __future__ import annotations

import asyncpg
import pytest

from obanpro import schema
from obanpro.embedded import EmbeddedPostgres
from obanpro.oban import Oban

from . import workers
from .conftest import wait_for


@pytest.mark.slow
async def test_node_restarts_embedded_server(start_node, tmp_path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg", throwaway=True)
    dsn = server.ensure_running()
    conn = await asyncpg.connect(dsn)
    await schema.install(conn, "public")
    await conn.close()

    node = start_node(
        "start", "--import", "tests.workers", "-q", "default:2", "-p", "1", "--prefix", "public",
        "--data-dir", str(tmp_path / "pg"),
        env={"OBAN_DSN": ""},
    )
    await wait_for(lambda: "starting 1 worker processes" in node.output(), timeout=20)

    # The test process owns the server, as a script that enqueued jobs would; it goes away.
    first_pid = server.postmaster_pid
    server.stop()

    await wait_for(lambda: "the embedded PostgreSQL had stopped" in node.output(), timeout=20)
    async with Oban(dsn=dsn) as oban:
        job = await workers.Noop.enqueue()

        async def completed() -> bool:
            return await oban.pool.fetchval("SELECT state::text FROM oban_jobs WHERE id = $1", job.id) == "completed"

        await wait_for(completed, timeout=20)

    assert f"postmaster pid {first_pid}" in node.output()
    assert node.stop() == 0
