"""pytest-benchmark: the process-level scenarios, one tool and one setting per benchmark.

    .venv/bin/python -m pytest benchmarks/bench_scenarios.py                     # obanpro only
    BENCH_TOOLS=obanpro,oban,celery .venv/bin/python -m pytest benchmarks/bench_scenarios.py
    .venv/bin/python -m pytest benchmarks/bench_scenarios.py -k "cpu and obanpro"

Each round starts a fresh driver (`benchmarks.peers.driver`) in the tool's own
venv, which resets the tool's database, inserts the jobs, starts the workers,
stops them and prints its figures; the figures of every round are kept in
``extra_info`` (the timed span also holds the insert and the shutdown, so
read ``extra_info``, not the timer, for the scenario's figure). Peer venvs
are created on first use, as `python -m benchmarks.compare` does; that
command runs the same drivers alternating between tools and writes
BENCHMARKS.md. Not collected by the default test run (testpaths is tests/).
"""

from __future__ import annotations

import os
import statistics

import pytest

from benchmarks import compare

TOOLS = [t for t in os.environ.get("BENCH_TOOLS", "obanpro").split(",") if t]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SIZES = compare.Sizes(quick=os.environ.get("BENCH_QUICK") == "1")
ROWS = compare.build_rows(
    ["cpu", "noop", "insert", "latency", "mixed", "startup"], SIZES
)

CASES = [
    pytest.param(row, id=f"{row.scenario}-{row.tool}-p{row.processes}-{row.jobs}")
    for rows in ROWS.values()
    for row in rows
    if row.tool in TOOLS and not row.unsupported
]


@pytest.mark.parametrize("row", CASES)
def test_scenario(benchmark, row, tmp_path):
    outcomes = []

    def once():
        outcome = compare.run_row(row, 300, tmp_path / "workers.log")
        assert outcome.get("ok"), outcome.get("error") or outcome.get("unsupported")
        outcomes.append(outcome)

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    metric, unit = compare.HEADLINE[row.scenario]
    values = [o[metric] for o in outcomes]
    benchmark.extra_info.update(
        tool=row.tool,
        label=row.label,
        command=row.command,
        metric=metric,
        unit=unit,
        median=statistics.median(values),
        min=min(values),
        max=max(values),
        runs=outcomes,
    )
