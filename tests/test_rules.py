"""store/rules.py: the pure functions both backends call."""

from __future__ import annotations

from datetime import UTC, datetime

from tcbridge.store.rules import cutoff_iso

NOW = datetime(2024, 5, 31, 12, 0, 0, tzinfo=UTC).timestamp()


def test_the_retention_cutoff_is_days_before_now_as_stored_text() -> None:
    assert cutoff_iso(NOW, 30) == "2024-05-01T12:00:00.000Z"
    assert cutoff_iso(NOW, 0.5) == "2024-05-31T00:00:00.000Z"
    # received_at is compared as text: the cutoff has the stored shape, milliseconds and Z
    assert "2024-05-01T11:59:59.999Z" < cutoff_iso(NOW, 30) < "2024-05-01T12:00:00.001Z"


def test_an_enormous_retention_keeps_everything_instead_of_failing() -> None:
    # capped at 100,000 days (about 274 years): before any event, and no OverflowError
    assert cutoff_iso(NOW, 1e9) == cutoff_iso(NOW, 100_000) == "1750-08-16T12:00:00.000Z"
