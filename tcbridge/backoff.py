"""Exponential backoff with jitter: one formula for every retry that is a row in the store."""

from __future__ import annotations

import random


def backoff_s(
    initial_s: float,
    max_s: float,
    exponent: int,
    retry_after_s: float | None = None,
    *,
    cap_retry_after: bool = True,
) -> float:
    """A delay between ``max(initial, ceiling/2)`` and ``ceiling = initial * 2**exponent``
    (at most ``max_s``); a server's Retry-After is a floor (capped at ``max_s`` unless told
    otherwise)."""
    ceiling = min(max_s, initial_s * 2.0 ** min(max(exponent, 0), 30))
    delay = random.uniform(max(min(initial_s, ceiling), ceiling / 2), ceiling)  # noqa: S311
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, max_s) if cap_retry_after else retry_after_s)
    return delay
