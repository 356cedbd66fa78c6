"""The poller: the safety net behind the webhook in hybrid mode, the only source in poll mode.

Paging is keyset first, offset only inside a run of equal timestamps. After a full page
the next query starts after the newest timestamp that is *complete* in what we have seen
(``lastUpdatedAfter`` is exclusive), skipping the few items of the last timestamp already
seen. Plain offset paging over a changing result set can skip an item when another one
is updated between two pages; this cannot, except inside one run of equal timestamps.
Each page's items and the cursor it makes safe are committed in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import structlog

from tcbridge.config import PollKind, PollSettings
from tcbridge.envelope import Candidate, parse_snapshot
from tcbridge.errors import ApiError, InvalidEvent, StoreError
from tcbridge.store import Rejected, Store
from tcbridge.timefmt import instant_us
from tcbridge.tradecloud import PollPage

log = structlog.get_logger(__name__)


class PollClient(Protocol):
    """The part of the Tradecloud client the poller needs."""

    async def poll(
        self, kind: Literal["order", "shipment"], cursor: str, *, offset: int, limit: int,
        filters: Mapping[str, Any] | None = None,
    ) -> PollPage: ...


@dataclass(slots=True)
class CycleStats:
    """What one poll cycle of one kind did."""

    pages: int = 0
    items: int = 0
    stored: int = 0
    duplicates: int = 0
    stale: int = 0
    rejected: int = 0
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class Position:
    """Where the next query starts, and the cursor that is safe to commit now."""

    cursor: str
    offset: int
    safe_cursor: str | None


def next_position(
    stamps: Sequence[str | None], cursor: str, offset: int, *, inclusive: bool
) -> Position:
    """The next query after a full page whose items carry ``stamps`` (None: unreadable)."""
    known = [(i, s, instant_us(s)) for i, s in enumerate(stamps) if s is not None]
    if not known:
        return Position(cursor, offset + len(stamps), None)
    _, last_stamp, last_us = known[-1]
    tail = len(stamps) - next(i for i, _, us in known if us == last_us)
    if inclusive:
        # lastUpdatedSince T returns T again: skip the items of T already seen.
        same_start = instant_us(cursor) == last_us
        return Position(last_stamp, tail + (offset if same_start else 0), last_stamp)
    earlier = [(s, us) for _, s, us in known if us < last_us]
    if not earlier:
        return Position(cursor, offset + len(stamps), None)
    boundary = earlier[-1][0]
    return Position(boundary, tail, boundary)


def page_cursor(page: PollPage, stamps: Sequence[str | None], *, api: str) -> str | None:
    """The cursor after the last page: the response's own (poll API) or the last item's."""
    if api == "poll" and page.last_updated_at and _readable(page.last_updated_at):
        return page.last_updated_at
    readable = [s for s in stamps if s is not None]
    return readable[-1] if readable else None


def _readable(stamp: str) -> bool:
    try:
        instant_us(stamp)
    except InvalidEvent:
        log.warning("poll.unreadable_cursor", value=stamp[:64])
        return False
    return True


class Poller:
    """Polls each configured kind every ``interval_s`` and stores what it finds."""

    def __init__(
        self,
        settings: PollSettings,
        client: PollClient,
        store: Store,
        wake: asyncio.Event,
        *,
        api: Literal["poll", "search"],
    ) -> None:
        self._settings = settings
        self._client = client
        self._store = store
        self._wake = wake
        self._api = api
        self._failures = 0
        self._stop = asyncio.Event()
        self.last_success: dict[str, float] = {}

    async def run_once(self, kind: PollKind) -> CycleStats:
        """One cycle of one kind: page until a page is not full. Raises on API or store errors."""
        start = await self._store.get_cursor(kind) or self._settings.start_from
        cursor, offset = start, 0
        stats = CycleStats(cursor=start)
        while True:
            page = await self._client.poll(
                kind, cursor, offset=offset, limit=self._settings.page_size,
                filters=self._filters(kind),
            )
            candidates, rejects, stamps = self._normalise(kind, page)
            full = len(page.items) >= self._settings.page_size
            if full:
                position = next_position(stamps, cursor, offset, inclusive=self._api == "search")
                commit = position.safe_cursor
            else:
                commit = page_cursor(page, stamps, api=self._api)
            results = await self._store.ingest_page(kind, candidates, rejects, commit)
            self._count(stats, page, results, rejects, commit)
            log.debug("poll.page", kind=kind, offset=offset, items=len(page.items),
                      total=page.total, committed_cursor=commit)
            if not full or self._stop.is_set():  # on shutdown, stop between pages
                return stats
            cursor, offset = position.cursor, position.offset

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every kind until ``stop`` is set; back off on errors, never give up."""
        loop = asyncio.get_running_loop()
        self._stop = stop
        while not stop.is_set():
            ok = True
            for kind in self._settings.kinds:
                if stop.is_set():
                    return
                ok = await self._cycle(kind, loop.time()) and ok
            delay = self._settings.interval_s if ok else self._backoff()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    async def _cycle(self, kind: PollKind, started: float) -> bool:
        try:
            stats = await self.run_once(kind)
        except (ApiError, StoreError) as e:
            self._failures += 1
            log.warning("poll.failed", kind=kind, error=str(e), error_type=type(e).__name__,
                        failures=self._failures)
            return False
        self._failures = 0
        self.last_success[kind] = started
        log.info("poll.done", kind=kind, pages=stats.pages, items=stats.items,
                 stored=stats.stored, duplicates=stats.duplicates, stale=stats.stale,
                 rejected=stats.rejected, cursor=stats.cursor)
        return True

    def _backoff(self) -> float:
        base = min(self._settings.error_backoff_max_s, 2.0 ** min(self._failures, 16))
        return min(self._settings.interval_s, random.uniform(base / 2, base))  # noqa: S311

    def _filters(self, kind: PollKind) -> Mapping[str, Any]:
        if kind == "order":
            return self._settings.order_filters
        return self._settings.shipment_filters

    def _normalise(
        self, kind: PollKind, page: PollPage
    ) -> tuple[list[Candidate], list[Rejected], list[str | None]]:
        candidates: list[Candidate] = []
        rejects: list[Rejected] = []
        stamps: list[str | None] = []
        for item in page.items:
            try:
                candidate = parse_snapshot(kind, item, "poll")
            except InvalidEvent as e:
                rejects.append(_rejected_item(kind, item, str(e)))
                stamps.append(None)
                continue
            candidates.append(candidate)
            stamps.append(candidate.last_updated_at)
        return candidates, rejects, stamps

    def _count(
        self, stats: CycleStats, page: PollPage, results: Sequence[Any],
        rejects: Sequence[Rejected], commit: str | None,
    ) -> None:
        stats.pages += 1
        stats.items += len(page.items)
        stats.rejected += len(rejects)
        for result in results:
            setattr(stats, _STAT[result.status], getattr(stats, _STAT[result.status]) + 1)
        if commit is not None:
            stats.cursor = commit
        if any(result.status == "stored" for result in results):
            self._wake.set()


_STAT = {"stored": "stored", "duplicate": "duplicates", "stale": "stale"}


def _rejected_item(kind: str, item: object, reason: str) -> Rejected:
    try:
        body = json.dumps(item).encode()
    except (TypeError, ValueError):
        body = repr(item).encode()
    return Rejected(source="poll", reason=f"{kind}: {reason}", body=body)
