"""Bad input: malformed rows, huge and unserialisable args, unknown workers, secrets and untrusted data."""

from __future__ import annotations

import base64
import json
import os
import pickle
import stat
import subprocess
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from obanpro import erlang_term, schema, slots
from obanpro.embedded import EmbeddedPostgres
from obanpro.oban import Oban

from . import workers
from .conftest import ROOT, Node, job_states, wait_for


async def _row(conn: asyncpg.Connection, prefix: str, job_id: int) -> asyncpg.Record:
    return await conn.fetchrow(
        f"SELECT state::text, attempt, errors, meta, attempted_by FROM {prefix}.oban_jobs WHERE id = $1", job_id
    )


async def _settled(conn: asyncpg.Connection, prefix: str, job_id: int, states: tuple[str, ...], timeout: float = 20) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        row = await _row(conn, prefix, job_id)
        return row if row["state"] in states else None

    return await wait_for(check, timeout=timeout)


async def _insert(conn: asyncpg.Connection, prefix: str, worker: str, args: str = "{}", meta: str = "{}", queue: str = "default") -> int:
    """Insert a row as another program might, without obanpro's checks or notification."""
    return await conn.fetchval(
        f"INSERT INTO {prefix}.oban_jobs (worker, queue, args, meta) VALUES ($1, $2, $3::jsonb, $4::jsonb) RETURNING id",
        worker,
        queue,
        args,
        meta,
    )


def _recorded(row: asyncpg.Record) -> object:
    return erlang_term.decode_base64(json.loads(row["meta"])["return"])


# Bad args rows


async def test_non_object_args_fail_without_harm(start_node, conn: asyncpg.Connection, prefix: str) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:4", "-p", "1")
    bad = {
        "list": await _insert(conn, prefix, "tests.workers.Noop", "[1, 2]"),
        "str": await _insert(conn, prefix, "tests.workers.Noop", '"text"'),
        "NoneType": await _insert(conn, prefix, "tests.workers.Noop", "null"),
        "int": await _insert(conn, prefix, "tests.workers.SyncNoop", "42"),
    }
    odd_meta = [
        await _insert(conn, prefix, "tests.workers.Noop", meta="[]"),
        await _insert(conn, prefix, "tests.workers.Noop", meta="null"),
    ]
    good = await _insert(conn, prefix, "tests.workers.Noop")

    for kind, job_id in bad.items():
        row = await _settled(conn, prefix, job_id, ("discarded",))
        errors = json.loads(row["errors"])
        assert row["attempt"] == 1
        assert len(errors) == 1
        assert f"invalid args for job {job_id}: expected a JSON object, got {kind}" in errors[0]["error"]
    for job_id in [*odd_meta, good]:
        await _settled(conn, prefix, job_id, ("completed",))

    output = node.output()
    assert "crashed" not in output
    assert "restarting" not in output
    assert node.stop() == 0


# Huge args


async def test_megabyte_args_run_and_notify_small(
    start_node, oban: Oban, conn: asyncpg.Connection, dsn: str, prefix: str
) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:4", "-p", "1")
    payloads: list[str] = []
    listener = await asyncpg.connect(dsn)
    await listener.add_listener(f"{prefix}.oban_insert", lambda *message: payloads.append(message[3]))
    try:
        big = {"blob": "x" * (3 * 1024 * 1024), "rows": [{"id": index, "tags": ["a", "b"]} for index in range(20_000)]}
        job = await workers.EchoArgs.enqueue(big)
        many = await oban.enqueue_many([workers.EchoArgs.new({"blob": "y" * 200_000, "i": index}) for index in range(20)])

        row = await _settled(conn, prefix, job.id, ("completed",), timeout=60)
        for other in many:
            await _settled(conn, prefix, other.id, ("completed",), timeout=60)
        await wait_for(lambda: len(payloads) >= 2, timeout=10)
    finally:
        await listener.close()

    recorded = _recorded(row)
    expected = json.dumps(big, sort_keys=True, separators=(",", ":"))
    assert recorded["size"] == len(expected)
    assert recorded["types"] == {"blob": "str", "rows": "list"}
    assert all(json.loads(payload) == {"queue": "default"} for payload in payloads)
    assert node.stop() == 0


# Args that JSON cannot hold


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"when": datetime(2026, 1, 1)}, "args['when'] (datetime is not JSON-serialisable)"),
        ({"ids": {1, 2}}, "args['ids'] (set is not JSON-serialisable)"),
        ({"raw": b"\x00\x01"}, "args['raw'] (bytes is not JSON-serialisable)"),
        ({"price": Decimal("1.10")}, "args['price'] (Decimal is not JSON-serialisable)"),
        ({"ratio": float("nan")}, "args['ratio'] (nan is not valid JSON)"),
        ({"nested": {"deep": [1, {"x": float("inf")}]}}, "args['nested']['deep'][1]['x'] (inf is not valid JSON)"),
        ({"by_id": {1: "one"}}, "args['by_id'][1] (keys must be strings)"),
        ({"handle": object()}, "args['handle'] (object is not JSON-serialisable)"),
    ],
)
async def test_unserialisable_args_rejected_at_enqueue(oban: Oban, conn: asyncpg.Connection, prefix: str, args: dict, named: str) -> None:
    good = workers.Noop.new({"ok": True})

    with pytest.raises(ValueError) as raised:
        await oban.enqueue_many([good, workers.Noop.new(args)])

    assert named in str(raised.value)
    assert await job_states(conn, prefix) == {}
    assert (await oban.enqueue(workers.Noop.new({"ok": True}))).id is not None


@pytest.mark.parametrize("text", ["nul \x00 inside", "lone \ud800 surrogate"])
async def test_args_jsonb_rejects_are_value_errors(oban: Oban, conn: asyncpg.Connection, prefix: str, text: str) -> None:
    with pytest.raises(ValueError, match=r"args\['note'\]"):
        await oban.enqueue(workers.Noop.new({"note": text}))
    assert await job_states(conn, prefix) == {}


# Unknown workers in a rolling deploy

OLD_RELEASE = '''
from obanpro import worker


@worker(queue="default")
class Existing:
    async def process(self, job):
        return None
'''

NEW_RELEASE = OLD_RELEASE + '''

@worker(queue="default")
class Report:
    async def process(self, job):
        return None
'''


@pytest.mark.slow
async def test_unknown_worker_waits_for_new_release(start_node, conn: asyncpg.Connection, prefix: str, tmp_path: Path) -> None:
    for release, source in (("old", OLD_RELEASE), ("new", NEW_RELEASE)):
        (tmp_path / release).mkdir()
        (tmp_path / release / "deploy_app.py").write_text(source)

    def release_node(release: str) -> Node:
        return start_node(
            "start", "--import", "deploy_app", "--import", "tests.workers", "-q", "default:3", "-p", "1", "--node", release,
            env={"PYTHONPATH": f"{ROOT}:{tmp_path / release}"},
        )

    old = release_node("old")
    report = await _insert(conn, prefix, "deploy_app.Report")
    others = [await _insert(conn, prefix, "deploy_app.Existing") for _ in range(5)]

    row = await _settled(conn, prefix, report, ("retryable",))
    assert "unknown worker 'deploy_app.Report'" in json.loads(row["errors"])[0]["error"]
    for job_id in others:
        await _settled(conn, prefix, job_id, ("completed",))

    # The new release joins while the old one still runs; the retry lands on either until the new one takes it.
    new = release_node("new")
    await wait_for(lambda: "new" in new.output() and "starting" in new.output(), timeout=20)
    for attempt in range(2, 17):
        await conn.execute(f"UPDATE {prefix}.oban_jobs SET scheduled_at = timezone('UTC', now()) WHERE id = $1", report)
        row = await wait_for(lambda attempt=attempt: _attempt_finished(conn, prefix, report, attempt), timeout=20)
        if row["state"] == "completed":
            break

    assert row["state"] == "completed"
    assert row["attempted_by"][0] == "new"
    errors = json.loads(row["errors"])
    assert all("unknown worker 'deploy_app.Report'" in entry["error"] for entry in errors)
    assert row["attempt"] == len(errors) + 1
    later = await _insert(conn, prefix, "deploy_app.Existing")
    await _settled(conn, prefix, later, ("completed",))
    assert old.stop() == 0
    assert new.stop() == 0


async def _attempt_finished(conn: asyncpg.Connection, prefix: str, job_id: int, attempt: int) -> asyncpg.Record | None:
    row = await _row(conn, prefix, job_id)
    return row if row["attempt"] == attempt and row["state"] in ("retryable", "completed") else None


# Security


async def test_dsn_password_never_shown(start_node, prefix: str, tmp_path: Path) -> None:
    password = "Sup3r-Secret-Pw"
    server = EmbeddedPostgres(tmp_path / "pg", throwaway=True)
    plain = server.ensure_running()
    try:
        conn = await asyncpg.connect(plain)
        try:
            await schema.install(conn, prefix)
            await conn.execute(f"ALTER ROLE postgres PASSWORD '{password}'")
        finally:
            await conn.close()

        # The embedded server trusts its owner on the socket, so the password only travels in the DSN.
        secret_dsn = plain.replace("postgresql://postgres@", f"postgresql://postgres:{password}@", 1)
        node = start_node("start", "--import", "tests.workers", "-q", "default:2", "-p", "1", "--log-level", "DEBUG",
                          env={"OBAN_DSN": secret_dsn})
        oban = Oban(dsn=secret_dsn, prefix=prefix)
        await oban.start()
        try:
            job = await oban.enqueue(workers.Fail.new({"note": "to log an error"}))
            conn = await asyncpg.connect(plain)
            await _settled(conn, prefix, job.id, ("retryable",))
            await conn.close()

            server.stop()
            await wait_for(lambda: "LISTEN connection to" in node.output(), timeout=20)
            server.ensure_running()
            await wait_for(lambda: "re-established" in node.output(), timeout=20)
            status = _cli("status", "--json", "--dsn", secret_dsn, "--prefix", prefix)
        finally:
            await oban.stop()

        node.stop()
        outputs = {
            "node log": node.output(),
            "status": status.stdout + status.stderr,
            "dry run": _cli("start", "--dry-run", "-q", "default:1", "--dsn", secret_dsn).stdout,
            "refused": _joined(_cli("status", "--dsn", secret_dsn.replace("port=54329", "port=1"), "--prefix", prefix)),
            "bad port": _joined(_cli("status", "--dsn", f"postgresql://u:{password}@localhost:notaport/db")),
            "keyword form": _joined(_cli("status", "--dsn", f"host=/nonexistent user=u password={password} dbname=db")),
            "raw at sign": _joined(_cli("status", "--dsn", f"postgresql://u:{password}@x@localhost:1/db")),
        }
        conn = await asyncpg.connect(plain)
        outputs["job errors"] = await conn.fetchval(f"SELECT errors::text FROM {prefix}.oban_jobs WHERE id = $1", job.id)
        await conn.close()
    finally:
        server.stop()

    assert "database" in status.stdout
    for where, text in outputs.items():
        assert password not in text, f"the password appears in the {where}"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "obanpro", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "OBAN_DSN": "", "PYTHONPATH": str(ROOT)},
    )


def _joined(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


async def test_slot_table_and_socket_are_private(start_node, tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        node = start_node("start", "--import", "tests.workers", "-q", "default:1", "-p", "1")
        server = EmbeddedPostgres(tmp_path / "pg", throwaway=True)
        server.ensure_running()
    finally:
        os.umask(previous)

    try:
        names = await wait_for(lambda: [name for name in slots.segment_names() if f".{node.pid}." in name], timeout=20)
        segment = slots.SHM_DIR / names[0].lstrip("/")
        assert stat.S_IMODE(segment.stat().st_mode) == 0o600
        assert segment.stat().st_uid == os.getuid()

        assert stat.S_IMODE(server.socket_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
        sockets = [path for path in server.socket_dir.iterdir() if path.is_socket()]
        assert sockets
        for path in sockets:
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    finally:
        server.stop()
    assert node.stop() == 0


class _Touch:
    """Creates a file when unpickled: proof that something called pickle.loads on data."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


async def test_args_stay_plain_data(start_node, oban: Oban, conn: asyncpg.Connection, prefix: str, tmp_path: Path) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:2", "-p", "1")
    unpickled = tmp_path / "unpickled"
    evaluated = tmp_path / "evaluated"
    args = {
        "pickle": base64.b64encode(pickle.dumps(_Touch(str(unpickled)))).decode(),
        "raw_pickle": pickle.dumps(_Touch(str(unpickled)), protocol=0).decode("latin-1"),
        "expr": f"__import__('pathlib').Path({str(evaluated)!r}).touch()",
        "template": "{job.__class__.__init__.__globals__}",
        "number_text": "1e400",
    }
    job = await workers.EchoArgs.enqueue(args)
    meta_job = await oban.enqueue(workers.Noop.new({}, meta={"return": args["pickle"], "recorded": True}))

    row = await _settled(conn, prefix, job.id, ("completed",))
    await _settled(conn, prefix, meta_job.id, ("completed",))

    assert _recorded(row)["types"] == {key: "str" for key in args}
    assert not unpickled.exists()
    assert not evaluated.exists()
    assert node.stop() == 0


EVIL_MODULE = '''
import pathlib
import os

pathlib.Path(os.environ["OBANPRO_TEST_MARKER"]).write_text("imported")
'''


async def test_worker_outside_imports_never_imported(start_node, conn: asyncpg.Connection, prefix: str, tmp_path: Path) -> None:
    code_dir = tmp_path / "code"
    (code_dir / "evilpkg").mkdir(parents=True)
    (code_dir / "evilpkg" / "__init__.py").write_text(EVIL_MODULE)
    (code_dir / "evil_module.py").write_text(EVIL_MODULE)
    marker = tmp_path / "marker"
    node = start_node(
        "start", "--import", "tests.workers", "-q", "default:4", "-p", "1",
        env={"PYTHONPATH": f"{ROOT}:{code_dir}", "OBANPRO_TEST_MARKER": str(marker)},
    )
    names = [
        "evil_module.Worker",
        "evilpkg.Worker",
        "evilpkg.sub.Worker",
        "os.system",
        "builtins.eval",
        "tests.conftest.Node",
        "tests.workers.os.system",
        "tests.workers_evil.Worker",
        "tests..workers.Noop",
        "tests.workers.Noop.process",
        "__import__('os').system",
    ]
    ids = {name: await _insert(conn, prefix, name) for name in names}
    good = await _insert(conn, prefix, "tests.workers.Noop")

    for name, job_id in ids.items():
        row = await _settled(conn, prefix, job_id, ("retryable",))
        error = json.loads(row["errors"])[0]["error"]
        assert f"unknown worker {name!r}" in error, error
    await _settled(conn, prefix, good, ("completed",))

    assert not marker.exists()
    assert "crashed" not in node.output()
    assert node.stop() == 0
