"""The poller's paging rules (pure) and its cycles against the simulator over HTTP."""

from __future__ import annotations

import pytest

from tcbridge.poller import Position, next_position, page_cursor
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
