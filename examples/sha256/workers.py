"""The example's worker: CPU-bound hashing, run off the event loop in each worker process."""

import hashlib
import os
import time

from obanpro import Record, worker

ROUNDS = 100_000


@worker(queue="default", max_attempts=3)
class Digest:
    """Hashes the seed ROUNDS times with SHA-256 and records the digest and the process that ran it."""

    def process(self, job):
        started = time.time()
        value = job.args["seed"].encode()
        for _ in range(job.args.get("rounds", ROUNDS)):
            value = hashlib.sha256(value).digest()

        return Record({"digest": value.hex(), "pid": os.getpid(), "seconds": round(time.time() - started, 3)})
