"""Tradecloud timestamps: stored as received, compared as instants."""

from __future__ import annotations

from datetime import UTC, datetime

from tcbridge.errors import InvalidEvent

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_instant(value: object) -> datetime:
    """Parse an ISO 8601 timestamp with a zone (``Z`` or an offset) into an aware UTC datetime."""
    if not isinstance(value, str) or not value:
        raise InvalidEvent(f"timestamp must be a non-empty string, got {type(value).__name__}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as e:
        raise InvalidEvent(f"not an ISO 8601 timestamp: {value[:64]!r}") from e
    if parsed.tzinfo is None:
        raise InvalidEvent(f"timestamp has no time zone: {value[:64]!r}")
    return parsed.astimezone(UTC)


def instant_us(value: object) -> int:
    """Microseconds since the epoch of a Tradecloud timestamp: the key for comparing instants."""
    delta = parse_instant(value) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def utc_now_iso() -> str:
    """The local clock as an ISO string, for our own bookkeeping only (never a cursor)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
