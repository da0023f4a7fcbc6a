# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled hot path: the shared slot table and the decoding of fetched rows.

Slot table
==========

One POSIX shared-memory segment per node. The supervisor creates it, sizes it
and is the only process that unlinks it or adds queues; worker processes take
and return slots in it without asking anyone. Every running job sits in one
slot entry, so the supervisor knows which jobs a dead worker held, which
process runs a job to cancel, and which job overran its deadline.

Byte layout (native byte order, every field naturally aligned; offsets in bytes):

    Header, 192 bytes at offset 0
        0   u64  magic           b"OBANSLT1" read as a little-endian u64
        8   u32  version         LAYOUT_VERSION
        12  u32  header_size     192
        16  u32  max_queues
        20  u32  max_workers
        24  u32  entry_count
        28  u32  queue_record_size   192
        32  u32  worker_record_size  64
        36  u32  entry_size          64
        40  i32  supervisor_pid
        44  u32  flags           bit 0: the node is stopping, take no new slots
        48  i64  created_at_ns   CLOCK_REALTIME
        56  u32  next_entry      first entry not yet given to a queue
        60  u32  generation      bumped whenever a queue is added or stopped
        64  char node[64]        node name, UTF-8, NUL-padded
        128 char prefix[64]      schema of the Oban tables the node runs, NUL-padded
    Queue records, max_queues x 192 bytes at offset 192
        0   char name[128]       UTF-8, NUL-terminated (names are < 128 characters)
        128 u32  state           0 unused, 1 running, 2 stopped
        132 i32  limit           slots the queue may use on this node
        136 u32  paused          1 while paused
        140 u32  region_start    index of the queue's first entry
        144 u32  region_size     entries reserved for the queue (its largest limit)
        148 u32  reserved0
        152 u8   reserved[40]
    Worker records, max_workers x 64 bytes after the queue records
        0   i32  pid             0 when the record is empty
        4   u32  state           WORKER_* constants below
        8   i64  started_at_ns   CLOCK_REALTIME
        16  u64  jobs_run
        24  u64  rss_bytes
        32  i64  heartbeat_ns    CLOCK_MONOTONIC
        40  u8   uuid[16]        the worker's producer identity
        56  u32  index
        60  u32  cpu_busy        1 while the process is saturated with CPU work
    Entries, entry_count x 64 bytes after the worker records
        0   u64  word            see below
        8   i64  job_id          0 while no job is recorded
        16  i64  started_at_ns   CLOCK_REALTIME
        24  i64  deadline_ns     CLOCK_MONOTONIC; 0 when the job has no timeout
        32  u32  cancel          1 once cancelling the job was requested
        36  i32  attempt
        40  u32  worker_index
        44  u32  timeout_ms
        48  u32  queue_index
        52  u8   reserved[12]

The entry word is the only field that decides ownership: 0 is a free slot,
DISABLED (bit 32) a slot outside the queue's current limit, and any other
value holds the owner's pid in its low 32 bits, with RETIRE (bit 33) set when
the slot must become DISABLED instead of free on release. Taking a slot is one
compare-and-swap from 0 to the pid, and returning it one compare-and-swap back,
so a process killed at any instruction leaves every slot either free or owned
by its pid, which the supervisor then frees. No free counter is stored: the
free count is the number of free entries in the queue's region, so it cannot
drift from the entries. Scaling keeps the number of enabled entries (free plus
owned without RETIRE) equal to the limit, and takes and releases never change
that number.
"""

cimport cython
from cpython.datetime cimport (
    datetime_day,
    datetime_hour,
    datetime_minute,
    datetime_month,
    datetime_microsecond,
    datetime_new,
    datetime_second,
    datetime_year,
    import_datetime,
)
from cpython.buffer cimport PyBUF_WRITABLE, PyObject_GetBuffer, PyBuffer_Release
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

cdef extern from "<string.h>":
    size_t strnlen(const char *s, size_t maxlen) nogil
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

import datetime as _datetime
import json as _json

import_datetime()

LAYOUT_VERSION = 2
MAGIC = int.from_bytes(b"OBANSLT1", "little")

HEADER_SIZE = sizeof(Header)
QUEUE_RECORD_SIZE = sizeof(QueueRecord)
WORKER_RECORD_SIZE = sizeof(WorkerRecord)
ENTRY_SIZE = sizeof(Entry)

FLAG_STOPPING = 1

QUEUE_UNUSED = 0
QUEUE_RUNNING = 1
QUEUE_STOPPED = 2

WORKER_EMPTY = 0
WORKER_STARTING = 1
WORKER_RUNNING = 2
WORKER_DRAINING = 3
WORKER_EXITING = 4

cdef uint64_t DISABLED = (<uint64_t>1) << 32
cdef uint64_t RETIRE = (<uint64_t>1) << 33
cdef uint64_t PID_MASK = 0xFFFFFFFF

cdef object _UTC = _datetime.timezone.utc
cdef object _loads = _json.loads


cdef inline int64_t _clock_ns(int clock) noexcept nogil:
    cdef timespec ts
    clock_gettime(clock, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


def monotonic_ns():
    """Return CLOCK_MONOTONIC in nanoseconds, the clock of entry deadlines (shared by all processes)."""
    return _clock_ns(CLOCK_MONOTONIC)


def layout():
    """Return the size and field offsets of each record, for the layout test."""
    cdef Header h
    cdef QueueRecord q
    cdef WorkerRecord w
    cdef Entry e
    cdef size_t hb = <size_t>&h
    cdef size_t qb = <size_t>&q
    cdef size_t wb = <size_t>&w
    cdef size_t eb = <size_t>&e

    return {
        "Header": {
            "size": sizeof(Header),
            "magic": <size_t>&h.magic - hb,
            "version": <size_t>&h.version - hb,
            "header_size": <size_t>&h.header_size - hb,
            "max_queues": <size_t>&h.max_queues - hb,
            "max_workers": <size_t>&h.max_workers - hb,
            "entry_count": <size_t>&h.entry_count - hb,
            "queue_record_size": <size_t>&h.queue_record_size - hb,
            "worker_record_size": <size_t>&h.worker_record_size - hb,
            "entry_size": <size_t>&h.entry_size - hb,
            "supervisor_pid": <size_t>&h.supervisor_pid - hb,
            "flags": <size_t>&h.flags - hb,
            "created_at_ns": <size_t>&h.created_at_ns - hb,
            "next_entry": <size_t>&h.next_entry - hb,
            "generation": <size_t>&h.generation - hb,
            "node": <size_t>&h.node - hb,
            "prefix": <size_t>&h.prefix - hb,
        },
        "QueueRecord": {
            "size": sizeof(QueueRecord),
            "name": <size_t>&q.name - qb,
            "state": <size_t>&q.state - qb,
            "limit": <size_t>&q.limit - qb,
            "paused": <size_t>&q.paused - qb,
            "region_start": <size_t>&q.region_start - qb,
            "region_size": <size_t>&q.region_size - qb,
            "reserved0": <size_t>&q.reserved0 - qb,
            "reserved": <size_t>&q.reserved - qb,
        },
        "WorkerRecord": {
            "size": sizeof(WorkerRecord),
            "pid": <size_t>&w.pid - wb,
            "state": <size_t>&w.state - wb,
            "started_at_ns": <size_t>&w.started_at_ns - wb,
            "jobs_run": <size_t>&w.jobs_run - wb,
            "rss_bytes": <size_t>&w.rss_bytes - wb,
            "heartbeat_ns": <size_t>&w.heartbeat_ns - wb,
            "uuid": <size_t>&w.uuid - wb,
            "index": <size_t>&w.index - wb,
            "cpu_busy": <size_t>&w.cpu_busy - wb,
        },
        "Entry": {
            "size": sizeof(Entry),
            "word": <size_t>&e.word - eb,
            "job_id": <size_t>&e.job_id - eb,
            "started_at_ns": <size_t>&e.started_at_ns - eb,
            "deadline_ns": <size_t>&e.deadline_ns - eb,
            "cancel": <size_t>&e.cancel - eb,
            "attempt": <size_t>&e.attempt - eb,
            "worker_index": <size_t>&e.worker_index - eb,
            "timeout_ms": <size_t>&e.timeout_ms - eb,
            "queue_index": <size_t>&e.queue_index - eb,
            "reserved": <size_t>&e.reserved - eb,
        },
    }


def table_size(int max_queues, int max_workers, int entry_count):
    """Return the bytes a table with these capacities needs."""
    if max_queues < 1 or max_workers < 1 or entry_count < 1:
        raise ValueError(
            f"invalid table capacities: max_queues={max_queues}, max_workers={max_workers}, "
            f"entry_count={entry_count}; each must be at least 1"
        )

    return (
        sizeof(Header)
        + max_queues * sizeof(QueueRecord)
        + max_workers * sizeof(WorkerRecord)
        + entry_count * sizeof(Entry)
    )


@cython.no_gc_clear
cdef class SlotTable:
    """A view of a slot table in a writable buffer (a shared mmap, or a bytearray in one process).

    Use `SlotTable.format` once on fresh memory, then `SlotTable(buffer)` in every
    process that maps it. The view keeps the buffer alive.
    """

    def __cinit__(self, buffer):
        self._has_view = False
        PyObject_GetBuffer(buffer, &self._view, PyBUF_WRITABLE)
        self._has_view = True
        self._buffer = buffer
        self._base = <char *>self._view.buf

        if <size_t>self._view.len < sizeof(Header):
            raise ValueError(f"slot table buffer of {self._view.len} bytes is smaller than its header")

        self._header = <Header *>self._base

        if self._header.magic != <uint64_t>MAGIC:
            raise ValueError("not an obanpro slot table: wrong magic number")

        if self._header.version != LAYOUT_VERSION:
            raise ValueError(
                f"slot table layout version {self._header.version} is not {LAYOUT_VERSION}; "
                "stop the other obanpro version first"
            )

        if (
            self._header.header_size != sizeof(Header)
            or self._header.queue_record_size != sizeof(QueueRecord)
            or self._header.worker_record_size != sizeof(WorkerRecord)
            or self._header.entry_size != sizeof(Entry)
        ):
            raise ValueError("slot table record sizes do not match this build")

        expected = table_size(self._header.max_queues, self._header.max_workers, self._header.entry_count)
        if <size_t>self._view.len < <size_t>expected:
            raise ValueError(f"slot table buffer of {self._view.len} bytes is smaller than its {expected} byte layout")

        self._queues = <QueueRecord *>(self._base + sizeof(Header))
        self._workers = <WorkerRecord *>(<char *>self._queues + self._header.max_queues * sizeof(QueueRecord))
        self._entries = <Entry *>(<char *>self._workers + self._header.max_workers * sizeof(WorkerRecord))

    def __dealloc__(self):
        # no_gc_clear keeps _buffer alive until here, so the view is released before the buffer goes.
        if self._has_view:
            PyBuffer_Release(&self._view)
            self._has_view = False

    @staticmethod
    def format(buffer, str node, int max_queues, int max_workers, int entry_count, int supervisor_pid, str prefix=""):
        """Write an empty table into ``buffer`` and return a view of it."""
        cdef Py_buffer view
        cdef Header *header
        size = table_size(max_queues, max_workers, entry_count)
        encoded = node.encode("utf-8")[:63]

        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        try:
            if <size_t>view.len < <size_t>size:
                raise ValueError(f"buffer of {view.len} bytes is smaller than the {size} bytes the table needs")

            memset(view.buf, 0, size)
            header = <Header *>view.buf
            header.version = LAYOUT_VERSION
            header.header_size = sizeof(Header)
            header.max_queues = max_queues
            header.max_workers = max_workers
            header.entry_count = entry_count
            header.queue_record_size = sizeof(QueueRecord)
            header.worker_record_size = sizeof(WorkerRecord)
            header.entry_size = sizeof(Entry)
            header.supervisor_pid = supervisor_pid
            header.created_at_ns = _clock_ns(CLOCK_REALTIME)
            memcpy(header.node, <char *>encoded, len(encoded))
            encoded_prefix = prefix.encode("utf-8")[:63]
            memcpy(header.prefix, <char *>encoded_prefix, len(encoded_prefix))
            # The magic goes last, so a reader never accepts a half-written header.
            op_store_u64(&header.magic, <uint64_t>MAGIC)
        finally:
            PyBuffer_Release(&view)

        return SlotTable(buffer)

    cdef QueueRecord *_queue(self, int index) except NULL:
        if index < 0 or <uint32_t>index >= self._header.max_queues:
            raise IndexError(f"queue index {index} is outside 0..{self._header.max_queues - 1}")
        return &self._queues[index]

    cdef Entry *_entry(self, int index) except NULL:
        if index < 0 or <uint32_t>index >= self._header.entry_count:
            raise IndexError(f"entry index {index} is outside 0..{self._header.entry_count - 1}")
        return &self._entries[index]

    cdef WorkerRecord *_worker(self, int index) except NULL:
        if index < 0 or <uint32_t>index >= self._header.max_workers:
            raise IndexError(f"worker index {index} is outside 0..{self._header.max_workers - 1}")
        return &self._workers[index]

    # Header

    @property
    def node(self):
        return self._header.node[:strnlen(self._header.node, 64)].decode("utf-8", "replace")

    @property
    def prefix(self):
        return self._header.prefix[:strnlen(self._header.prefix, 64)].decode("utf-8", "replace")

    @property
    def supervisor_pid(self):
        return self._header.supervisor_pid

    @property
    def created_at_ns(self):
        return self._header.created_at_ns

    @property
    def max_queues(self):
        return self._header.max_queues

    @property
    def max_workers(self):
        return self._header.max_workers

    @property
    def entry_count(self):
        return self._header.entry_count

    @property
    def generation(self):
        return op_load_u32(&self._header.generation)

    @property
    def stopping(self):
        return bool(op_load_u32(&self._header.flags) & FLAG_STOPPING)

    def set_stopping(self):
        """Mark the node as stopping: from now on `take` returns no slots."""
        cdef uint32_t old
        while True:
            old = op_load_u32(&self._header.flags)
            if op_cas_u32(&self._header.flags, old, old | FLAG_STOPPING):
                return

    # Queues

    def add_queue(self, str name, int limit, int capacity, bint paused=False):
        """Reserve ``capacity`` entries for a new queue with ``limit`` of them enabled; return its index.

        Only the process that owns the table's shape (the supervisor) may call this.
        """
        cdef QueueRecord *queue
        cdef uint32_t start, i
        cdef int index
        encoded = name.encode("utf-8")

        if not 0 < len(encoded) < 128:
            raise ValueError(f"invalid queue name {name!r}: must be 1 to 127 bytes")
        if self.queue_index(name) >= 0:
            raise ValueError(f"queue {name!r} is already in the slot table")
        if limit < 1 or capacity < limit:
            raise ValueError(f"invalid limit {limit} for queue {name!r} with capacity {capacity}")

        start = self._header.next_entry
        if <uint64_t>start + capacity > self._header.entry_count:
            raise ValueError(
                f"no room for queue {name!r}: it needs {capacity} slots and "
                f"{self._header.entry_count - start} are left in the slot table"
            )

        index = -1
        for i in range(self._header.max_queues):
            if op_load_u32(&self._queues[i].state) == QUEUE_UNUSED:
                index = i
                break
        if index < 0:
            raise ValueError(f"no room for queue {name!r}: the table holds at most {self._header.max_queues} queues")

        queue = &self._queues[index]
        memset(queue.name, 0, 128)
        memcpy(queue.name, <char *>encoded, len(encoded))
        queue.region_start = start
        queue.region_size = capacity
        op_store_i32(&queue.limit, limit)
        op_store_u32(&queue.paused, 1 if paused else 0)

        for i in range(start, start + capacity):
            memset(&self._entries[i], 0, sizeof(Entry))
            self._entries[i].queue_index = index
            if i - start >= <uint32_t>limit:
                op_store_u64(&self._entries[i].word, DISABLED)

        self._header.next_entry = start + capacity
        op_store_u32(&queue.state, QUEUE_RUNNING)
        op_add_u32(&self._header.generation, 1)
        return index

    def queue_index(self, str name):
        """Return the index of the queue called ``name``, or -1."""
        cdef uint32_t i
        encoded = name.encode("utf-8")

        for i in range(self._header.max_queues):
            if op_load_u32(&self._queues[i].state) == QUEUE_UNUSED:
                continue
            if self._queues[i].name[:strnlen(self._queues[i].name, 128)] == encoded:
                return i
        return -1

    def queues(self):
        """Return ``{name: index}`` for every queue in the table, running or stopped."""
        cdef uint32_t i
        result = {}

        for i in range(self._header.max_queues):
            if op_load_u32(&self._queues[i].state) != QUEUE_UNUSED:
                result[self._queues[i].name[:strnlen(self._queues[i].name, 128)].decode("utf-8")] = i
        return result

    def queue_state(self, int q):
        return op_load_u32(&self._queue(q).state)

    def set_queue_state(self, int q, uint32_t state):
        op_store_u32(&self._queue(q).state, state)
        op_add_u32(&self._header.generation, 1)

    def limit(self, int q):
        return op_load_i32(&self._queue(q).limit)

    def capacity(self, int q):
        return self._queue(q).region_size

    def paused(self, int q):
        return op_load_u32(&self._queue(q).paused) != 0

    def set_paused(self, int q, bint paused):
        op_store_u32(&self._queue(q).paused, 1 if paused else 0)

    def counts(self, int q):
        """Return ``(free, used, enabled)`` for queue ``q``: free entries, owned entries, and the limit in force."""
        cdef QueueRecord *queue = self._queue(q)
        cdef uint32_t i
        cdef uint64_t word
        cdef int free = 0, used = 0, enabled = 0

        for i in range(queue.region_start, queue.region_start + queue.region_size):
            word = op_load_u64(&self._entries[i].word)
            if word == 0:
                free += 1
                enabled += 1
            elif word & PID_MASK:
                used += 1
                if not word & RETIRE:
                    enabled += 1
        return free, used, enabled

    def free_count(self, int q):
        return self.counts(q)[0]

    def scale(self, int q, int limit):
        """Change queue ``q``'s limit. Running jobs keep their slots; retired slots stop being reused.

        One process at a time may scale a queue (the supervisor or its duties process).
        """
        cdef QueueRecord *queue = self._queue(q)
        cdef uint32_t i, start = queue.region_start, end = queue.region_start + queue.region_size
        cdef uint64_t word
        cdef int enabled

        if limit < 0 or <uint32_t>limit > queue.region_size:
            raise ValueError(
                f"invalid limit {limit} for queue {self._queue_name(q)!r}: this node reserved "
                f"{queue.region_size} slots for it at start; restart with a higher limit to go beyond"
            )

        op_store_i32(&queue.limit, limit)
        enabled = self.counts(q)[2]

        # Each pass retries an index whose word changed between the load and the
        # swap, because a concurrent take or release moved it to another state.
        # Growing re-enables retiring slots first, since they are already busy.
        i = start
        while enabled < limit and i < end:
            word = op_load_u64(&self._entries[i].word)
            if word & PID_MASK and word & RETIRE:
                if not op_cas_u64(&self._entries[i].word, word, word & ~RETIRE):
                    continue
                enabled += 1
            i += 1

        i = start
        while enabled < limit and i < end:
            word = op_load_u64(&self._entries[i].word)
            if word == DISABLED:
                if not op_cas_u64(&self._entries[i].word, DISABLED, 0):
                    continue
                enabled += 1
            i += 1

        # Shrinking disables free slots first, then retires busy ones.
        i = start
        while enabled > limit and i < end:
            word = op_load_u64(&self._entries[i].word)
            if word == 0:
                if not op_cas_u64(&self._entries[i].word, 0, DISABLED):
                    continue
                enabled -= 1
            i += 1

        i = start
        while enabled > limit and i < end:
            word = op_load_u64(&self._entries[i].word)
            if word & PID_MASK and not word & RETIRE:
                if not op_cas_u64(&self._entries[i].word, word, word | RETIRE):
                    continue
                enabled -= 1
            elif word == 0:
                if not op_cas_u64(&self._entries[i].word, 0, DISABLED):
                    continue
                enabled -= 1
            i += 1

    cdef str _queue_name(self, int q):
        return self._queues[q].name[:strnlen(self._queues[q].name, 128)].decode("utf-8", "replace")

    # Slots

    def take(self, int q, int pid, int count, int start_hint=0):
        """Take up to ``count`` free slots of queue ``q`` for ``pid``; return their entry indexes.

        Returns an empty list while the queue is paused or stopped or the node is stopping.
        """
        cdef QueueRecord *queue = self._queue(q)
        cdef uint32_t size = queue.region_size, offset, i, n
        cdef uint64_t owner = <uint64_t><uint32_t>pid
        cdef list taken = []

        if pid <= 0:
            raise ValueError(f"invalid pid {pid}")
        if count <= 0 or size == 0:
            return taken
        if op_load_u32(&self._header.flags) & FLAG_STOPPING:
            return taken
        if op_load_u32(&queue.paused) or op_load_u32(&queue.state) != QUEUE_RUNNING:
            return taken

        offset = <uint32_t>start_hint % size
        for n in range(size):
            i = queue.region_start + (offset + n) % size
            if op_load_u64(&self._entries[i].word) == 0 and op_cas_u64(&self._entries[i].word, 0, owner):
                op_store_i64(&self._entries[i].job_id, 0)
                op_store_i64(&self._entries[i].deadline_ns, 0)
                op_store_u32(&self._entries[i].cancel, 0)
                taken.append(i)
                if len(taken) >= count:
                    break
        return taken

    def set_job(self, int e, int64_t job_id, int attempt, int worker_index, double timeout):
        """Record the job that runs in entry ``e``; ``timeout`` in seconds, 0 for none."""
        cdef Entry *entry = self._entry(e)
        cdef int64_t now = _clock_ns(CLOCK_MONOTONIC)

        entry.attempt = attempt
        entry.worker_index = worker_index
        entry.timeout_ms = <uint32_t>(timeout * 1000) if timeout > 0 else 0
        op_store_i64(&entry.started_at_ns, _clock_ns(CLOCK_REALTIME))
        op_store_i64(&entry.deadline_ns, now + <int64_t>(timeout * 1e9) if timeout > 0 else 0)
        op_store_i64(&entry.job_id, job_id)

    def release(self, int e, int pid):
        """Return entry ``e`` owned by ``pid``; return True when it became free (False when it was retired).

        Raises ValueError when ``pid`` does not own the entry.
        """
        cdef Entry *entry = self._entry(e)
        cdef uint64_t word

        while True:
            word = op_load_u64(&entry.word)
            if (word & PID_MASK) != <uint64_t><uint32_t>pid:
                raise ValueError(f"slot {e} is not owned by pid {pid} (word {word:#x})")

            op_store_i64(&entry.job_id, 0)
            op_store_i64(&entry.deadline_ns, 0)
            op_store_u32(&entry.cancel, 0)

            if word & RETIRE:
                if op_cas_u64(&entry.word, word, DISABLED):
                    return False
            elif op_cas_u64(&entry.word, word, 0):
                return True

    def reuse(self, int e, int pid):
        """Clear entry ``e``, owned by ``pid``, for a new job without returning the slot.

        Returns False, and leaves the entry alone, when the slot is retiring
        after a scale-down: it must be released instead.
        """
        cdef Entry *entry = self._entry(e)
        cdef uint64_t word = op_load_u64(&entry.word)

        if (word & PID_MASK) != <uint64_t><uint32_t>pid:
            raise ValueError(f"slot {e} is not owned by pid {pid} (word {word:#x})")
        if word & RETIRE:
            return False

        op_store_i64(&entry.job_id, 0)
        op_store_i64(&entry.deadline_ns, 0)
        op_store_u32(&entry.cancel, 0)
        return True

    def owner(self, int e):
        """Return the pid that owns entry ``e``, or 0."""
        return <int>(op_load_u64(&self._entry(e).word) & PID_MASK)

    def reclaim(self, int pid):
        """Free every slot owned by a dead ``pid``; return ``[(entry, queue_index, job_id, attempt)]`` for them.

        The supervisor calls this after reaping ``pid``, so no live process can race it for those entries.
        """
        cdef uint32_t i
        cdef uint64_t word
        cdef list found = []

        for i in range(self._header.next_entry):
            word = op_load_u64(&self._entries[i].word)
            if word & PID_MASK and (word & PID_MASK) == <uint64_t><uint32_t>pid:
                found.append((i, self._entries[i].queue_index, op_load_i64(&self._entries[i].job_id), self._entries[i].attempt))
                self.release(i, pid)
        return found

    def owned_by(self, int pid):
        """Return ``[(entry, queue_index, job_id, attempt)]`` for the slots ``pid`` owns."""
        cdef uint32_t i
        cdef uint64_t word
        cdef list found = []

        for i in range(self._header.next_entry):
            word = op_load_u64(&self._entries[i].word)
            if word & PID_MASK and (word & PID_MASK) == <uint64_t><uint32_t>pid:
                found.append((i, self._entries[i].queue_index, op_load_i64(&self._entries[i].job_id), self._entries[i].attempt))
        return found

    def overdue(self, int64_t grace_ns):
        """Return ``[(entry, pid, job_id, timeout_s)]`` for jobs past their deadline by more than ``grace_ns``."""
        cdef uint32_t i
        cdef uint64_t word
        cdef int64_t deadline, now = _clock_ns(CLOCK_MONOTONIC)
        cdef list found = []

        for i in range(self._header.next_entry):
            word = op_load_u64(&self._entries[i].word)
            if not word & PID_MASK:
                continue
            deadline = op_load_i64(&self._entries[i].deadline_ns)
            if deadline and now - deadline > grace_ns:
                found.append((i, <int>(word & PID_MASK), op_load_i64(&self._entries[i].job_id), self._entries[i].timeout_ms / 1000.0))
        return found

    def request_cancel(self, int64_t job_id):
        """Set the cancel flag of the slot that runs ``job_id``; return the owner's pid, or 0 when none runs it."""
        cdef uint32_t i
        cdef uint64_t word

        if job_id <= 0:
            return 0
        for i in range(self._header.next_entry):
            if op_load_i64(&self._entries[i].job_id) != job_id:
                continue
            word = op_load_u64(&self._entries[i].word)
            if word & PID_MASK:
                op_store_u32(&self._entries[i].cancel, 1)
                return <int>(word & PID_MASK)
        return 0

    def cancel_requested(self, int e):
        return op_load_u32(&self._entry(e).cancel) != 0

    def entry(self, int e):
        """Return entry ``e`` as a dict, for status output and tests."""
        cdef Entry *entry = self._entry(e)
        cdef uint64_t word = op_load_u64(&entry.word)

        return {
            "index": e,
            "queue_index": entry.queue_index,
            "pid": <int>(word & PID_MASK),
            "disabled": word == DISABLED,
            "retiring": bool(word & RETIRE),
            "job_id": op_load_i64(&entry.job_id),
            "attempt": entry.attempt,
            "worker_index": entry.worker_index,
            "started_at_ns": op_load_i64(&entry.started_at_ns),
            "deadline_ns": op_load_i64(&entry.deadline_ns),
            "timeout": entry.timeout_ms / 1000.0,
            "cancel": op_load_u32(&entry.cancel) != 0,
        }

    def running(self, int q):
        """Return the entries of queue ``q`` that hold a job, as dicts."""
        cdef QueueRecord *queue = self._queue(q)
        cdef uint32_t i
        result = []

        for i in range(queue.region_start, queue.region_start + queue.region_size):
            if op_load_u64(&self._entries[i].word) & PID_MASK:
                result.append(self.entry(i))
        return result

    # Worker records

    def register_worker(self, int index, int pid, bytes uuid):
        """Fill worker record ``index`` for a freshly started process."""
        cdef WorkerRecord *record = self._worker(index)

        if len(uuid) != 16:
            raise ValueError("a worker uuid is 16 bytes")
        memcpy(record.uuid, <char *>uuid, 16)
        record.index = index
        op_store_i64(&record.started_at_ns, _clock_ns(CLOCK_REALTIME))
        op_store_u64(&record.jobs_run, 0)
        op_store_u64(&record.rss_bytes, 0)
        op_store_i64(&record.heartbeat_ns, _clock_ns(CLOCK_MONOTONIC))
        op_store_u32(&record.cpu_busy, 0)
        op_store_u32(&record.state, WORKER_STARTING)
        op_store_i32(&record.pid, pid)

    def set_worker_pid(self, int index, int pid):
        op_store_i32(&self._worker(index).pid, pid)

    def clear_worker(self, int index):
        cdef WorkerRecord *record = self._worker(index)
        op_store_u32(&record.state, WORKER_EMPTY)
        op_store_i32(&record.pid, 0)

    def set_worker_state(self, int index, uint32_t state):
        op_store_u32(&self._worker(index).state, state)

    def worker_state(self, int index):
        return op_load_u32(&self._worker(index).state)

    def worker_pid(self, int index):
        return op_load_i32(&self._worker(index).pid)

    def heartbeat(self, int index, uint64_t rss_bytes, bint cpu_busy):
        cdef WorkerRecord *record = self._worker(index)
        op_store_u64(&record.rss_bytes, rss_bytes)
        op_store_u32(&record.cpu_busy, 1 if cpu_busy else 0)
        op_store_i64(&record.heartbeat_ns, _clock_ns(CLOCK_MONOTONIC))

    def add_jobs_run(self, int index, uint64_t count):
        return op_add_u64(&self._worker(index).jobs_run, count)

    def worker(self, int index):
        """Return worker record ``index`` as a dict."""
        cdef WorkerRecord *record = self._worker(index)

        return {
            "index": index,
            "pid": op_load_i32(&record.pid),
            "state": op_load_u32(&record.state),
            "started_at_ns": op_load_i64(&record.started_at_ns),
            "jobs_run": op_load_u64(&record.jobs_run),
            "rss_bytes": op_load_u64(&record.rss_bytes),
            "heartbeat_ns": op_load_i64(&record.heartbeat_ns),
            "uuid": bytes(record.uuid[:16]),
            "cpu_busy": op_load_u32(&record.cpu_busy) != 0,
        }


# Row decoding

cdef inline object _aware(object value):
    if value is None:
        return None
    return datetime_new(
        datetime_year(value),
        datetime_month(value),
        datetime_day(value),
        datetime_hour(value),
        datetime_minute(value),
        datetime_second(value),
        datetime_microsecond(value),
        _UTC,
    )


cdef inline object _json_field(object text):
    if text is None:
        return None
    return _loads(text)


def decode_jobs(list rows, object job_type, object executing):
    """Build a ``job_type`` object for each row of fetch_jobs.sql.

    The columns are, in order: id, queue, worker, attempt, max_attempts,
    priority, args, meta, errors (JSON text), tags, attempted_by, inserted_at,
    scheduled_at, attempted_at (naive UTC). Args that are not a JSON object are
    kept as decoded, so the executor can fail that one job with a clear error.
    """
    cdef list jobs = []
    cdef object job, row
    cdef object new = job_type.__new__

    for row in rows:
        job = new(job_type)
        job.id = row[0]
        job.state = executing
        job.queue = row[1]
        job.worker = row[2]
        job.attempt = row[3]
        job.max_attempts = row[4]
        job.priority = row[5]
        job.args = _json_field(row[6])
        job.meta = _json_field(row[7])
        job.errors = _json_field(row[8])
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
