"""Plain-Python versions of the two steps that obanpro compiles in ``obanpro/_core.pyx``.

`bench_hotpath.py` times these against the Cython ones, so the speedup the
extension buys is a measured figure rather than a belief:

- `PlainSlotTable`: taking, recording and returning slots in the same entry
  layout (64-byte entries, the owner word at offset 0), on a bytearray with
  `struct`, without atomics: correct in one process only, which is enough to
  time the Python-level cost the compiled version removes.
- `decode_jobs`: turning fetched rows into `Job` objects, as `_core.decode_jobs` does.
"""

from __future__ import annotations

import json
import struct
import time
from datetime import UTC

ENTRY_SIZE = 64
DISABLED = 1 << 32
RETIRE = 1 << 33
PID_MASK = 0xFFFFFFFF

_word = struct.Struct("=Q")
_job = struct.Struct("=qqq")  # job_id, started_at_ns, deadline_ns at offset 8
_job_fields = struct.Struct(
    "=IiIII"
)  # cancel, attempt, worker_index, timeout_ms, queue_index at offset 32
_cancel = struct.Struct("=I")


class PlainSlotTable:
    """One queue's region of the slot table: ``capacity`` entries of which the first ``limit`` are enabled."""

    def __init__(self, limit: int, capacity: int) -> None:
        self.buffer = bytearray(capacity * ENTRY_SIZE)
        self.region_start = 0
        self.region_size = capacity
        self.stopping = False
        self.paused = False
        self.running = True
        for i in range(limit, capacity):
            _word.pack_into(self.buffer, i * ENTRY_SIZE, DISABLED)

    def take(self, pid: int, count: int, start_hint: int = 0) -> list[int]:
        taken: list[int] = []
        if pid <= 0:
            raise ValueError(f"invalid pid {pid}")
        if count <= 0 or self.stopping or self.paused or not self.running:
            return taken
        buffer, size, start = self.buffer, self.region_size, self.region_start
        offset = start_hint % size
        for n in range(size):
            i = start + (offset + n) % size
            at = i * ENTRY_SIZE
            if _word.unpack_from(buffer, at)[0] == 0:
                _word.pack_into(buffer, at, pid)
                _job.pack_into(buffer, at + 8, 0, 0, 0)
                _cancel.pack_into(buffer, at + 32, 0)
                taken.append(i)
                if len(taken) >= count:
                    break
        return taken

    def set_job(
        self, e: int, job_id: int, attempt: int, worker_index: int, timeout: float
    ) -> None:
        at = e * ENTRY_SIZE
        now = time.monotonic_ns()
        timeout_ms = int(timeout * 1000) if timeout > 0 else 0
        _job_fields.pack_into(
            self.buffer, at + 32, 0, attempt, worker_index, timeout_ms, 0
        )
        _job.pack_into(
            self.buffer,
            at + 8,
            job_id,
            time.time_ns(),
            now + int(timeout * 1e9) if timeout > 0 else 0,
        )

    def release(self, e: int, pid: int) -> bool:
        at = e * ENTRY_SIZE
        word = _word.unpack_from(self.buffer, at)[0]
        if word & PID_MASK != pid:
            raise ValueError(f"slot {e} is not owned by pid {pid} (word {word:#x})")
        _job.pack_into(self.buffer, at + 8, 0, 0, 0)
        _cancel.pack_into(self.buffer, at + 32, 0)
        if word & RETIRE:
            _word.pack_into(self.buffer, at, DISABLED)
            return False
        _word.pack_into(self.buffer, at, 0)
        return True


def _aware(value):
    return None if value is None else value.replace(tzinfo=UTC)


def _json(text):
    return None if text is None else json.loads(text)


def decode_jobs(rows: list, job_type, executing) -> list:
    """The plain-Python twin of ``obanpro._core.decode_jobs``: same columns, same fields."""
    jobs = []
    new = job_type.__new__
    for row in rows:
        job = new(job_type)
        job.id = row[0]
        job.state = executing
        job.queue = row[1]
        job.worker = row[2]
        job.attempt = row[3]
        job.max_attempts = row[4]
        job.priority = row[5]
        job.args = _json(row[6])
        job.meta = _json(row[7])
        job.errors = _json(row[8])
        job.tags = row[9]
        job.attempted_by = row[10]
        job.inserted_at = _aware(row[11])
        job.scheduled_at = _aware(row[12])
        job.attempted_at = _aware(row[13])
        job.cancelled_at = None
        job.completed_at = None
        job.discarded_at = None
        job.extra = {}
        job._cancel_check = None
        jobs.append(job)
    return jobs
