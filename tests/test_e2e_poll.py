"""End to end: the real daemon polling and fetching from the simulator over HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tcbridge.timefmt import instant_us
from tests.conftest import Daemon, tradecloud_config, until

TOKEN = {"Authorization": "Bearer hook-token-1-for-tests-0123456789ab"}
START = "2020-01-01T00:00:00.000Z"


pytestmark = pytest.mark.backends()


def query(daemon: Daemon, sql: str) -> list[tuple[Any, ...]]:
    return daemon.rows(sql)


def poll_config(url: str, mode: str = "poll", **poll: Any) -> dict[str, Any]:
    return {
        "mode": mode,
        "tradecloud": tradecloud_config(url),
        "poll": {"kinds": ["order"], "interval_s": 0.3, "start_from": START} | poll,
    }


def cursor(daemon: Daemon, kind: str = "order") -> str | None:
    rows = query(daemon, f"SELECT value FROM cursors WHERE kind = '{kind}'")
    return rows[0][0] if rows else None


def order_polls(sim: Any) -> list[dict[str, Any]]:
    return [r for r in sim.requests if r["path"] == "/v2/order-search/poll"]


async def test_250_orders_in_3_pages_all_stored_cursor_latest(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    sim, url = await simulator_factory()
    orders = sim.add_orders(250)
    daemon = daemon_factory(poll_config(url))
    await daemon.start()
    await daemon.wait_for_log("poll.done", kind="order", stored=250)
    assert await daemon.stop() == 0
    stored = {row[0] for row in query(daemon, "SELECT entity_id FROM events")}
    assert stored == {o["id"] for o in orders}
    assert cursor(daemon) == orders[-1]["lastUpdatedAt"]
    first_cycle = order_polls(sim)[:3]
    assert [len(r["body"]["filters"]) for r in first_cycle] == [1, 1, 1]
    assert first_cycle[0]["body"]["filters"]["lastUpdatedAfter"] == START
    assert all(r["body"]["limit"] == 100 for r in first_cycle)
    assert query(daemon, "SELECT DISTINCT source FROM events") == [("poll",)]


async def test_more_than_a_page_on_one_timestamp_all_stored(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    sim, url = await simulator_factory()
    before = sim.add_orders(3)
    burst = sim.add_orders(150, same_timestamp=True)
    after = sim.add_orders(2)
    daemon = daemon_factory(poll_config(url))
    await daemon.start()
    await daemon.wait_for_log("poll.done", kind="order", stored=155)
    await daemon.wait_for_log("poll.done", kind="order", count=3)  # and it keeps polling
    assert await daemon.stop() == 0
    assert query(daemon, "SELECT count(*) FROM events") == [(155,)]
    assert len({o["lastUpdatedAt"] for o in burst}) == 1
    assert cursor(daemon) == after[-1]["lastUpdatedAt"]
    assert before[0]["id"] in {r[0] for r in query(daemon, "SELECT entity_id FROM events")}


async def test_same_version_is_a_duplicate_newer_is_an_event(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    sim, url = await simulator_factory()
    (order,) = sim.add_orders(1)
    webhook_body = sim.changes()[-1].webhook_body
    daemon = daemon_factory(poll_config(url, mode="hybrid"))
    await daemon.start()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/webhook/order", json=webhook_body,
                                headers=TOKEN) as response:
            assert (await response.json())["status"] in ("stored", "duplicate")
    seen = await daemon.wait_for_log("poll.done", kind="order", items=1)
    stored_before = sum(1 for line in seen if line["stored"] == 1)
    updated = sim.update_order(order["id"])
    await daemon.wait_for_log("poll.done", kind="order", stored=1, items=1,
                              count=stored_before + 1)
    assert await daemon.stop() == 0
    events = query(daemon, "SELECT last_updated_at FROM events ORDER BY seq")
    assert [e[0] for e in events] == [order["lastUpdatedAt"], updated["lastUpdatedAt"]]
    (duplicates,) = query(daemon, "SELECT count(*) FROM sightings WHERE reason = 'duplicate'")
    assert duplicates == (1,)


# The search API takes filters.lastUpdatedAfter and a login token since 2024 (docs
# security/authentication.md, docs commit "Rename lastUpdatedSince filter to
# lastUpdatedAfter"); this test used to expect Basic auth and lastUpdatedSince.
async def test_search_api_sends_last_updated_after_with_a_login_token(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    sim, url = await simulator_factory()
    orders = sim.add_orders(5)
    config = poll_config(url, lookback_s=0)  # the look-back would see all five again
    config["tradecloud"]["api"] = "search"
    daemon = daemon_factory(config)
    await daemon.start()
    await daemon.wait_for_log("poll.done", kind="order", stored=5)
    await daemon.wait_for_log("poll.done", kind="order", items=0)  # exclusive: nothing again
    assert await daemon.stop() == 0
    searches = [r for r in sim.requests if r["path"] == "/v2/order-search/search"]
    assert {r["auth"] for r in searches} == {"bearer"} and {r["status"] for r in searches} == {200}
    assert searches[1]["body"]["filters"] == {"lastUpdatedAfter": orders[-1]["lastUpdatedAt"]}
    assert query(daemon, "SELECT count(*) FROM events") == [(5,)]
    assert cursor(daemon) == orders[-1]["lastUpdatedAt"]


async def test_search_paging_with_last_updated_after_skips_nothing(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    # Paging follows the filter's name, not the API: treating the exclusive lastUpdatedAfter
    # of the search API as inclusive would skip an item after every full page.
    sim, url = await simulator_factory()
    orders = sim.add_orders(7, lines=1)
    config = poll_config(url, page_size=2)
    config["tradecloud"]["api"] = "search"
    daemon = daemon_factory(config)
    await daemon.start()
    await daemon.wait_for_log("poll.done", kind="order", stored=7)
    assert await daemon.stop() == 0
    stored = {r[0] for r in query(daemon, "SELECT entity_id FROM events")}
    assert stored == {o["id"] for o in orders}
    # Inclusive paging on an exclusive server would look like shifted runs and re-read them.
    assert not [e for e in daemon.logs() if e.get("event") == "poll.run_shifted"]


async def test_search_cursor_filter_keeps_the_old_inclusive_name(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    sim, url = await simulator_factory(search_cursor_filter="lastUpdatedSince")
    orders = sim.add_orders(5)
    config = poll_config(url, lookback_s=0)  # the inclusive cursor alone brings one back
    config["tradecloud"].update(api="search", search_cursor_filter="lastUpdatedSince")
    daemon = daemon_factory(config)
    await daemon.start()
    await daemon.wait_for_log("poll.done", kind="order", stored=5)
    await daemon.wait_for_log("poll.done", kind="order", duplicates=1)  # the last one again
    assert await daemon.stop() == 0
    searches = [r for r in sim.requests if r["path"] == "/v2/order-search/search"]
    assert searches[1]["body"]["filters"]["lastUpdatedSince"] == orders[-1]["lastUpdatedAt"]
    assert query(daemon, "SELECT count(*) FROM events") == [(5,)]
    assert cursor(daemon) == orders[-1]["lastUpdatedAt"]


async def test_the_old_filter_name_on_a_current_server_shows_as_a_stuck_cursor(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    sim, url = await simulator_factory()
    sim.add_orders(5)
    config = poll_config(url, lookback_s=0)  # without a look-back, all again means stuck
    config["tradecloud"].update(api="search", search_cursor_filter="lastUpdatedSince")
    daemon = daemon_factory(config)
    await daemon.start()
    await daemon.wait_for_log("poll.done", kind="order", stored=5)
    # The server ignores the unknown name: every cycle brings everything again.
    await daemon.wait_for_log("poll.done", kind="order", duplicates=5)
    assert await daemon.stop() == 0


async def test_single_delivery_polls_its_route_and_marks_the_layout(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    sim, url = await simulator_factory(single_delivery=True)
    sim.add_orders(2)
    config = poll_config(url)
    config["tradecloud"]["single_delivery"] = True
    daemon = daemon_factory(config)
    await daemon.start()
    await daemon.wait_for_log("poll.done", kind="order", stored=2)
    assert await daemon.stop() == 0
    paths = {r["path"] for r in sim.requests if r["path"].startswith("/v2/order-search")}
    assert paths == {"/v2/order-search/poll/single-delivery"}
    envelopes = [json.loads(r[0]) for r in query(
        daemon, "SELECT envelope FROM events WHERE kind = 'order'")]
    assert [e["layout"] for e in envelopes] == ["single-delivery"] * 2
    assert all("statusLine" in line for e in envelopes for line in e["payload"]["lines"])


async def test_nested_and_dotted_filters_reach_the_server_nested(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    sim, url = await simulator_factory()
    orders = sim.add_orders(12, lines=1)
    buyer = orders[0]["buyerOrder"]["companyId"]
    config = poll_config(url)
    config["poll"]["kinds"] = ["order"]
    config["poll"]["order_filters"] = {"buyerOrder.companyId": [buyer],
                                       "status": {"processStatus": ["Issued"]}}
    daemon = daemon_factory(config)
    await daemon.start()
    expected = sum(1 for o in orders if o["buyerOrder"]["companyId"] == buyer)
    assert 0 < expected < 12
    await daemon.wait_for_log("poll.done", kind="order", stored=expected)
    assert await daemon.stop() == 0
    (first, *_) = [r for r in sim.requests if r["path"] == "/v2/order-search/poll"]
    assert first["body"]["filters"]["buyerOrder"] == {"companyId": [buyer]}
    assert first["body"]["filters"]["status"] == {"processStatus": ["Issued"]}


async def test_first_poll_marks_only_lines_after_start_from_as_changed(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    sim, url = await simulator_factory()
    order = sim.add_orders(1, lines=3)[0]
    updated = sim.update_order(order["id"], line_count=1)
    (changed,) = [ln["id"] for ln in updated["lines"]
                  if ln["lastUpdatedAt"] == updated["lastUpdatedAt"]]
    config = poll_config(url)
    config["poll"]["kinds"] = ["order"]
    config["poll"]["start_from"] = order["lastUpdatedAt"]  # the issue is before the cursor
    daemon = daemon_factory(config)
    await daemon.start()
    await daemon.wait_for_log("poll.done", kind="order", stored=1)
    assert await daemon.stop() == 0
    (envelope,) = [json.loads(r[0]) for r in query(daemon, "SELECT envelope FROM events")]
    assert envelope["changedLineIds"] == [changed]
    assert envelope["meta"] is None and envelope["layout"] == "delivery-schedule"


@pytest.mark.parametrize("pages_before_kill", [1, 2])
async def test_kill_between_pages_loses_nothing_and_cursor_never_goes_back(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any],
    pages_before_kill: int,
) -> None:
    sim, url = await simulator_factory()
    orders = sim.add_orders(250)
    sim.faults.api_latency_s = 0.4  # room to kill while the next page is being fetched
    daemon = daemon_factory(poll_config(url))
    await daemon.start()
    pages = await daemon.wait_for_log("poll.page", kind="order", count=pages_before_kill)
    await daemon.kill()
    # The pipeline had asked for the next page before committing this one: killed mid-fetch.
    assert len(order_polls(sim)) == pages_before_kill + 1
    committed = cursor(daemon)
    assert committed == pages[-1]["committed_cursor"]  # committed with its page, before the kill
    stored_ids = {row[0] for row in query(daemon, "SELECT entity_id FROM events")}
    # 100 on the first page, 99 new on each later one (the first is the last one asked again).
    assert len(stored_ids) == 100 + 99 * (pages_before_kill - 1)
    # The cursor never passed an order that was not committed.
    assert committed is not None
    assert {o["id"] for o in orders
            if instant_us(o["lastUpdatedAt"]) <= instant_us(committed)} <= stored_ids
    sim.faults.api_latency_s = 0
    await daemon.start()
    await daemon.wait_for_log("poll.done", kind="order", count=1)
    assert await daemon.stop() == 0
    assert query(daemon, "SELECT count(DISTINCT entity_id) FROM events") == [(250,)]
    assert query(daemon, "SELECT count(*) FROM events") == [(250,)]
    final = cursor(daemon)
    assert final == orders[-1]["lastUpdatedAt"]
    assert instant_us(final) >= instant_us(committed)


async def test_api_outage_never_advances_the_cursor_and_recovers(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    sim, url = await simulator_factory()
    sim.add_orders(3)
    sim.faults.api_error_status = 503
    sim.faults.api_error_count = 10_000
    config = poll_config(url)
    config["tradecloud"]["max_retries"] = 1
    config["poll"]["error_backoff_max_s"] = 0.2
    daemon = daemon_factory(config)
    await daemon.start()
    await daemon.wait_for_log("poll.failed", kind="order", count=2)
    assert cursor(daemon) is None
    assert query(daemon, "SELECT count(*) FROM events") == [(0,)]
    sim.faults.api_error_count = 0
    await daemon.wait_for_log("poll.done", kind="order", stored=3)
    assert await daemon.stop() == 0


async def test_legacy_get_webhook_fetches_and_stores_the_order(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    sim, url = await simulator_factory()
    (order,) = sim.add_orders(1, lines=4)
    config = {"mode": "webhook", "tradecloud": tradecloud_config(url, max_retries=0),
              "fetch": {"retry_initial_s": 0.05, "retry_max_s": 0.1}}
    daemon = daemon_factory(config)
    sim.faults.api_error_status = 503
    sim.faults.api_error_count = 2  # the first fetch attempts fail: retried from the store
    await daemon.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{daemon.url}/webhook/order/{order['id']}",
                               headers=TOKEN) as response:
            assert response.status == 202
    await daemon.wait_for_log("fetch.stored", entity_id=order["id"])
    assert await daemon.stop() == 0
    ((source, envelope),) = query(daemon, "SELECT source, envelope FROM events")
    assert source == "webhook_get"
    stored = json.loads(envelope)
    assert len(stored["payload"]["lines"]) == 4 and stored["eventName"] is None
    assert query(daemon, "SELECT status, attempts FROM fetch_requests") == [("done", 3)]
    assert [r["path"] for r in sim.requests].count("/v2/authentication/login") >= 1


async def test_update_inside_a_run_between_two_pages_skips_nothing(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    sim, url = await simulator_factory()
    burst = sim.add_orders(15, same_timestamp=True, lines=1)
    sim.faults.api_latency_s = 0.3  # the simulator answers each page after 0.3 s
    daemon = daemon_factory(poll_config(url, page_size=10))
    await daemon.start()
    await until(lambda: bool(order_polls(sim)), timeout_s=10)
    await asyncio.sleep(0.35)  # page 1 is answered; page 2 is being evaluated
    sim.update_order(sorted(o["id"] for o in burst)[0])  # it moves to the end of the run
    await daemon.wait_for_log("poll.done", kind="order", count=2)
    assert await daemon.stop() == 0
    stored = {row[0] for row in query(daemon, "SELECT entity_id FROM events")}
    assert stored == {o["id"] for o in burst}
    assert any(line["event"] == "poll.run_shifted" for line in daemon.logs())


def events_of(daemon: Daemon, entity_id: str) -> list[str]:
    return [row[0] for row in query(
        daemon, f"SELECT last_updated_at FROM events WHERE entity_id = '{entity_id}'")]


async def test_update_of_the_last_order_between_pages_is_stored(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    # Issue 9 bug 1: page 1 is [a, b]; b is updated before page 2 is asked, which asks for b
    # again and gets b's new version first. Comparing ids only dropped it for good (the
    # look-back is off here so that nothing else can find it again).
    sim, url = await simulator_factory()
    a, b = sim.add_orders(2)
    updated: list[dict[str, Any]] = []

    def update_before_page_two(path: str, body: Any) -> None:
        if path == "/v2/order-search/poll" and body.get("filters", {}).get(
                "lastUpdatedAfter") == a["lastUpdatedAt"] and not updated:
            updated.append(sim.update_order(b["id"]))

    sim.before_query = update_before_page_two
    daemon = daemon_factory(poll_config(url, page_size=2, lookback_s=0))
    await daemon.start()
    await daemon.wait_for_log("poll.done", kind="order", count=2)
    assert await daemon.stop() == 0
    assert updated, "the hook never ran: the scenario did not happen"
    assert updated[0]["lastUpdatedAt"] in events_of(daemon, b["id"])
    assert cursor(daemon) == updated[0]["lastUpdatedAt"]


async def test_changes_the_index_shows_late_are_stored_within_the_lookback(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    # Issue 9 bug 2: with an exclusive cursor on the newest item, (1) a second change in the
    # same millisecond that the index shows after the poll, and (2) a change indexed after a
    # newer one, were never seen.
    sim, url = await simulator_factory()
    a, b, c = sim.add_orders(3)
    daemon = daemon_factory(poll_config(url, interval_s=0.2, lookback_s=120))
    await daemon.start()
    await until(lambda: len(query(daemon, "SELECT id FROM events")) == 3, timeout_s=15)
    a2 = sim.update_order(a["id"])  # visible at once: the cursor moves to its stamp
    sim.world.index_delay_s = 1.0
    b2 = sim.update_order(b["id"], same_timestamp=True)  # same ms, shown a second later
    await until(lambda: cursor(daemon) == a2["lastUpdatedAt"], timeout_s=15)
    c2 = sim.update_order(c["id"])  # shown a second later...
    sim.world.index_delay_s = 0
    a3 = sim.update_order(a["id"])  # ...than this newer one
    await until(lambda: b2["lastUpdatedAt"] in events_of(daemon, b["id"])
                and c2["lastUpdatedAt"] in events_of(daemon, c["id"])
                and a3["lastUpdatedAt"] in events_of(daemon, a["id"]), timeout_s=15)
    assert await daemon.stop() == 0
    assert b2["lastUpdatedAt"] == a2["lastUpdatedAt"]
    assert instant_us(c2["lastUpdatedAt"]) < instant_us(a3["lastUpdatedAt"])
    assert cursor(daemon) == a3["lastUpdatedAt"]  # the exact string, never moved back
    later = [r for r in order_polls(sim) if r["body"]["offset"] == 0][-1]
    assert instant_us(later["body"]["filters"]["lastUpdatedAfter"]) == (
        instant_us(a3["lastUpdatedAt"]) - 120_000_000)


async def test_a_polled_order_with_a_lone_surrogate_is_rejected_and_polling_moves_on(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    sim, url = await simulator_factory()
    bad, good = sim.add_orders(2)
    entry = next(e for e in sim.world.indexed("order") if e.entity_id == bad["id"])
    entry.obj["buyerOrder"]["description"] = "\ud800"  # JSON says "\ud800": no text
    daemon = daemon_factory(poll_config(url, interval_s=0.2))
    await daemon.start()
    await daemon.wait_for_log("poll.done", kind="order", count=2)
    assert await daemon.stop() == 0
    assert query(daemon, "SELECT entity_id FROM events") == [(good["id"],)]
    reasons = [r[0] for r in query(daemon, "SELECT reason FROM rejected")]
    assert reasons and all("cannot be stored as JSON" in r for r in reasons)
    assert cursor(daemon) == good["lastUpdatedAt"]
