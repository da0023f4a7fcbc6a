"""The job bodies every tool runs, and the stamps that latency scenarios read back.

Standard library only: imported by the worker processes of every peer.
"""

from __future__ import annotations

import hashlib
import os
import time

ROUNDS = 100_000
IO_SLEEP = 0.05


def sha256_rounds(seed: str, rounds: int = ROUNDS) -> str:
    """The CPU-bound job: ``h = sha256(h).digest()`` ``rounds`` times."""
    value = seed.encode()
    for _ in range(rounds):
        value = hashlib.sha256(value).digest()
    return value.hex()


def stamp(kind: str, seq: int, started: float, finished: float | None = None) -> None:
    """Append one line ``kind seq started finished pid`` to the file named by BENCH_STAMPS, if set.

    One short write with O_APPEND, so lines from several processes never interleave.
    """
    path = os.environ.get("BENCH_STAMPS")
    if not path:
        return
    line = f"{kind} {seq} {started!r} {finished if finished is not None else 0.0!r} {os.getpid()}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_stamps(path: str, with_pid: bool = False) -> list[tuple]:
    """The stamps as ``(kind, seq, started, finished)``, plus the pid with ``with_pid``."""
    rows = []
    try:
        with open(path) as handle:
            for line in handle:
                kind, seq, started, finished, pid = line.split()
                row = (kind, int(seq), float(started), float(finished))
                rows.append(row + (int(pid),) if with_pid else row)
    except FileNotFoundError:
        pass
    return rows


def now() -> float:
    return time.time()
