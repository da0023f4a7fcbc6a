"""Interoperation with oban 0.7.0 (oban-py) on one database: jobs and signals in both directions.

oban 0.7.0 needs Python 3.12, so these tests run it from a virtual environment
built once under ``.venvs/oban-0.7.0`` at the repository root (ignored by git)
and are skipped when no Python 3.12 is found.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import asyncpg
import pytest

from obanpro import Job, _core, erlang_term, slots
from obanpro.oban import Oban

from . import workers
from .conftest import ROOT, Node, wait_for

OBAN_VERSION = "0.7.0"
VENV = ROOT / ".venvs" / f"oban-{OBAN_VERSION}"
COMPLETE_MARK = VENV / ".installed"

pytestmark = pytest.mark.slow


def find_python312() -> str | None:
    """Return a Python 3.12 interpreter: pyenv's first, then ``python3.12`` on PATH."""
    candidates = sorted(glob.glob("/root/.pyenv/versions/3.12*/bin/python"), reverse=True)
    on_path = shutil.which("python3.12")
    if on_path:
        candidates.append(on_path)

    for candidate in candidates:
        try:
            result = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.returncode == 0 and result.stdout.strip() == "True":
            return candidate
    return None


@pytest.fixture(scope="session")
def oban_py() -> Path:
    """The bin directory of a virtual environment with oban 0.7.0, built on first use."""
    if COMPLETE_MARK.exists() and _imports_oban(VENV / "bin" / "python"):
        return VENV / "bin"

    python = find_python312()
    if python is None:
        pytest.skip(
            f"oban {OBAN_VERSION} needs Python 3.12 and none was found "
            "(looked for /root/.pyenv/versions/3.12*/bin/python and python3.12 on PATH)"
        )

    # Scripts in a venv name its path in their first line, so it is built where it stays.
    shutil.rmtree(VENV, ignore_errors=True)
    steps = [
        [python, "-m", "venv", str(VENV)],
        [str(VENV / "bin" / "pip"), "install", "--disable-pip-version-check", "--quiet", f"oban=={OBAN_VERSION}"],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
        if result.returncode != 0:
            pytest.fail(f"building the oban {OBAN_VERSION} environment failed at {step[:3]}: {result.stderr[-2000:]}")

    COMPLETE_MARK.write_text(f"oban=={OBAN_VERSION}\n")
    return VENV / "bin"


def _imports_oban(python: Path) -> bool:
    """Return True when ``python`` still runs and imports oban; the interpreter it links to may be gone."""
    try:
        result = subprocess.run([str(python), "-c", "import oban"], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def run_oban_py(bin_dir: Path, script: str, *args: str, cwd: Path = ROOT) -> str:
    """Run ``script`` with oban 0.7.0's interpreter and return its standard output."""
    result = subprocess.run(
        [str(bin_dir / "python"), "-c", textwrap.dedent(script), *args],
        cwd=cwd,
        env={key: value for key, value in os.environ.items() if not key.startswith("PYTHON")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"oban {OBAN_VERSION} script failed:\n{result.stderr[-3000:]}"
    return result.stdout


async def _states(conn: asyncpg.Connection, prefix: str) -> dict[str, int]:
    rows = await conn.fetch(f"SELECT state::text, count(*) FROM {prefix}.oban_jobs GROUP BY 1")
    return {row[0]: row[1] for row in rows}


async def _segment(node: Node) -> slots.Segment:
    def find() -> str | None:
        names = [name for name in slots.segment_names() if f".{node.pid}." in name]
        return names[0] if names else None

    return slots.attach(await wait_for(find, timeout=20))


INSERT_SCRIPT = """
    import asyncio, json, sys
    from oban import Job, Oban

    async def main():
        pool = await Oban.create_pool(sys.argv[1])
        oban = Oban(pool=pool, prefix=sys.argv[2])
        jobs = [Job(worker="tests.workers.Recorder", args={"value": i}, tags=["from-oban-py"]) for i in range(5)]
        jobs.append(Job(worker="tests.workers.Fail", args={"note": "inserted by oban-py"}, max_attempts=1))
        jobs.append(Job(worker="tests.workers.Noop", args={}, schedule_in=1))
        inserted = await oban.enqueue_many(jobs)
        print(json.dumps([job.id for job in inserted]))
        await pool.close()

    asyncio.run(main())
"""


async def test_jobs_from_oban_py_run_on_obanpro(oban_py: Path, start_node, dsn: str, prefix: str, conn) -> None:
    ids = json.loads(run_oban_py(oban_py, INSERT_SCRIPT, dsn, prefix))
    assert len(ids) == 7

    start_node("start", "--import", "tests.workers", "-q", "default:4", "-p", "2", "--node", "obanpro-node")

    await wait_for(lambda: _has_states(conn, prefix, {"completed": 6, "discarded": 1}), timeout=30)
    rows = await conn.fetch(f"SELECT * FROM {prefix}.oban_jobs WHERE worker = 'tests.workers.Recorder' ORDER BY id")
    assert [erlang_term.decode_base64(json.loads(row["meta"])["return"]) for row in rows] == [0, 1, 2, 3, 4]
    assert all(row["attempted_by"][0] == "obanpro-node" for row in rows)
    assert all(row["tags"] == ["from-oban-py"] for row in rows)
    error = await conn.fetchval(f"SELECT errors FROM {prefix}.oban_jobs WHERE worker = 'tests.workers.Fail'")
    assert "failing on purpose: inserted by oban-py" in json.loads(error)[0]["error"]


async def _has_states(conn: asyncpg.Connection, prefix: str, expected: dict[str, int]) -> bool:
    return await _states(conn, prefix) == expected


OBAN_PY_WORKERS = """
    from oban import worker


    @worker(queue="default")
    class Echo:
        async def process(self, job):
            if job.args.get("fail"):
                raise RuntimeError("failing in oban-py")
            return None
"""


async def test_jobs_from_obanpro_run_on_oban_py(oban_py: Path, oban: Oban, dsn: str, prefix: str, conn, tmp_path: Path) -> None:
    (tmp_path / "interop_workers.py").write_text(textwrap.dedent(OBAN_PY_WORKERS))
    await oban.enqueue_many(
        [Job("interop_workers.Echo", {"n": n}, tags=["From-Obanpro"]) for n in range(5)]
        + [Job("interop_workers.Echo", {"fail": True}, max_attempts=1), Job("interop_workers.Echo", {"n": 9}, schedule_in=1)]
    )

    log_path = tmp_path / "oban-py.log"
    process = _start_oban_py(oban_py, dsn, prefix, tmp_path, log_path)
    try:
        await wait_for(lambda: _has_states(conn, prefix, {"completed": 6, "discarded": 1}), timeout=30)
    except AssertionError:
        raise AssertionError(f"oban start output:\n{log_path.read_text()[-3000:]}") from None
    finally:
        _stop(process)

    rows = await conn.fetch(f"SELECT attempted_by, errors, state::text FROM {prefix}.oban_jobs ORDER BY id")
    assert all(row["attempted_by"][0] == "oban-py-node" for row in rows)
    assert "failing in oban-py" in json.loads(rows[5]["errors"])[0]["error"]


def _start_oban_py(bin_dir: Path, dsn: str, prefix: str, cwd: Path, log_path: Path) -> subprocess.Popen:
    """Start ``oban start`` for the default queue, importing workers from ``cwd``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [str(bin_dir / "oban"), "start", "--dsn", dsn, "--prefix", prefix, "--queues", "default:5", "--node", "oban-py-node"],
            cwd=cwd,
            env={**{key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}, "PYTHONPATH": str(cwd)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


SIGNAL_SCRIPT = """
    import asyncio, sys
    from oban import Oban

    async def main():
        pool = await Oban.create_pool(sys.argv[1])
        oban = Oban(pool=pool, prefix=sys.argv[2], node="oban-py-sender")
        action = sys.argv[3]
        if action == "pause":
            await oban.pause_queue("default", node="n1")
            await oban.scale_queue(queue="default", limit=3)
        else:
            await oban.resume_all_queues()
        await pool.close()

    asyncio.run(main())
"""


async def test_pause_from_oban_py_pauses_obanpro_queue(oban_py: Path, start_node, oban: Oban, dsn: str, prefix: str, conn) -> None:
    node = start_node("start", "--import", "tests.workers", "-q", "default:4,other:2", "-p", "2", "--node", "n1")
    table = (await _segment(node)).table
    default, other = table.queue_index("default"), table.queue_index("other")

    # Wait until the node listens: an obanpro pause of the other queue takes effect.
    async def listening() -> bool:
        await oban.pause_queue("other")
        await asyncio.sleep(0.2)
        return table.paused(other)

    await wait_for(listening, timeout=20)

    run_oban_py(oban_py, SIGNAL_SCRIPT, dsn, prefix, "pause")

    await wait_for(lambda: table.paused(default) and table.limit(default) == 3, timeout=10)
    job = await workers.Noop.enqueue()
    # The producers poll every second; two seconds cover two polls of each process.
    for _ in range(20):
        assert await _states(conn, prefix) == {"available": 1}
        await asyncio.sleep(0.1)

    run_oban_py(oban_py, SIGNAL_SCRIPT, dsn, prefix, "resume")

    await wait_for(lambda: not table.paused(default) and not table.paused(other), timeout=10)
    await wait_for(lambda: _has_states(conn, prefix, {"completed": 1}), timeout=20)
    assert table.queue_state(default) == _core.QUEUE_RUNNING
    assert job.id is not None
