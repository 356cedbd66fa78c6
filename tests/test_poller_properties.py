"""A property of the paging loop against the scripted API (tests/fake_api.py), in process.

Hypothesis interleaves updates (some in the millisecond of the previous change, some shown
late by the index, some made between two pages of a cycle) with poll cycles, and checks:
every version that the index showed throughout a completed cycle whose query started
before the version's stamp (the stored cursor minus the look-back) is stored; so, with
cycles at least every look-back, every version shown for longer than the look-back plus
the index delay is stored. The stored cursor is always a stamp the API answered, exactly,
and never moves backwards.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tcbridge.config import PollSettings, StoreSettings
from tcbridge.poller import Poller
from tcbridge.store import Store
from tcbridge.timefmt import instant_us
from tests.fake_api import FakeApi, Version
from tests.test_poller import stored_versions

LOOKBACK_S = 5.0
START = "2024-01-01T00:00:00.000Z"
ENTITIES = [f"o{i}" for i in range(4)]

change = st.tuples(st.just("change"), st.sampled_from(ENTITIES), st.booleans(),
                   st.sampled_from([0.0, 0.0, 0.4, 3.0]))
advance = st.tuples(st.just("advance"), st.sampled_from([0.001, 0.3, 1.0, 2.5, 8.0]))
# Between pages, "newest" updates the newest item shown: the one asked for again, often.
mid_change = st.tuples(st.just("change"), st.sampled_from([*ENTITIES, "newest", "newest"]),
                       st.booleans(), st.sampled_from([0.0, 0.0, 0.4]))
cycle = st.tuples(st.just("cycle"), st.lists(mid_change, max_size=3))
steps = st.lists(st.one_of(change, change, advance, cycle), min_size=1, max_size=30)


@dataclass
class Seen:
    """What the index showed at the start and the end of one cycle."""

    query_from_us: int  # the stored cursor minus the look-back, at the cycle's start
    shown: set[int]  # ids of Version objects shown throughout
    complete: bool


def shown_now(api: FakeApi) -> set[int]:
    return {id(v) for v in api.visible()}


def apply_change(api: FakeApi, step: tuple[Any, ...]) -> Version:
    _, entity, same_ms, delay_s = step
    if entity == "newest":
        shown = api.visible()
        entity = max(shown, key=lambda v: (v.ms, v.entity_id)).entity_id if shown else "o0"
    return api.change(entity, same_ms=same_ms, delay_s=delay_s)


def between_pages(api: FakeApi, first: int, mid: list[tuple[Any, ...]],
                  made: list[Version]) -> None:
    """Make the cycle's scripted changes before its second, third... page."""
    def hook(n: int) -> None:
        if n > first and mid:
            step = mid.pop(0)
            version = apply_change(api, step)
            if not step[2] and not step[3]:  # a new millisecond, shown at once
                made.append(version)

    api.before_answer = hook


async def scenario(path: Path, script: list[tuple[Any, ...]], kind: str, page_size: int,
                   lookback_s: float) -> None:
    api = FakeApi(kind, answer_yields=2)  # answers while the previous page commits
    settings_ = PollSettings(kinds=["order"], page_size=page_size, lookback_s=lookback_s,
                             start_from=START)
    cycles: list[Seen] = []
    cursors: list[str] = []
    must: list[Version] = []
    async with Store(path, StoreSettings()) as store:
        poller = Poller(settings_, api, store, asyncio.Event(),
                        api="search" if kind == "search" else "poll")
        for step in [*script, ("cycle", [])]:
            if step[0] == "change":
                apply_change(api, step)
            elif step[0] == "advance":
                api.advance(step[1])
            else:
                made: list[Version] = []
                between_pages(api, len(api.requests), list(step[1]), made)
                before = shown_now(api)
                committed = await store.get_cursor("order")
                query_from_us = (instant_us(committed) - int(lookback_s * 1e6)
                                 if committed else instant_us(START))
                stats = await poller.run_once("order")
                api.before_answer = None
                cycles.append(Seen(query_from_us, before & shown_now(api), stats.complete))
                cursor = await store.get_cursor("order")
                if cursor is not None:
                    cursors.append(cursor)
                    # An update between two pages that the cursor has reached was seen:
                    # its millisecond is its own, so only its own page can carry that stamp.
                    # (Unless a later update replaced it before any page could show it.)
                    if stats.complete:
                        shown = shown_now(api)
                        must.extend(v for v in made
                                    if v.ms * 1000 <= instant_us(cursor) and id(v) in shown)
        stored = stored_versions(store)
    assert api.peak_in_flight <= 1, "two requests in flight at once"
    answered = {v.stamp for v in api.versions}
    assert all(c in answered for c in cursors), "a cursor that is no stamp the API answered"
    assert [instant_us(c) for c in cursors] == sorted(instant_us(c) for c in cursors)
    inclusive = kind == "search"
    for version in api.versions:
        if must_be_stored(version, cycles, inclusive=inclusive):
            assert (version.entity_id, version.ms * 1000) in stored, version
    for version in must:
        assert (version.entity_id, version.ms * 1000) in stored, ("between pages", version)


def must_be_stored(version: Version, cycles: list[Seen], *, inclusive: bool) -> bool:
    us = version.ms * 1000
    return any(c.complete and id(version) in c.shown
               and (us >= c.query_from_us if inclusive else us > c.query_from_us)
               for c in cycles)


# Known losses, always tried: the newest item updated between two pages (issue 9 bug 1),
# and a same-millisecond change shown late (bug 2).
NEWEST_UPDATED = [("change", "o0", False, 0.0), ("advance", 1.0), ("change", "o1", False, 0.0),
                  ("advance", 1.0), ("cycle", [("change", "newest", False, 0.0)])]
SAME_MS_LATE = [("change", "o0", False, 0.0), ("change", "o1", True, 0.4), ("cycle", []),
                ("advance", 1.0)]


# Under mutation testing (mutmut sets MUTANT_UNDER_TEST) fewer random examples: the
# explicit ones always run.
EXAMPLES = 15 if os.environ.get("MUTANT_UNDER_TEST") else 60


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(script=NEWEST_UPDATED, kind="poll", page_size=2, lookback_s=0.0)
@example(script=[*NEWEST_UPDATED[:4], ("change", "o2", False, 0.0), ("advance", 1.0),
                 ("cycle", [("change", "o1", False, 0.0), ("change", "o3", False, 0.0),
                            ("change", "o2", False, 0.0)])],
         kind="search", page_size=2, lookback_s=0.0)
@example(script=SAME_MS_LATE, kind="poll", page_size=3, lookback_s=LOOKBACK_S)
@given(script=steps, kind=st.sampled_from(["poll", "search"]), page_size=st.integers(1, 3),
       lookback_s=st.sampled_from([0.0, LOOKBACK_S]))
def test_every_version_shown_within_the_lookback_is_stored(
    script: list[tuple[Any, ...]], kind: str, page_size: int, lookback_s: float
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp) / "tcbridge.db", script, kind, page_size, lookback_s))
