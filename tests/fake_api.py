"""A scripted Tradecloud poll/search API in process, for tests of ``Poller.run_once``.

It answers from a changing list of versions by the real query rules (see
``tcbridge/simulator/query.py`` and the reference page): ``api="poll"`` filters
``lastUpdatedAfter`` exclusively and answers the page's last stamp as the top-level
``lastUpdatedAt``; ``api="search"`` filters ``lastUpdatedSince`` inclusively and has no
top-level stamp. Matches sort by the instant of ``lastUpdatedAt``, then by id; ``offset``
and ``limit`` cut the page. A change becomes visible ``index_delay_s`` after it is made,
on a simulated clock that only tests move. No HTTP, no sleeping: a test takes milliseconds
(``answer_yields`` makes each answer yield to the event loop a few times, as a real round
trip does, and ``peak_in_flight`` counts how many requests were ever open at once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tcbridge.errors import ApiError
from tcbridge.timefmt import instant_us
from tcbridge.tradecloud import PollPage

EPOCH_S = datetime(2024, 5, 1, tzinfo=UTC).timestamp()


def stamp_of(ms: int) -> str:
    """A Tradecloud timestamp for milliseconds since the epoch."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Version:
    """One version of one order, and when the index shows it."""

    entity_id: str
    ms: int
    visible_at_s: float
    obj: dict[str, Any]

    @property
    def stamp(self) -> str:
        return stamp_of(self.ms)


@dataclass(slots=True)
class FakeApi:
    """The poll client the poller needs (``poll``), answering from ``versions``."""

    api: str = "poll"
    index_delay_s: float = 0.0
    now_s: float = EPOCH_S
    versions: list[Version] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Called with the request's number (0 first) before each answer: changes between pages.
    before_answer: Callable[[int], None] | None = None
    # Request numbers that fail, and with what.
    failures: dict[int, ApiError] = field(default_factory=dict)
    # Raw entries added at the end of every answer's data (non-objects, bad items).
    extra: list[tuple[int, object]] = field(default_factory=list)
    # How often each answer yields to the event loop before it is given (0: never).
    answer_yields: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    _last_ms: int = 0

    def change(self, entity_id: str, *, same_ms: bool = False, delay_s: float | None = None,
               **fields: Any) -> Version:
        """A new version of an order now (``same_ms``: in the millisecond of the previous
        change), visible after the index delay (or ``delay_s``)."""
        now_ms = int(self.now_s * 1000)
        ms = self._last_ms if same_ms and self._last_ms else max(now_ms, self._last_ms + 1)
        if any(v.entity_id == entity_id and v.ms == ms for v in self.versions):
            ms += 1  # one object has one version per millisecond (its dedup key)
        self._last_ms = max(self._last_ms, ms)
        obj = {"id": entity_id, "lastUpdatedAt": stamp_of(ms),
               "lines": [{"id": f"{entity_id}-l1", "lastUpdatedAt": stamp_of(ms)}], **fields}
        delay = self.index_delay_s if delay_s is None else delay_s
        version = Version(entity_id, ms, self.now_s + delay, obj)
        self.versions.append(version)
        return version

    def advance(self, seconds: float) -> None:
        """Move the simulated clock."""
        self.now_s += seconds

    def visible(self) -> list[Version]:
        """What the index shows now: each order's newest version already visible."""
        newest: dict[str, Version] = {}
        for version in self.versions:
            if version.visible_at_s <= self.now_s:
                seen = newest.get(version.entity_id)
                if seen is None or (version.ms, version.visible_at_s) >= (seen.ms,
                                                                         seen.visible_at_s):
                    newest[version.entity_id] = version
        return list(newest.values())

    async def close(self) -> None:
        """What the client does at the end of a backfill: nothing to do here."""

    async def poll(
        self, kind: str, cursor: str, *, offset: int, limit: int,
        filters: Mapping[str, Any] | None = None,
    ) -> PollPage:
        number = len(self.requests)
        self.requests.append({"kind": kind, "cursor": cursor, "offset": offset, "limit": limit,
                              "filters": filters})
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            for _ in range(self.answer_yields):
                await asyncio.sleep(0)  # a round trip: other tasks run meanwhile
            return self._answer(number, cursor, offset, limit)
        finally:
            self.in_flight -= 1

    def _answer(self, number: int, cursor: str, offset: int, limit: int) -> PollPage:
        if self.before_answer is not None:
            self.before_answer(number)
        if number in self.failures:
            raise self.failures[number]
        cursor_us = instant_us(cursor)
        inclusive = self.api == "search"
        matches = sorted(
            (v for v in self.visible()
             if (v.ms * 1000 >= cursor_us if inclusive else v.ms * 1000 > cursor_us)),
            key=lambda v: (v.ms, v.entity_id),
        )
        data: list[Any] = [dict(v.obj) for v in matches]
        for position, entry in self.extra:
            data.insert(position, entry)
        page = data[offset:offset + limit]
        last = page_stamp(page)
        return PollPage(items=page, total=len(data),
                        last_updated_at=last if self.api == "poll" else None)


def page_stamp(page: list[Any]) -> str | None:
    """The last readable ``lastUpdatedAt`` of a page (what the poll API answers on top)."""
    for item in reversed(page):
        if isinstance(item, dict) and isinstance(item.get("lastUpdatedAt"), str):
            return str(item["lastUpdatedAt"])
    return None
