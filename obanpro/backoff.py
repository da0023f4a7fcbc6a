"""Retry delays for failed jobs."""

from __future__ import annotations

import math
import random

MAX_BACKOFF = 10 * 365 * 86_400
"""Longest delay in seconds. Larger values from a worker's ``backoff`` are cut to it,
so ``now() + delay`` always fits PostgreSQL's timestamp range."""

CLAMPED_ATTEMPTS = 20


def default_backoff(attempt: int, max_attempts: int) -> int:
    """Return Oban's default delay: 15 + 2**attempt seconds plus up to 10% jitter.

    When ``max_attempts`` exceeds 20, the attempt is scaled into 0..20 first, so
    the delay stays bounded (about 12 days at most) at any attempt count.
    """
    if max_attempts > CLAMPED_ATTEMPTS:
        attempt = round(attempt / max_attempts * CLAMPED_ATTEMPTS)

    attempt = max(0, min(attempt, CLAMPED_ATTEMPTS))
    base = 15 + 2**attempt

    return base + int(random.random() * 0.1 * base)


def clamp_backoff(seconds: object) -> float:
    """Return a worker-supplied delay as seconds within 0..MAX_BACKOFF.

    Raises:
        TypeError: when the value is not a number.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"backoff must return seconds as a number, got {seconds!r}")

    if math.isnan(seconds):
        raise TypeError("backoff must return seconds as a number, got nan")

    return float(min(max(seconds, 0), MAX_BACKOFF))
