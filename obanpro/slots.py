"""The node's slot table in POSIX shared memory: creating, attaching, finding and removing segments.

The supervisor creates one segment per node with a unique name
(``/obanpro.<uid>.<supervisor pid>.<random>``), mode 0600, and is the only
process that unlinks it. Workers inherit the mapping through fork. A segment
whose supervisor died is removed by the next ``obanpro start`` of the same
user; ``obanpro status`` finds running nodes by listing the segments.

The byte layout and the lock-free operations live in ``_core.pyx``.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
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

    def close(self) -> None:
        """Drop this process's view; the segment stays for the others."""
        self.table = None  # type: ignore[assignment]
        try:
            self.mapping.close()
        except BufferError:
            pass  # a view is still exported; the mapping closes with the process

    def unlink(self) -> None:
        """Remove the segment's name; processes that mapped it keep their mapping."""
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass


def _capacities(queues: dict[str, dict], max_workers: int) -> tuple[int, int, int]:
    entries = sum(queue_capacity(options["limit"]) for options in queues.values()) + SPARE_ENTRIES
    return max(MAX_QUEUES, len(queues)), max_workers, entries


def _format(buffer: object, node: str, queues: dict[str, dict], capacities: tuple[int, int, int]) -> SlotTable:
    table = SlotTable.format(buffer, node, *capacities, os.getpid())
    for queue, options in queues.items():
        table.add_queue(queue, options["limit"], queue_capacity(options["limit"]), options.get("paused", False))
    return table


def create(node: str, queues: dict[str, dict], max_workers: int) -> Segment:
    """Create and format a segment for ``queues`` (name to options with ``limit`` and ``paused``)."""
    capacities = _capacities(queues, max_workers)
    size = table_size(*capacities)
    name = f"/{SEGMENT_PREFIX}{os.getuid()}.{os.getpid()}.{secrets.token_hex(4)}"

    memory = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        mapping = mmap.mmap(memory.fd, size)
    finally:
        memory.close_fd()

    return Segment(name, _format(mapping, node, queues, capacities), mapping)


def private_table(node: str, queues: dict[str, dict]) -> SlotTable:
    """Return a one-process table in ordinary memory, for an `Oban` embedded in an application."""
    capacities = _capacities(queues, 1)
    return _format(bytearray(table_size(*capacities)), node, queues, capacities)


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


def supervisor_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True

    # A zombie holds its pid until reaped but runs nothing.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale() -> list[str]:
    """Unlink this user's segments whose supervisor is gone; return their names."""
    removed = []

    for name in segment_names():
        pid = _pid_from_name(name)
        if pid is None or pid == os.getpid() or supervisor_alive(pid):
            continue

        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            continue

        log.warning("removed slot table %s left by supervisor pid %s, which is no longer running", name, pid)
        removed.append(name)

    return removed


def live_segments() -> list[Segment]:
    """Attach read-only to every segment whose supervisor is running."""
    found = []

    for name in segment_names():
        pid = _pid_from_name(name)
        if pid is None or not supervisor_alive(pid):
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
