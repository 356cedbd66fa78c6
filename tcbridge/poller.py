"""The poller: the safety net behind the webhook in hybrid mode, the only source in poll mode.

Paging is keyset first, offset only inside a run of equal timestamps. After a full page
the next query starts after the newest timestamp that is *complete* in what we have seen
(``lastUpdatedAfter`` is exclusive), skipping the few items of the last timestamp already
seen. Offsets over a changing result set can still skip an item: when an item before the
offset is updated between two pages it moves to the end and every later item moves up
one. So each offset query asks for the previous page's last item again; if that item
does not come back first, the run shifted and the poller re-reads it from the query's
start. Each page's items and the cursor it makes safe are committed in one transaction.

The item asked for again must come back with the same id *and* the same ``lastUpdatedAt``:
an item updated between two pages moves to the end, and when it is the newest item it
still comes first, with a new stamp; taking it for the old one would skip its new version.

A search index is eventually consistent, and a second change in the millisecond of the
cursor can become visible after the poll. So each cycle queries from the committed cursor
minus ``lookback_s`` and relies on deduplication for what it sees again; the committed
cursor is still the exact string received, and it never moves backwards.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Literal, Protocol

import structlog

from tcbridge.aio import wait_any
from tcbridge.config import PollKind, PollSettings
from tcbridge.envelope import Candidate, parse_snapshot
from tcbridge.errors import ApiAuthError, ApiError, Fenced, InvalidEvent, StoreError
from tcbridge.metrics import Metrics
from tcbridge.store import Fence, IngestResult, Rejected, StoreBackend
from tcbridge.timefmt import instant_us, parse_instant
from tcbridge.tradecloud import PollPage

log = structlog.get_logger(__name__)


class PollClient(Protocol):
    """The part of the Tradecloud client the poller needs."""

    async def poll(
        self, kind: Literal["order", "shipment"], cursor: str, *, offset: int, limit: int,
        filters: Mapping[str, Any] | None = None,
    ) -> PollPage: ...


class PollGate(Protocol):
    """Whether this process may poll a kind now: always on one SQLite file; among replicas
    on one PostgreSQL store, only while it holds the kind's lock (``tcbridge.leader``)."""

    changed: asyncio.Event  # set when a kind is taken or lost

    def active(self, kind: str) -> bool: ...

    def fence(self, kind: str) -> Fence | None: ...


class AlwaysActive:
    """The gate of a store only this process writes to: every kind, no fence."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()

    def active(self, kind: str) -> bool:
        """Always."""
        return True

    def fence(self, kind: str) -> Fence | None:
        """No fence to check."""
        return None


@dataclass(slots=True)
class CycleStats:
    """What one poll cycle of one kind did."""

    pages: int = 0
    items: int = 0
    stored: int = 0
    duplicates: int = 0
    stale: int = 0
    rejected: int = 0
    recovered: int = 0
    total: int | None = None
    cursor: str | None = None
    complete: bool = True  # False: cut short by a result set that kept shifting


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


def lookback_start(cursor: str, lookback_s: float) -> str:
    """Where a cycle's query starts: ``lookback_s`` before the committed cursor, in the
    API's format (UTC, milliseconds, rounded down by isoformat); the cursor itself when 0
    or out of range."""
    if lookback_s <= 0:
        return cursor
    try:
        moment = parse_instant(cursor) - timedelta(seconds=lookback_s)  # parse_instant: UTC
    except (InvalidEvent, OverflowError):
        return cursor
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ahead(offered: str | None, committed: str) -> str | None:
    """``offered`` if it is later than the committed cursor, else None: a look-back page
    makes cursors safe that lie behind the committed one, and those are not progress."""
    if offered is None or instant_us(offered) <= instant_us(committed):
        return None
    return offered


def _readable(stamp: str) -> bool:
    try:
        instant_us(stamp)
    except InvalidEvent:
        log.warning("poll.unreadable_cursor", value=stamp[:64])
        return False
    return True


MAX_SHIFTS_PER_CYCLE = 5


class Poller:
    """Polls each configured kind every ``interval_s`` and stores what it finds."""

    def __init__(
        self,
        settings: PollSettings,
        client: PollClient,
        store: StoreBackend,
        wake: asyncio.Event,
        *,
        api: Literal["poll", "search"],
        hybrid: bool = False,
        metrics: Metrics | None = None,
        cursor_prefix: str = "",
        progress: Callable[[str, CycleStats, int | None], None] | None = None,
        inclusive: bool | None = None,
        gate: PollGate | None = None,
    ) -> None:
        self._settings = settings
        self._gate: PollGate = gate or AlwaysActive()
        self._client = client
        self._store = store
        self._wake = wake
        self._api = api
        # Tied to the cursor filter's name (lastUpdatedSince returns the cursor's items again),
        # not to the API: the search API takes the exclusive lastUpdatedAfter since 2024.
        self._inclusive = api == "search" if inclusive is None else inclusive
        self._hybrid = hybrid
        self._metrics = metrics or Metrics()
        self._cursor_prefix = cursor_prefix  # "backfill:" keeps a backfill off the main cursor
        self._progress = progress
        self._failures = 0
        self._stop = asyncio.Event()
        self.last_success: dict[str, float] = {}
        self.auth_refused: str | None = None  # Tradecloud refused our credentials (readiness)
        self.interval_s = self.base_interval_s

    @property
    def base_interval_s(self) -> float:
        """The configured interval: ``hybrid_interval_s`` in hybrid mode when set."""
        if self._hybrid and self._settings.hybrid_interval_s is not None:
            return self._settings.hybrid_interval_s
        return self._settings.interval_s

    async def run_once(self, kind: PollKind) -> CycleStats:
        """One cycle of one kind: page until a page is not full. Raises on API or store errors."""
        name = self._cursor_prefix + kind
        stored = await self._store.get_cursor(name)
        # Two cursors: ``committed`` is the exact string received (stored, only forwards);
        # ``query_cursor`` is where this cycle's query starts, a look-back before it.
        committed = stored or self._settings.start_from
        query_cursor = (lookback_start(stored, self._settings.lookback_s)
                        if stored is not None else committed)
        # Until a first cycle has completed, the poller catches up on history (from
        # start_from); after that, what it sees first is what the webhook missed.
        recover = (self._hybrid and not self._cursor_prefix
                   and await self._store.poll_succeeded(name))
        cursor, offset, overlap, shifts = query_cursor, 0, None, 0
        stats = CycleStats(cursor=committed)
        while True:
            # The item asked for again takes a place on the page; a page of one needs two.
            limit = max(self._settings.page_size, 2) if overlap else self._settings.page_size
            raw = await self._fetch(kind, cursor, offset - 1 if overlap else offset, limit)
            page = _after_overlap(raw, overlap)
            if page is None:
                # An item before ``offset`` was updated since the last page (it moved to the
                # end), so every later item moved up one: offset paging would skip one.
                # Re-read from the query's start (a committed, safe cursor); duplicates are
                # harmless. If it keeps shifting, end the cycle: the next one resumes there.
                shifts += 1
                log.info("poll.run_shifted", kind=kind, cursor=cursor, offset=offset,
                         shifts=shifts)
                if shifts > MAX_SHIFTS_PER_CYCLE:
                    log.warning("poll.cycle_cut_short", kind=kind, cursor=cursor)
                    stats.complete = False
                    return stats
                offset, overlap = 0, None
                continue
            candidates, rejects, stamps = self._normalise(kind, page, cursor)
            full = len(raw.items) >= limit
            if full:
                position = next_position(stamps, cursor, offset, inclusive=self._inclusive)
                commit = position.safe_cursor
            else:
                commit = page_cursor(page, stamps, api=self._api)
            commit = ahead(commit, committed)
            results = await self._store.ingest_page(
                name, candidates, rejects, commit, recovered=recover, fence=self._fence(kind))
            committed = commit or committed
            self._account(kind, stats, page, candidates, results, rejects, commit)
            # On shutdown, or when another replica took the kind over: stop between pages.
            if not full or self._stop.is_set() or not self._gate.active(kind):
                return stats
            cursor, offset = position.cursor, position.offset
            # Ask for the last item again: if it does not come first, the offsets shifted.
            overlap = _Overlap(_identity(page.items[-1])) if offset and page.items else None

    def _fence(self, kind: str) -> Fence | None:
        """The fence for a page of ``kind``; raises when this process may not poll it."""
        if not self._gate.active(kind):
            raise Fenced(f"{kind}: this replica no longer holds the poller lock")
        return self._gate.fence(kind)

    async def _fetch(self, kind: PollKind, cursor: str, offset: int, limit: int) -> PollPage:
        self._metrics.poll_requests.labels(kind).inc()
        with self._metrics.poll_latency.labels(kind).time():
            return await self._client.poll(
                kind, cursor, offset=offset, limit=limit,
                filters=self._filters(kind),
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every kind until ``stop`` is set; back off on errors, never give up."""
        loop = asyncio.get_running_loop()
        self._stop = stop
        while not stop.is_set():
            self._gate.changed.clear()
            cycles: list[CycleStats | None] = []
            for kind in self._settings.kinds:
                if stop.is_set():
                    return
                if self._gate.active(kind):  # a standby replica polls nothing
                    cycles.append(await self._cycle(kind, loop.time()))
            delay = self._next_delay(cycles)
            # A kind taken over from a dead replica is polled at once, not after the delay.
            await wait_any(stop, self._gate.changed, delay)

    def _next_delay(self, cycles: Sequence[CycleStats | None]) -> float:
        """Back off after errors; poll sooner while busy (recovering missed webhooks, or more
        than a page per cycle: the API's own advice), relaxing back to the base interval."""
        if any(stats is None for stats in cycles):
            return self._backoff()
        busy = any(
            stats is not None
            and (stats.recovered > 0 or (stats.total or 0) > self._settings.page_size)
            for stats in cycles
        )
        floor = min(self._settings.min_interval_s, self.base_interval_s)
        if busy:
            self.interval_s = max(floor, self.interval_s / 2)
        else:
            self.interval_s = min(self.base_interval_s, self.interval_s * 2)
        return self.interval_s

    async def _cycle(self, kind: PollKind, started: float) -> CycleStats | None:
        try:
            stats = await self.run_once(kind)
        except Fenced as e:  # not a failure: another replica polls this kind now
            log.warning("poll.fenced", kind=kind, error=str(e))
            return None
        except ApiAuthError as e:
            # Not transient: say so at once (readiness, an error line), and keep trying.
            self._failures += 1
            self.auth_refused = str(e)
            self._metrics.poll_errors.labels(kind).inc()
            log.error("poll.credentials_refused", kind=kind, error=str(e),
                      message="check tradecloud.username and the password")
            await self._record(kind, None, str(e))
            return None
        except (ApiError, StoreError) as e:
            self._failures += 1
            self._metrics.poll_errors.labels(kind).inc()
            log.warning("poll.failed", kind=kind, error=str(e), error_type=type(e).__name__,
                        failures=self._failures)
            await self._record(kind, None, str(e))
            return None
        self._failures = 0
        self.auth_refused = None
        self.last_success[kind] = started
        log.info("poll.done", kind=kind, pages=stats.pages, items=stats.items,
                 stored=stats.stored, duplicates=stats.duplicates, stale=stats.stale,
                 rejected=stats.rejected, recovered=stats.recovered, total=stats.total,
                 cursor=stats.cursor)
        await self._record(kind, stats, None)
        return stats

    async def _record(self, kind: str, stats: CycleStats | None, error: str | None) -> None:
        try:
            await self._store.record_poll(
                kind, error=error, items=None if stats is None else stats.items,
                stored=None if stats is None else stats.stored)
        except StoreError as e:
            log.warning("poll.state_not_recorded", kind=kind, error=str(e))

    def _backoff(self) -> float:
        base = min(self._settings.error_backoff_max_s, 2.0 ** min(self._failures, 16))
        return min(self.base_interval_s, random.uniform(base / 2, base))  # noqa: S311

    def _filters(self, kind: PollKind) -> Mapping[str, Any]:
        if kind == "order":
            return self._settings.order_filters
        return self._settings.shipment_filters

    def _normalise(
        self, kind: PollKind, page: PollPage, since: str
    ) -> tuple[list[Candidate], list[Rejected], list[str | None]]:
        candidates: list[Candidate] = []
        rejects: list[Rejected] = []
        stamps: list[str | None] = []
        for item in page.items:
            try:
                # ``since``: a first sighting's changed lines are those after the query's cursor.
                candidate = parse_snapshot(kind, item, "poll", since=since, layout=page.layout)
            except InvalidEvent as e:
                rejects.append(_rejected_item(kind, item, str(e)))
                stamps.append(None)
                continue
            candidates.append(candidate)
            stamps.append(candidate.last_updated_at)
        return candidates, rejects, stamps

    def _account(
        self, kind: str, stats: CycleStats, page: PollPage, candidates: Sequence[Candidate],
        results: Sequence[IngestResult], rejects: Sequence[Rejected], commit: str | None,
    ) -> None:
        if stats.pages == 0:
            stats.total = page.total
        stats.pages += 1
        stats.items += len(page.items)
        stats.rejected += len(rejects)
        self._metrics.rejected.labels("poll").inc(len(rejects))
        for candidate, result in zip(candidates, results, strict=True):
            self._count(stats, candidate, result)
        if commit is not None:
            stats.cursor = commit
            if not self._cursor_prefix:
                self._metrics.set_cursor(kind, commit)
        if stats.stored:
            self._wake.set()
        log.debug("poll.page", kind=kind, items=len(page.items), total=page.total,
                  committed_cursor=commit)
        if self._progress is not None:
            self._progress(kind, stats, stats.total)

    def _count(self, stats: CycleStats, candidate: Candidate, result: IngestResult) -> None:
        setattr(stats, _STAT[result.status], getattr(stats, _STAT[result.status]) + 1)
        self._metrics.count_ingest(result.status, "poll", candidate.kind)
        if result.status != "stored":
            return
        fields = {"event_id": result.event_id, "entity_id": candidate.entity_id,
                  "kind": candidate.kind, "source": "poll",
                  "last_updated_at": candidate.last_updated_at}
        if result.recovered:
            stats.recovered += 1
            self._metrics.recovered.labels(candidate.kind).inc()
            log.warning("poll.recovered", **fields,
                        message="first seen by the poller: the webhook missed it")
        else:
            log.debug("poll.stored", **fields)


@dataclass(frozen=True, slots=True)
class _Overlap:
    """The previous page's last item, as it must come back when asked for again."""

    identity: tuple[object, object]


def _identity(item: object) -> tuple[object, object]:
    """An item's id and the instant of its ``lastUpdatedAt`` (a shipment's is in ``meta``);
    the raw value when either is unreadable, the item itself when it is no object."""
    if not isinstance(item, Mapping):
        return None, item
    meta = item.get("meta")
    stamp = item.get("lastUpdatedAt")
    if stamp is None and isinstance(meta, Mapping):
        stamp = meta.get("lastUpdatedAt")
    try:
        return item.get("id"), instant_us(stamp)
    except InvalidEvent:
        return item.get("id"), stamp


def _after_overlap(page: PollPage, overlap: _Overlap | None) -> PollPage | None:
    """The page without the item asked for again; None if that item did not come back
    first unchanged (same id, same instant): the run shifted, or the item was updated."""
    if overlap is None:
        return page
    if not page.items or _identity(page.items[0]) != overlap.identity:
        return None
    return replace(page, items=page.items[1:])


_STAT = {"stored": "stored", "duplicate": "duplicates", "stale": "stale"}


def _rejected_item(kind: str, item: object, reason: str) -> Rejected:
    try:
        body = json.dumps(item).encode()
    except (TypeError, ValueError, RecursionError):
        try:
            body = repr(item).encode(errors="backslashreplace")
        except RecursionError:  # nested too deeply even for repr: keep the reason only
            body = b"<nested too deeply to keep>"
    return Rejected(source="poll", reason=f"{kind}: {reason}", body=body)
