"""Jobs and the values a worker's ``process`` may return.

A `Job` mirrors one row of ``oban_jobs``. Timestamps are timezone-aware UTC in
Python and stored as UTC without a time zone, as Oban stores them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from . import erlang_term

MAX_NAME_LENGTH = 127
"""Longest queue or worker name: Elixir Oban checks ``char_length < 128``."""


class JobState(StrEnum):
    """The labels of the ``oban_job_state`` enum."""

    AVAILABLE = "available"
    SCHEDULED = "scheduled"
    SUSPENDED = "suspended"
    EXECUTING = "executing"
    RETRYABLE = "retryable"
    COMPLETED = "completed"
    DISCARDED = "discarded"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Snooze:
    """Return value that reschedules the job ``seconds`` from now without using an attempt."""

    seconds: int | float
    meta: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)):
            raise TypeError(f"Snooze seconds must be a number, got {self.seconds!r}")
        if not math.isfinite(self.seconds) or self.seconds < 0:
            raise ValueError(f"Snooze seconds must be zero or more, got {self.seconds!r}")


@dataclass(frozen=True, slots=True)
class Cancel:
    """Return value that cancels the job and records ``reason`` in its errors."""

    reason: str


class Record:
    """Return value that completes the job and stores ``value`` in ``meta.return``.

    The value is encoded in the Erlang external term format, as Oban does, so
    Elixir nodes and Oban Web can read it.
    """

    __slots__ = ("value", "encoded")

    def __init__(self, value: Any, limit: int = 64_000_000) -> None:
        encoded = erlang_term.encode_base64(value)

        if len(encoded) > limit:
            raise ValueError(
                f"recorded value is {len(encoded)} bytes once encoded, over the limit of {limit}"
            )

        self.value = value
        self.encoded = encoded

    def __repr__(self) -> str:
        return f"Record({self.value!r})"


def utc_now() -> datetime:
    return datetime.now(UTC)


def to_utc(value: datetime) -> datetime:
    """Return ``value`` as an aware UTC datetime; naive values are taken as UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)

    return value.astimezone(UTC)


def scheduled_utc(value: Any) -> datetime:
    """Return a ``scheduled_at`` value as an aware UTC datetime, raising TypeError or ValueError that name the field."""
    if not isinstance(value, datetime):
        raise TypeError(f"invalid scheduled_at {value!r}: expected a datetime")

    try:
        return to_utc(value)
    except OverflowError:
        raise ValueError(f"invalid scheduled_at {value!r}: out of range once converted to UTC") from None


def schedule_time(schedule_in: timedelta | int | float) -> datetime:
    if isinstance(schedule_in, timedelta):
        return utc_now() + schedule_in

    if isinstance(schedule_in, bool) or not isinstance(schedule_in, (int, float)):
        raise TypeError(
            f"invalid schedule_in {schedule_in!r}: expected seconds as a number or a timedelta"
        )

    return utc_now() + timedelta(seconds=schedule_in)


def normalize_tags(tags: Any) -> list[str]:
    """Return tags as Oban stores them: strings, stripped, lower-cased, unique and sorted."""
    if isinstance(tags, str) or not isinstance(tags, (list, tuple, set, frozenset)):
        raise TypeError(f"invalid tags {tags!r}: expected a list of strings")

    if not tags:
        return []

    normalized = sorted({str(tag).strip().lower() for tag in tags if tag is not None and str(tag).strip()})
    for tag in normalized:
        problem = _string_problem(tag, f"tag {tag!r}")
        if problem:
            raise ValueError(f"invalid tags: {problem}")
    return normalized


def find_unserializable(value: Any, path: str = "args") -> str | None:
    """Return the path of the first value that JSON cannot encode, or None."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path}[{key!r}] (keys must be strings)"

            problem = _string_problem(key, f"{path} key {key!r}")
            if problem:
                return problem

            found = find_unserializable(item, f"{path}[{key!r}]")
            if found:
                return found

        return None

    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = find_unserializable(item, f"{path}[{index}]")
            if found:
                return found

        return None

    if isinstance(value, str):
        return _string_problem(value, path)

    if isinstance(value, float) and not math.isfinite(value):
        return f"{path} ({value!r} is not valid JSON)"

    if value is None or isinstance(value, (str, int, float, bool)):
        return None

    return f"{path} ({type(value).__name__} is not JSON-serialisable)"


def _string_problem(value: str, path: str) -> str | None:
    """Name what PostgreSQL rejects in a text or jsonb string: NUL, or a surrogate without its pair."""
    if value.isascii():
        return f"{path} (contains the NUL character, which PostgreSQL cannot store)" if "\x00" in value else None

    if "\x00" in value:
        return f"{path} (contains the NUL character, which PostgreSQL cannot store)"

    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{path} (contains an unpaired surrogate, which is not valid Unicode)"

    return None


encode_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
"""Compact, strict JSON; one encoder for every call, since json.dumps builds one per call with options."""


def encode_object(value: Any, field: str) -> str:
    """Encode a JSON object field (args or meta), naming the offending key on failure."""
    if type(value) is not dict and not isinstance(value, Mapping):
        raise ValueError(
            f"invalid {field} {value!r}: expected a JSON object (a dict with string keys)"
        )

    if not value:
        return "{}"

    # The C encoder does the work; the slow walk that names the bad value runs
    # only when something is wrong. Escaped NULs and surrogates show in the
    # output, since the encoder writes ASCII, and only keys need a check of their own.
    try:
        text = encode_json(value)
    except (TypeError, ValueError):
        text = None

    if text is None or "\\u0000" in text or "\\ud" in text or not _keys_are_strings(value, text):
        bad = find_unserializable(value, field)
        if bad:
            raise ValueError(f"invalid {field}: {bad}")
        if text is None:
            raise ValueError(f"invalid {field}: not JSON-serialisable")

    return text


def _keys_are_strings(value: Mapping[str, Any], text: str) -> bool:
    """Return False when a dict anywhere in ``value`` has a key that is not a string.

    The JSON encoder turns such keys into strings silently, so they need this
    check. ``text`` is the encoded value: with no nested object or array in it,
    only the top-level keys need a look.
    """
    if text.find("{", 1) == -1 and "[" not in text:
        return all(type(key) is str for key in value)

    pending: list[Any] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, Mapping):
            for key, inner in item.items():
                if type(key) is not str:
                    return False
                if isinstance(inner, (Mapping, list, tuple)):
                    pending.append(inner)
        else:
            pending.extend(inner for inner in item if isinstance(inner, (Mapping, list, tuple)))
    return True


class Job:
    """One unit of work: a worker name, JSON args and the Oban bookkeeping around them.

    Args:
        worker: dotted ``module.Name`` of the worker that runs the job.
        args: JSON object passed to the worker.
        queue: queue name, 1 to 127 characters.
        priority: 0 (highest) to 9.
        max_attempts: attempts before the job is discarded, at least 1.
        tags: strings, normalised as Oban does.
        meta: JSON object stored with the job.
        scheduled_at: when the job becomes available; a later time makes it ``scheduled``.
        scheduled_in: seconds or a timedelta from now, instead of ``scheduled_at``;
            ``schedule_in`` is accepted too, as in oban-py.

    Raises:
        TypeError, ValueError: when a field has the wrong type or value, naming it.
    """

    __slots__ = (
        "id",
        "state",
        "queue",
        "worker",
        "attempt",
        "max_attempts",
        "priority",
        "args",
        "meta",
        "errors",
        "tags",
        "attempted_by",
        "inserted_at",
        "scheduled_at",
        "attempted_at",
        "cancelled_at",
        "completed_at",
        "discarded_at",
        "extra",
        "_cancel_check",
    )

    def __init__(
        self,
        worker: str,
        args: Mapping[str, Any] | None = None,
        *,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int = 20,
        tags: list[str] | None = None,
        meta: Mapping[str, Any] | None = None,
        scheduled_at: datetime | None = None,
        schedule_in: timedelta | int | float | None = None,
        scheduled_in: timedelta | int | float | None = None,
        state: str = JobState.AVAILABLE,
        id: int | None = None,
        attempt: int = 0,
        errors: list[dict[str, Any]] | None = None,
        attempted_by: list[str] | None = None,
        inserted_at: datetime | None = None,
        attempted_at: datetime | None = None,
        cancelled_at: datetime | None = None,
        completed_at: datetime | None = None,
        discarded_at: datetime | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if schedule_in is not None and scheduled_in is not None:
            raise ValueError("pass scheduled_in or schedule_in, not both: they are the same option")
        schedule_in = scheduled_in if scheduled_in is not None else schedule_in

        if scheduled_at is not None and schedule_in is not None:
            raise ValueError("pass scheduled_at or scheduled_in, not both")

        if schedule_in is not None:
            scheduled_at = schedule_time(schedule_in)

        self.id = id
        self.state = state if type(state) is JobState else JobState(state)
        self.queue = queue
        self.worker = worker
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.priority = priority
        self.args = {} if args is None else args
        self.meta = {} if meta is None else meta
        self.errors = [] if errors is None else errors
        self.tags = normalize_tags([] if tags is None else tags)
        self.attempted_by = [] if attempted_by is None else attempted_by
        self.inserted_at = inserted_at
        self.scheduled_at = None if scheduled_at is None else scheduled_utc(scheduled_at)
        self.attempted_at = attempted_at
        self.cancelled_at = cancelled_at
        self.completed_at = completed_at
        self.discarded_at = discarded_at
        self.extra = {} if extra is None else extra
        self._cancel_check = None

        self.validate()

    def validate(self) -> None:
        """Check every field, raising TypeError or ValueError that names the field."""
        _check_name("queue", self.queue)
        _check_name("worker", self.worker)
        _check_int("priority", self.priority, 0, 9)
        _check_int("max_attempts", self.max_attempts, 1, 32_767)
        _check_int("attempt", self.attempt, 0, 32_767)

        if type(self.args) is not dict and not isinstance(self.args, Mapping):
            raise ValueError(
                f"invalid args {self.args!r}: expected a JSON object (a dict with string keys)"
            )
        if type(self.meta) is not dict and not isinstance(self.meta, Mapping):
            raise ValueError(
                f"invalid meta {self.meta!r}: expected a JSON object (a dict with string keys)"
            )
        if self.scheduled_at is not None and not isinstance(self.scheduled_at, datetime):
            raise TypeError(f"invalid scheduled_at {self.scheduled_at!r}: expected a datetime")

    def update(self, changes: Mapping[str, Any]) -> Job:
        """Apply ``changes`` to this job's fields and validate the result."""
        for key, value in changes.items():
            if key in ("schedule_in", "scheduled_in"):
                self.scheduled_at = schedule_time(value)
            elif key == "tags":
                self.tags = normalize_tags(value)
            elif key == "scheduled_at":
                self.scheduled_at = scheduled_utc(value)
            elif key in _UPDATABLE:
                setattr(self, key, value)
            else:
                raise ValueError(f"invalid field {key!r}: updatable fields are {sorted(_UPDATABLE)}")

        self.validate()
        return self

    def cancelled(self) -> bool:
        """Return True once a cancel request reached this running job."""
        check: Callable[[], bool] | None = self._cancel_check
        return bool(check and check())

    def to_dict(self) -> dict[str, Any]:
        """Return the job's persisted fields as a dict, timestamps as ISO strings."""
        result: dict[str, Any] = {}

        for name in _PERSISTED:
            value = getattr(self, name)
            result[name] = value.isoformat() if isinstance(value, datetime) else value

        return result

    def __repr__(self) -> str:
        return (
            f"Job(id={self.id!r}, worker={self.worker!r}, queue={self.queue!r}, "
            f"state={str(self.state)!r}, attempt={self.attempt}/{self.max_attempts}, "
            f"args={self.args!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Job):
            return NotImplemented

        return all(getattr(self, name) == getattr(other, name) for name in _PERSISTED)

    __hash__ = None  # type: ignore[assignment]


_UPDATABLE = frozenset({"args", "max_attempts", "meta", "priority", "queue", "worker"})

_PERSISTED = (
    "id",
    "state",
    "queue",
    "worker",
    "attempt",
    "max_attempts",
    "priority",
    "args",
    "meta",
    "errors",
    "tags",
    "attempted_by",
    "inserted_at",
    "scheduled_at",
    "attempted_at",
    "cancelled_at",
    "completed_at",
    "discarded_at",
)


def _check_name(field: str, value: Any) -> None:
    # The usual case first: every job passes here twice, at construction and at insert.
    if (
        type(value) is str
        and 0 < len(value) <= MAX_NAME_LENGTH
        and value.isascii()
        and "\x00" not in value
        and not value.isspace()
    ):
        return

    if not isinstance(value, str):
        raise TypeError(f"invalid {field} {value!r}: expected a string")

    if not value.strip():
        raise ValueError(f"invalid {field} {value!r}: must not be blank")

    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(
            f"invalid {field} {value[:40]!r}...: {len(value)} characters, "
            f"the maximum is {MAX_NAME_LENGTH}"
        )

    problem = _string_problem(value, f"{field} {value!r}")
    if problem:
        raise ValueError(f"invalid {problem}")


def _check_int(field: str, value: Any, low: int, high: int) -> None:
    if type(value) is int and low <= value <= high:
        return

    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"invalid {field} {value!r}: expected an integer")

    if not low <= value <= high:
        raise ValueError(f"invalid {field} {value}: must be between {low} and {high}")
