# Declarations for the compiled hot path. The byte layout of these structs is
# documented once, in the header comment of _core.pyx, and checked by
# tests/test_slots.py through `layout()`.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t


cdef extern from "_atomics.h":
    uint64_t op_load_u64(uint64_t *p) nogil
    void op_store_u64(uint64_t *p, uint64_t v) nogil
    bint op_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired) nogil
    uint64_t op_add_u64(uint64_t *p, uint64_t v) nogil
    int64_t op_load_i64(int64_t *p) nogil
    void op_store_i64(int64_t *p, int64_t v) nogil
    uint32_t op_load_u32(uint32_t *p) nogil
    void op_store_u32(uint32_t *p, uint32_t v) nogil
    uint32_t op_add_u32(uint32_t *p, uint32_t v) nogil
    bint op_cas_u32(uint32_t *p, uint32_t expected, uint32_t desired) nogil
    int32_t op_load_i32(int32_t *p) nogil
    void op_store_i32(int32_t *p, int32_t v) nogil


cdef struct Header:
    uint64_t magic
    uint32_t version
    uint32_t header_size
    uint32_t max_queues
    uint32_t max_workers
    uint32_t entry_count
    uint32_t queue_record_size
    uint32_t worker_record_size
    uint32_t entry_size
    int32_t supervisor_pid
    uint32_t flags
    int64_t created_at_ns
    uint32_t next_entry
    uint32_t generation
    char node[64]
    char prefix[64]


cdef struct QueueRecord:
    char name[128]
    uint32_t state
    int32_t limit
    uint32_t paused
    uint32_t region_start
    uint32_t region_size
    uint32_t reserved0
    uint8_t reserved[40]


cdef struct WorkerRecord:
    int32_t pid
    uint32_t state
    int64_t started_at_ns
    uint64_t jobs_run
    uint64_t rss_bytes
    int64_t heartbeat_ns
    uint8_t uuid[16]
    uint32_t index
    uint32_t cpu_busy


cdef struct Entry:
    uint64_t word
    int64_t job_id
    int64_t started_at_ns
    int64_t deadline_ns
    uint32_t cancel
    int32_t attempt
    uint32_t worker_index
    uint32_t timeout_ms
    uint32_t queue_index
    uint8_t reserved[12]


cdef class SlotTable:
    cdef object _buffer
    cdef Py_buffer _view
    cdef bint _has_view
    cdef char *_base
    cdef Header *_header
    cdef QueueRecord *_queues
    cdef WorkerRecord *_workers
    cdef Entry *_entries

    cdef QueueRecord *_queue(self, int index) except NULL
    cdef Entry *_entry(self, int index) except NULL
    cdef WorkerRecord *_worker(self, int index) except NULL
    cdef str _queue_name(self, int q)
