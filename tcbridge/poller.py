"""The poller: the safety net behind the webhook in hybrid mode, the only source in poll mode.

Paging is keyset first, offset only inside a run of equal timestamps. After a full page
the next query starts after the newest timestamp that is *complete* in what we have seen
(``lastUpdatedAfter`` is exclusive), skipping the few items of the last timestamp already
seen. Offsets over a changing result set can still skip an item: when an item before the
offset is updated between two pages it moves to the end and every later item moves up
one. So each offset query asks for the previous page's last item again; if that item
does not come back first, the run shifted and the poller re-reads it from the query's
start. Each page's items and the cursor it makes safe are committed in one transaction.

The next query follows from a page's raw stamps alone (``next_step``), so a cycle fetches
ahead of its commits: one request in flight, up to ``AHEAD_PAGES`` pages waiting, the
next page normalised while the one before it commits, the commits one at a time and in
order. A failed commit drops what was fetched after it.

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


def item_stamp(item: object) -> str | None:
    """The ``lastUpdatedAt`` an item is sorted by, as received (a shipment's is in ``meta``,
    as in envelope.py); None when it has none or it is unreadable. Read from the raw item,
    so that the next query is known before the page is normalised."""
    if not isinstance(item, Mapping):
        return None
    meta = item.get("meta")
    stamp = meta.get("lastUpdatedAt") if isinstance(meta, Mapping) else None
    if stamp is None:
        stamp = item.get("lastUpdatedAt")
    if not isinstance(stamp, str):
        return None
    try:
        instant_us(stamp)
    except InvalidEvent:
        return None
    return stamp


@dataclass(frozen=True, slots=True)
class Query:
    """One page's query: where it starts, and the previous page's last item, asked for
    again in front of the page when paging by offset (None: nothing asked for again)."""

    cursor: str
    offset: int
    overlap: _Overlap | None

    @property
    def request_offset(self) -> int:
        return self.offset - 1 if self.overlap else self.offset

    def limit(self, page_size: int) -> int:
        # The item asked for again takes a place on the page; a page of one needs two.
        return max(page_size, 2) if self.overlap else page_size


@dataclass(frozen=True, slots=True)
class Step:
    """What a fetched page leads to: its items (without the one asked for again) commit
    with ``commit`` (None: no cursor move); then ``next`` is asked (None: the last page).
    ``since``: the cursor of the query that brought the page."""

    page: PollPage
    commit: str | None
    next: Query | None
    since: str


def next_step(
    raw: PollPage, query: Query, *, page_size: int, inclusive: bool, api: str, committed: str
) -> Step | None:
    """The pure "what's next" after a page answered ``query``; None when the item asked for
    again did not come back first unchanged (the run shifted: re-read from its start)."""
    page = _after_overlap(raw, query.overlap)
    if page is None:
        return None
    stamps = [item_stamp(item) for item in page.items]
    if len(raw.items) < query.limit(page_size):
        return Step(page, ahead(page_cursor(page, stamps, api=api), committed), None,
                    query.cursor)
    position = next_position(stamps, query.cursor, query.offset, inclusive=inclusive)
    # Ask for the last item again: if it does not come first, the offsets shifted.
    overlap = _Overlap(_identity(page.items[-1])) if position.offset and page.items else None
    return Step(page, ahead(position.safe_cursor, committed),
                Query(position.cursor, position.offset, overlap), query.cursor)


async def _discard(task: asyncio.Task[None]) -> None:
    """Cancel the fetch loop when its pages will not be used and wait until it has
    stopped, so that no request of this cycle is still in flight when the cycle ends."""
    if not task.done():
        task.cancel()
        await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved: a failure after the cycle ended is not news


MAX_SHIFTS_PER_CYCLE = 5
# Pages fetched ahead of the one committing: they absorb a slow commit (a checkpoint, a busy
# disk) so the requests keep their pace. About 1-2 MB of parsed JSON each (100 orders).
AHEAD_PAGES = 4
NORMALISE_SLICE = 20  # items normalised between two yields to the event loop (~0.3 ms)


@dataclass(frozen=True, slots=True)
class _Ready:
    """A fetched page, normalised: what its commit stores."""

    step: Step
    candidates: list[Candidate]
    rejects: list[Rejected]


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
        """One cycle of one kind: page until a page is not full. Raises on API or store errors.

        Pipelined, one request in flight: a fetch loop asks for page after page (the next
        query follows from a page's raw stamps) and hands them on, up to ``AHEAD_PAGES``
        ahead, while this loop normalises and commits them one at a time, in order, each
        with the cursor it makes safe. When a commit fails, the pages fetched after it are
        dropped and the fetch under way is cancelled: the cursor stays where the last
        committed page put it. When a fetch fails, the pages before it still commit."""
        name = self._cursor_prefix + kind
        stored = await self._store.get_cursor(name)
        # Two cursors: ``committed`` is the exact string received (stored, only forwards);
        # the first query starts a look-back before it.
        committed = stored or self._settings.start_from
        start = (lookback_start(stored, self._settings.lookback_s)
                 if stored is not None else committed)
        # Until a first cycle has completed, the poller catches up on history (from
        # start_from); after that, what it sees first is what the webhook missed.
        recover = (self._hybrid and not self._cursor_prefix
                   and await self._store.poll_succeeded(name))
        stats = CycleStats(cursor=committed)
        # Three stages, each page handed on in order: fetched, normalised, committed (the
        # pages ready when a commit starts go in it together). The pages waiting their turn
        # are at most AHEAD_PAGES (those in the two queues and the one the normaliser
        # holds), and one more the fetcher holds until there is room.
        fetched: asyncio.Queue[Step | Exception | None] = asyncio.Queue(maxsize=1)
        ready: asyncio.Queue[_Ready | Exception | None] = asyncio.Queue(
            maxsize=AHEAD_PAGES - 2)
        log.info("poll.started", kind=kind, cursor=start)
        fetcher = asyncio.create_task(
            self._fetch_ahead(kind, Query(start, 0, None), committed, fetched, stats))
        normaliser = asyncio.create_task(self._normalise_ahead(kind, fetched, ready))
        try:
            while True:
                group, error, ended = _take_ready(await ready.get(), ready)
                if group:
                    await self._commit(kind, stats, group, recover)
                    # On shutdown, or when another replica took the kind over: stop between
                    # commits.
                    if self._stop.is_set() or not self._gate.active(kind):
                        break
                if error is not None:
                    raise error
                if ended:
                    break
            return stats
        finally:
            await _discard(normaliser)
            await _discard(fetcher)

    async def _fetch_ahead(
        self, kind: PollKind, query: Query, committed: str,
        pages: asyncio.Queue[Step | Exception | None], stats: CycleStats,
    ) -> None:
        """Fetch one page at a time and put each, in order, then None (the end) or the
        error that ended it. ``committed``: the cursor once the pages put so far commit."""
        shifts = 0
        try:
            while True:
                raw = await self._fetch(kind, query.cursor, query.request_offset,
                                        query.limit(self._settings.page_size))
                step = next_step(raw, query, page_size=self._settings.page_size,
                                 inclusive=self._inclusive, api=self._api, committed=committed)
                if step is None:
                    shifts += 1
                    if self._cut_short(kind, query, shifts, stats):
                        break
                    query = Query(query.cursor, 0, None)
                    continue
                committed = step.commit or committed
                await pages.put(step)
                if step.next is None or self._stop.is_set() or not self._gate.active(kind):
                    break
                query = step.next
        except Exception as e:  # handed on after the pages before it: they still commit
            await pages.put(e)
            return
        await pages.put(None)

    def _cut_short(self, kind: PollKind, query: Query, shifts: int, stats: CycleStats) -> bool:
        """After a shift: an item before the offset was updated since the last page (it
        moved to the end), so every later item moved up one and offset paging would skip
        one. The caller re-reads from the query's start (a safe cursor; duplicates are
        harmless); True when it kept shifting: end the cycle, the next one resumes there."""
        log.info("poll.run_shifted", kind=kind, cursor=query.cursor, offset=query.offset,
                 shifts=shifts)
        if shifts <= MAX_SHIFTS_PER_CYCLE:
            return False
        log.warning("poll.cycle_cut_short", kind=kind, cursor=query.cursor)
        stats.complete = False
        return True

    async def _normalise_ahead(
        self, kind: PollKind, fetched: asyncio.Queue[Step | Exception | None],
        ready: asyncio.Queue[_Ready | Exception | None],
    ) -> None:
        """Normalise the fetched pages in order while the page before commits, and put each,
        then None (the end) or the error that ended the fetching or the normalising."""
        try:
            while (step := await fetched.get()) is not None:
                if isinstance(step, Exception):
                    await ready.put(step)
                    return
                await ready.put(await self._normalise_page(kind, step))
        except Exception as e:  # a page that could not be normalised: those before it commit
            await ready.put(e)
            return
        await ready.put(None)

    async def _normalise_page(self, kind: PollKind, step: Step) -> _Ready:
        candidates: list[Candidate] = []
        rejects: list[Rejected] = []
        items = step.page.items
        for first in range(0, len(items), NORMALISE_SLICE):
            # Yield between slices: the next request (aiohttp writes it from a task of its
            # own, queued after this one), the pacer's timer and the next answer go first.
            await asyncio.sleep(0)
            part = replace(step.page, items=items[first:first + NORMALISE_SLICE])
            more, bad = self._normalise(kind, part, step.since)
            candidates += more
            rejects += bad
        return _Ready(step, candidates, rejects)

    async def _commit(self, kind: PollKind, stats: CycleStats, group: Sequence[_Ready],
                      recover: bool) -> None:
        """Store normalised pages, in order, with the cursor the last of them makes safe, in
        one transaction: all of them or none."""
        commit = next((p.step.commit for p in reversed(group) if p.step.commit is not None),
                      None)
        results = await self._store.ingest_page(
            self._cursor_prefix + kind, [c for p in group for c in p.candidates],
            [r for p in group for r in p.rejects], commit, recovered=recover,
            fence=self._fence(kind))
        at = 0
        for page in group:
            mine = results[at:at + len(page.candidates)]
            at += len(page.candidates)
            self._account(kind, stats, page.step.page, page.candidates, mine, page.rejects,
                          page.step.commit)

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
    ) -> tuple[list[Candidate], list[Rejected]]:
        candidates: list[Candidate] = []
        rejects: list[Rejected] = []
        for item in page.items:
            try:
                # ``since``: a first sighting's changed lines are those after the query's cursor.
                candidates.append(
                    parse_snapshot(kind, item, "poll", since=since, layout=page.layout))
            except InvalidEvent as e:
                rejects.append(_rejected_item(kind, item, str(e)))
        return candidates, rejects

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


def _take_ready(
    first: _Ready | Exception | None, ready: asyncio.Queue[_Ready | Exception | None]
) -> tuple[list[_Ready], Exception | None, bool]:
    """The pages to commit together, ``first`` and those ready behind it (at most the
    queue's size: one fsync and one hand-over to the store's thread for them all), with
    the error that ended the cycle and whether it ended, when that came among them."""
    group: list[_Ready] = []
    item = first
    while True:
        if item is None or isinstance(item, Exception):
            return group, item, True
        group.append(item)
        if ready.empty():
            return group, None, False
        item = ready.get_nowait()


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
