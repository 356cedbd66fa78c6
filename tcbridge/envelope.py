"""Normalising Tradecloud payloads into envelopes: pure functions, no IO.

Every item from any source (a webhook POST, an object fetched for a legacy GET, a
poll page) becomes a :class:`Candidate`. The store turns a candidate into an event,
a duplicate or a stale sighting (see ``store.py``); the event's public form is the
envelope that handlers receive (:func:`envelope_dict`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

import orjson

from tcbridge.config import EventKind, PollKind, Source
from tcbridge.errors import InvalidEvent
from tcbridge.timefmt import instant_us

ORDER_EVENT_KEYS: dict[str, EventKind] = {
    "orderEvent": "order",
    "singleDeliveryOrderEvent": "order",
    "simpleOrderEvent": "order",
    "orderDocumentsEvent": "order_documents",
}
SHIPMENT_EVENT_KEYS = ("shipment", "shipmentEvent")
ORDER_ID_KEYS = ("orderId", "id")  # events say orderId, snapshots id; both must agree
MAX_ID_LENGTH = 200


@dataclass(frozen=True, slots=True)
class Candidate:
    """One normalised item, before deduplication.

    ``version_key`` is what makes two arrivals the same change: ``t:<µs since epoch>``
    for a ``lastUpdatedAt`` (compared as an instant, whatever its offset) or
    ``m:<messageId>`` for an event that has no timestamp.
    """

    kind: EventKind
    entity_id: str
    last_updated_at: str | None
    version_key: str
    instant_us: int | None
    event_name: str | None
    source: Source
    payload: Mapping[str, Any]
    line_ids: tuple[str, ...]
    line_instants: tuple[tuple[str, int | None], ...]

    @property
    def is_snapshot(self) -> bool:
        """Snapshots (poll, legacy GET fetch) carry a whole object but no event name."""
        return self.source != "webhook"

    @property
    def event_id(self) -> str:
        """The stable id of the event this candidate would become."""
        return event_id(self.kind, self.entity_id, self.version_key)


def event_id(kind: str, entity_id: str, version_key: str) -> str:
    """A stable, unique event id derived from the dedup key, so a replay keeps its id."""
    digest = hashlib.sha256(f"{kind}\x00{entity_id}\x00{version_key}".encode()).hexdigest()
    return digest[:32]


def parse_order_webhook(body: object) -> Candidate:
    """Normalise the body of ``POST /webhook/order``."""
    data = _require_object(body, "body")
    present = [key for key in ORDER_EVENT_KEYS if key in data]
    if len(present) != 1:
        raise InvalidEvent(
            "body must hold exactly one of " + ", ".join(ORDER_EVENT_KEYS)
            + (f"; found {', '.join(present)}" if present else "")
        )
    key = present[0]
    event = _require_object(data[key], key)
    entity = _entity_id(event, ORDER_ID_KEYS, key)
    stamp, version, instant = _version(event, key, meta=event.get("meta"))
    return Candidate(
        kind=ORDER_EVENT_KEYS[key],
        entity_id=entity,
        last_updated_at=stamp,
        version_key=version,
        instant_us=instant,
        event_name=_event_name(data),
        source="webhook",
        payload=event,
        line_ids=tuple(line_id for line_id, _ in _lines(event, "lastUpdatedAt")),
        line_instants=(),
    )


def parse_shipment_webhook(body: object) -> Candidate:
    """Normalise the body of ``POST /webhook/shipment``."""
    data = _require_object(body, "body")
    present = [key for key in SHIPMENT_EVENT_KEYS if key in data]
    if len(present) != 1:
        raise InvalidEvent("body must hold exactly one of shipment, shipmentEvent")
    key = present[0]
    shipment = _require_object(data[key], key)
    candidate = _shipment(shipment, "webhook", key)
    # A shipment event carries every line; the changed ones share the shipment's stamp.
    changed = tuple(
        line_id for line_id, stamp in candidate.line_instants
        if stamp is not None and stamp == candidate.instant_us
    )
    return replace(candidate, event_name=_event_name(data), line_ids=changed, line_instants=())


def parse_snapshot(kind: PollKind, obj: object, source: Source) -> Candidate:
    """Normalise a whole order or shipment from a poll page or a fetch by id."""
    data = _require_object(obj, kind)
    require_storable(data, kind)
    if kind == "shipment":
        return _shipment(data, source, kind)
    entity = _entity_id(data, ORDER_ID_KEYS, kind)
    stamp, version, instant = _version(data, kind, meta=None)
    lines = _lines(data, "lastUpdatedAt")
    return Candidate(
        kind="order", entity_id=entity, last_updated_at=stamp, version_key=version,
        instant_us=instant, event_name=None, source=source, payload=data,
        line_ids=tuple(line_id for line_id, _ in lines), line_instants=lines,
    )


def changed_lines(candidate: Candidate, newest_stored_us: int | None) -> list[str]:
    """The ``changedLineIds`` of the event a candidate becomes.

    Events: the lines they hold. Snapshots: lines stamped after the newest stored
    version of the entity; every line on a first sighting.
    """
    if not candidate.is_snapshot or newest_stored_us is None:
        return list(candidate.line_ids)
    return [
        line_id for line_id, stamp in candidate.line_instants
        if stamp is None or stamp > newest_stored_us
    ]


def envelope_dict(
    *,
    event_id: str,
    candidate: Candidate,
    received_at: str,
    changed_line_ids: list[str],
    late: bool,
) -> dict[str, Any]:
    """The envelope handlers receive, in Tradecloud's camelCase."""
    return {
        "id": event_id,
        "kind": candidate.kind,
        "entityId": candidate.entity_id,
        "lastUpdatedAt": candidate.last_updated_at,
        "eventName": candidate.event_name,
        "source": candidate.source,
        "receivedAt": received_at,
        "changedLineIds": changed_line_ids,
        "late": late,
        "payload": candidate.payload,
    }


def _shipment(data: Mapping[str, Any], source: Source, where: str) -> Candidate:
    entity = _entity_id(data, ("id", "shipmentId"), where)
    meta = data.get("meta")
    stamp_holder = meta if isinstance(meta, Mapping) and "lastUpdatedAt" in meta else data
    stamp, version, instant = _version(stamp_holder, where, meta=meta)
    lines = _shipment_lines(data)
    return Candidate(
        kind="shipment", entity_id=entity, last_updated_at=stamp, version_key=version,
        instant_us=instant, event_name=None, source=source, payload=data,
        line_ids=tuple(line_id for line_id, _ in lines), line_instants=lines,
    )


def _require_object(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidEvent(f"{where} must be a JSON object")
    return value


def _event_name(data: Mapping[str, Any]) -> str | None:
    name = data.get("eventName")
    if name is None:
        return None
    if not plain_text(name):
        raise InvalidEvent("eventName must be a non-empty string")
    return name


def plain_text(value: object) -> TypeGuard[str]:
    """A usable id or name: a non-blank string, not too long, valid Unicode (a lone
    surrogate such as "\\ud800" parses as JSON but is no text)."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_LENGTH:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def require_storable(data: Mapping[str, Any], where: str) -> None:
    """Refuse an object orjson (the parser of the store and the dispatcher) cannot write:
    a lone surrogate, a NaN, an integer beyond 64 bits, nesting beyond its limit. Webhook
    bodies are read by orjson already; objects from the API client are checked here, once."""
    try:
        orjson.dumps(data)
    except orjson.JSONEncodeError as e:
        raise InvalidEvent(f"{where} cannot be stored as JSON: {e}") from e


def _entity_id(data: Mapping[str, Any], keys: tuple[str, ...], where: str) -> str:
    found: str | None = None
    for key in keys:
        value = data.get(key)
        if value is None:
            continue
        if not plain_text(value):
            raise InvalidEvent(f"{where}.{key} must be a non-empty string")
        if found is not None and value != found:
            raise InvalidEvent(f"{where}: {' and '.join(keys)} differ")
        found = value
    if found is None:
        raise InvalidEvent(f"{where} has no {' or '.join(keys)}")
    return found


def _version(
    data: Mapping[str, Any], where: str, *, meta: object
) -> tuple[str | None, str, int | None]:
    """(lastUpdatedAt as received, version key, instant) of an object."""
    stamp = data.get("lastUpdatedAt")
    if stamp is not None:
        try:
            instant = instant_us(stamp)
        except InvalidEvent as e:
            raise InvalidEvent(f"{where}.lastUpdatedAt: {e}") from e
        return str(stamp), f"t:{instant}", instant
    if isinstance(meta, Mapping):
        message_id = meta.get("messageId")
        if plain_text(message_id):
            return None, f"m:{message_id}", None
        created = meta.get("createdDateTime")
        if isinstance(created, str):
            try:
                instant = instant_us(created)
            except InvalidEvent as e:
                raise InvalidEvent(f"{where}.meta.createdDateTime: {e}") from e
            return None, f"c:{instant}", None
    raise InvalidEvent(f"{where} has no lastUpdatedAt (nor meta.messageId)")


def _lines(data: Mapping[str, Any], stamp_key: str) -> tuple[tuple[str, int | None], ...]:
    return tuple(
        (line_id, _line_instant(line.get(stamp_key))) for line_id, line in _iter_lines(data)
    )


def _shipment_lines(data: Mapping[str, Any]) -> tuple[tuple[str, int | None], ...]:
    out = []
    for line_id, line in _iter_lines(data):
        meta = line.get("meta")
        stamp = meta.get("lastUpdatedAt") if isinstance(meta, Mapping) else None
        out.append((line_id, _line_instant(stamp)))
    return tuple(out)


def _iter_lines(data: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    lines = data.get("lines")
    if not isinstance(lines, list):
        return []
    return [
        (line["id"], line)
        for line in lines
        if isinstance(line, Mapping) and plain_text(line.get("id"))
    ]


def _line_instant(stamp: object) -> int | None:
    """A line's instant, or None when missing or unreadable (then it counts as changed)."""
    try:
        return instant_us(stamp)
    except InvalidEvent:
        return None
