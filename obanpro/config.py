"""Configuration for ``obanpro start``: a TOML file, then the environment, then flags.

Keys and variables follow oban-py's (``oban.toml``, ``OBAN_DSN``, ``OBAN_QUEUES``
...); the multi-process settings use ``OBAN_PRO_*`` variables. A later source
overrides an earlier one key by key, and an unset variable overrides nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .job import MAX_NAME_LENGTH

CONFIG_FILES = ("obanpro.toml", "oban.toml")
MAX_LIMIT = 100_000
"""Largest queue limit: a queue reserves four slots of 64 bytes per unit of limit in shared memory."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """Raised for an invalid setting; the message names the setting, the value and the expected form."""


def parse_queues(spec: Mapping[str, Any] | str) -> dict[str, dict[str, Any]]:
    """Parse ``"default:20,mailers:5"`` or a mapping into ``{name: {"limit": n, "paused": bool, ...}}``.

    Raises:
        ConfigError: naming the bad part and the expected form.
    """
    if isinstance(spec, str):
        return _parse_queue_string(spec)

    if not isinstance(spec, Mapping):
        raise ConfigError(f"invalid queues {spec!r}: expected 'name:limit,...' or a mapping of name to limit")

    queues: dict[str, dict[str, Any]] = {}
    for name, value in spec.items():
        _check_queue_name(name, repr(name))
        if isinstance(value, Mapping):
            options = dict(value)
            if "limit" not in options:
                raise ConfigError(f"invalid queue {name!r}: its table needs a limit, as in limit = 20")
        else:
            options = {"limit": value}

        options["limit"] = _check_limit(options["limit"], f"{name}:{options['limit']}")
        paused = options.get("paused", False)
        if not isinstance(paused, bool):
            raise ConfigError(f"invalid paused {paused!r} for queue {name!r}: expected true or false")
        options["paused"] = paused
        queues[name] = options

    return queues


def _parse_queue_string(spec: str) -> dict[str, dict[str, Any]]:
    queues: dict[str, dict[str, Any]] = {}

    for part in (piece.strip() for piece in spec.split(",")):
        if not part:
            continue

        name, colon, limit = part.rpartition(":")
        if not colon:
            raise ConfigError(f"invalid queue spec {part!r}: expected name:limit, as in 'default:20'")

        name = name.strip()
        _check_queue_name(name, repr(part))
        if name in queues:
            raise ConfigError(f"invalid queue spec {spec!r}: queue {name!r} appears twice")

        queues[name] = {"limit": _check_limit(limit.strip(), part), "paused": False}

    if not queues:
        raise ConfigError(f"invalid queue spec {spec!r}: expected name:limit, as in 'default:20'")

    return queues


def _check_queue_name(name: Any, shown: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"invalid queue spec {shown}: the queue name is missing, as in 'default:20'")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"invalid queue spec {shown}: queue names are at most {MAX_NAME_LENGTH} characters")


def _check_limit(value: Any, shown: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)

    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"invalid queue spec {shown!r}: the limit must be a positive integer, as in 'default:20'")

    if value > MAX_LIMIT:
        raise ConfigError(
            f"invalid queue spec {shown!r}: the limit is at most {MAX_LIMIT:,} jobs at once per node "
            "(each slot takes shared memory); run more nodes for more"
        )

    return value


def format_queues(queues: Mapping[str, Mapping[str, Any]]) -> str:
    return ",".join(f"{name}:{options['limit']}" for name, options in queues.items())


@dataclass
class Config:
    """Settings of one ``obanpro start`` node."""

    dsn: str | None = None
    name: str = "Oban"
    node: str = field(default_factory=socket.gethostname)
    prefix: str = "public"
    queues: dict[str, dict[str, Any]] = field(default_factory=dict)
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    imports: list[str] = field(default_factory=list)
    setup: str | None = None
    teardown: str | None = None
    grace_period: float = 15.0
    max_jobs_per_process: int = 0
    max_memory_per_process: int = 0
    pool_min_size: int = 0
    pool_max_size: int = 10
    log_level: str = "INFO"
    log_format: str = "text"
    stager: dict[str, Any] = field(default_factory=dict)
    lifeline: dict[str, Any] = field(default_factory=dict)
    pruner: dict[str, Any] = field(default_factory=dict)
    refresher: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    vacuum_watch: dict[str, Any] = field(default_factory=dict)
    leadership: bool | None = None
    source: str | None = None

    def validate(self) -> Config:
        """Check every setting; raise ConfigError naming the first bad one."""
        from .queries import check_prefix

        for name in ("dsn", "setup", "teardown"):
            _require_text(name, getattr(self, name), optional=True)
        for name in ("name", "node", "prefix", "log_level", "log_format"):
            _require_text(name, getattr(self, name))
        if not isinstance(self.imports, list) or not all(isinstance(module, str) for module in self.imports):
            raise ConfigError(f"invalid imports {self.imports!r}: expected a list of module names, as in [\"app.workers\"]")
        for name in ("stager", "lifeline", "pruner", "refresher", "scheduler", "vacuum_watch"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"invalid {name} {getattr(self, name)!r}: expected a table, as in [{name}]")
        if self.leadership is not None and not isinstance(self.leadership, bool):
            raise ConfigError(f"invalid leadership {self.leadership!r}: expected true or false")

        try:
            check_prefix(self.prefix)
        except ValueError as error:
            raise ConfigError(str(error)) from None

        self.queues = parse_queues(self.queues)
        _require_int("processes", self.processes, 1, 1024)
        _require_int("max_jobs_per_process", self.max_jobs_per_process, 0, None)
        _require_int("max_memory_per_process", self.max_memory_per_process, 0, None)
        _require_int("pool_min_size", self.pool_min_size, 0, 1000)
        _require_int("pool_max_size", self.pool_max_size, 1, 1000)

        if self.pool_min_size > self.pool_max_size:
            raise ConfigError(
                f"invalid pool sizes: pool_min_size {self.pool_min_size} is above pool_max_size {self.pool_max_size}"
            )
        if isinstance(self.grace_period, bool) or not isinstance(self.grace_period, (int, float)) or not (
            math.isfinite(self.grace_period) and self.grace_period >= 0
        ):
            raise ConfigError(f"invalid grace_period {self.grace_period!r}: expected seconds, zero or more")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"invalid log_level {self.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"invalid log_format {self.log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
        if not self.node.strip() or len(self.node) > 255:
            raise ConfigError(f"invalid node {self.node[:60]!r}: expected a name of 1 to 255 characters")

        from .node import check_options

        try:
            check_options({"stager": self.stager, "scheduler": self.scheduler, "pruner": self.pruner,
                           "lifeline": self.lifeline, "refresher": self.refresher, "vacuum_watch": self.vacuum_watch})
        except ValueError as error:
            raise ConfigError(str(error)) from None

        self.log_level = self.log_level.upper()
        return self


_INT_FIELDS = {
    "processes",
    "max_jobs_per_process",
    "max_memory_per_process",
    "pool_min_size",
    "pool_max_size",
}

ENVIRONMENT = {
    "OBAN_DSN": "dsn",
    "OBAN_QUEUES": "queues",
    "OBAN_PREFIX": "prefix",
    "OBAN_NODE": "node",
    "OBAN_POOL_MIN_SIZE": "pool_min_size",
    "OBAN_POOL_MAX_SIZE": "pool_max_size",
    "OBAN_IMPORTS": "imports",
    "OBAN_LOG_LEVEL": "log_level",
    "OBAN_LOG_FORMAT": "log_format",
    "OBAN_GRACE_PERIOD": "grace_period",
    "OBAN_PRO_PROCESSES": "processes",
    "OBAN_PRO_SETUP": "setup",
    "OBAN_PRO_TEARDOWN": "teardown",
    "OBAN_PRO_MAX_JOBS_PER_PROCESS": "max_jobs_per_process",
    "OBAN_PRO_MAX_MEMORY_PER_PROCESS": "max_memory_per_process",
}
"""Environment variable to setting."""


def load(
    config_path: str | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Config:
    """Build a Config from the file, the environment and ``flags`` (None values are ignored), in that order."""
    environ = os.environ if environ is None else environ
    config = Config()
    values: dict[str, Any] = {}

    path = _find_file(config_path, cwd or Path.cwd())
    if path is not None:
        values.update(_read_file(path))
        config.source = str(path)

    for variable, key in ENVIRONMENT.items():
        raw = environ.get(variable)
        if raw is not None and raw != "":
            values[key] = _from_text(key, raw, variable)

    for key, value in (flags or {}).items():
        if value is not None and value != ():
            values[key] = list(value) if isinstance(value, tuple) else value

    for key, value in values.items():
        setattr(config, key, value)

    return config.validate()


def _find_file(config_path: str | None, cwd: Path) -> Path | None:
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {config_path} not found")
        return path

    for name in CONFIG_FILES:
        if (cwd / name).is_file():
            return cwd / name

    return None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"invalid TOML in {path}: {error}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None

    known = {item.name for item in dataclasses.fields(Config)} - {"source"}
    values: dict[str, Any] = {}

    for key, value in data.items():
        if key in ("metrics",):
            continue
        if key not in known:
            raise ConfigError(f"unknown setting {key!r} in {path}; known settings are {', '.join(sorted(known))}")

        if key == "imports" and isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        values[key] = value

    return values


def _from_text(key: str, raw: str, variable: str) -> Any:
    if key == "imports":
        return [item.strip() for item in raw.split(",") if item.strip()]

    if key == "queues":
        # Checked here, where the error can name the variable the spec came from.
        try:
            parse_queues(raw)
        except ConfigError as error:
            raise ConfigError(f"invalid {variable}: {error}") from None
        return raw

    if key in _INT_FIELDS:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"invalid {variable}={raw!r}: expected an integer") from None

    if key == "grace_period":
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"invalid {variable}={raw!r}: expected seconds as a number") from None

    return raw


def _require_text(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise ConfigError(f"invalid {name} {value!r}: expected a string")


def _require_int(name: str, value: Any, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"{low} or more"
        raise ConfigError(f"invalid {name} {value!r}: expected an integer {bound}")
