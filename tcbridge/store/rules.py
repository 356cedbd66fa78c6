"""The deduplication rules, as pure functions every backend calls: they cannot drift apart.

A backend looks up what it has stored (the event with the candidate's id, the entity's
newest instant) and asks these functions what the candidate is; it then writes what they
decide, in the candidate's transaction."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from tcbridge.envelope import (
    RESENT_EVENTS,
    Candidate,
    content_digest,
    sibling_version_key,
)
from tcbridge.envelope import (
    event_id as make_event_id,
)


def sibling_id(
    candidate: Candidate, stored_source: str, stored_envelope: str | None
) -> str | None:
    """The id of a distinct message that shares a stored event's timestamp, or None when
    the candidate repeats that event.

    Events carry only the lines they changed, so two messages stamped alike may say
    different things: both are delivered. A repeat (same message id, or same content)
    stays a duplicate; so does every snapshot, and a webhook after a snapshot (which
    holds the whole object), unless it is a Resent event (always delivered). An event
    whose payload retention has dropped can no longer be compared: a duplicate."""
    if candidate.is_snapshot or stored_envelope is None:
        return None
    resent = candidate.event_name in RESENT_EVENTS
    if stored_source != "webhook" and not resent:
        return None
    try:
        envelope = json.loads(stored_envelope)
    except ValueError:
        return None
    meta = envelope.get("meta")
    stored_message = meta.get("messageId") if isinstance(meta, dict) else None
    if candidate.message_id is not None and candidate.message_id == stored_message:
        return None
    payload = envelope.get("payload")
    if not resent and isinstance(payload, dict) and candidate.content_digest == content_digest(
            envelope.get("eventName"), payload):
        return None
    return make_event_id(candidate.kind, candidate.entity_id, sibling_version_key(candidate))


def is_late(candidate: Candidate, newest_us: int | None) -> bool:
    """Older than the newest version of its entity already stored."""
    return (
        candidate.instant_us is not None and newest_us is not None
        and candidate.instant_us < newest_us
    )


def is_stale(candidate: Candidate, late: bool) -> bool:
    """A late snapshot says nothing new: it is a sighting, never an event."""
    return late and candidate.is_snapshot


def moves_newest(candidate: Candidate, late: bool) -> bool:
    """Whether storing the candidate makes it the entity's newest version."""
    return candidate.instant_us is not None and not late


def cutoff_iso(now: float, days: float) -> str:
    """The received_at (ISO text, as stored) before which retention acts: ``days`` before
    ``now``; beyond 100,000 days, as far back as datetime can count (keep forever)."""
    days = min(days, 100_000.0)
    moment = datetime.fromtimestamp(now - days * 86_400, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
