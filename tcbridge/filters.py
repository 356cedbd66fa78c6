"""Which handlers an event goes to: pure functions over a handler's settings and an envelope.

Every filter answers with the reason it skips an event (or None), so the decision can be
counted and shown. Values are read defensively: an unknown or missing status, a payload of
an unexpected shape, a snapshot without message meta, never raise; they simply do not match
(a status filter) or do not name an excluded source (echo suppression, so a change that
cannot be attributed is never dropped).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from tcbridge.config import HandlerSettings

SkipReason = Literal[
    "kind", "source", "event_name", "snapshot", "process_status", "logistics_status",
    "source_user", "source_company",
]
STATUS_KEYS: dict[str, str] = {
    "process_status": "processStatus", "logistics_status": "logisticsStatus",
}


def skip_reason(settings: HandlerSettings, envelope: Mapping[str, Any]) -> SkipReason | None:
    """Why the handler does not take this event, or None when it does (first reason wins)."""
    if envelope.get("kind") not in settings.kinds:
        return "kind"
    if envelope.get("source") not in settings.sources:
        return "source"
    reason = _event_name_reason(settings, envelope)
    if reason is not None:
        return reason
    for field in ("process_status", "logistics_status"):
        patterns: Sequence[str] | None = getattr(settings, field)
        if patterns is not None and not status_matches(envelope, STATUS_KEYS[field], patterns):
            return field
    return _echo_reason(settings, envelope)


def _event_name_reason(
    settings: HandlerSettings, envelope: Mapping[str, Any]
) -> SkipReason | None:
    if settings.event_names is None:
        return None
    event_name = envelope.get("eventName")
    if event_name is None:
        return None if settings.snapshots else "snapshot"
    if any(fnmatch.fnmatchcase(str(event_name), p) for p in settings.event_names):
        return None
    return "event_name"


def status_matches(envelope: Mapping[str, Any], key: str, patterns: Sequence[str]) -> bool:
    """True when the object's ``status.<key>``, or that of one of its changed lines, matches
    one of the glob patterns (case-sensitive, like Tradecloud's enum values)."""
    return any(
        any(fnmatch.fnmatchcase(value, p) for p in patterns)
        for value in statuses(envelope, key)
    )


def statuses(envelope: Mapping[str, Any], key: str) -> Iterator[str]:
    """The object's ``status.<key>`` and, for an order, those of the changed lines.

    Shipment lines carry no status in Tradecloud's model, so a shipment is judged on its
    own ``status`` only.
    """
    payload = envelope.get("payload")
    if not isinstance(payload, Mapping):
        return
    own = _status_value(payload, key)
    if own is not None:
        yield own
    if envelope.get("kind") == "shipment":
        return
    changed = envelope.get("changedLineIds")
    wanted = {i for i in changed if isinstance(i, str)} if isinstance(changed, list) else set()
    lines = payload.get("lines")
    for line in lines if isinstance(lines, list) else ():
        if isinstance(line, Mapping) and line.get("id") in wanted:
            value = _status_value(line, key)
            if value is not None:
                yield value


def _status_value(holder: Mapping[str, Any], key: str) -> str | None:
    status = holder.get("status")
    value = status.get(key) if isinstance(status, Mapping) else None
    return value if isinstance(value, str) else None


def _echo_reason(settings: HandlerSettings, envelope: Mapping[str, Any]) -> SkipReason | None:
    if not (settings.exclude_source_user_ids or settings.exclude_source_company_ids):
        return None
    source = message_source(envelope)
    if source.get("userId") in settings.exclude_source_user_ids:
        return "source_user"
    if source.get("companyId") in settings.exclude_source_company_ids:
        return "source_company"
    return None


def message_source(envelope: Mapping[str, Any]) -> Mapping[str, Any]:
    """``meta.source`` of the webhook message (the envelope's top-level ``meta``); empty for
    a snapshot, which has no message meta, or for anything of an unexpected shape."""
    meta = envelope.get("meta")
    source = meta.get("source") if isinstance(meta, Mapping) else None
    return source if isinstance(source, Mapping) else {}
