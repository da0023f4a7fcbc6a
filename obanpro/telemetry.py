"""Telemetry events with oban-py's names: attach handlers, emit events, time spans.

Handlers run synchronously in the emitting process. A handler that raises is
logged and detached from nothing: the next event still reaches it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any]], None]

JOB_START = "oban.job.start"
JOB_STOP = "oban.job.stop"
JOB_EXCEPTION = "oban.job.exception"

SPANS = (
    "oban.producer.get",
    "oban.producer.ack",
    "oban.stager.stage",
    "oban.pruner.prune",
    "oban.lifeline.rescue",
    "oban.refresher.refresh",
    "oban.refresher.cleanup",
    "oban.scheduler.evaluate",
    "oban.leader.election",
)

EVENTS = (
    JOB_START,
    JOB_STOP,
    JOB_EXCEPTION,
    *(f"{span}.{phase}" for span in SPANS for phase in ("start", "stop", "exception")),
)
"""Every event obanpro emits."""

_handlers: dict[str, tuple[frozenset[str], Handler]] = {}
_by_event: dict[str, list[Handler]] = {}


def attach(handler_id: str, events: Iterable[str], handler: Handler) -> None:
    """Call ``handler(name, metadata)`` for each of ``events``; ``handler_id`` must be unique."""
    names = frozenset(events)
    unknown = names - set(EVENTS)
    if unknown:
        raise ValueError(f"unknown telemetry events {sorted(unknown)}; known events are listed in obanpro.telemetry.EVENTS")

    if handler_id in _handlers:
        raise ValueError(f"a telemetry handler with id {handler_id!r} is already attached")

    _handlers[handler_id] = (names, handler)
    _rebuild()


def detach(handler_id: str) -> None:
    _handlers.pop(handler_id, None)
    _rebuild()


def _rebuild() -> None:
    _by_event.clear()
    for names, handler in _handlers.values():
        for name in names:
            _by_event.setdefault(name, []).append(handler)


def execute(name: str, metadata: dict[str, Any]) -> None:
    """Emit event ``name`` to its handlers."""
    handlers = _by_event.get(name)
    if not handlers:
        return

    for handler in handlers:
        try:
            handler(name, metadata)
        except Exception:
            log.exception("telemetry handler for %s failed", name)


def enabled(name: str) -> bool:
    return name in _by_event


class Span:
    """Metadata collected while a span runs; ``add`` merges values into the stop event."""

    __slots__ = ("metadata",)

    def __init__(self, metadata: dict[str, Any]) -> None:
        self.metadata = metadata

    def add(self, values: dict[str, Any]) -> None:
        self.metadata.update(values)


@contextmanager
def span(prefix: str, metadata: dict[str, Any]) -> Iterator[Span]:
    """Emit ``<prefix>.start``, then ``.stop`` with a ``duration`` in ns, or ``.exception`` on error."""
    start = time.monotonic_ns()
    current = Span(dict(metadata))
    execute(f"{prefix}.start", {**current.metadata, "system_time": start})

    try:
        yield current
    except Exception as error:
        execute(
            f"{prefix}.exception",
            {**current.metadata, "duration": time.monotonic_ns() - start, "error": error},
        )
        raise

    execute(f"{prefix}.stop", {**current.metadata, "duration": time.monotonic_ns() - start})
