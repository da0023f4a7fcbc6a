"""Helpers for the fault benchmarks: a private PostgreSQL, a node subprocess, /proc readings."""

from __future__ import annotations

import os
import platform
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from obanpro import schema
from obanpro.dsn import describe_dsn

ROOT = Path(__file__).resolve().parents[2]
_PAGE_SIZE = resource.getpagesize()


class Database:
    """The PostgreSQL a benchmark runs against: ``--dsn`` when given, else a throwaway embedded server."""

    def __init__(self, dsn: str | None) -> None:
        self._given = dsn
        self._server = None
        self._directory: tempfile.TemporaryDirectory | None = None
        self.dsn = ""

    def start(self) -> str:
        if self._given:
            self.dsn = self._given
            return self.dsn

        from obanpro.embedded import EmbeddedPostgres

        self._directory = tempfile.TemporaryDirectory(prefix="obanpro-faults-")
        self._server = EmbeddedPostgres(self._directory.name, throwaway=True, max_connections=100)
        self.dsn = self._server.ensure_running()
        return self.dsn

    async def tune(self, settings: dict[str, str]) -> None:
        """Apply ``settings`` with ALTER SYSTEM on the embedded server; a server given with --dsn is left as it is."""
        if self._server is None:
            return

        conn = await asyncpg.connect(self.dsn)
        try:
            for name, value in settings.items():
                await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()

    async def settings(self, names: list[str]) -> dict[str, str]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return {name: await conn.fetchval(f"SHOW {name}") for name in names}
        finally:
            await conn.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        if self._directory is not None:
            self._directory.cleanup()

    def describe(self) -> str:
        if self._server is not None:
            return f"embedded throwaway PostgreSQL (fsync off) at {describe_dsn(self.dsn)}"
        return describe_dsn(self.dsn)


async def new_schema(dsn: str, label: str) -> str:
    """Install the Oban tables in a new schema named after ``label``; return the schema name."""
    prefix = f"bench_{label}_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(dsn)
    try:
        await schema.install(conn, prefix)
    finally:
        await conn.close()
    return prefix


async def drop_schema(dsn: str, prefix: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {prefix} CASCADE")
    finally:
        await conn.close()


class Node:
    """An ``obanpro start`` subprocess running the benchmark workers, with its output in a log file."""

    def __init__(self, dsn: str, prefix: str, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        environment = {
            **os.environ,
            "OBAN_DSN": dsn,
            "OBAN_PREFIX": prefix,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "obanpro", "start", "--import", "benchmarks.faults.workloads", *args],
            cwd=ROOT,
            env=environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[int]:
        """Return the pids of the supervisor's children: the duties process and the workers."""
        try:
            return [int(pid) for pid in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()]
        except OSError:
            return []

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            return self.process.wait(10)
        finally:
            self._log.close()


def rss_bytes(pid: int) -> int | None:
    """Return the resident set size of ``pid`` in bytes, or None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def open_files(pid: int) -> int | None:
    """Return the number of open file descriptors of ``pid``, or None when it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}"


def wait_until(condition, timeout: float, interval: float = 0.2) -> bool:
    """Poll a synchronous ``condition`` until it is true or ``timeout`` seconds pass; return whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False
