"""Node services: the loops a node runs once, whatever its number of worker processes.

`NodeServices` runs in the duties process under ``obanpro start``, and inside
the application's loop for an `Oban` embedded with queues. Each service is an
object with ``start()`` and ``async stop()``; they share one pool and act on the
node's slot table, which every worker process reads without a round trip.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg

from . import _core
from .stager import Stager

log = logging.getLogger(__name__)


class Service(Protocol):
    """A background loop with a lifecycle."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class NodeContext:
    """What node services share."""

    pool: asyncpg.Pool
    dsn: str
    prefix: str
    name: str
    node: str
    table: _core.SlotTable
    wake_worker: Callable[[int], None]
    """Wakes the worker process with the given slot-table index (all of them for -1)."""
    request_queue: Callable[[dict[str, Any]], None]
    """Asks the owner of the table's shape to add a queue: ``{"queue", "limit", "paused"}``."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-service settings from the config: stager, lifeline, pruner, refresher, scheduler."""
    leadership: bool = True

    def running_queues(self) -> list[str]:
        table = self.table
        return [name for name, index in table.queues().items() if table.queue_state(index) == _core.QUEUE_RUNNING]

    def worker_index_of(self, pid: int) -> int:
        for index in range(self.table.max_workers):
            if self.table.worker_pid(index) == pid:
                return index
        return -1


class NodeServices:
    """Starts and stops the node's services in order."""

    def __init__(self, context: NodeContext) -> None:
        self.context = context
        self.services: list[Service] = []

    async def start(self) -> None:
        context = self.context
        self.services = [
            Stager(context.pool, context.prefix, context.running_queues, **context.options.get("stager", {})),
        ]

        for service in self.services:
            service.start()

        log.debug("node %s services started in pid %s", context.node, os.getpid())

    async def stop(self) -> None:
        for service in reversed(self.services):
            try:
                await service.stop()
            except Exception:
                log.exception("stopping %s failed", type(service).__name__)
        self.services = []
