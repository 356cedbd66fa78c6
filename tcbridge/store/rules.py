"""The deduplication rules, as pure functions every backend calls: they cannot drift apart.

A backend looks up what it has stored (the event with the candidate's id, the entity's
newest instant) and asks these functions what the candidate is; it then writes what they
decide, in the candidate's transaction."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from tcbridge.envelope import (
    RESENT_EVENTS,
    Candidate,
    changed_lines,
    content_digest,
    envelope_dict,
    sibling_version_key,
)
from tcbridge.envelope import (
    event_id as make_event_id,
)
from tcbridge.store.base import Route
from tcbridge.store.types import IngestResult

# (candidate, the event it repeats or None, "duplicate" or "stale", received_at)
Sighting = Callable[[Candidate, "str | None", str, str], None]


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


def envelope_json(envelope: Mapping[str, Any], payload_text: bytes | None = None) -> str:
    """The envelope as compact JSON text; a payload with a lone surrogate (valid JSON
    syntax, but no valid Unicode; only the poller can bring one) is stored with escapes
    instead of being refused. ``payload_text``: the payload already written by orjson
    (``Candidate.payload_text``), spliced in as is: the same bytes, without writing the
    payload again on the writer thread, where it held the GIL (about 2 us an event)."""
    if payload_text is not None:
        with contextlib.suppress(TypeError):  # the fields beside it: the path below
            return orjson.dumps({**envelope, "payload": orjson.Fragment(payload_text)}).decode()
    try:
        return orjson.dumps(envelope).decode()
    except TypeError:
        return json.dumps(envelope, separators=(",", ":"))


@dataclass(slots=True)
class BatchView:
    """What a run of ingests decided, written by the backend at its end; ``stored`` and
    ``newest`` are the batch's own view on top of the database (what sequential processing
    would have read): the backend fills them from its one look-up before deciding."""

    stored: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    newest: dict[tuple[str, str], int | None] = field(default_factory=dict)
    events: list[list[Any]] = field(default_factory=list)
    entities: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    deliveries: list[list[str]] = field(default_factory=list)


def decide(
    candidate: Candidate, received_at: str, route: Route, view: BatchView, *,
    exists: Callable[[str], bool], sighting: Sighting, recovered: bool,
) -> IngestResult:
    """The dedup rules for one candidate of a batch, against the batch's view: one
    decision procedure for both backends. ``exists`` answers whether the database holds
    an event id (asked only for a sibling's); ``sighting`` records a duplicate or stale
    sighting; the event, entity and delivery rows to write are appended to ``view``."""
    event_id, sibling = candidate.event_id, None
    stored = view.stored.get(event_id)
    if stored is not None:
        sibling = sibling_id(candidate, stored[0], stored[1])
        if sibling is None or sibling in view.stored or exists(sibling):
            duplicate_of = sibling or event_id
            sighting(candidate, duplicate_of, "duplicate", received_at)
            return IngestResult("duplicate", duplicate_of)
        event_id = sibling
    entity = (candidate.kind, candidate.entity_id)
    newest = view.newest[entity]
    late = is_late(candidate, newest)
    if is_stale(candidate, late):
        sighting(candidate, None, "stale", received_at)
        return IngestResult("stale", event_id)
    envelope = envelope_dict(
        event_id=event_id, candidate=candidate, received_at=received_at,
        changed_line_ids=changed_lines(candidate, newest), late=late,
        sibling=sibling is not None,
    )
    text = envelope_json(envelope, candidate.payload_text)
    view.events.append([
        event_id, candidate.kind, candidate.entity_id, candidate.version_key,
        candidate.last_updated_at, candidate.instant_us, candidate.event_name,
        candidate.source, received_at, int(late), text, int(recovered)])
    view.stored[event_id] = (candidate.source, text)
    if moves_newest(candidate, late):
        view.newest[entity] = candidate.instant_us
        view.entities[entity] = [candidate.kind, candidate.entity_id, candidate.instant_us,
                                 candidate.last_updated_at]
    routes = route(envelope)
    view.deliveries.extend([event_id, name, received_at] for name in routes)
    return IngestResult("stored", event_id, late=late, deliveries=len(routes),
                        recovered=recovered)
