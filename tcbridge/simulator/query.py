"""The poll and search endpoints' semantics as pure functions: filter, sort, page."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tcbridge.simulator.model import JsonObj, parse_instant_us

MAX_LIMIT = 100
DEFAULT_LIMIT = 100

ORDER_FILTERS = ("status.processStatus", "status.logisticsStatus", "buyerOrder.companyId",
                 "supplierOrder.companyId")
POLL_CURSOR = "lastUpdatedAfter"  # exclusive
LEGACY_SEARCH_CURSOR = "lastUpdatedSince"  # inclusive; renamed in January 2024
SHIPMENT_FILTERS = ("status.processStatus", "buyerShipment.companyId",
                    "supplierShipment.companyId")


class QueryError(ValueError):
    """The request body is not a valid query (answered with 400)."""


@dataclass(frozen=True, slots=True)
class Indexed:
    """One stored object with its sort key: the instant of its lastUpdatedAt and its id."""

    instant_us: int
    entity_id: str
    stamp: str
    obj: JsonObj


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a query: the items, the count of all matches and the last item's stamp."""

    data: list[JsonObj]
    total: int
    last_updated_at: str | None


def run_query(
    items: Iterable[Indexed], body: object, *, inclusive: bool, filter_paths: tuple[str, ...],
    cursor_key: str | None = None,
) -> Page:
    """Apply a query body to ``items``: the cursor in ``cursor_key`` (default: the exclusive
    ``lastUpdatedAfter``, or the inclusive ``lastUpdatedSince`` when ``inclusive``).

    Like a strict server, a filter it does not know, the other cursor name included, is
    ignored: a wrong name returns everything from the start (a stuck cursor), not a 400."""
    query = _as_object(body, "body")
    filters = _as_object(query.get("filters", {}), "filters")
    if cursor_key is None:
        cursor_key = LEGACY_SEARCH_CURSOR if inclusive else POLL_CURSOR
    cursor_us = _cursor(filters.get(cursor_key), cursor_key)
    offset = _bounded_int(query.get("offset", 0), "offset", 0, None)
    limit = _bounded_int(query.get("limit", DEFAULT_LIMIT), "limit", 0, MAX_LIMIT)
    wanted = flatten_filters(filters, filter_paths)
    matches = sorted(
        (it for it in items
         if _after(it.instant_us, cursor_us, inclusive) and _matches(it.obj, wanted)),
        key=lambda it: (it.instant_us, it.entity_id),
    )
    page = matches[offset:offset + limit]
    return Page([it.obj for it in page], len(matches), page[-1].stamp if page else None)


def flatten_filters(filters: Mapping[str, Any], paths: tuple[str, ...]) -> dict[str, set[str]]:
    """Known filters as ``{"a.b": {allowed values}}``, str or list values. Filters nest as
    objects (SDK samples PollOrders.cs, PollShipments.cs): a dotted key is no filter name
    the API knows, so it is ignored."""
    flat: dict[str, set[str]] = {}
    _flatten(filters, "", flat)
    return {path: values for path, values in flat.items() if path in paths}


def _flatten(node: Mapping[str, Any], prefix: str, out: dict[str, set[str]]) -> None:
    for key, value in node.items():
        if "." in key:
            continue
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, f"{path}.", out)
        elif isinstance(value, str):
            out[path] = {value}
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out[path] = set(value)


def _matches(obj: JsonObj, wanted: dict[str, set[str]]) -> bool:
    return all(_lookup(obj, path) in values for path, values in wanted.items())


def _lookup(obj: JsonObj, path: str) -> object:
    node: object = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _after(instant_us: int, cursor_us: int | None, inclusive: bool) -> bool:
    if cursor_us is None:
        return True
    return instant_us >= cursor_us if inclusive else instant_us > cursor_us


def _as_object(value: object, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise QueryError(f"{name} must be a JSON object")
    return value


def _cursor(value: object, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise QueryError(f"filters.{name} must be a string")
    try:
        return parse_instant_us(value)
    except ValueError as e:
        raise QueryError(f"filters.{name} is not an ISO 8601 timestamp: {value!r}") from e


def _bounded_int(value: object, name: str, low: int, high: int | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise QueryError(f"{name} must be an integer")
    if value < low or (high is not None and value > high):
        raise QueryError(f"{name} must be between {low} and {high or 'any'}")
    return value
