"""obanpro.run: a whole multi-process node from a script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

import obanpro
from obanpro.oban import Oban

from . import workers
from .conftest import ROOT, wait_for

SCRIPT = """
import sys
import obanpro
import tests.workers

sys.exit(obanpro.run(
    queues="default:3",
    processes=2,
    dsn=sys.argv[1],
    prefix=sys.argv[2],
    setup="tests.workers.marking_setup",
    grace_period=5,
))
"""


async def test_run_starts_node_from_script(dsn: str, prefix: str, oban: Oban, conn: asyncpg.Connection, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    script = tmp_path / "node.py"
    script.write_text(SCRIPT)
    node = subprocess.Popen(
        [sys.executable, str(script), dsn, prefix],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OBANPRO_TEST_MARKS": str(marks)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        jobs = await oban.enqueue_many([workers.Noop.new({"i": i}) for i in range(20)])

        async def completed() -> bool:
            count = await conn.fetchval(f"SELECT count(*) FROM {prefix}.oban_jobs WHERE state = 'completed'")
            return count == len(jobs)

        await wait_for(completed, timeout=30)
        await wait_for(lambda: marks.exists() and marks.read_text().count("setup") == 2, timeout=10)
    finally:
        node.send_signal(signal.SIGTERM)
        output, _ = node.communicate(timeout=30)

    assert node.returncode == 0, output
    assert "starting 2 worker processes" in output


async def test_run_rejects_running_loop() -> None:
    with pytest.raises(RuntimeError, match="call it from a script, not from async code"):
        obanpro.run(queues="default:1")
