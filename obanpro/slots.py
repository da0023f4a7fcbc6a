"""The node's slot table in POSIX shared memory: creating, attaching, finding and removing segments.

The supervisor creates one segment per node with a unique name
(``/obanpro.<uid>.<supervisor pid>.<random>``), mode 0600, and is the only
process that unlinks it. Workers inherit the mapping through fork, and the
supervisor's descriptor with an exclusive flock on the segment. A segment that
no process holds locked any more belongs to a node that is gone: the next
``obanpro start`` of the same user removes it. ``obanpro status`` finds running
nodes by listing the segments.

The byte layout and the lock-free operations live in ``_core.pyx``.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

import posix_ipc

from ._core import SlotTable, table_size

log = logging.getLogger(__name__)

SEGMENT_PREFIX = "obanpro."
SHM_DIR = Path("/dev/shm")
MAX_QUEUES = 64
SPARE_ENTRIES = 1024
"""Entries kept free for queues started at run time."""


def queue_capacity(limit: int) -> int:
    """Return the slots reserved for a queue: room to scale up to four times its limit, at least 256."""
    return max(4 * limit, 256)


@dataclass
class Segment:
    """A mapped slot table segment."""

    name: str
    table: SlotTable
    mapping: mmap.mmap
    lock_fd: int = -1
    """The supervisor's open descriptor with an exclusive flock, held while the node runs."""

    def close(self) -> None:
        """Drop this process's view; the segment stays for the others."""
        self.table = None  # type: ignore[assignment]
        try:
            self.mapping.close()
        except BufferError:
            pass  # a view is still exported; the mapping closes with the process
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def unlink(self) -> None:
        """Remove the segment's name; processes that mapped it keep their mapping."""
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass


def _capacities(queues: dict[str, dict], max_workers: int) -> tuple[int, int, int]:
    entries = sum(queue_capacity(options["limit"]) for options in queues.values()) + SPARE_ENTRIES
    return max(MAX_QUEUES, len(queues)), max_workers, entries


def _format(
    buffer: object, node: str, queues: dict[str, dict], capacities: tuple[int, int, int], prefix: str = ""
) -> SlotTable:
    table = SlotTable.format(buffer, node, *capacities, os.getpid(), prefix)
    for queue, options in queues.items():
        table.add_queue(queue, options["limit"], queue_capacity(options["limit"]), options.get("paused", False))
    return table


def create(node: str, queues: dict[str, dict], max_workers: int, prefix: str = "") -> Segment:
    """Create and format a segment for ``queues`` (name to options with ``limit`` and ``paused``)."""
    capacities = _capacities(queues, max_workers)
    size = table_size(*capacities)
    name = f"/{SEGMENT_PREFIX}{os.getuid()}.{os.getpid()}.{secrets.token_hex(4)}"

    memory = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        mapping = mmap.mmap(memory.fd, size)
        # The lock lives as long as any process of the node keeps this descriptor,
        # forked workers included, which tells a live segment from a stale one
        # even where pids are not comparable (separate pid namespaces).
        fcntl.flock(memory.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        memory.close_fd()
        raise

    return Segment(name, _format(mapping, node, queues, capacities, prefix), mapping, memory.fd)


def private_table(node: str, queues: dict[str, dict], prefix: str = "") -> SlotTable:
    """Return a one-process table in ordinary memory, for an `Oban` embedded in an application."""
    capacities = _capacities(queues, 1)
    return _format(bytearray(table_size(*capacities)), node, queues, capacities, prefix)


def attach(name: str, *, writable: bool = True) -> Segment:
    """Map an existing segment by name."""
    memory = posix_ipc.SharedMemory(name, flags=0, read_only=not writable)
    try:
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        mapping = mmap.mmap(memory.fd, memory.size, access=access)
    finally:
        memory.close_fd()

    # SlotTable needs a writable buffer, so a read-only mapping is copied once.
    source = mapping if writable else bytearray(mapping)
    return Segment(name, SlotTable(source), mapping)


def segment_names() -> list[str]:
    """Return the names of this user's obanpro segments on this host."""
    if not SHM_DIR.is_dir():
        return []

    uid = os.getuid()
    names = []
    for path in SHM_DIR.iterdir():
        if path.name.startswith(f"{SEGMENT_PREFIX}{uid}."):
            names.append("/" + path.name)
    return sorted(names)


def in_use(name: str) -> bool:
    """Return True while some process of the node that created segment ``name`` still runs."""
    try:
        memory = posix_ipc.SharedMemory(name, flags=0, read_only=True)
    except posix_ipc.ExistentialError:
        return False

    try:
        fcntl.flock(memory.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        memory.close_fd()

    return False


@dataclass
class StaleSegment:
    """What a removed segment said about the node that left it."""

    name: str
    supervisor_pid: int | None
    node: str
    worker_uuids: list[uuid.UUID]
    queues: list[str]


def remove_stale() -> list[StaleSegment]:
    """Unlink this user's segments that no running node holds; return what they recorded.

    The worker uuids let the caller rescue the jobs those processes left
    executing when the whole node was killed.
    """
    removed = []

    for name in segment_names():
        pid = _pid_from_name(name)
        if pid == os.getpid() or in_use(name):
            continue

        stale = _describe(name, pid)
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            continue

        log.warning("removed slot table %s left by supervisor pid %s, which is no longer running", name, pid)
        removed.append(stale)

    return removed


def _describe(name: str, pid: int | None) -> StaleSegment:
    try:
        segment = attach(name, writable=False)
    except (posix_ipc.Error, ValueError, OSError):
        return StaleSegment(name, pid, "", [], [])

    table = segment.table
    uuids = [
        uuid.UUID(bytes=table.worker(index)["uuid"])
        for index in range(table.max_workers)
        if any(table.worker(index)["uuid"])
    ]
    stale = StaleSegment(name, pid, table.node, uuids, list(table.queues()))
    segment.close()
    return stale


def live_segments() -> list[Segment]:
    """Attach read-only to every segment whose supervisor is running."""
    found = []

    for name in segment_names():
        if not in_use(name):
            continue
        try:
            found.append(attach(name, writable=False))
        except (posix_ipc.Error, ValueError, OSError) as error:
            log.debug("skipped slot table %s: %r", name, error)

    return found


def _pid_from_name(name: str) -> int | None:
    parts = name.lstrip("/").split(".")
    try:
        return int(parts[2])
    except (IndexError, ValueError):
        return None
