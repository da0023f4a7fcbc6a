"""pytest-benchmark: obanpro's compiled hot path (``obanpro/_core.pyx``) against plain Python.

    .venv/bin/python -m pytest benchmarks/bench_hotpath.py --benchmark-columns=median,min,max

Not collected by the default test run (testpaths is tests/). Each benchmark
records ``impl`` (cython or python) and ``ops`` (operations per call) in
extra_info; `benchmarks.compare` divides by ``ops`` and reports the ratio.
"""

from __future__ import annotations

import datetime
import os

import pytest

from benchmarks import plain_python
from obanpro import _core
from obanpro.job import Job, JobState

LIMIT, CAPACITY, HELD = 20, 256, 10
"""A queue with limit 20 in a region of 256 entries (obanpro's minimum), with 10 slots already running jobs."""
LIFECYCLES = 1_000
"""Slot operations per timed call: take one slot, record its job, return it."""
ROWS = 50
"""Rows per decode: one fetch at limit 50."""


def cython_table():
    size = _core.table_size(64, 8, CAPACITY + 1024)
    table = _core.SlotTable.format(
        bytearray(size), "bench", 64, 8, CAPACITY + 1024, os.getpid()
    )
    q = table.add_queue("default", LIMIT, CAPACITY)
    table.take(q, os.getpid(), HELD)
    return table, q


def plain_table():
    table = plain_python.PlainSlotTable(LIMIT, CAPACITY)
    table.take(os.getpid(), HELD)
    return table


def rows():
    now = datetime.datetime(2026, 1, 1, 12, 0, 0, 123456)
    return [
        (
            i,
            "default",
            "benchmarks.peers.obanpro_jobs.Noop",
            1,
            20,
            0,
            f'{{"seq": {i}, "name": "x"}}',
            '{"uniq_key": null}',
            "[]",
            ["bench"],
            ["node", "2a6c9b0e"],
            now,
            now,
            now,
        )
        for i in range(1, ROWS + 1)
    ]


@pytest.mark.benchmark(group="slot take + set_job + release")
def test_slots_cython(benchmark):
    table, q = cython_table()
    pid = os.getpid()
    take, set_job, release = table.take, table.set_job, table.release

    def lifecycle():
        for i in range(LIFECYCLES):
            (e,) = take(q, pid, 1, 0)  # worker 0: start_hint = worker_index * 7
            set_job(e, i + 1, 1, 0, 30.0)
            release(e, pid)

    benchmark.extra_info.update(impl="cython", ops=LIFECYCLES)
    benchmark(lifecycle)
    assert table.counts(q) == (LIMIT - HELD, HELD, LIMIT)


@pytest.mark.benchmark(group="slot take + set_job + release")
def test_slots_python(benchmark):
    table = plain_table()
    pid = os.getpid()
    take, set_job, release = table.take, table.set_job, table.release

    def lifecycle():
        for i in range(LIFECYCLES):
            (e,) = take(pid, 1, 0)
            set_job(e, i + 1, 1, 0, 30.0)
            release(e, pid)

    benchmark.extra_info.update(impl="python", ops=LIFECYCLES)
    benchmark(lifecycle)


@pytest.mark.benchmark(group="decode 50 fetched rows into Jobs")
def test_decode_cython(benchmark):
    data = rows()
    benchmark.extra_info.update(impl="cython", ops=ROWS)
    jobs = benchmark(_core.decode_jobs, data, Job, JobState.EXECUTING)
    assert (
        jobs[0].args == {"seq": 1, "name": "x"}
        and jobs[0].inserted_at.tzinfo is datetime.UTC
    )


@pytest.mark.benchmark(group="decode 50 fetched rows into Jobs")
def test_decode_python(benchmark):
    data = rows()
    benchmark.extra_info.update(impl="python", ops=ROWS)
    jobs = benchmark(plain_python.decode_jobs, data, Job, JobState.EXECUTING)
    compiled = _core.decode_jobs(data, Job, JobState.EXECUTING)
    assert [job.to_dict() for job in jobs] == [job.to_dict() for job in compiled]
