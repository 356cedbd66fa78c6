"""Normalising Tradecloud payloads into envelopes: pure functions, no IO.

Every item from any source (a webhook POST, an object fetched for a legacy GET, a
poll page) becomes a :class:`Candidate`. The store turns a candidate into an event,
a duplicate or a stale sighting (see ``store.py``); the event's public form is the
envelope that handlers receive (:func:`envelope_dict`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeGuard
from urllib.parse import quote

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
Layout = Literal["delivery-schedule", "single-delivery"]
# The order line layout each webhook body field carries (docs api/delivery-schedule.md).
LAYOUTS: dict[str, Layout] = {
    "orderEvent": "delivery-schedule",
    "singleDeliveryOrderEvent": "single-delivery",
    "simpleOrderEvent": "single-delivery",
}
# The buyer or supplier asking for the order again: same lastUpdatedAt, always delivered.
RESENT_EVENTS = frozenset({"OrderResentByBuyer", "OrderResentBySupplier", "ShipmentResentByBuyer"})
# orjson writes at most 254 nested arrays/objects (loads reads 1024). Deeper envelopes fell
# back to the json module, whose limit is Python's recursion limit minus whatever is on the
# stack (about 989 levels in the writer thread), and then failed for ever: 503s that
# Tradecloud retries without end. So the envelope's own limit is orjson's.
MAX_ENVELOPE_DEPTH = 254
# C0 and C1 control characters: no id has them, and they would reach file names, logs and
# the operator's terminal. And surrogates: in a str every one is lone (a pair from JSON is
# one code point), so no valid Unicode (one search instead of a trial encode, per id).
_UNFIT_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


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
    meta: Mapping[str, Any] | None = None
    layout: Layout | None = None
    message_id: str | None = None
    since_us: int | None = None
    # The payload as orjson wrote it when require_storable checked it: the store (both backends)
    # splices it into the envelope (orjson.Fragment) instead of writing it out again.
    # Use it through :attr:`payload_text`, which holds it to the payload it was made of.
    payload_dump: tuple[Mapping[str, Any], bytes] | None = field(
        default=None, compare=False, repr=False)
    # The event id once computed (the store asks twice: its look-up, then the rules), so
    # its SHA-256 runs once, on the writer. Not copied by replace(): a copy computes its own.
    _event_id: str | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def content_digest(self) -> str | None:
        """What a webhook event says (:func:`content_digest` of its name and payload);
        None for a snapshot. Computed when asked, not at parse time: only a candidate whose
        event id is stored already needs it (about 12 % of the loop's time when it was
        computed for every webhook)."""
        if self.is_snapshot:
            return None
        return content_digest(self.event_name, self.payload)

    @property
    def payload_text(self) -> bytes | None:
        """The payload's JSON from the storability probe; None unless it was made of this
        very payload (a candidate copied with another payload must not keep the old text)."""
        dump = self.payload_dump
        return dump[1] if dump is not None and dump[0] is self.payload else None

    @property
    def is_snapshot(self) -> bool:
        """Snapshots (poll, legacy GET fetch) carry a whole object but no event name."""
        return self.source != "webhook"

    @property
    def event_id(self) -> str:
        """The stable id of the event this candidate would become."""
        known = self._event_id
        if known is None:
            known = event_id(self.kind, self.entity_id, self.version_key)
            object.__setattr__(self, "_event_id", known)  # a cache, not a change: frozen
        return known


def sibling_version_key(candidate: Candidate) -> str:
    """The version key of a distinct message that shares a stored event's timestamp.

    A Resent event is its own message whatever its content: keyed by its message id.
    Any other sibling is keyed by its content, so a repeat of it stays a duplicate."""
    if candidate.event_name in RESENT_EVENTS and candidate.message_id is not None:
        return f"{candidate.version_key}|m:{candidate.message_id}"
    return f"{candidate.version_key}|d:{candidate.content_digest}"


def content_digest(event_name: str | None, event: Mapping[str, Any]) -> str:
    """What a webhook event says, without its message meta: two messages with the same
    digest are the same change (another message id alone does not make a new event)."""
    content = {key: value for key, value in event.items() if key != "meta"}
    try:
        raw = orjson.dumps([event_name, content], option=orjson.OPT_SORT_KEYS)
    except TypeError:  # a lone surrogate: fall back to the escaping encoder
        raw = json.dumps([event_name, content], sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def event_id(kind: str, entity_id: str, version_key: str) -> str:
    """A stable, unique event id derived from the dedup key, so a replay keeps its id."""
    digest = hashlib.sha256(f"{kind}\x00{entity_id}\x00{version_key}".encode()).hexdigest()
    return digest[:32]


def parse_order_webhook(body: object) -> Candidate:
    """Normalise the body of ``POST /webhook/order``."""
    data = _require_object(body, "body")
    present = _present(data, ORDER_EVENT_KEYS)
    if len(present) != 1:
        raise InvalidEvent(
            "body must hold exactly one of " + ", ".join(ORDER_EVENT_KEYS)
            + (f"; found {', '.join(present)}" if present else "")
        )
    key = present[0]
    event = _require_object(data[key], key)
    kind = ORDER_EVENT_KEYS[key]
    entity = _entity_id(event, ORDER_ID_KEYS, key)
    payload_dump = event, require_storable(event, key)
    meta = _message_meta(data, event)
    message_id = _message_id(meta)
    name = _event_name(data)
    if kind == "order_documents":
        # Its model is undocumented and may lack lastUpdatedAt: never refuse it for that
        # (a 4xx is never retried), key it by the message id or by what it says.
        stamp, version, instant = _documents_version(event, key, message_id, name)
    else:
        stamp, version, instant = _version(event, key, meta=meta)
    return Candidate(
        kind=kind,
        entity_id=entity,
        last_updated_at=stamp,
        version_key=version,
        instant_us=instant,
        event_name=name,
        source="webhook",
        payload=event,
        # An event's lines are its changed lines whatever their stamps: ids only.
        line_ids=tuple(line_id for line_id, _ in _iter_lines(event)),
        line_instants=(),
        meta=meta,
        layout=LAYOUTS.get(key),
        message_id=message_id,
        payload_dump=payload_dump,
    )


def parse_shipment_webhook(body: object) -> Candidate:
    """Normalise the body of ``POST /webhook/shipment``."""
    data = _require_object(body, "body")
    present = _present(data, SHIPMENT_EVENT_KEYS)
    if len(present) != 1:
        raise InvalidEvent("body must hold exactly one of shipment, shipmentEvent")
    key = present[0]
    shipment = _require_object(data[key], key)
    meta = _message_meta(data, shipment)
    candidate = _shipment(shipment, "webhook", key, message_meta=meta)
    # A shipment event carries every line; a line changed when its meta.lastUpdatedAt
    # equals the shipment's (docs shipment/buyer/receive/README.md).
    changed = tuple(
        line_id for line_id, stamp in candidate.line_instants
        if stamp is not None and stamp == candidate.instant_us
    )
    name = _event_name(data)
    return replace(candidate, event_name=name, line_ids=changed, line_instants=(),
                   meta=meta, message_id=_message_id(meta))


def parse_snapshot(
    kind: PollKind,
    obj: object,
    source: Source,
    *,
    since: str | None = None,
    layout: Layout | None = None,
) -> Candidate:
    """Normalise a whole order or shipment from a poll page or a fetch by id.

    ``since``: the cursor of the query that brought it (None for a fetch by id); on a
    first sighting only the lines stamped after it count as changed. ``layout``: the
    order line layout of the endpoint (default: the native delivery schedule)."""
    data = _require_object(obj, kind)
    since_us = _line_instant(since) if since is not None else None
    if kind == "shipment":
        return replace(_shipment(data, source, kind), since_us=since_us)
    entity = _entity_id(data, ORDER_ID_KEYS, kind)
    payload_dump = data, require_storable(data, kind)
    stamp, version, instant = _version(data, kind, meta=None)
    lines = _lines(data, "lastUpdatedAt")
    return Candidate(
        kind="order", entity_id=entity, last_updated_at=stamp, version_key=version,
        instant_us=instant, event_name=None, source=source, payload=data,
        line_ids=tuple(line_id for line_id, _ in lines), line_instants=lines,
        layout=layout or "delivery-schedule", since_us=since_us, payload_dump=payload_dump,
    )


def changed_lines(candidate: Candidate, newest_stored_us: int | None) -> list[str]:
    """The ``changedLineIds`` of the event a candidate becomes.

    Events: the lines they hold. Snapshots: lines stamped after the newest stored
    version of the entity; on a first sighting, lines stamped after the cursor of the
    query that brought it ("use data.lines.lastUpdatedAt to identify which lines have
    changed since the lastUpdatedAfter time you provided"), every line of a fetch.
    """
    if not candidate.is_snapshot:
        return list(candidate.line_ids)
    after = newest_stored_us if newest_stored_us is not None else candidate.since_us
    if after is None:
        return list(candidate.line_ids)
    return [
        line_id for line_id, stamp in candidate.line_instants
        if stamp is None or stamp > after
    ]


def envelope_dict(
    *,
    event_id: str,
    candidate: Candidate,
    received_at: str,
    changed_line_ids: list[str],
    late: bool,
    sibling: bool = False,
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
        "sibling": sibling,
        "meta": candidate.meta,
        "layout": candidate.layout,
        "payload": candidate.payload,
    }


def _shipment(
    data: Mapping[str, Any], source: Source, where: str, *,
    message_meta: Mapping[str, Any] | None = None,
) -> Candidate:
    """``message_meta``: a webhook body's message meta, which keys a shipment event that
    has no usable timestamp (as for orders) instead of refusing it."""
    entity = _entity_id(data, ("id", "shipmentId"), where)
    payload_dump = data, require_storable(data, where)
    meta = data.get("meta")
    stamped = isinstance(meta, Mapping) and meta.get("lastUpdatedAt") is not None
    stamp_holder = meta if stamped and isinstance(meta, Mapping) else data
    stamp, version, instant = _version(stamp_holder, where, meta=message_meta or meta)
    lines = _shipment_lines(data)
    return Candidate(
        kind="shipment", entity_id=entity, last_updated_at=stamp, version_key=version,
        instant_us=instant, event_name=None, source=source, payload=data,
        line_ids=tuple(line_id for line_id, _ in lines), line_instants=lines,
        payload_dump=payload_dump,
    )


def _present(data: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """The event keys a body holds; a key whose value is null is absent (serialisers that
    write every optional field write the event kinds a body does not carry as null)."""
    return [key for key in keys if data.get(key) is not None]


def _message_meta(
    data: Mapping[str, Any], event: Mapping[str, Any] | None
) -> Mapping[str, Any] | None:
    """The message meta: at the top of the body (docs order/buyer/receive, shipment/buyer/
    receive), else the event's own (older bodies, tradecloud-bc-connector's model)."""
    for holder in (data, event):
        meta = holder.get("meta") if holder is not None else None
        if isinstance(meta, Mapping):
            return meta
    return None


def _message_id(meta: Mapping[str, Any] | None) -> str | None:
    value = meta.get("messageId") if meta is not None else None
    return value if plain_text(value) else None


def _documents_version(
    event: Mapping[str, Any], where: str, message_id: str | None, name: str | None
) -> tuple[str | None, str, int | None]:
    if event.get("lastUpdatedAt") is not None:
        return _version(event, where, meta=None)
    if message_id is not None:
        return None, f"m:{message_id}", None
    return None, f"d:{content_digest(name, event)}", None


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
    surrogate such as "\\ud800" parses as JSON but is no text), without control characters,
    and not "." or ".." (which a URL path would resolve: GET /v2/order/.. is GET /v2/)."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_LENGTH:
        return False
    return value not in (".", "..") and _UNFIT_CHARS.search(value) is None


def require_storable(payload: Mapping[str, Any], where: str) -> bytes:
    """Refuse a payload whose envelope orjson (the parser of the store and the dispatcher)
    could never write: a lone surrogate, a NaN, an integer beyond 64 bits, nesting beyond
    its limit. A 4xx (or a rejected poll item) now, instead of a 503 or a stuck delivery for
    ever. Webhook bodies are read by orjson already; objects from the API client are checked
    here, once. orjson is the probe: in C, and fast when it succeeds. Returns the payload as
    the probe wrote it (the envelope's ``"payload"`` value), so it is written only once."""
    try:
        probe = orjson.dumps({"payload": payload})  # as deep as the envelope
    except orjson.JSONEncodeError as e:
        if _deeper_than({"payload": payload}, MAX_ENVELOPE_DEPTH):
            raise InvalidEvent(
                f"{where} is nested deeper than {MAX_ENVELOPE_DEPTH - 1} levels and cannot "
                "be stored"
            ) from None
        raise InvalidEvent(f"{where} cannot be stored as JSON: {e}") from e
    return probe[len(b'{"payload":'):-1]


def _deeper_than(value: object, limit: int) -> bool:
    """True when ``value`` has more than ``limit`` nested arrays and objects (iterative)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, Mapping) else node
        assert isinstance(children, Iterable)
        stack.extend((c, depth + 1) for c in children if isinstance(c, Mapping | list))
    return False


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
    for line_id, line in shipment_lines(data):
        meta = line.get("meta")
        stamp = meta.get("lastUpdatedAt") if isinstance(meta, Mapping) else None
        out.append((line_id, _line_instant(stamp)))
    return tuple(out)


def shipment_lines(data: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """Every line of a shipment with its identity: ``lines`` first, then each of
    ``loadCarriers[].lines`` in order.

    A shipment line has no id (docs shipment/buyer/receive/README.md), so its identity
    is built from its documented fields, each part percent-encoded (``/`` -> ``%2F``):
    ``<despatchAdviceNumber>/<despatchAdviceLinePosition>`` (both mandatory, "unique
    within the despatch advice and immutable"); without them
    ``po/<purchaseOrderNumber>/<purchaseOrderLinePosition>/<deliverySchedulePosition>``;
    without those ``@lines/<i>`` or ``@loadCarriers/<j>/lines/<i>`` (its place). A
    repeat of an identity within the shipment gets ``#2``, ``#3``... in that order.
    """
    found: list[tuple[str, Mapping[str, Any]]] = []
    for where, line in _shipment_line_places(data):
        found.append((_shipment_line_key(line) or where, line))
    seen: dict[str, int] = {}
    out = []
    for key, line in found:
        seen[key] = seen.get(key, 0) + 1
        out.append((key if seen[key] == 1 else f"{key}#{seen[key]}", line))
    return out


def _shipment_line_places(data: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    places = [(f"@lines/{i}", line) for i, line in enumerate(_list(data.get("lines")))]
    for j, carrier in enumerate(_list(data.get("loadCarriers"))):
        if isinstance(carrier, Mapping):
            places += [(f"@loadCarriers/{j}/lines/{i}", line)
                       for i, line in enumerate(_list(carrier.get("lines")))]
    return [(where, line) for where, line in places if isinstance(line, Mapping)]


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _shipment_line_key(line: Mapping[str, Any]) -> str | None:
    supplier = line.get("supplierLine")
    if isinstance(supplier, Mapping):
        parts = _parts(supplier, ("despatchAdviceNumber", "despatchAdviceLinePosition"))
        if parts is not None:
            return "/".join(parts)
    parts = _parts(line, ("purchaseOrderNumber", "purchaseOrderLinePosition"))
    if parts is None:
        return None
    schedule = _part(line.get("deliverySchedulePosition")) or ""
    return "/".join(["po", *parts, schedule])


def _parts(data: Mapping[str, Any], keys: tuple[str, ...]) -> list[str] | None:
    parts = [_part(data.get(key)) for key in keys]
    return None if None in parts else [p for p in parts if p is not None]


def _part(value: object) -> str | None:
    """One identity part: text or a number (positions are sometimes numbers), encoded."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        value = str(value)
    if not plain_text(value):
        return None
    return quote(value.strip(), safe="")


def _iter_lines(data: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    lines = data.get("lines")
    if not isinstance(lines, list):
        return []
    return [
        (line["id"], line)
        for line in lines  # a dict first: the Mapping check is an ABC's, about 0.4 us a line
        if (type(line) is dict or isinstance(line, Mapping)) and plain_text(line.get("id"))
    ]


def _line_instant(stamp: object) -> int | None:
    """A line's instant, or None when missing or unreadable (then it counts as changed)."""
    try:
        return instant_us(stamp)
    except InvalidEvent:
        return None
