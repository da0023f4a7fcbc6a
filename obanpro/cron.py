"""Cron expressions for periodic jobs, and the minutes at which they are due.

An expression has five fields, ``minute hour day-of-month month day-of-week``,
or is one of the nicknames in ``NICKNAMES``. Each field is ``*``, a number, a
range ``a-b``, a step ``*/n``, ``a-b/n`` or ``a/n`` (from ``a`` to the field's
maximum), or a comma-separated list of these. Months may be written JAN..DEC and
weekdays SUN..SAT, in any case. Weekday 0 and 7 both mean Sunday.

Day-of-month and day-of-week combine as every other field does: a minute matches
only when all five fields match. ``0 0 13 * FRI`` therefore runs on Friday the
13th only. This follows Oban, not Vixie cron, which runs a job on either day
when both fields are restricted. Sources: ``Oban.Cron.Expression.now?/2`` in
oban (Elixir, lib/oban/cron/expression.ex) requires every field to match, and so
does ``Expression.is_now`` in oban-py 0.7.0.

``due_minutes`` evaluates an expression against the wall clock of an IANA time
zone and returns UTC minutes, with these daylight-saving rules:

- A wall-clock minute that does not exist, because the clock jumps forward, is
  due at the first minute after the jump. Skipped minutes that match collapse
  into that one run, so ``30 2 * * *`` runs once on the spring-forward day and
  ``* 2 * * *`` runs once instead of 60 times.
- A wall-clock minute that occurs twice, because the clock falls back, is due
  only at its first occurrence. ``@hourly`` therefore runs once per real hour,
  except the hour in which the wall clock repeats, which gets no run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["Expression", "NICKNAMES", "cron_name", "due_minutes", "load_zone"]

NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

MONTH_NAMES = {
    name: number
    for number, name in enumerate(
        ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"],
        start=1,
    )
}

WEEKDAY_NAMES = {
    name: number
    for number, name in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])
}

ONE_MINUTE = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class _Field:
    """One of the five fields: its name, its allowed values and its value names."""

    name: str
    minimum: int
    maximum: int
    names: dict[str, int]
    wildcard_maximum: int
    range_hint: str = ""

    def out_of_range(self, value: int) -> bool:
        return not self.minimum <= value <= self.maximum


FIELDS = (
    _Field("minute", 0, 59, {}, 59),
    _Field("hour", 0, 23, {}, 23),
    _Field("day-of-month", 1, 31, {}, 31),
    _Field("month", 1, 12, MONTH_NAMES, 12, " or JAN-DEC"),
    # 7 is accepted as Sunday, but '*' and '*/n' cover 0-6 only.
    _Field("day-of-week", 0, 7, WEEKDAY_NAMES, 6, " or SUN-SAT (0 and 7 are Sunday)"),
)

FIELD_LAYOUT = "minute hour day-of-month month day-of-week"


class _FieldError(ValueError):
    """Error in one field, which ``Expression.parse`` prefixes with the expression."""


@dataclass(frozen=True, slots=True)
class Expression:
    """A parsed cron expression.

    ``text`` is the expression as written (a nickname stays a nickname), which is
    what Oban stores in a cron job's ``meta.cron_expr`` and hashes into its
    ``cron_name``. Each other attribute is the set of values its field matches,
    with Sunday always 0 in ``weekdays``.
    """

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Expression:
        """Parse a five-field cron expression or a nickname such as ``@daily``.

        Raises:
            TypeError: ``text`` is not a str.
            ValueError: the expression is invalid. The message names the
                expression, the field and the bad part, as in
                ``invalid cron expression '61 * * * *': minute 61 is out of range 0-59``.
        """
        if not isinstance(text, str):
            raise TypeError(f"cron expression must be a str, got {type(text).__name__}")

        try:
            fields = _split_fields(text)
            values = [_parse_field(field, spec) for field, spec in zip(fields, FIELDS)]
        except _FieldError as error:
            raise ValueError(f"invalid cron expression {text!r}: {error}") from None

        minutes, hours, days, months, weekdays = values

        # 0 and 7 are both Sunday, and matches() numbers Sunday 0, so store 7 as 0.
        if 7 in weekdays:
            weekdays = (weekdays - {7}) | {0}

        return cls(text, minutes, hours, days, months, frozenset(weekdays))

    def matches(self, wall_clock: datetime) -> bool:
        """Return whether the expression matches the minute of a naive wall-clock time.

        Seconds are ignored. Pass local time without tzinfo. For a time zone
        with daylight saving, use ``due_minutes``, which handles skipped and
        repeated wall-clock minutes.

        Raises:
            ValueError: ``wall_clock`` has tzinfo, so which wall clock it means
                is ambiguous. Convert it first with
                ``dt.astimezone(zone).replace(tzinfo=None)``.
        """
        if wall_clock.tzinfo is not None:
            raise ValueError(
                f"Expression.matches expects a naive wall-clock datetime, got {wall_clock!r}; "
                "convert it with dt.astimezone(zone).replace(tzinfo=None)"
            )

        return (
            wall_clock.minute in self.minutes
            and wall_clock.hour in self.hours
            and wall_clock.day in self.days
            and wall_clock.month in self.months
            and wall_clock.isoweekday() % 7 in self.weekdays
        )

    def __str__(self) -> str:
        return self.text


def _split_fields(text: str) -> list[str]:
    stripped = text.strip()

    if stripped.startswith("@"):
        expanded = NICKNAMES.get(stripped.lower())
        if expanded is None:
            raise _FieldError(
                f"unknown nickname {stripped!r}; use one of {', '.join(NICKNAMES)}"
            )
        return expanded.split()

    fields = stripped.split()
    if len(fields) != 5:
        raise _FieldError(
            f"expected 5 fields ({FIELD_LAYOUT}) or a nickname such as @daily, "
            f"got {len(fields)}"
        )

    return fields


def _parse_field(field: str, spec: _Field) -> frozenset[int]:
    values: set[int] = set()

    for part in field.split(","):
        if not part:
            raise _FieldError(f"{spec.name} {field!r} has an empty item in its list")

        values.update(_parse_part(part, spec))

    return frozenset(values)


def _parse_part(part: str, spec: _Field) -> range:
    range_text, slash, step_text = part.partition("/")
    step = _parse_step(step_text, part, spec) if slash else 1

    if range_text == "*":
        return range(spec.minimum, spec.wildcard_maximum + 1, step)

    start_text, dash, end_text = range_text.partition("-")
    start = _parse_value(start_text, part, spec)

    if dash:
        end = _parse_range_end(end_text, start, part, spec)
    elif slash:
        # 'a/n' steps from a to the field's maximum, as Oban reads it.
        end = spec.wildcard_maximum
    else:
        end = start

    if start > end:
        raise _FieldError(
            f"{spec.name} range {part!r} starts after it ends; for a range that "
            f"wraps around, list two ranges, as in '{start}-{spec.maximum},{spec.minimum}-{end}'"
        )

    return range(start, end + 1, step)


def _parse_step(step_text: str, part: str, spec: _Field) -> int:
    if not step_text.isdigit() or int(step_text) < 1:
        raise _FieldError(
            f"{spec.name} step in {part!r} must be a whole number of at least 1, "
            f"as in '*/5'"
        )

    return int(step_text)


def _parse_range_end(end_text: str, start: int, part: str, spec: _Field) -> int:
    end = _parse_value(end_text, part, spec)

    # 'FRI-SUN' means Friday to Sunday, so SUN ends a range as 7, not 0.
    if spec.names is WEEKDAY_NAMES and end == 0 and start > 0 and not end_text.isdigit():
        return 7

    return end


def _parse_value(token: str, part: str, spec: _Field) -> int:
    if token.isdigit():
        value = int(token)
    elif token.upper() in spec.names:
        value = spec.names[token.upper()]
    else:
        raise _FieldError(_describe_bad_token(token, part, spec))

    if spec.out_of_range(value):
        where = "" if token == part else f" in {part!r}"
        raise _FieldError(
            f"{spec.name} {value}{where} is out of range {spec.minimum}-{spec.maximum}"
        )

    return value


def _describe_bad_token(token: str, part: str, spec: _Field) -> str:
    allowed = f"a number {spec.minimum}-{spec.maximum}{spec.range_hint}"

    if token == part:
        return f"{spec.name} {part!r} is not valid; expected '*' or {allowed}"

    if not token:
        return (
            f"{spec.name} range {part!r} is missing a value on one side of '-'; "
            f"expected {allowed}"
        )

    return f"{spec.name} {token!r} in {part!r} is not valid; expected {allowed}"


def load_zone(name: str) -> ZoneInfo:
    """Return the IANA time zone ``name``, such as ``"Europe/Berlin"``.

    Raises:
        ValueError: no zone has that name, or the name is malformed.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"invalid time zone {name!r}: expected an IANA name such as 'Europe/Berlin'"
        )

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        # NOTE: obanpro does not depend on the tzdata package, so on a system
        # without a time zone database every name fails here.
        raise ValueError(
            f"invalid time zone {name!r}: no IANA time zone has that name; use a name "
            "such as 'Europe/Berlin' or 'UTC' (install the tzdata package if the system "
            "has no time zone database)"
        ) from None


def due_minutes(
    expression: Expression | str,
    tz: str | ZoneInfo,
    since_utc: datetime,
    until_utc: datetime,
) -> list[datetime]:
    """Return the UTC minutes in ``(since_utc, until_utc]`` at which ``expression`` is due.

    The expression is evaluated against the wall clock of the IANA zone ``tz``
    with the daylight-saving rules in this module's docstring. Both bounds are
    truncated to the minute. No returned minute is at or before ``since_utc``,
    so a wall clock that steps back cannot repeat a run if the caller keeps a
    cursor: pass the last minute already evaluated as ``since_utc``, then set
    the cursor to ``max(cursor, until_utc)``. When ``until_utc`` is not after
    ``since_utc``, the result is empty. The cost is linear in the number of
    minutes in the window.

    Returns:
        Timezone-aware UTC datetimes on whole minutes, in ascending order.

    Raises:
        ValueError: the expression or the zone is invalid, or a bound is a
            naive datetime.
    """
    parsed = Expression.parse(expression) if isinstance(expression, str) else expression
    zone = tz if isinstance(tz, ZoneInfo) else load_zone(tz)
    start = _floor_minute(since_utc, "since_utc")
    end = _floor_minute(until_utc, "until_utc")

    due: list[datetime] = []
    minute = start + ONE_MINUTE

    while minute <= end:
        if _is_due(parsed, zone, minute):
            due.append(minute)
        minute += ONE_MINUTE

    return due


def _floor_minute(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(
            f"{name} must be timezone-aware, got naive {moment!r}; "
            "pass datetime.now(UTC) or attach tzinfo=UTC"
        )

    return moment.astimezone(UTC).replace(second=0, microsecond=0)


def _is_due(expression: Expression, zone: ZoneInfo, minute: datetime) -> bool:
    local = minute.astimezone(zone)

    # fold=1 marks the second pass through a repeated wall-clock time.
    if local.fold:
        return False

    # Normally the previous UTC minute is the previous wall-clock minute. After
    # a forward jump, the wall-clock minutes in between never occur, so they
    # are checked here and any match runs at this first minute after the jump.
    wall_clock = local.replace(tzinfo=None)
    previous = (minute - ONE_MINUTE).astimezone(zone).replace(tzinfo=None)
    candidate = min(previous + ONE_MINUTE, wall_clock)

    while candidate <= wall_clock:
        if expression.matches(candidate):
            return True
        candidate += ONE_MINUTE

    return False


def cron_name(expr: str, worker: str, opts: dict[str, Any]) -> str:
    """Return the name Oban gives a cron entry: 8 hex digits of a SHA-256.

    The digest covers ``f"{expr}:{worker}:"`` in UTF-8 followed by ``opts`` as
    compact JSON with sorted keys, which is how oban-py 0.7.0 names entries
    (it writes the JSON with orjson's OPT_SORT_KEYS). ``expr`` is the
    expression as written, so ``@daily`` and ``0 0 * * *`` get different names.

    NOTE: the bytes match orjson 3.13 for str, int, bool, None, lists and dicts
    with str keys, and for most floats, but not all: json writes 1e-07 where
    orjson writes 1e-7. orjson writes NaN as null, where this raises.

    Raises:
        TypeError: ``opts`` contains a dict key that is not a str, which
            orjson rejects too, or a value that JSON cannot represent.
        ValueError: ``opts`` contains NaN or infinity.
    """
    _check_str_keys(opts, "opts")

    opts_json = json.dumps(
        opts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    digest = hashlib.sha256(f"{expr}:{worker}:".encode() + opts_json.encode())

    return digest.hexdigest()[:8]


def _check_str_keys(value: Any, path: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"cron opts key {key!r} at {path} must be a str, because Oban hashes "
                    "opts as JSON with string keys"
                )
            _check_str_keys(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_str_keys(item, f"{path}[{index}]")
