/* Sequentially consistent atomics on shared memory, for _core.pyx.
 *
 * The slot table lives in a POSIX shared-memory segment mapped by several
 * processes. Neither the GIL nor `volatile` orders memory between processes,
 * so every word that more than one process writes goes through these GCC/Clang
 * builtins. They compile to single lock-prefixed instructions on x86-64 and to
 * LL/SC loops on ARM; a process killed at any instruction leaves each word
 * either fully written or untouched. */
#ifndef OBANPRO_ATOMICS_H
#define OBANPRO_ATOMICS_H

#include <stdint.h>

static inline uint64_t op_load_u64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void op_store_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline int op_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline uint64_t op_add_u64(uint64_t *p, uint64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }

static inline int64_t op_load_i64(int64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void op_store_i64(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }

static inline uint32_t op_load_u32(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void op_store_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t op_add_u32(uint32_t *p, uint32_t v) { return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }
static inline int op_cas_u32(uint32_t *p, uint32_t expected, uint32_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static inline int32_t op_load_i32(int32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void op_store_i32(int32_t *p, int32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }

#endif
