"""The default telemetry logger: job events and the spans of the background loops, as log records.

Levels: ``oban.job.start`` and ``oban.job.stop`` at DEBUG, ``oban.job.exception``
at WARNING with the error, a span's ``.stop`` at DEBUG and its ``.exception``
at ERROR. Each record carries the event's fields in ``record.obanpro``, and
the JSON formatter of `obanpro.log` writes them as keys of the line. The
message is a sentence for text logs. With ``fmt="json"`` the message itself
is the JSON object instead, for applications whose own formatter prints only
the message.

``obanpro start`` attaches it through `obanpro.log.configure`, before the
worker and duties processes fork, so every process of the node inherits it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from . import telemetry

HANDLER_ID = "obanpro-logger"

EVENTS = (
    telemetry.JOB_START,
    telemetry.JOB_STOP,
    telemetry.JOB_EXCEPTION,
    *(f"{span}.{phase}" for span in telemetry.SPANS for phase in ("stop", "exception")),
)
"""The events the logger subscribes to when `attach` gets no ``events``."""

JOB_FIELDS = ("id", "worker", "queue", "attempt", "max_attempts", "args", "meta", "tags")

ERROR_INTERVAL = 10.0
"""Seconds during which further ``.exception`` records of the same span are counted instead of logged."""

_SKIPPED = frozenset({"job", "system_time", "monotonic_time", "error", "duration", "traceback"})


def attach(
    *,
    logger: logging.Logger | None = None,
    events: Iterable[str] | None = None,
    fmt: str = "text",
) -> None:
    """Log telemetry events through ``logger`` (``obanpro.events`` by default); attaching again replaces it.

    Raises:
        ValueError: for an unknown event name or a format other than "text" or "json".
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"invalid fmt {fmt!r}: expected 'text' or 'json'")

    handler = EventLogger(logger or logging.getLogger("obanpro.events"), fmt)
    detach()
    telemetry.attach(HANDLER_ID, EVENTS if events is None else events, handler)


def detach() -> None:
    telemetry.detach(HANDLER_ID)


class EventLogger:
    """A telemetry handler that turns each event into one log record."""

    def __init__(self, logger: logging.Logger, fmt: str = "text") -> None:
        self.logger = logger
        self.fmt = fmt
        self._errors: dict[str, tuple[float, int]] = {}
        """Span name to (time of its last logged exception, exceptions counted since)."""

    def __call__(self, name: str, metadata: dict[str, Any]) -> None:
        level = _level(name)
        if not self.logger.isEnabledFor(level):
            return

        if name.startswith("oban.job."):
            fields, message = _job_event(name, metadata)
        else:
            fields, message = _span_event(name, metadata)

        if level == logging.ERROR:
            repeated = self._count(name)
            if repeated is None:
                return
            if repeated:
                fields["repeated"] = repeated
                message += f"; {repeated} more failures of {name.rpartition('.')[0]} were not logged before this one"

        if self.fmt == "json":
            self.logger.log(level, json.dumps(fields, default=str))
        else:
            self.logger.log(level, message, extra={"obanpro": fields})

    def _count(self, name: str) -> int | None:
        """Return None when an error record of ``name`` was logged recently, else how many were suppressed since."""
        now = time.monotonic()
        last, suppressed = self._errors.get(name, (float("-inf"), 0))
        if now - last < ERROR_INTERVAL:
            self._errors[name] = (last, suppressed + 1)
            return None

        self._errors[name] = (now, 0)
        return suppressed


def _level(name: str) -> int:
    if name == telemetry.JOB_EXCEPTION:
        return logging.WARNING
    if name.endswith(".exception"):
        return logging.ERROR
    return logging.DEBUG


def _milliseconds(nanoseconds: Any) -> float | None:
    return round(nanoseconds / 1e6, 2) if isinstance(nanoseconds, (int, float)) else None


def _readable(milliseconds: float | None) -> str:
    """Return a duration for a log line: milliseconds below one second, seconds above."""
    if milliseconds is None:
        return "an unknown time"
    if milliseconds < 1000:
        return f"{milliseconds:g} ms"
    return f"{milliseconds / 1000:.2f} s"


def _job_event(name: str, metadata: dict[str, Any]) -> tuple[dict[str, Any], str]:
    job = metadata["job"]
    fields: dict[str, Any] = {"event": name}
    fields.update((field, getattr(job, field, None)) for field in JOB_FIELDS)
    where = f"job {job.id} ({job.worker}) in queue {job.queue}, attempt {job.attempt} of {job.max_attempts}"

    if name == telemetry.JOB_START:
        return fields, f"{where} started"

    fields["state"] = str(metadata.get("state"))
    fields["duration"] = _milliseconds(metadata.get("duration"))
    fields["queue_time"] = _milliseconds(metadata.get("queue_time"))
    timing = f"after running {_readable(fields['duration'])} (it started {_readable(fields['queue_time'])} after it was due)"

    if name == telemetry.JOB_STOP:
        return fields, f"{where} ended {fields['state']} {timing}"

    fields["error_type"] = metadata.get("error_type")
    fields["error_message"] = metadata.get("error_message")
    return fields, (
        f"{where} failed {timing}: {fields['error_type']}: {fields['error_message']}; it is now {fields['state']}"
    )


def _span_event(name: str, metadata: dict[str, Any]) -> tuple[dict[str, Any], str]:
    fields: dict[str, Any] = {"event": name, "duration": _milliseconds(metadata.get("duration"))}
    fields.update((key, value) for key, value in metadata.items() if key not in _SKIPPED)
    details = ", ".join(f"{key} {value}" for key, value in fields.items() if key not in ("event", "duration"))
    span = name.rpartition(".")[0]

    if name.endswith(".exception"):
        error = metadata.get("error")
        fields["error_type"] = type(error).__name__
        fields["error_message"] = str(error)
        message = f"{span} failed after {_readable(fields['duration'])}: {fields['error_type']}: {error}"
    else:
        message = f"{span} took {_readable(fields['duration'])}"

    return fields, f"{message} ({details})" if details else message
