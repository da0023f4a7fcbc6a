"""Command-line logging: repeated warnings are held back, with a count."""

from __future__ import annotations

import logging

from obanpro.log import RepeatFilter


def _record(message: str, args: tuple, created: float, level: int = logging.WARNING) -> logging.LogRecord:
    record = logging.LogRecord("obanpro.test", level, __file__, 1, message, args, None)
    record.created = created
    return record


def test_repeats_are_held_back_then_counted() -> None:
    repeat = RepeatFilter()
    passed = [repeat.filter(_record("fetch failed: %r", (i,), 100.0 + i)) for i in range(10)]

    assert passed == [True, True, True] + [False] * 7
    later = _record("fetch failed: %r", ("x",), 200.0)
    assert repeat.filter(later)
    assert later.getMessage() == "fetch failed: 'x' (7 similar messages held back)"


def test_other_messages_and_info_pass() -> None:
    repeat = RepeatFilter()
    for i in range(5):
        assert repeat.filter(_record("a %s", (i,), 1.0, logging.INFO))
    for template in ("first %s", "second %s", "third %s", "fourth %s"):
        assert repeat.filter(_record(template, (1,), 1.0))
