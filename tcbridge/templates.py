"""Routing key and subject templates of the broker sinks: pure functions, no IO.

Checked when the configuration is loaded (so ``tcbridge check-config`` and start-up refuse
a bad one), filled from the envelope at delivery.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping
from typing import Any

TEMPLATE_FIELDS = ("id", "kind", "entityId", "eventName", "source")
MAX_ROUTING_KEY_BYTES = 255  # AMQP 0-9-1 shortstr
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_NATS_SUBJECT = re.compile(r"^[^\s.*>]+(\.[^\s.*>]+)*$")


def check_template(template: str, valid: Callable[[str], bool], rule: str) -> str:
    """The template, or ValueError if it is malformed, uses an unknown field, or cannot give
    a valid routing key or subject (``rule`` says what a valid one is)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"malformed template {template!r}: {e}") from e
    for _, field, spec, conversion in parts:
        if field is not None and (field not in TEMPLATE_FIELDS or spec or conversion):
            allowed = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
            raise ValueError(f"unknown placeholder in {template!r}; use {allowed}")
    if not valid(render_template(template, {})):
        raise ValueError(f"{template!r} does not give {rule}")
    return template


def render_template(template: str, envelope: Mapping[str, Any]) -> str:
    """Fill a routing key or subject from the envelope; values keep only ``[A-Za-z0-9_-]``
    (others become ``_``), so an id can never add a ``.`` level or a wildcard."""
    values = {field: _safe(envelope.get(field)) for field in TEMPLATE_FIELDS}
    if envelope.get("eventName") is None:
        values["eventName"] = "snapshot"
    return template.format_map(values)


def _safe(value: object) -> str:
    return _UNSAFE.sub("_", "none" if value is None else str(value)) or "_"


def routing_key_fits(key: str) -> bool:
    """True when an AMQP routing key is short enough."""
    return len(key.encode()) <= MAX_ROUTING_KEY_BYTES


def valid_subject(subject: str) -> bool:
    """True for a NATS subject one can publish to: tokens, no spaces or wildcards."""
    return _NATS_SUBJECT.match(subject) is not None


def check_routing_key(template: str) -> str:
    """A routing key template, or ValueError."""
    return check_template(template, routing_key_fits,
                          f"a routing key of at most {MAX_ROUTING_KEY_BYTES} bytes")


def check_subject(template: str) -> str:
    """A subject template, or ValueError."""
    return check_template(template, valid_subject,
                          "a NATS subject (tokens separated by '.', no spaces, no '*' or '>')")
