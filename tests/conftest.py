"""Fixtures: a real PostgreSQL (``OBAN_DSN`` or an embedded server), a schema per test, nodes as subprocesses."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from obanpro import schema
from obanpro.oban import Oban

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The database every test uses: OBAN_DSN when set, else a throwaway embedded server."""
    configured = os.environ.get("OBAN_DSN")
    if configured:
        yield configured
        return

    from obanpro.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"), throwaway=True, max_connections=300)
    yield server.ensure_running()
    server.stop()


@pytest.fixture
async def prefix(dsn: str) -> AsyncIterator[str]:
    """A fresh schema with the Oban tables, dropped after the test."""
    name = f"t_{secrets.token_hex(5)}"
    conn = await asyncpg.connect(dsn)
    try:
        await schema.install(conn, name)
    finally:
        await conn.close()

    yield name

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(dsn)
    yield connection
    await connection.close()


@pytest.fixture
async def oban(dsn: str, prefix: str) -> AsyncIterator[Oban]:
    """A started Oban without queues, for enqueueing."""
    instance = Oban(dsn=dsn, prefix=prefix, pool_min_size=1, pool_max_size=4)
    await instance.start()
    yield instance
    await instance.stop()


async def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``condition`` (sync or async) until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        await asyncio.sleep(interval)


async def job_states(conn: asyncpg.Connection, prefix: str) -> dict[str, int]:
    rows = await conn.fetch(f"SELECT state::text, count(*) FROM {prefix}.oban_jobs GROUP BY 1")
    return {row[0]: row[1] for row in rows}


class Node:
    """An ``obanpro start`` subprocess with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "obanpro", *args],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def stop(self, timeout: float = 30.0) -> int:
        """Send SIGTERM and wait; return the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.flush()

    def kill(self) -> None:
        """SIGKILL the supervisor and every process it forked, by their group."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def children(self) -> list[int]:
        """Return the pids of the supervisor's direct children."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(pid) for pid in path.read_text().split()]
        except OSError:
            return []


@pytest.fixture
def start_node(dsn: str, prefix: str, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start ``obanpro start`` nodes on the test's schema; every node is killed at teardown."""
    nodes: list[Node] = []

    def start(*args: str, env: dict[str, str] | None = None, prefix_override: str | None = None) -> Node:
        environment = {
            **os.environ,
            "OBAN_DSN": dsn,
            "OBAN_PREFIX": prefix_override or prefix,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        node = Node(list(args), environment, tmp_path / f"node-{len(nodes)}.log")
        nodes.append(node)
        return node

    yield start

    for node in nodes:
        if node.process.poll() is None:
            node.kill()
