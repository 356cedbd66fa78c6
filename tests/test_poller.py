"""The poller's paging rules (pure) and its cycles against a scripted API, in process."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tcbridge import backfill as backfill_module
from tcbridge import poller as poller_module
from tcbridge import tradecloud
from tcbridge.cli import main as cli_main
from tcbridge.config import PollSettings, StoreSettings
from tcbridge.errors import ApiAuthError, ApiPermanentError, ApiTransientError, StoreError
from tcbridge.poller import (
    MAX_SHIFTS_PER_CYCLE,
    CycleStats,
    Poller,
    Position,
    Query,
    Step,
    ahead,
    item_stamp,
    lookback_start,
    next_position,
    next_step,
    page_cursor,
)
from tcbridge.store import Fence, Store
from tcbridge.timefmt import instant_us
from tcbridge.tradecloud import PollPage
from tests.fake_api import FakeApi, Version, stamp_of
from tests.support import write_config

T1, T2, T3 = "2024-05-01T00:00:01.000Z", "2024-05-01T00:00:02.000Z", "2024-05-01T00:00:03.000Z"
START = "2024-01-01T00:00:00.000Z"


def test_exclusive_full_page_restarts_after_the_last_complete_timestamp() -> None:
    position = next_position([T1, T2, T3, T3], START, 0, inclusive=False)
    assert position == Position(cursor=T2, offset=2, safe_cursor=T2)


def test_exclusive_page_of_one_timestamp_pages_by_offset_without_moving() -> None:
    first = next_position([T3] * 4, START, 0, inclusive=False)
    assert first == Position(cursor=START, offset=4, safe_cursor=None)
    second = next_position([T3] * 4, START, 4, inclusive=False)
    assert second == Position(cursor=START, offset=8, safe_cursor=None)


def test_inclusive_full_page_restarts_at_the_last_timestamp() -> None:
    assert next_position([T1, T2, T3, T3], START, 0, inclusive=True) == Position(T3, 2, T3)
    # still inside the same run of equal timestamps: the offset accumulates
    assert next_position([T3] * 4, T3, 2, inclusive=True) == Position(T3, 6, T3)


def test_unreadable_stamps_count_for_the_offset_only() -> None:
    assert next_position([None, None], START, 3, inclusive=False) == Position(START, 5, None)
    assert next_position([T1, None, T2, None], START, 0, inclusive=False) == Position(T1, 2, T1)


def test_offsets_compare_as_instants() -> None:
    same_as_t3 = "2024-05-01T02:00:03.000+02:00"
    assert next_position([T1, T3, same_as_t3], START, 0, inclusive=False) == Position(T1, 2, T1)


@pytest.mark.parametrize(
    ("page", "api", "expected"),
    [
        (PollPage(items=[{}], total=1, last_updated_at=T3), "poll", T3),
        (PollPage(items=[{}], total=1, last_updated_at=None), "poll", T2),
        (PollPage(items=[{}], total=1, last_updated_at="garbage"), "poll", T2),
        (PollPage(items=[{}], total=1, last_updated_at=T3), "search", T2),
        (PollPage(items=[], total=0, last_updated_at=None), "poll", None),
    ],
)
def test_cursor_after_the_last_page(page: PollPage, api: str, expected: str | None) -> None:
    stamps = [T1, T2] if page.items else []
    assert page_cursor(page, stamps, api=api) == expected


def _poller(**poll: Any) -> Poller:
    settings = PollSettings(**({"interval_s": 300, "min_interval_s": 30} | poll))
    store = Store(Path("/nonexistent/never-opened.db"), StoreSettings())
    return Poller(settings, None, store, asyncio.Event(), api="poll", hybrid=True)  # type: ignore[arg-type]


def test_interval_shortens_while_recovering_and_relaxes_back() -> None:
    poller = _poller(hybrid_interval_s=120)
    assert poller.base_interval_s == 120
    busy, quiet = CycleStats(recovered=1), CycleStats()
    assert [poller._next_delay([busy]) for _ in range(4)] == [60, 30, 30, 30]
    assert [poller._next_delay([quiet]) for _ in range(4)] == [60, 120, 120, 120]


def test_interval_shortens_while_more_than_a_page_changes() -> None:
    poller = _poller(page_size=100)
    assert poller._next_delay([CycleStats(total=250), CycleStats()]) == 150
    assert poller._next_delay([CycleStats(total=100)]) == 300


def test_failed_cycle_backs_off_within_the_interval() -> None:
    poller = _poller(error_backoff_max_s=8)
    poller._failures = 10
    assert all(4 <= poller._next_delay([None]) <= 8 for _ in range(20))


class OnePageClient:
    """A poll client answering one fixed page, recording the cursors it was asked for."""

    def __init__(self, page: PollPage) -> None:
        self.page = page
        self.cursors: list[str] = []

    async def poll(self, kind: str, cursor: str, *, offset: int, limit: int,
                   filters: Any = None) -> PollPage:
        self.cursors.append(cursor)
        return self.page if len(self.cursors) == 1 else PollPage([], 0, None)


async def test_first_sighting_changes_only_lines_after_the_query_cursor(
    store: Store,
) -> None:
    order = {"id": "o1", "lastUpdatedAt": T3, "lines": [
        {"id": "old", "lastUpdatedAt": T1}, {"id": "new", "lastUpdatedAt": T3}]}
    client = OnePageClient(PollPage([order], 1, T3, layout="single-delivery"))
    settings = PollSettings(start_from=T2, interval_s=300)
    poller = Poller(settings, client, store, asyncio.Event(), api="poll")
    stats = await poller.run_once("order")
    assert stats.stored == 1 and client.cursors == [T2]
    (row,) = await store.events()
    envelope = await store.run(lambda conn: conn.execute(
        "SELECT envelope FROM events").fetchone()[0])
    assert '"changedLineIds":["new"]' in envelope and '"layout":"single-delivery"' in envelope
    assert row["entityId"] == "o1"
def test_backoff_doubles_with_each_failure_up_to_two_to_the_sixteen() -> None:
    poller = _poller(error_backoff_max_s=300)
    poller._failures = 3
    assert all(4 <= poller._next_delay([None]) <= 8 for _ in range(50))
    huge = _poller(interval_s=1e6, error_backoff_max_s=1e6)
    huge._failures = 20
    assert all(2**15 <= huge._next_delay([None]) <= 2**16 for _ in range(50))


async def test_run_polls_every_kind_again_after_the_interval_until_stopped(
    store: Store,
) -> None:
    api = FakeApi("poll")
    api.change("a")
    stop = asyncio.Event()
    api.before_answer = lambda n: stop.set() if n == 3 else None
    poller = _scripted(store, api, kinds=["order", "shipment"], interval_s=0.01,
                       min_interval_s=0.01)
    await asyncio.wait_for(poller.run(stop), timeout=30)
    assert [r["kind"] for r in api.requests] == ["order", "shipment", "order", "shipment"]
    assert set(poller.last_success) == {"order", "shipment"}
    assert all(isinstance(t, float) for t in poller.last_success.values())


# -- Poller.run_once against a scripted API (tests/fake_api.py), in process --------------


def _scripted(store: Store, api: FakeApi, **poll: Any) -> Poller:
    settings = PollSettings(**({"kinds": ["order"], "page_size": 2, "lookback_s": 0,
                                "start_from": START} | poll))
    return Poller(settings, api, store, asyncio.Event(), api="search" if api.api == "search"
                  else "poll")


def stored_versions(store: Store) -> set[tuple[str, int]]:
    with sqlite3.connect(store.path) as conn:
        rows = conn.execute("SELECT entity_id, instant_us FROM events").fetchall()
    return {(entity, int(us)) for entity, us in rows}


def rejected_reasons(store: Store) -> list[str]:
    with sqlite3.connect(store.path) as conn:
        return [row[0] for row in conn.execute("SELECT reason FROM rejected ORDER BY id")]


def version_key(version: Version) -> tuple[str, int]:
    return version.entity_id, version.ms * 1000


async def test_update_of_the_newest_item_between_pages_is_stored_poll_api(store: Store) -> None:
    # Bug 1: page 1 is [a, b]; b is updated before page 2, which asks for b again and gets
    # b's new version first. Comparing ids only dropped it, and the top-level lastUpdatedAt
    # of that page moved the cursor past it.
    api = FakeApi("poll")
    api.change("a")
    api.advance(1)
    api.change("b")
    api.advance(1)
    updates: list[Version] = []
    api.before_answer = lambda n: updates.append(api.change("b")) if n == 1 else None
    stats = await _scripted(store, api).run_once("order")
    assert version_key(updates[0]) in stored_versions(store)
    assert await store.get_cursor("order") == updates[0].stamp
    assert stats.complete


async def test_update_of_the_overlap_item_before_a_full_page_is_stored_search_api(
    store: Store,
) -> None:
    # The search API's case: the page after the update is full, so the poller pages on
    # from the page's last stamp, past the updated item it took for the old one.
    api = FakeApi("search")
    api.change("a")
    api.advance(1)
    api.change("b")
    updates: list[Version] = []

    def update_then_add(n: int) -> None:
        if n == 1:
            api.advance(1)
            updates.append(api.change("b"))
            api.advance(1)
            api.change("c")
            api.advance(1)
            api.change("d")

    api.before_answer = update_then_add
    await _scripted(store, api).run_once("order")
    assert version_key(updates[0]) in stored_versions(store)
    assert {entity for entity, _ in stored_versions(store)} == {"a", "b", "c", "d"}


async def test_same_millisecond_change_shown_late_is_seen_within_the_lookback(
    store: Store,
) -> None:
    api = FakeApi("poll")
    api.change("a")
    late = api.change("b", same_ms=True, delay_s=1.0)
    poller = _scripted(store, api, lookback_s=120)
    await poller.run_once("order")
    assert version_key(late) not in stored_versions(store)  # not visible yet
    api.advance(2)
    await poller.run_once("order")
    assert version_key(late) in stored_versions(store)


async def test_without_lookback_a_same_millisecond_change_shown_late_is_missed(
    store: Store,
) -> None:
    # What lookback_s = 0 gives up (documented): the exclusive cursor is already on b's ms.
    api = FakeApi("poll")
    api.change("a")
    late = api.change("b", same_ms=True, delay_s=1.0)
    poller = _scripted(store, api, lookback_s=0)
    await poller.run_once("order")
    api.advance(2)
    await poller.run_once("order")
    assert version_key(late) not in stored_versions(store)


@pytest.mark.parametrize("kind", ["poll", "search"])
async def test_item_indexed_after_a_newer_one_is_seen_within_the_lookback(
    store: Store, kind: str
) -> None:
    api = FakeApi(kind)
    slow = api.change("a", delay_s=30)
    api.advance(1)
    fast = api.change("b")
    api.advance(1)
    poller = _scripted(store, api, lookback_s=120)
    await poller.run_once("order")
    assert stored_versions(store) == {version_key(fast)}
    cursor = await store.get_cursor("order")
    api.advance(40)
    first = len(api.requests)
    await poller.run_once("order")
    assert version_key(slow) in stored_versions(store)
    # The stored cursor is the exact string received and did not move back to a's stamp.
    assert await store.get_cursor("order") == cursor == fast.stamp
    assert api.requests[first]["cursor"] == stamp_of(fast.ms - 120_000)


async def test_lookback_query_starts_before_the_cursor_and_pages_still_commit_forwards(
    store: Store,
) -> None:
    api = FakeApi("poll")
    for entity in "abcdefg":
        api.change(entity)
        api.advance(1)
    poller = _scripted(store, api, lookback_s=4)
    await poller.run_once("order")
    newest = api.versions[-1]
    assert await store.get_cursor("order") == newest.stamp
    api.requests.clear()
    changed = api.change("a")
    await poller.run_once("order")
    assert api.requests[0]["cursor"] == stamp_of(newest.ms - 4000)
    assert version_key(changed) in stored_versions(store)
    assert await store.get_cursor("order") == changed.stamp
    assert len(stored_versions(store)) == 8


def test_lookback_start_rounds_down_to_the_millisecond_and_handles_the_edges() -> None:
    assert lookback_start("2024-05-01T00:02:00.000Z", 120) == "2024-05-01T00:00:00.000Z"
    assert lookback_start("2024-05-01T02:02:00.500+02:00", 0.0004) == "2024-05-01T00:02:00.499Z"
    assert lookback_start("2024-05-01T00:02:00.000Z", 0) == "2024-05-01T00:02:00.000Z"
    # off means the exact stored string, whatever its format
    assert lookback_start("2024-05-01T02:02:00.5+02:00", 0) == "2024-05-01T02:02:00.5+02:00"
    assert lookback_start("2024-05-01T00:00:00.9996Z", 0.0001) == "2024-05-01T00:00:00.999Z"
    assert lookback_start("0001-01-01T00:00:00.000Z", 120) == "0001-01-01T00:00:00.000Z"


def test_ahead_offers_only_later_cursors() -> None:
    assert ahead(T2, T1) == T2
    assert ahead(T1, T2) is None
    assert ahead(T2, "2024-05-01T02:00:02.000+02:00") is None
    assert ahead(None, T1) is None


async def test_a_failing_page_leaves_the_cursor_where_the_last_good_page_put_it(
    store: Store,
) -> None:
    api = FakeApi("poll")
    for entity in "abcde":
        api.change(entity)
        api.advance(1)
    api.failures[1] = ApiTransientError("HTTP 503", status=503)
    poller = _scripted(store, api)
    with pytest.raises(ApiTransientError):
        await poller.run_once("order")
    # page 1 = [a, b] made a's stamp safe; page 2 failed: nothing of it, no cursor beyond a
    assert await store.get_cursor("order") == api.versions[0].stamp
    assert {e for e, _ in stored_versions(store)} == {"a", "b"}
    api.failures.clear()
    await poller.run_once("order")
    assert {e for e, _ in stored_versions(store)} == set("abcde")


async def test_a_failing_first_page_moves_nothing(store: Store) -> None:
    api = FakeApi("poll")
    api.change("a")
    api.failures[0] = ApiPermanentError("answer is nested too deeply")
    with pytest.raises(ApiPermanentError):
        await _scripted(store, api).run_once("order")
    assert await store.get_cursor("order") is None
    assert stored_versions(store) == set()


async def test_failed_cycle_is_counted_and_backed_off_not_raised(store: Store) -> None:
    api = FakeApi("poll")
    api.change("a")
    api.failures[0] = ApiPermanentError("answer is nested too deeply")
    poller = _scripted(store, api)
    assert await poller._cycle("order", 0.0) is None
    assert poller._failures == 1
    assert await store.get_cursor("order") is None


async def test_a_stop_during_page_one_makes_one_request_only(store: Store) -> None:
    api = FakeApi("poll")
    for entity in "abcde":
        api.change(entity)
        api.advance(1)
    stop = asyncio.Event()
    api.before_answer = lambda n: stop.set()
    await asyncio.wait_for(_scripted(store, api).run(stop), timeout=10)
    assert len(api.requests) == 1
    assert {e for e, _ in stored_versions(store)} == {"a", "b"}  # page 1 is committed


@pytest.mark.parametrize(
    ("field", "value"),
    [("id", "o-\ud800"), ("note", "lone \udc00 surrogate"), ("note", 2**70)],
)
async def test_a_polled_item_that_cannot_be_stored_is_rejected_and_the_cursor_moves_on(
    store: Store, field: str, value: object
) -> None:
    api = FakeApi("poll")
    api.change("a")
    api.advance(1)
    bad = api.change("bad")
    bad.obj[field] = value
    api.advance(1)
    last = api.change("c")
    stats = await _scripted(store, api, page_size=10).run_once("order")
    assert {e for e, _ in stored_versions(store)} == {"a", "c"}
    assert stats.rejected == 1
    assert len(rejected_reasons(store)) == 1
    assert await store.get_cursor("order") == last.stamp


async def test_a_bad_item_on_a_full_page_fails_neither_the_page_nor_the_run(store: Store) -> None:
    api = FakeApi("poll")
    for entity in "abcdef":
        version = api.change(entity)
        if entity == "b":
            version.obj["note"] = "\ud800"
        api.advance(1)
    stats = await _scripted(store, api).run_once("order")
    assert {e for e, _ in stored_versions(store)} == set("acdef")
    assert stats.rejected == 1 and stats.complete
    assert await store.get_cursor("order") == api.versions[-1].stamp


async def test_entries_that_are_not_objects_count_towards_a_full_page(store: Store) -> None:
    # A run of one timestamp, a junk entry inside it: dropping the junk made page 1 look
    # not full, and the cursor moved past the rest of the run.
    api = FakeApi("poll")
    api.change("a")
    for entity in "bcd":
        api.change(entity, same_ms=True)
    api.extra = [(1, "junk")]
    stats = await _scripted(store, api).run_once("order")
    assert {e for e, _ in stored_versions(store)} == set("abcd")
    assert stats.rejected >= 1
    assert "order: order must be a JSON object" in rejected_reasons(store)


async def test_a_run_that_keeps_shifting_ends_the_cycle_as_incomplete(store: Store) -> None:
    api = FakeApi("poll")
    for entity in "abcdef":
        api.change(entity)
        api.advance(1)

    def update_the_first(n: int) -> None:
        if n:  # every later page: the oldest item moves to the end, the offsets shift
            api.advance(1)
            oldest = min(api.visible(), key=lambda v: v.ms)
            api.change(oldest.entity_id)

    api.before_answer = update_the_first
    stats = await _scripted(store, api).run_once("order")
    assert not stats.complete
    assert len(api.requests) < 4 * (MAX_SHIFTS_PER_CYCLE + 2)  # it gave up, it did not spin


def _shifting_api() -> FakeApi:
    """An API whose oldest item is updated before every page after the first."""
    api = FakeApi("poll")
    for entity in "abcdef":
        api.change(entity)
        api.advance(1)

    def update_the_first(n: int) -> None:
        if n:
            api.advance(1)
            api.change(min(api.visible(), key=lambda v: v.ms).entity_id)

    api.before_answer = update_the_first
    return api


def test_backfill_cut_short_says_incomplete_and_exits_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "tcbridge.toml", {
        "mode": "poll",
        "store": {"path": str(tmp_path / "tcbridge.db")},
        "tradecloud": {"username": "u@example.com", "password": "pw"},
        "poll": {"kinds": ["order"], "page_size": 2},
    })
    monkeypatch.setattr(backfill_module, "TradecloudClient", lambda *a, **k: _shifting_api())
    # the command configures logging onto this test's captured stderr, cached for good
    monkeypatch.setattr("tcbridge.cli.logs.configure", lambda *a, **k: None)
    assert cli_main(["backfill", "--config", str(config), "--since", START]) == 1
    captured = capsys.readouterr()
    assert "INCOMPLETE" in captured.out and "backfill incomplete for order" in captured.err
    monkeypatch.setattr(backfill_module, "TradecloudClient", lambda *a, **k: FakeApi("poll"))
    assert cli_main(["backfill", "--config", str(config), "--since", START]) == 0


async def test_items_nested_too_deeply_or_with_nan_are_rejected_and_kept(store: Store) -> None:
    deep: Any = []
    for _ in range(900):  # within Python's parser, beyond orjson's depth limit
        deep = [deep]
    api = FakeApi("poll")
    api.change("a")
    api.advance(1)
    api.change("deep").obj["x"] = deep
    api.advance(1)
    api.change("nan").obj["x"] = tradecloud._Unencodable("NaN")  # how the client reads NaN
    api.advance(1)
    last = api.change("c")
    stats = await _scripted(store, api, page_size=10).run_once("order")
    assert {e for e, _ in stored_versions(store)} == {"a", "c"}
    assert stats.rejected == 2 and len(rejected_reasons(store)) == 2
    assert await store.get_cursor("order") == last.stamp


def poll_state(store: Store) -> list[tuple[Any, ...]]:
    with sqlite3.connect(store.path) as conn:
        return conn.execute(
            "SELECT kind, last_error, last_items, last_stored, last_success_at IS NOT NULL"
            " FROM poll_state").fetchall()


def sample(poller: Poller, name: str, **labels: str) -> float | None:
    return poller._metrics.registry.get_sample_value(name, labels)


async def test_a_cycle_records_success_and_failure_and_counts_them(store: Store) -> None:
    api = FakeApi("poll")
    for entity in "abc":
        api.change(entity)
        api.advance(1)
    poller = _scripted(store, api)
    poller._failures = 3
    stats = await poller._cycle("order", 12.5)
    assert stats is not None and (stats.items, stats.stored, stats.pages) == (3, 3, 3)
    assert poller._failures == 0 and poller.last_success == {"order": 12.5}
    assert poll_state(store) == [("order", None, 3, 3, 1)]
    assert sample(poller, "tcbridge_poll_requests_total", kind="order") == 3
    assert sample(poller, "tcbridge_events_total", source="poll", kind="order") == 3
    api.failures[len(api.requests)] = ApiTransientError("HTTP 503 after 4 attempts",
                                                         status=503)
    assert await poller._cycle("order", 20.0) is None
    assert poller._failures == 1 and poller.last_success == {"order": 12.5}
    assert poll_state(store) == [("order", "HTTP 503 after 4 attempts", 3, 3, 1)]
    assert sample(poller, "tcbridge_poll_errors_total", kind="order") == 1
    assert await poller._cycle("order", 21.0) is not None  # nothing new: a success again
    assert poll_state(store) == [("order", None, 0, 0, 1)]


async def test_a_store_error_while_recording_is_logged_not_raised(store: Store) -> None:
    api = FakeApi("poll")
    poller = _scripted(store, api)

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise StoreError("disk full")

    store.record_poll = broken  # type: ignore[method-assign]
    assert await poller._cycle("order", 1.0) is not None


async def test_stats_count_duplicates_stale_and_rejected_and_set_the_lag_cursor(
    store: Store,
) -> None:
    api = FakeApi("poll")
    old = api.change("a")
    api.advance(1)
    api.change("b")
    poller = _scripted(store, api, page_size=10, lookback_s=120)
    await poller.run_once("order")
    api.versions.append(Version("a", old.ms - 1, api.now_s, {**old.obj, "lastUpdatedAt":
                                                            stamp_of(old.ms - 1)}))
    api.versions.remove(old)  # an older version of a shows now: stale
    api.extra = [(0, 7)]
    stats = await poller.run_once("order")
    assert (stats.items, stats.stored, stats.duplicates, stats.stale, stats.rejected) == (
        3, 0, 1, 1, 1)
    assert stats.cursor == api.versions[0].stamp
    assert poller._metrics._lag.cursors_us == {"order": api.versions[0].ms * 1000}
    assert sample(poller, "tcbridge_rejected_total", source="poll") == 1
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT body FROM rejected").fetchall() == [(b"7",)]


async def test_a_backfill_poller_keeps_its_own_cursor_and_leaves_the_lag_gauge(
    store: Store,
) -> None:
    api = FakeApi("poll")
    api.change("a")
    settings = PollSettings(kinds=["order"], page_size=2, lookback_s=0, start_from=START)
    seen: list[tuple[str, int, int | None]] = []
    poller = Poller(settings, api, store, asyncio.Event(), api="poll", cursor_prefix="backfill:",
                    progress=lambda kind, stats, total: seen.append((kind, stats.items, total)))
    await poller.run_once("order")
    assert await store.get_cursor("backfill:order") == api.versions[0].stamp
    assert await store.get_cursor("order") is None
    assert poller._metrics._lag.cursors_us == {}
    assert seen == [("order", 1, 1)]


async def test_hybrid_poller_marks_what_it_finds_first_after_a_completed_cycle(
    store: Store,
) -> None:
    api = FakeApi("poll")
    api.change("a")
    settings = PollSettings(kinds=["order"], page_size=2, lookback_s=0, start_from=START)
    poller = Poller(settings, api, store, asyncio.Event(), api="poll", hybrid=True)
    first = await poller._cycle("order", 0.0)
    assert first is not None and first.recovered == 0  # catching up on history
    api.advance(1)
    api.change("b")
    api.change("c")
    second = await poller._cycle("order", 1.0)
    assert second is not None and second.recovered == 2
    assert sample(poller, "tcbridge_recovered_events_total", kind="order") == 2


async def test_overlap_of_shipments_uses_meta_last_updated_at(store: Store) -> None:
    # Shipments carry their stamp in meta: an updated shipment asked for again must be
    # told apart by it too.
    first = {"id": "s1", "meta": {"lastUpdatedAt": T1}}
    assert poller_module._identity(first) == ("s1", instant_us(T1))
    assert poller_module._identity({"id": "s1", "meta": {"lastUpdatedAt": T2}}) != (
        poller_module._identity(first))
    assert poller_module._identity({"id": "o1", "lastUpdatedAt": T1,
                                    "meta": {"lastUpdatedAt": T2}}) == ("o1", instant_us(T1))
    assert poller_module._identity({"id": "o1", "lastUpdatedAt": "bad"}) == ("o1", "bad")
    assert poller_module._identity({"id": "o1", "meta": "x"}) == ("o1", None)
    assert poller_module._identity(7) == (None, 7)


async def test_pages_of_one_item_also_ask_for_the_last_item_again(store: Store) -> None:
    # page_size = 1 had no overlap check (the page would hold only the item asked again):
    # an update between pages shifted the run and the next item was skipped. The overlap
    # request now asks for two.
    api = FakeApi("poll")
    for entity in "abc":
        api.change(entity)
        api.advance(1)
    updates: list[Version] = []
    api.before_answer = lambda n: updates.append(api.change("a")) if n == 1 else None
    stats = await _scripted(store, api, page_size=1).run_once("order")
    assert stats.complete
    assert {e for e, _ in stored_versions(store)} == {"a", "b", "c"}
    assert version_key(updates[0]) in stored_versions(store)
    assert [r["limit"] for r in api.requests[:2]] == [1, 2]
    assert await store.get_cursor("order") == updates[0].stamp


def test_inclusive_restart_keeps_the_offset_only_inside_the_same_timestamp() -> None:
    assert next_position([T1, T2, T3, T3], START, 5, inclusive=True) == Position(T3, 2, T3)


async def test_details_of_a_cycle_source_filters_metrics_and_rejected_rows(
    store: Store,
) -> None:
    api = FakeApi("poll")
    api.change("a")
    api.advance(1)
    api.change("nan").obj["x"] = tradecloud._Unencodable("NaN")
    api.advance(1)
    api.change("both").obj["x"] = [tradecloud._Unencodable("NaN"), "\ud800"]
    api.advance(1)
    last = api.change("c")
    poller = _scripted(store, api, page_size=10, order_filters={"status": {"x": ["A"]}},
                       shipment_filters={"buyerShipment": {"companyId": "b"}})
    stats = await poller.run_once("order")
    await poller.run_once("shipment")
    assert [r["filters"] for r in api.requests] == [
        {"status": {"x": ["A"]}}, {"buyerShipment": {"companyId": "b"}}]
    assert stats.cursor == last.stamp and not poller._hybrid
    assert sample(poller, "tcbridge_poll_request_seconds_count", kind="order") == 1
    assert sample(poller, "tcbridge_poll_requests_total", kind="shipment") == 1
    with sqlite3.connect(store.path) as conn:
        assert {row[0] for row in conn.execute("SELECT source FROM events")} == {"poll"}
        ((source, body), (_, both)) = conn.execute(
            "SELECT source, body FROM rejected ORDER BY id").fetchall()[:2]
    assert source == "poll"
    assert b"'id': 'nan'" in body and b"NaN" in body  # kept as repr: json.dumps refuses it
    assert b"NaN, '\\ud800'" in both  # a lone surrogate in that repr is escaped


async def test_consecutive_failures_count_up(store: Store) -> None:
    api = FakeApi("poll")
    api.failures = {0: ApiTransientError("HTTP 503"), 1: ApiTransientError("HTTP 503")}
    poller = _scripted(store, api)
    await poller._cycle("order", 0.0)
    await poller._cycle("order", 1.0)
    assert poller._failures == 2


class LogRecorder:
    """Stands in for the poller's logger: records event names."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **fields: self.events.append(event)


async def test_a_run_is_re_read_five_times_and_the_sixth_shift_ends_the_cycle(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = LogRecorder()
    monkeypatch.setattr(poller_module, "log", recorder)
    stats = await _scripted(store, _shifting_api()).run_once("order")
    assert stats.complete is False
    assert recorder.events.count("poll.run_shifted") == MAX_SHIFTS_PER_CYCLE + 1
    assert recorder.events.count("poll.cycle_cut_short") == 1


# -- the poller gate: replicas on one PostgreSQL store poll a kind only while they hold it


class ScriptedGate:
    """A gate a test opens and closes by hand."""

    def __init__(self, active: bool, epoch: int = 7) -> None:
        self.changed = asyncio.Event()
        self.is_active = active
        self.epoch = epoch

    def active(self, kind: str) -> bool:
        return self.is_active and kind in ("order", "shipment")  # asked per kind

    def fence(self, kind: str) -> Fence | None:
        return Fence(kind, self.epoch) if self.active(kind) else None

    def set(self, active: bool) -> None:
        self.is_active = active
        self.changed.set()


async def test_a_standby_polls_nothing_and_polls_at_once_when_it_takes_over(
    store: Store,
) -> None:
    api = FakeApi("poll")
    api.change("a")
    gate = ScriptedGate(active=False)
    stop = asyncio.Event()
    settings = PollSettings(kinds=["order"], page_size=2, lookback_s=0, start_from=START,
                            interval_s=3600, min_interval_s=3600)
    poller = Poller(settings, api, store, asyncio.Event(), api="poll", gate=gate)
    task = asyncio.create_task(poller.run(stop))
    await asyncio.sleep(0.2)
    assert api.requests == []  # standby: not a single request
    gate.set(True)  # taken over: polled now, not after the hour-long interval
    for _ in range(100):
        if api.requests:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    assert len(api.requests) == 1
    assert stored_versions(store) == {("a", instant_us(api.versions[0].obj["lastUpdatedAt"]))}


async def test_the_page_commit_carries_the_gates_fence(store: Store) -> None:
    api = FakeApi("poll")
    api.change("a")
    gate = ScriptedGate(active=True, epoch=42)
    seen: list[Any] = []
    original = store.ingest_page

    async def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("fence"))
        return await original(*args, **kwargs)

    store.ingest_page = spy  # type: ignore[method-assign]
    poller = Poller(PollSettings(kinds=["order"], page_size=2, lookback_s=0, start_from=START),
                    api, store, asyncio.Event(), api="poll", gate=gate)
    await poller.run_once("order")
    assert seen == [Fence("order", 42)]


def _gated(store: Store) -> tuple[FakeApi, ScriptedGate, Poller]:
    """Five orders, pages of two, and a poller behind an open scripted gate."""
    api = FakeApi("poll")
    for name in "abcde":
        api.change(name)
    gate = ScriptedGate(active=True)
    poller = Poller(PollSettings(kinds=["order"], page_size=2, lookback_s=0, start_from=START),
                    api, store, asyncio.Event(), api="poll", gate=gate)
    return api, gate, poller


async def test_an_open_gate_lets_the_cycle_run_every_page(store: Store) -> None:
    api, _, poller = _gated(store)
    stats = await poller._cycle("order", 1.0)
    assert stats is not None and (stats.pages, stats.stored) == (5, 5)  # overlap: 1 new a page
    newest = max(api.versions, key=lambda v: v.ms)
    assert await store.get_cursor("order") == newest.obj["lastUpdatedAt"]


async def test_a_lost_lock_stops_the_cycle_before_the_next_page_is_committed(
    store: Store,
) -> None:
    api, gate, poller = _gated(store)
    original = store.ingest_page

    async def lose_after_first(*args: Any, **kwargs: Any) -> Any:
        results = await original(*args, **kwargs)
        gate.set(False)  # the lock is lost once the first page has committed
        return results

    store.ingest_page = lose_after_first  # type: ignore[method-assign]
    stats = await poller._cycle("order", 1.0)
    assert stats is not None and stats.stored == 2  # the cycle ends after that page
    assert poller._failures == 0  # ... and no failure: someone else polls now
    assert len(stored_versions(store)) == 2  # the first page only
    # The first page's safe cursor (its last complete timestamp), not the second page's.
    first = sorted(api.versions, key=lambda v: v.ms)[0]
    assert await store.get_cursor("order") == first.obj["lastUpdatedAt"]


async def test_a_lock_lost_before_a_fetched_page_commits_refuses_that_page(
    store: Store,
) -> None:
    api, gate, poller = _gated(store)
    # The lock is lost while the first page is being fetched: its commit must not happen.
    api.before_answer = lambda n: gate.set(False) if n == 0 else None
    assert await poller._cycle("order", 1.0) is None  # fenced: no stats ...
    assert poller._failures == 0  # ... and no failure either: someone else polls now
    assert stored_versions(store) == set()
    assert await store.get_cursor("order") is None


# -- the pipeline: page N+1 is fetched while page N commits, one request in flight -----------


class Commits:
    """Wraps a store's ingest_page: records each commit's cursor and how many requests had
    been sent when it began; fails the ``fail_at``-th commit, or waits on ``hold`` in it."""

    def __init__(self, store: Store, api: FakeApi, monkeypatch: pytest.MonkeyPatch,
                 fail_at: int | None = None) -> None:
        self.cursors: list[str | None] = []
        self.sent_at_start: list[int] = []
        self.entities: list[list[str]] = []  # each commit's candidates, in order
        self.hold: asyncio.Event | None = None
        self.on_commit: Callable[[int], None] | None = None
        self.open = self.peak_open = 0  # commits under way at once
        real = store.ingest_page

        async def ingest_page(kind: str, candidates: Any, rejects: Any, cursor: str | None,
                              **kw: Any) -> Any:
            number = len(self.sent_at_start)
            self.sent_at_start.append(len(api.requests))
            self.entities.append([c.entity_id for c in candidates])
            if self.on_commit is not None:
                self.on_commit(number)
            self.open += 1
            self.peak_open = max(self.peak_open, self.open)
            try:
                if self.hold is not None:
                    await self.hold.wait()
                if number == fail_at:
                    raise StoreError("disk I/O error")
                results = await real(kind, candidates, rejects, cursor, **kw)
            finally:
                self.open -= 1
            self.cursors.append(cursor)
            return results

        monkeypatch.setattr(store, "ingest_page", ingest_page)


def _orders(entities: str, **api: Any) -> FakeApi:
    fake = FakeApi("poll", **api)
    for entity in entities:
        fake.change(entity)
        fake.advance(1)
    return fake


async def test_pages_commit_in_order_while_the_next_page_is_being_fetched(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = _orders("abcdefghi", answer_yields=3)
    commits = Commits(store, api, monkeypatch)
    stats = await _scripted(store, api, page_size=3).run_once("order")
    assert {e for e, _ in stored_versions(store)} == set("abcdefghi")
    assert await store.get_cursor("order") == api.versions[-1].stamp
    moved = [instant_us(c) for c in commits.cursors if c is not None]
    assert moved == sorted(set(moved)) and len(moved) == len(commits.cursors)
    # The pages' items in order, each once (a commit holds one page or several).
    assert [e for entities in commits.entities for e in entities] == list("abcdefghi")
    assert stats.pages == 5
    # Each commit but the last began with the next page's request already sent.
    assert all(sent >= number + 2 for number, sent in enumerate(commits.sent_at_start[:-1]))
    assert api.peak_in_flight == 1 and api.in_flight == 0
    assert commits.peak_open == 1  # one commit at a time: none passes one that may fail


async def test_a_failed_commit_stops_the_pipeline_and_keeps_the_cursor_of_the_page_before(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = _orders("abcdefghi", answer_yields=3)
    commits = Commits(store, api, monkeypatch, fail_at=2)
    poller = _scripted(store, api, page_size=3)
    with pytest.raises(StoreError):
        await poller.run_once("order")
    # Pages fetched ahead (at most AHEAD_PAGES, and one on its way) were dropped: nothing
    # more was handed to the store, and no request is left in flight.
    assert 4 <= len(api.requests) <= 3 + poller_module.AHEAD_PAGES + 1
    assert api.in_flight == 0 and len(commits.sent_at_start) == 3
    assert await store.get_cursor("order") == commits.cursors[1]
    # What the first two commits held and nothing of the failed one (all of it or none).
    kept = set(commits.entities[0] + commits.entities[1])
    assert {e for e, _ in stored_versions(store)} == kept
    assert kept.isdisjoint(commits.entities[2]) and commits.entities[2]
    monkeypatch.undo()
    await poller.run_once("order")
    assert {e for e, _ in stored_versions(store)} == set("abcdefghi")


async def test_a_page_that_cannot_be_normalised_fails_the_cycle_after_the_pages_before_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = _orders("abcdefghi", answer_yields=3)
    commits = Commits(store, api, monkeypatch)
    poller = _scripted(store, api, page_size=3)
    real = poller._normalise

    def normalise(kind: Any, page: PollPage, since: str) -> Any:
        if any(item["id"] == "e" for item in page.items):  # a bug, not a bad item
            raise RuntimeError("normaliser bug")
        return real(kind, page, since)

    monkeypatch.setattr(poller, "_normalise", normalise)
    with pytest.raises(RuntimeError, match="normaliser bug"):
        await poller.run_once("order")
    assert {e for e, _ in stored_versions(store)} == set("abc")  # page 1; page 2 holds "e"
    assert await store.get_cursor("order") == commits.cursors[-1] == api.versions[1].stamp
    assert api.in_flight == 0


@pytest.mark.backends()
async def test_a_group_commit_counts_each_pages_own_results(store: Store) -> None:
    poller = _scripted(store, FakeApi("poll"), page_size=3)

    def step(*items: tuple[str, str]) -> Step:
        page = PollPage([{"id": i, "lastUpdatedAt": t} for i, t in items], 9, None)
        return Step(page, items[-1][1], None, START)

    # One transaction for three pages: a, a again (a duplicate), then b, then c.
    group = [await poller._normalise_page("order", s)
             for s in (step(("a", T1), ("a", T1)), step(("b", T2)), step(("c", T3)))]
    stats = CycleStats()
    await poller._commit("order", stats, group, False)
    assert (stats.pages, stats.items, stats.stored, stats.duplicates) == (3, 4, 3, 1)
    assert await store.get_cursor("order") == T3  # the last page's cursor


async def test_a_failed_fetch_of_the_next_page_keeps_the_cursor_of_the_page_committing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = _orders("abcdefghi", answer_yields=3)
    api.failures[2] = ApiTransientError("HTTP 503", status=503)
    commits = Commits(store, api, monkeypatch)
    with pytest.raises(ApiTransientError):
        await _scripted(store, api, page_size=3).run_once("order")
    # Page 3 failed while page 2 committed: page 2 and its cursor stay.
    assert commits.sent_at_start == [2, 3]
    assert await store.get_cursor("order") == commits.cursors[1] == api.versions[3].stamp
    assert {e for e, _ in stored_versions(store)} == set("abcde")


async def test_a_stop_while_the_next_page_is_fetched_ends_after_the_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = _orders("abcdefghi", answer_yields=50)
    stop = asyncio.Event()
    commits = Commits(store, api, monkeypatch)
    commits.on_commit = lambda n: stop.set()  # while page 2 is on its way
    await asyncio.wait_for(_scripted(store, api, page_size=3).run(stop), timeout=10)
    assert len(api.requests) == 2 and api.in_flight == 0  # page 2 was asked, then dropped
    assert await store.get_cursor("order") == commits.cursors[-1] == api.versions[1].stamp
    assert {e for e, _ in stored_versions(store)} == set("abc")


async def test_the_fetches_run_ahead_of_a_slow_commit_by_at_most_ahead_pages(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeApi("poll", answer_yields=2)
    for i in range(40):
        api.change(f"o{i:02}")
        api.advance(1)
    commits = Commits(store, api, monkeypatch)
    commits.hold = asyncio.Event()  # page 1's commit waits
    cycle = asyncio.create_task(_scripted(store, api, page_size=3).run_once("order"))
    while not commits.sent_at_start:
        await asyncio.sleep(0.001)
    for _ in range(500):  # the fetches need no thread: yielding lets them run
        await asyncio.sleep(0)
    # Page 1 committing, AHEAD_PAGES waiting their turn, one more fetched and held back.
    assert len(api.requests) == poller_module.AHEAD_PAGES + 2 and api.in_flight == 0
    assert len(commits.sent_at_start) == 1
    commits.hold.set()
    stats = await asyncio.wait_for(cycle, timeout=10)
    assert len(stored_versions(store)) == 40 and stats.complete
    assert await store.get_cursor("order") == api.versions[-1].stamp
    # The pages that were ready when page 1's commit ended went into the next one together
    # (a page holds at most 3 items), and every item once, in order.
    assert len(commits.entities[1]) > 3
    assert len(commits.entities) < stats.pages
    assert [e for entities in commits.entities for e in entities] == [
        f"o{i:02}" for i in range(40)]


async def test_a_cancelled_cycle_leaves_no_request_in_flight(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = _orders("abcdefghi", answer_yields=1000)
    commits = Commits(store, api, monkeypatch)
    commits.hold = asyncio.Event()  # the first commit never ends
    cycle = asyncio.create_task(_scripted(store, api, page_size=3).run_once("order"))
    while api.in_flight == 0 or not commits.sent_at_start:
        await asyncio.sleep(0)
    cycle.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cycle
    assert len(api.requests) == 2 and api.in_flight == 0
    assert await store.get_cursor("order") is None


def test_next_step_knows_the_next_query_from_the_raw_page() -> None:
    items = [{"id": "a", "lastUpdatedAt": T1}, {"id": "b", "lastUpdatedAt": T2},
             {"id": "bad", "lastUpdatedAt": T3, "note": "\ud800"}]
    step = next_step(PollPage(items, 9, T3), Query(START, 0, None), page_size=3,
                     inclusive=False, api="poll", committed=START)
    assert step is not None and step.commit == T2 and step.page.items == items
    # The rejected item's readable stamp counts: the API sorted it there.
    assert step.next == Query(T2, 1, poller_module._Overlap(("bad", instant_us(T3))))
    assert step.since == START  # the page's first sightings are new since its own query
    again = next_step(PollPage([{"id": "other", "lastUpdatedAt": T3}], 1, T3), step.next,
                      page_size=3, inclusive=False, api="poll", committed=T2)
    assert again is None  # the item asked for again did not come back first: shifted
    last = next_step(PollPage([items[2], {"id": "c", "lastUpdatedAt": T3}], 2, T3), step.next,
                     page_size=3, inclusive=False, api="poll", committed=T2)
    assert last == Step(PollPage([{"id": "c", "lastUpdatedAt": T3}], 2, T3), T3, None, T2)


@pytest.mark.parametrize(
    ("item", "expected"),
    [({"lastUpdatedAt": T1}, T1), ({"meta": {"lastUpdatedAt": T2}, "lastUpdatedAt": T1}, T2),
     ({"meta": {}, "lastUpdatedAt": T1}, T1), ({"lastUpdatedAt": "garbage"}, None),
     ({"lastUpdatedAt": 17}, None), ({}, None), ("junk", None)],
)
def test_item_stamp_reads_what_envelope_reads(item: object, expected: str | None) -> None:
    assert item_stamp(item) == expected


async def test_a_page_longer_than_a_normalising_slice_is_stored_whole_and_once(
    store: Store,
) -> None:
    """Normalising goes in slices of NORMALISE_SLICE items (yielding between them): every
    slice's candidates and rejects reach the page's one commit, each exactly once."""
    from tcbridge.poller import NORMALISE_SLICE

    api = FakeApi("poll")
    count = 2 * NORMALISE_SLICE + 5
    for i in range(count):
        api.change(f"o{i:03d}")
    api.extra = [(0, 17)]  # one bad entry, in the first slice
    poller = Poller(PollSettings(kinds=["order"], page_size=count + 10, lookback_s=0,
                                 start_from=START), api, store, asyncio.Event(), api="poll")
    stats = await poller.run_once("order")
    assert (stats.stored, stats.duplicates, stats.rejected) == (count, 0, 1)
    assert len(stored_versions(store)) == count


async def test_refused_credentials_are_a_counted_failure_said_at_once_and_cleared_by_success(
    store: Store,
) -> None:
    api = FakeApi("poll")
    api.change("a")
    poller = _scripted(store, api)
    poller._failures = 2
    api.failures = {0: ApiAuthError("HTTP 401 after a fresh login")}
    assert await poller._cycle("order", 1.0) is None
    assert poller._failures == 3  # backs off like any failure
    assert poller.auth_refused == "HTTP 401 after a fresh login"  # readiness says why
    assert poll_state(store) == [("order", "HTTP 401 after a fresh login", None, None, 0)]
    assert sample(poller, "tcbridge_poll_errors_total", kind="order") == 1
    assert await poller._cycle("order", 2.0) is not None
    assert (poller._failures, poller.auth_refused) == (0, None)
