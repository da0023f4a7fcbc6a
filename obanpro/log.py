"""Logging set-up for the command line: text or JSON lines on standard error."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from . import telemetry_logger

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        for key, value in getattr(record, "obanpro", {}).items():
            entry[key] = value

        return json.dumps(entry, default=str)


class RepeatFilter(logging.Filter):
    """Passes at most `BURST` warnings per `WINDOW` seconds for each logger and message template.

    A node that loses its database retries every loop at once and would log
    the same warning hundreds of times; the first message after a quiet spell
    gives the number held back.
    """

    BURST = 3
    WINDOW = 60.0
    MAX_KEYS = 1_000

    def __init__(self) -> None:
        super().__init__()
        self._windows: dict[tuple[str, str], list[float | int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True

        key = (record.name, str(record.msg))
        window = self._windows.get(key)
        if window is None or record.created - window[0] > self.WINDOW:
            if len(self._windows) >= self.MAX_KEYS:
                self._windows.clear()
            held = window[2] if window else 0
            window = self._windows[key] = [record.created, 0, held]

        if window[1] >= self.BURST:
            window[2] += 1
            return False

        window[1] += 1
        if window[2] and isinstance(record.args, tuple):
            record.msg = f"{record.msg} (%d similar messages held back)"
            record.args = (*record.args, window[2])
            window[2] = 0
        return True


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send obanpro's logs, and the root logger's, to standard error at ``level``, job and loop events included.

    The telemetry logger is attached here, before a node forks, so its worker
    and duties processes inherit it.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RepeatFilter())

    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    telemetry_logger.attach()
