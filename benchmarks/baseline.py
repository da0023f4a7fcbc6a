"""The queue-less baselines of the CPU table: the plain loop, and multiprocessing.Pool(N).

    python -m benchmarks.baseline --processes 2 --jobs 100 --rounds 100000

Runs the same job body (`benchmarks.peers.work.sha256_rounds`) with no queue
and exits; `benchmarks.compare` times the whole process, interpreter start and
pool creation included, as it times the queue tools from their start. With
``--processes 0`` it is the plain single-process loop, without a pool.
"""

from __future__ import annotations

import argparse
import multiprocessing

from benchmarks.peers.work import ROUNDS, sha256_rounds


def _job(seq_rounds):
    seq, rounds = seq_rounds
    return sha256_rounds(f"job-{seq}", rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--processes", type=int, default=2, help="pool size; 0 for the plain loop"
    )
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    options = parser.parse_args()

    work = [(seq, options.rounds) for seq in range(options.jobs)]
    if options.processes == 0:
        for item in work:
            _job(item)
        return

    with multiprocessing.get_context("fork").Pool(options.processes) as pool:
        pool.map(_job, work, chunksize=1)


if __name__ == "__main__":
    main()
