"""The poller's paging rules (pure) and its cycles against the simulator over HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tcbridge.config import PollSettings, StoreSettings
from tcbridge.poller import CycleStats, Poller, Position, next_position, page_cursor
from tcbridge.store import Store
from tcbridge.tradecloud import PollPage

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
    busy, quiet = CycleStats(recovered=2), CycleStats()
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
