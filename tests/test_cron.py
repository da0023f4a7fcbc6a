"""Tests for cron expression parsing, matching and time-zone aware scheduling."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from obanpro.cron import NICKNAMES, Expression, cron_name, due_minutes, load_zone

ALL_MINUTES = frozenset(range(60))
ALL_HOURS = frozenset(range(24))
ALL_DAYS = frozenset(range(1, 32))
ALL_MONTHS = frozenset(range(1, 13))
ALL_WEEKDAYS = frozenset(range(7))


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def local_day_window(zone_name: str, day: date) -> tuple[datetime, datetime]:
    """Return (since, until) so due_minutes covers every real minute of a local day."""
    zone = ZoneInfo(zone_name)
    start = datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)

    return start - timedelta(minutes=1), end - timedelta(minutes=1)


def runs_per_utc_hour(runs: list[datetime], since: datetime, until: datetime) -> dict[datetime, int]:
    counts = {}
    hour = since + timedelta(minutes=1)

    while hour <= until:
        counts[hour] = 0
        hour += timedelta(hours=1)

    for run in runs:
        counts[run.replace(minute=0)] += 1

    return counts


# --- parsing -----------------------------------------------------------------------


def test_parse_all_wildcards() -> None:
    expression = Expression.parse("* * * * *")

    assert expression.minutes == ALL_MINUTES
    assert expression.hours == ALL_HOURS
    assert expression.days == ALL_DAYS
    assert expression.months == ALL_MONTHS
    assert expression.weekdays == ALL_WEEKDAYS


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("5", {5}),
        ("0", {0}),
        ("10-13", {10, 11, 12, 13}),
        ("*/15", {0, 15, 30, 45}),
        ("*/1", set(range(60))),
        ("*/59", {0, 59}),
        ("*/100", {0}),
        ("10-30/10", {10, 20, 30}),
        ("10-31/10", {10, 20, 30}),
        ("5/20", {5, 25, 45}),
        ("1,5-7,*/20", {0, 1, 5, 6, 7, 20, 40}),
        ("3,3,3", {3}),
        ("59-59", {59}),
    ],
)
def test_parse_minute_field(field: str, expected: set[int]) -> None:
    assert Expression.parse(f"{field} * * * *").minutes == expected


def test_parse_fields_in_order() -> None:
    expression = Expression.parse("1 2 3 4 5")

    assert expression.minutes == {1}
    assert expression.hours == {2}
    assert expression.days == {3}
    assert expression.months == {4}
    assert expression.weekdays == {5}


def test_parse_day_of_month_step_starts_at_one() -> None:
    assert Expression.parse("0 0 */10 * *").days == {1, 11, 21, 31}


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("JAN", {1}),
        ("dec", {12}),
        ("Jun-Aug", {6, 7, 8}),
        ("JAN,MAR,5", {1, 3, 5}),
        ("FEB-DEC/2", {2, 4, 6, 8, 10, 12}),
    ],
)
def test_parse_month_names(field: str, expected: set[int]) -> None:
    assert Expression.parse(f"0 0 1 {field} *").months == expected


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("SUN", {0}),
        ("sat", {6}),
        ("Mon-Fri", {1, 2, 3, 4, 5}),
        ("0", {0}),
        ("7", {0}),
        ("0,7", {0}),
        ("5-7", {5, 6, 0}),
        ("FRI-SUN", {5, 6, 0}),
        ("SUN-TUE", {0, 1, 2}),
        ("*/2", {0, 2, 4, 6}),
        ("1-7/3", {1, 4, 0}),
    ],
)
def test_parse_weekdays(field: str, expected: set[int]) -> None:
    assert Expression.parse(f"0 0 * * {field}").weekdays == expected


@pytest.mark.parametrize(("nickname", "equivalent"), sorted(NICKNAMES.items()))
def test_parse_nicknames(nickname: str, equivalent: str) -> None:
    parsed = Expression.parse(nickname)
    expected = Expression.parse(equivalent)

    assert parsed.minutes == expected.minutes
    assert parsed.hours == expected.hours
    assert parsed.days == expected.days
    assert parsed.months == expected.months
    assert parsed.weekdays == expected.weekdays


def test_parse_nickname_values() -> None:
    assert NICKNAMES["@yearly"] == "0 0 1 1 *"
    assert NICKNAMES["@annually"] == "0 0 1 1 *"
    assert NICKNAMES["@monthly"] == "0 0 1 * *"
    assert NICKNAMES["@weekly"] == "0 0 * * 0"
    assert NICKNAMES["@daily"] == "0 0 * * *"
    assert NICKNAMES["@midnight"] == "0 0 * * *"
    assert NICKNAMES["@hourly"] == "0 * * * *"


def test_parse_keeps_text_as_written() -> None:
    assert Expression.parse("@daily").text == "@daily"
    assert str(Expression.parse("*/5  *\t* * *")) == "*/5  *\t* * *"


def test_parse_nickname_ignores_case_and_spaces() -> None:
    assert Expression.parse("  @HOURLY ").minutes == {0}


def test_parse_extra_whitespace_between_fields() -> None:
    assert Expression.parse("  0\t12   *  * *  ").hours == {12}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("61 * * * *", "invalid cron expression '61 * * * *': minute 61 is out of range 0-59"),
        ("* 24 * * *", "hour 24 is out of range 0-23"),
        ("* * 0 * *", "day-of-month 0 is out of range 1-31"),
        ("* * 32 * *", "day-of-month 32 is out of range 1-31"),
        ("* * * 13 *", "month 13 is out of range 1-12"),
        ("* * * 0 *", "month 0 is out of range 1-12"),
        ("* * * * 8", "day-of-week 8 is out of range 0-7"),
        ("1,61 * * * *", "minute 61 is out of range 0-59"),
        ("5-70 * * * *", "minute 70 in '5-70' is out of range 0-59"),
        ("30-10 * * * *", "minute range '30-10' starts after it ends"),
        ("* 22-2 * * *", "list two ranges, as in '22-23,0-2'"),
        ("*/0 * * * *", "minute step in '*/0' must be a whole number of at least 1"),
        ("1-5/x * * * *", "minute step in '1-5/x' must be a whole number"),
        ("5/ * * * *", "minute step in '5/'"),
        ("x * * * *", "minute 'x' is not valid; expected '*' or a number 0-59"),
        ("* * * FOO *", "month 'FOO' is not valid; expected '*' or a number 1-12 or JAN-DEC"),
        ("* * * * FUNDAY", "day-of-week 'FUNDAY' is not valid"),
        ("JAN * * * *", "minute 'JAN' is not valid"),
        ("* * * MON *", "month 'MON' is not valid"),
        ("* * * * JAN", "day-of-week 'JAN' is not valid"),
        ("-1 * * * *", "minute range '-1' is missing a value"),
        ("* * * * MON-", "day-of-week range 'MON-' is missing a value"),
        ("*-5 * * * *", "minute '*' in '*-5' is not valid"),
        ("1,,2 * * * *", "minute '1,,2' has an empty item in its list"),
        ("1, * * * *", "minute '1,' has an empty item"),
        ("* * * *", "expected 5 fields (minute hour day-of-month month day-of-week)"),
        ("* * * * * *", "got 6"),
        ("", "got 0"),
        ("@reboot", "unknown nickname '@reboot'; use one of @yearly"),
        ("@every 5m", "unknown nickname '@every 5m'"),
    ],
)
def test_parse_rejects_invalid(text: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        Expression.parse(text)

    assert message in str(raised.value)
    assert str(raised.value).startswith(f"invalid cron expression {text!r}: ")


def test_parse_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="cron expression must be a str, got int"):
        Expression.parse(5)  # type: ignore[arg-type]


# --- matching ----------------------------------------------------------------------


def test_matches_each_field() -> None:
    expression = Expression.parse("30 9 15 6 *")

    assert expression.matches(datetime(2024, 6, 15, 9, 30))
    assert not expression.matches(datetime(2024, 6, 15, 9, 31))
    assert not expression.matches(datetime(2024, 6, 15, 10, 30))
    assert not expression.matches(datetime(2024, 6, 16, 9, 30))
    assert not expression.matches(datetime(2024, 7, 15, 9, 30))


def test_matches_ignores_seconds() -> None:
    assert Expression.parse("30 9 * * *").matches(datetime(2024, 6, 15, 9, 30, 59, 999999))


def test_matches_sunday_as_zero_and_seven() -> None:
    sunday = datetime(2024, 6, 16, 0, 0)
    monday = datetime(2024, 6, 17, 0, 0)

    assert Expression.parse("0 0 * * 0").matches(sunday)
    assert Expression.parse("0 0 * * 7").matches(sunday)
    assert Expression.parse("0 0 * * SUN").matches(sunday)
    assert not Expression.parse("0 0 * * 7").matches(monday)


def test_matches_weekday_names() -> None:
    expression = Expression.parse("0 9 * * MON-FRI")

    assert expression.matches(datetime(2024, 6, 14, 9, 0))  # Friday
    assert not expression.matches(datetime(2024, 6, 15, 9, 0))  # Saturday


def test_matches_day_and_weekday_both() -> None:
    # Oban requires both fields to match, unlike Vixie cron, which runs on either.
    friday_13th = Expression.parse("0 0 13 * FRI")

    assert friday_13th.matches(datetime(2024, 9, 13, 0, 0))
    assert not friday_13th.matches(datetime(2024, 9, 20, 0, 0))  # a Friday, the 20th
    assert not friday_13th.matches(datetime(2024, 5, 13, 0, 0))  # the 13th, a Monday


def test_matches_rejects_aware_datetime() -> None:
    with pytest.raises(ValueError, match="expects a naive wall-clock datetime"):
        Expression.parse("* * * * *").matches(utc(2024, 1, 1, 0, 0))


# --- due_minutes in UTC and fixed offsets -------------------------------------------------


def test_due_minutes_half_open_window() -> None:
    runs = due_minutes("*/15 * * * *", "UTC", utc(2024, 1, 1, 10, 0), utc(2024, 1, 1, 11, 0))

    assert runs == [
        utc(2024, 1, 1, 10, 15),
        utc(2024, 1, 1, 10, 30),
        utc(2024, 1, 1, 10, 45),
        utc(2024, 1, 1, 11, 0),
    ]


def test_due_minutes_truncates_seconds() -> None:
    since = datetime(2024, 1, 1, 10, 0, 30, tzinfo=UTC)
    until = datetime(2024, 1, 1, 10, 15, 59, tzinfo=UTC)

    assert due_minutes("*/15 * * * *", "UTC", since, until) == [utc(2024, 1, 1, 10, 15)]


def test_due_minutes_returns_utc_datetimes() -> None:
    runs = due_minutes("* * * * *", "Asia/Tokyo", utc(2024, 1, 1, 0, 0), utc(2024, 1, 1, 0, 3))

    assert len(runs) == 3
    for run in runs:
        assert run.tzinfo is UTC
        assert run.second == 0
        assert run.microsecond == 0


def test_due_minutes_converts_aware_bounds() -> None:
    plus_two = timezone(timedelta(hours=2))
    since = datetime(2024, 1, 1, 12, 0, tzinfo=plus_two)
    until = datetime(2024, 1, 1, 13, 0, tzinfo=plus_two)

    assert due_minutes("0 * * * *", "UTC", since, until) == [utc(2024, 1, 1, 11, 0)]


def test_due_minutes_rejects_naive_bounds() -> None:
    with pytest.raises(ValueError, match="since_utc must be timezone-aware"):
        due_minutes("* * * * *", "UTC", datetime(2024, 1, 1), utc(2024, 1, 1, 1))

    with pytest.raises(ValueError, match="until_utc must be timezone-aware"):
        due_minutes("* * * * *", "UTC", utc(2024, 1, 1), datetime(2024, 1, 1, 1))


def test_due_minutes_empty_window() -> None:
    assert due_minutes("* * * * *", "UTC", utc(2024, 1, 1, 10, 0), utc(2024, 1, 1, 10, 0)) == []
    assert due_minutes("* * * * *", "UTC", utc(2024, 1, 1, 10, 5), utc(2024, 1, 1, 10, 0)) == []


def test_due_minutes_clock_step_back_never_repeats() -> None:
    expression = Expression.parse("* * * * *")
    seen: list[datetime] = []
    cursor = utc(2024, 1, 1, 9, 59)

    # Wall clock readings: forward, a step back of four minutes, forward again.
    for now in [utc(2024, 1, 1, 10, 5), utc(2024, 1, 1, 10, 1), utc(2024, 1, 1, 10, 7)]:
        runs = due_minutes(expression, "UTC", cursor, now)

        for run in runs:
            assert run > cursor
        seen.extend(runs)
        cursor = max(cursor, now)

    assert seen == [utc(2024, 1, 1, 10, minute) for minute in range(0, 8)]
    assert len(seen) == len(set(seen))


def test_due_minutes_parsed_arguments() -> None:
    runs = due_minutes(
        Expression.parse("0 12 * * *"),
        ZoneInfo("Europe/Berlin"),
        utc(2024, 1, 1, 0, 0),
        utc(2024, 1, 2, 0, 0),
    )

    assert runs == [utc(2024, 1, 1, 11, 0)]


def test_due_minutes_follows_zone_offset_by_season() -> None:
    winter = due_minutes("0 9 * * *", "Europe/Berlin", utc(2024, 1, 15, 0, 0), utc(2024, 1, 16, 0, 0))
    summer = due_minutes("0 9 * * *", "Europe/Berlin", utc(2024, 7, 15, 0, 0), utc(2024, 7, 16, 0, 0))

    assert winter == [utc(2024, 1, 15, 8, 0)]
    assert summer == [utc(2024, 7, 15, 7, 0)]


def test_due_minutes_uses_local_weekday() -> None:
    # Monday 00:30 in Tokyo is Sunday 15:30 UTC.
    runs = due_minutes("30 0 * * MON", "Asia/Tokyo", utc(2024, 6, 16, 0, 0), utc(2024, 6, 17, 0, 0))

    assert runs == [utc(2024, 6, 16, 15, 30)]


def test_due_minutes_invalid_expression() -> None:
    with pytest.raises(ValueError, match="invalid cron expression '61 \\* \\* \\* \\*'"):
        due_minutes("61 * * * *", "UTC", utc(2024, 1, 1), utc(2024, 1, 2))


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "", "../etc/passwd", "/usr/share/zoneinfo/UTC"])
def test_due_minutes_invalid_zone(name: str) -> None:
    with pytest.raises(ValueError, match=f"invalid time zone {name!r}"):
        due_minutes("* * * * *", name, utc(2024, 1, 1), utc(2024, 1, 2))


def test_load_zone_valid() -> None:
    assert load_zone("America/New_York") == ZoneInfo("America/New_York")


def test_load_zone_rejects_non_str() -> None:
    with pytest.raises(ValueError, match="invalid time zone None"):
        load_zone(None)  # type: ignore[arg-type]


# --- daylight saving: spring forward ---------------------------------------------------
# America/New_York, 2024-03-10: 02:00 EST (07:00 UTC) jumps to 03:00 EDT.
# Europe/Berlin, 2024-03-31: 02:00 CET (01:00 UTC) jumps to 03:00 CEST.


@pytest.mark.parametrize(
    ("zone", "day", "first_after_gap"),
    [
        ("America/New_York", date(2024, 3, 10), utc(2024, 3, 10, 7, 0)),
        ("Europe/Berlin", date(2024, 3, 31), utc(2024, 3, 31, 1, 0)),
    ],
)
def test_spring_forward_skipped_minute_runs_once(zone: str, day: date, first_after_gap: datetime) -> None:
    since, until = local_day_window(zone, day)

    assert due_minutes("30 2 * * *", zone, since, until) == [first_after_gap]


@pytest.mark.parametrize(
    ("zone", "day", "first_after_gap"),
    [
        ("America/New_York", date(2024, 3, 10), utc(2024, 3, 10, 7, 0)),
        ("Europe/Berlin", date(2024, 3, 31), utc(2024, 3, 31, 1, 0)),
    ],
)
def test_spring_forward_skipped_hour_collapses(zone: str, day: date, first_after_gap: datetime) -> None:
    since, until = local_day_window(zone, day)

    assert due_minutes("* 2 * * *", zone, since, until) == [first_after_gap]


def test_spring_forward_gap_merges_next_minute() -> None:
    since, until = local_day_window("America/New_York", date(2024, 3, 10))

    runs = due_minutes("0,30 2,3 * * *", "America/New_York", since, until)

    # 02:00, 02:30 and 03:00 EDT share the first minute after the gap.
    assert runs == [utc(2024, 3, 10, 7, 0), utc(2024, 3, 10, 7, 30)]


def test_spring_forward_other_days_unchanged() -> None:
    since, until = local_day_window("America/New_York", date(2024, 3, 11))

    assert due_minutes("30 2 * * *", "America/New_York", since, until) == [utc(2024, 3, 11, 6, 30)]


@pytest.mark.parametrize(
    ("zone", "day"),
    [("America/New_York", date(2024, 3, 10)), ("Europe/Berlin", date(2024, 3, 31))],
)
def test_spring_forward_hourly_once_per_real_hour(zone: str, day: date) -> None:
    since, until = local_day_window(zone, day)

    runs = due_minutes("@hourly", zone, since, until)

    assert len(runs) == 23
    assert set(runs_per_utc_hour(runs, since, until).values()) == {1}


def test_spring_forward_half_hour_gap() -> None:
    # Australia/Lord_Howe, 2024-10-06: 02:00 jumps to 02:30 (15:30 UTC the day before).
    since, until = local_day_window("Australia/Lord_Howe", date(2024, 10, 6))

    assert due_minutes("15 2 * * *", "Australia/Lord_Howe", since, until) == [utc(2024, 10, 5, 15, 30)]


def test_skipped_calendar_day_runs_after_gap() -> None:
    # Pacific/Apia skipped 2011-12-30: 23:59 on the 29th was followed by 00:00
    # on the 31st, at 10:00 UTC on the 30th.
    runs = due_minutes("0 12 30 12 *", "Pacific/Apia", utc(2011, 12, 29, 0, 0), utc(2012, 1, 2, 0, 0))

    assert runs == [utc(2011, 12, 30, 10, 0)]


# --- daylight saving: fall back ---------------------------------------------------------
# America/New_York, 2024-11-03: 02:00 EDT (06:00 UTC) falls back to 01:00 EST.
# Europe/Berlin, 2024-10-27: 03:00 CEST (01:00 UTC) falls back to 02:00 CET.


@pytest.mark.parametrize(
    ("zone", "day", "expression", "first_occurrence"),
    [
        ("America/New_York", date(2024, 11, 3), "30 1 * * *", utc(2024, 11, 3, 5, 30)),
        ("Europe/Berlin", date(2024, 10, 27), "30 2 * * *", utc(2024, 10, 27, 0, 30)),
    ],
)
def test_fall_back_repeated_minute_runs_once(
    zone: str, day: date, expression: str, first_occurrence: datetime
) -> None:
    since, until = local_day_window(zone, day)

    assert due_minutes(expression, zone, since, until) == [first_occurrence]


@pytest.mark.parametrize(
    ("zone", "day", "repeated_hour"),
    [
        ("America/New_York", date(2024, 11, 3), utc(2024, 11, 3, 6, 0)),
        ("Europe/Berlin", date(2024, 10, 27), utc(2024, 10, 27, 1, 0)),
    ],
)
def test_fall_back_hourly_skips_repeated_hour(zone: str, day: date, repeated_hour: datetime) -> None:
    since, until = local_day_window(zone, day)

    runs = due_minutes("@hourly", zone, since, until)
    counts = runs_per_utc_hour(runs, since, until)

    assert len(counts) == 25
    assert len(runs) == 24
    assert counts.pop(repeated_hour) == 0
    assert set(counts.values()) == {1}


def test_fall_back_every_fifteen_minutes() -> None:
    since, until = local_day_window("America/New_York", date(2024, 11, 3))

    runs = due_minutes("*/15 * * * *", "America/New_York", since, until)

    # 25 real hours, less the four runs of the repeated hour.
    assert len(runs) == 96
    assert not any(utc(2024, 11, 3, 6, 0) <= run < utc(2024, 11, 3, 7, 0) for run in runs)


def test_fall_back_start_inside_repeated_hour() -> None:
    # A scheduler that starts during the second 01:xx does not rerun 01:30,
    # because its first occurrence, an hour earlier, is when it was due.
    runs = due_minutes("30 1 * * *", "America/New_York", utc(2024, 11, 3, 6, 0), utc(2024, 11, 3, 8, 0))

    assert runs == []


# --- cron_name ---------------------------------------------------------------------------


def test_cron_name_byte_format() -> None:
    expected = hashlib.sha256(b'0 0 * * *:MyApp.Worker:{"timezone":"UTC"}').hexdigest()[:8]

    assert cron_name("0 0 * * *", "MyApp.Worker", {"timezone": "UTC"}) == expected


def test_cron_name_empty_opts() -> None:
    expected = hashlib.sha256(b"@daily:w:{}").hexdigest()[:8]

    assert cron_name("@daily", "w", {}) == expected


def test_cron_name_matches_oban_py_digests() -> None:
    # Digests computed with oban-py 0.7.0's formula, with opts serialized by orjson 3.13.
    assert cron_name("0 0 * * *", "MyWorker", {}) == "8b1d93df"
    assert cron_name("@daily", "app.workers.Report", {"timezone": "Europe/Berlin"}) == "853c2710"


def test_cron_name_sorts_keys() -> None:
    expected = hashlib.sha256(b'* * * * *:w:{"a":2,"b":{"c":1,"d":[1,null,true]}}').hexdigest()[:8]

    assert cron_name("* * * * *", "w", {"b": {"d": [1, None, True], "c": 1}, "a": 2}) == expected


def test_cron_name_keeps_non_ascii() -> None:
    expected = hashlib.sha256('* * * * *:wörker:{"tz":"é"}'.encode()).hexdigest()[:8]

    assert cron_name("* * * * *", "wörker", {"tz": "é"}) == expected


def test_cron_name_depends_on_text_as_written() -> None:
    assert cron_name("@daily", "w", {}) != cron_name("0 0 * * *", "w", {})


def test_cron_name_rejects_non_str_keys() -> None:
    with pytest.raises(TypeError, match=r"cron opts key 1 at opts\['nested'\] must be a str"):
        cron_name("* * * * *", "w", {"nested": {1: "x"}})
