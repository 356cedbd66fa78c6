"""store/rules.py: the pure functions both backends call."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from tcbridge.envelope import parse_order_webhook, sibling_version_key
from tcbridge.store.rules import cutoff_iso, is_late, sibling_id
from tests.conftest import order_event_body

NOW = datetime(2024, 5, 31, 12, 0, 0, tzinfo=UTC).timestamp()


def test_the_retention_cutoff_is_days_before_now_as_stored_text() -> None:
    assert cutoff_iso(NOW, 30) == "2024-05-01T12:00:00.000Z"
    assert cutoff_iso(NOW, 0.5) == "2024-05-31T00:00:00.000Z"
    # received_at is compared as text: the cutoff has the stored shape, milliseconds and Z
    assert "2024-05-01T11:59:59.999Z" < cutoff_iso(NOW, 30) < "2024-05-01T12:00:00.001Z"


def test_an_enormous_retention_keeps_everything_instead_of_failing() -> None:
    # capped at 100,000 days (about 274 years): before any event, and no OverflowError
    assert cutoff_iso(NOW, 1e9) == cutoff_iso(NOW, 100_000) == "1750-08-16T12:00:00.000Z"


def test_a_sibling_is_keyed_by_kind_entity_and_its_own_version() -> None:
    stored = parse_order_webhook(order_event_body("o1", line_ids=("l1",), message_id="m-1"))
    other = parse_order_webhook(order_event_body("o1", line_ids=("l2",), message_id="m-2"))
    envelope = (
        '{"meta":{"messageId":"m-1"},"eventName":"OrderLinesConfirmedBySupplier",'
        '"payload":{}}')
    key = f"order\x00o1\x00{sibling_version_key(other)}"
    assert sibling_id(other, "webhook", envelope) == hashlib.sha256(
        key.encode()).hexdigest()[:32]
    assert sibling_id(other, "webhook", envelope) != other.event_id == stored.event_id


def test_the_same_instant_as_the_newest_is_not_late() -> None:
    candidate = parse_order_webhook(order_event_body("o1"))
    assert candidate.instant_us is not None
    assert is_late(candidate, candidate.instant_us + 1)
    assert not is_late(candidate, candidate.instant_us)  # a sibling, not an older version
    assert not is_late(candidate, None)
