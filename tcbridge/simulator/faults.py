"""Injected failures: API errors and latency, token expiry, webhook loss; and the rate limit."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from random import Random
from typing import Any

# How each settable field is checked when it arrives as JSON over POST /_sim/faults.
_KINDS: dict[str, str] = {
    "api_error_status": "optional_status",
    "api_error_count": "count",
    "api_error_rate": "rate",
    "api_latency_s": "seconds",
    "webhook_drop_rate": "rate",
    "webhook_duplicate_rate": "rate",
    "webhook_reorder": "bool",
    "webhook_delay_s": "seconds",
}


@dataclass(slots=True)
class Faults:
    """What the simulator currently gets wrong on purpose; change it at any time."""

    api_error_status: int | None = None
    api_error_count: int = 0
    api_error_rate: float = 0.0
    api_latency_s: float = 0.0
    webhook_drop_rate: float = 0.0
    webhook_duplicate_rate: float = 0.0
    webhook_reorder: bool = False
    webhook_delay_s: float = 0.0
    token_epoch: int = 0  # bumped by expire_tokens_now(); older access tokens are invalid

    def expire_tokens_now(self) -> None:
        """Invalidate every access token issued so far (refresh tokens stay valid)."""
        self.token_epoch += 1

    def take_api_error(self, rng: Random) -> int | None:
        """The status an API request must fail with now, or None to answer it normally."""
        if self.api_error_count > 0:
            self.api_error_count -= 1
            return self.api_error_status or 503
        if self.api_error_rate > 0 and rng.random() < self.api_error_rate:
            return 503
        return None

    def update(self, changes: Mapping[str, object]) -> None:
        """Apply JSON changes (snake_case or camelCase keys); ValueError names a bad one."""
        checked = {_snake(key): value for key, value in changes.items()}
        expire = checked.pop("expire_tokens_now", False)
        coerced = {key: _coerce(key, value) for key, value in checked.items()}
        for key, value in coerced.items():
            setattr(self, key, value)
        if expire is True:
            self.expire_tokens_now()

    def as_dict(self) -> dict[str, Any]:
        """The current faults as JSON-ready data."""
        return asdict(self)


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()


def _coerce(key: str, value: object) -> object:
    kind = _KINDS.get(key)
    if kind is None:
        raise ValueError(f"unknown fault {key!r}")
    if not _valid(kind, value):
        raise ValueError(f"invalid value for {key}: {value!r}")
    if kind in ("rate", "seconds"):
        assert isinstance(value, int | float)
        return float(value)
    return value


def _valid(kind: str, value: object) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "optional_status" and value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if kind == "optional_status":
        return isinstance(value, int) and 100 <= value <= 599
    if kind == "count":
        return isinstance(value, int) and value >= 0
    if kind == "rate":
        return 0 <= value <= 1
    return value >= 0


class RateLimiter:
    """At most ``per_s`` admitted requests in any sliding one-second window."""

    def __init__(self, per_s: float, clock: Callable[[], float]) -> None:
        self._per_s = per_s
        self._clock = clock
        self._admitted: deque[float] = deque()

    def admit(self) -> bool:
        """Count a request if there is room now; False means answer 429."""
        now = self._clock()
        while self._admitted and self._admitted[0] <= now - 1.0:
            self._admitted.popleft()
        if len(self._admitted) >= self._per_s:
            return False
        self._admitted.append(now)
        return True
