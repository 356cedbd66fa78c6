"""The Tradecloud simulator over real HTTP on loopback, with a real webhook receiver."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tcbridge.simulator import Faults, Simulator, add_arguments, run_from_args
from tcbridge.simulator.model import parse_instant_us
from tests.conftest import Receiver, basic_header, free_port

USER, PASSWORD = "integration@example.com", "secret"
BASIC = {"Authorization": basic_header(USER, PASSWORD)}
EPOCH = "2000-01-01T00:00:00.000Z"
T0 = 1_750_000_000.0

SimFactory = Callable[..., Awaitable[tuple[Simulator, str]]]


class FakeClock:
    """A wall clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def sim_factory(clock: FakeClock, simulator_factory: SimFactory) -> SimFactory:
    """Simulators on the fake clock, without a rate limit, with this file's credentials."""

    async def make(**kwargs: Any) -> tuple[Simulator, str]:
        defaults = {"rate_limit_per_s": None, "clock": clock, "username": USER,
                    "password": PASSWORD}
        return await simulator_factory(**(defaults | kwargs))

    return make


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, dict[str, str]]:
    async with http.request(method, url, **kwargs) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None), dict(resp.headers)


async def login(http: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    status, _, headers = await call(http, "GET", f"{url}/v2/authentication/login", headers=BASIC)
    assert status == 200
    return headers["Set-Authorization"], headers["Set-Refresh-Token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def poll(
    http: aiohttp.ClientSession, url: str, cursor: str | None = EPOCH, *,
    path: str = "/v2/order-search/poll", key: str = "lastUpdatedAfter",
    headers: dict[str, str] = BASIC, **body: Any,
) -> tuple[int, Any]:
    filters = body.pop("filters", {}) | ({key: cursor} if cursor else {})
    status, answer, _ = await call(http, "POST", url + path, headers=headers,
                                   json={"filters": filters, **body})
    return status, answer


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return claims


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for a condition to hold (fails the test after timeout_s)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


# --- authentication ----------------------------------------------------------------------


async def test_login_returns_a_jwt_shaped_pair_with_exp(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    _, url = await sim_factory(access_token_ttl_s=600)
    access, refresh = await login(http, url)
    assert len(access.split(".")) == 3
    assert jwt_claims(access)["exp"] == int(T0 + 600)
    assert refresh and refresh != access


@pytest.mark.parametrize("headers", [
    {"Authorization": basic_header(USER, "wrong")},
    {"Authorization": basic_header("other@example.com", PASSWORD)},
    {"Authorization": "Basic !!not-base64!!"},
    {"Authorization": "Bearer nonsense"},
    {},
])
async def test_login_rejects_bad_credentials(
    sim_factory: SimFactory, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    _, url = await sim_factory()
    status, _, answer_headers = await call(http, "GET", f"{url}/v2/authentication/login",
                                           headers=headers)
    assert status == 401
    assert "Set-Authorization" not in answer_headers


async def test_refresh_gives_a_new_pair_and_is_single_use(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory()
    _, refresh = await login(http, url)
    refresh_url = f"{url}/v2/authentication/refresh"
    status, _, headers = await call(http, "GET", refresh_url, headers={"Refresh-Token": refresh})
    assert status == 200
    new_access, new_refresh = headers["Set-Authorization"], headers["Set-Refresh-Token"]
    assert sim.tokens.access_valid(new_access)
    reused, _, _ = await call(http, "GET", refresh_url, headers={"Refresh-Token": refresh})
    assert reused == 401
    again, _, _ = await call(http, "GET", refresh_url, headers={"Refresh-Token": new_refresh})
    assert again == 200
    missing, _, _ = await call(http, "GET", refresh_url)
    assert missing == 401


async def test_refresh_token_expires(
    sim_factory: SimFactory, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    _, url = await sim_factory(refresh_token_ttl_s=100)
    _, refresh = await login(http, url)
    clock.advance(100.001)
    status, _, _ = await call(http, "GET", f"{url}/v2/authentication/refresh",
                              headers={"Refresh-Token": refresh})
    assert status == 401


async def test_access_token_expires(
    sim_factory: SimFactory, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim, url = await sim_factory(access_token_ttl_s=60)
    order_id = sim.add_orders(1)[0]["id"]
    access, _ = await login(http, url)
    ok, _, _ = await call(http, "GET", f"{url}/v2/order/{order_id}", headers=bearer(access))
    assert ok == 200
    clock.advance(60)
    expired, _, _ = await call(http, "GET", f"{url}/v2/order/{order_id}", headers=bearer(access))
    assert expired == 401
    status, _ = await poll(http, url, headers=bearer(access))
    assert status == 401


async def test_expire_tokens_now_invalidates_access_tokens(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory()
    first, _ = await login(http, url)
    sim.faults.expire_tokens_now()
    assert (await poll(http, url, headers=bearer(first)))[0] == 401
    second, refresh = await login(http, url)
    assert (await poll(http, url, headers=bearer(second)))[0] == 200
    status, _, _ = await call(http, "POST", f"{url}/_sim/faults", json={"expireTokensNow": True})
    assert status == 200
    assert (await poll(http, url, headers=bearer(second)))[0] == 401
    refreshed, _, _ = await call(http, "GET", f"{url}/v2/authentication/refresh",
                                 headers={"Refresh-Token": refresh})
    assert refreshed == 200


async def test_logout_revokes_the_session(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    _, url = await sim_factory()
    access, refresh = await login(http, url)
    logout_url = f"{url}/v2/authentication/logout"
    status, _, _ = await call(http, "POST", logout_url, headers={"Refresh-Token": refresh})
    assert status == 200
    assert (await poll(http, url, headers=bearer(access)))[0] == 401
    again, _, _ = await call(http, "POST", logout_url, headers={"Refresh-Token": refresh})
    assert again == 401
    refreshed, _, _ = await call(http, "GET", f"{url}/v2/authentication/refresh",
                                 headers={"Refresh-Token": refresh})
    assert refreshed == 401


# --- poll and search -----------------------------------------------------------------------


# This test used to search with Basic auth and lastUpdatedSince: the pre-2024 shape. The
# search API takes lastUpdatedAfter and a login token only (docs security/authentication.md).
async def test_poll_and_search_are_exclusive_and_the_old_name_is_ignored(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory()
    orders = sim.add_orders(3)
    stamps = [o["lastUpdatedAt"] for o in orders]
    assert len(set(stamps)) == 3
    _, polled = await poll(http, url, stamps[1])
    assert [o["id"] for o in polled["data"]] == [orders[2]["id"]]
    token = bearer((await login(http, url))[0])
    _, searched = await poll(http, url, stamps[1], path="/v2/order-search/search", headers=token)
    assert [o["id"] for o in searched["data"]] == [orders[2]["id"]]
    assert "lastUpdatedAt" not in searched
    # A strict server ignores a filter name it does not know: everything, a stuck cursor.
    _, old_name = await poll(http, url, stamps[1], path="/v2/order-search/search",
                             key="lastUpdatedSince", headers=token)
    assert [o["id"] for o in old_name["data"]] == [o["id"] for o in orders]


async def test_an_old_server_takes_the_inclusive_last_updated_since(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory(search_cursor_filter="lastUpdatedSince")
    orders = sim.add_orders(3)
    token = bearer((await login(http, url))[0])
    _, searched = await poll(http, url, orders[1]["lastUpdatedAt"], headers=token,
                             path="/v2/order-search/search", key="lastUpdatedSince")
    assert [o["id"] for o in searched["data"]] == [orders[1]["id"], orders[2]["id"]]


@pytest.mark.parametrize("path", ["/v2/order-search/search", "/v2/shipment/search"])
async def test_search_refuses_basic_auth(
    sim_factory: SimFactory, http: aiohttp.ClientSession, path: str
) -> None:
    _, url = await sim_factory()
    status, answer = await poll(http, url, path=path)
    assert status == 401 and "Bearer" in answer["message"]


async def test_single_delivery_poll_route_and_webhook_bodies(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory(single_delivery=True)
    order = sim.add_orders(1, lines=2)[0]
    for headers in (BASIC, bearer((await login(http, url))[0])):
        status, answer = await poll(http, url, path="/v2/order-search/poll/single-delivery",
                                    headers=headers)
        assert status == 200
        (polled,) = answer["data"]
        assert polled["id"] == order["id"]
        for line in polled["lines"]:
            assert "deliverySchedule" not in line["buyerLine"]
            assert set(line["statusLine"]["scheduledDelivery"]) == {"date", "quantity"}
    (change,) = sim.changes()
    body = change.webhook_body
    assert set(body) == {"eventName", "singleDeliveryOrderEvent", "meta"}
    assert "statusLine" in body["singleDeliveryOrderEvent"]["lines"][0]
    # The native route keeps the delivery schedule.
    _, native = await poll(http, url)
    assert "deliverySchedule" in native["data"][0]["lines"][0]["buyerLine"]


async def test_cursor_is_compared_as_an_instant(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory()
    orders = sim.add_orders(2)
    # T0 is 15:06:40.000Z; the first order is stamped T0, the second 1 ms later.
    assert orders[0]["lastUpdatedAt"] == "2025-06-15T15:06:40.000Z"
    _, answer = await poll(http, url, "2025-06-15T17:06:40.000+02:00")
    assert [o["id"] for o in answer["data"]] == [orders[1]["id"]]


async def test_paging_total_and_top_level_last_updated_at(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory()
    orders = sim.add_orders(5, lines=1)
    _, page = await poll(http, url, offset=2, limit=2)
    assert [o["id"] for o in page["data"]] == [o["id"] for o in orders[2:4]]
    assert page["total"] == 5
    assert page["lastUpdatedAt"] == orders[3]["lastUpdatedAt"]
    _, tail = await poll(http, url, offset=4, limit=2)
    assert len(tail["data"]) == 1 and tail["lastUpdatedAt"] == orders[4]["lastUpdatedAt"]
    _, empty = await poll(http, url, orders[4]["lastUpdatedAt"])
    assert empty == {"data": [], "total": 0}


async def test_same_timestamp_burst_of_150_pages_in_a_stable_order(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory()
    before = sim.add_orders(1)[0]["lastUpdatedAt"]
    burst = sim.add_orders(150, same_timestamp=True, lines=1)
    stamp = burst[0]["lastUpdatedAt"]
    assert {o["lastUpdatedAt"] for o in burst} == {stamp} and stamp > before
    _, first = await poll(http, url, before, limit=100)
    _, second = await poll(http, url, before, offset=100, limit=100)
    ids = [o["id"] for o in first["data"] + second["data"]]
    assert first["total"] == second["total"] == 150
    assert len(ids) == 150 and set(ids) == {o["id"] for o in burst}
    assert ids == sorted(ids)
    assert first["lastUpdatedAt"] == second["lastUpdatedAt"] == stamp
    _, again = await poll(http, url, before, limit=100)
    assert [o["id"] for o in again["data"]] == ids[:100]
    _, after = await poll(http, url, stamp)
    assert after["total"] == 0
    token = bearer((await login(http, url))[0])
    _, searched = await poll(http, url, before, path="/v2/order-search/search", headers=token)
    assert searched["total"] == 150


@pytest.mark.parametrize("body", [
    {"filters": {"lastUpdatedAfter": EPOCH}, "limit": 101},
    {"filters": {"lastUpdatedAfter": EPOCH}, "limit": "10"},
    {"filters": {"lastUpdatedAfter": EPOCH}, "offset": -1},
    {"filters": {"lastUpdatedAfter": "yesterday"}},
    {"filters": {"lastUpdatedAfter": "2024-01-01T00:00:00"}},
    {"filters": {"lastUpdatedAfter": 17}},
    {"filters": ["lastUpdatedAfter"]},
    ["not", "an", "object"],
])
async def test_poll_rejects_bad_bodies(
    sim_factory: SimFactory, http: aiohttp.ClientSession, body: Any
) -> None:
    _, url = await sim_factory()
    status, answer, _ = await call(http, "POST", f"{url}/v2/order-search/poll", headers=BASIC,
                                   json=body)
    assert status == 400 and answer["status"] == 400


async def test_poll_rejects_invalid_json(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory()
    status, _, _ = await call(http, "POST", f"{url}/v2/shipment/poll", headers=BASIC,
                              data=b"{not json")
    assert status == 400
    assert sim.requests[-1]["body"] == "{not json"


async def test_filters_and_unknown_filters(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory()
    orders = sim.add_orders(12, lines=1)
    sim.update_order(orders[0]["id"], event_name="OrderLinesConfirmedBySupplier")
    buyer = orders[0]["buyerOrder"]["companyId"]
    _, by_buyer = await poll(http, url, filters={"buyerOrder": {"companyId": buyer},
                                                 "somethingNew": {"x": 1}})
    expected = {o["id"] for o in orders if o["buyerOrder"]["companyId"] == buyer}
    assert {o["id"] for o in by_buyer["data"]} == expected and 0 < len(expected) < 12
    _, confirmed = await poll(http, url, filters={"status": {"processStatus": ["Confirmed"]}})
    assert [o["id"] for o in confirmed["data"]] == [orders[0]["id"]]
    # Filters nest (SDK PollOrders.cs): a dotted key is no filter name, so it is ignored.
    _, dotted = await poll(http, url, filters={"status.processStatus": ["Confirmed"]})
    assert dotted["total"] == 12
    shipments = sim.add_shipments(2, order_ids=[orders[0]["id"]])
    _, by_ship_buyer = await poll(http, url, path="/v2/shipment/poll",
                                  filters={"buyerShipment": {"companyId": [buyer]}})
    assert {s["id"] for s in by_ship_buyer["data"]} == {s["id"] for s in shipments}
    _, other = await poll(http, url, path="/v2/shipment/search",
                          headers=bearer((await login(http, url))[0]),
                          filters={"buyerShipment": {"companyId": "nobody"}})
    assert other == {"data": [], "total": 0}


async def test_shipment_poll_uses_meta_last_updated_at(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory()
    order = sim.add_orders(1, lines=4)[0]
    first, second = sim.add_shipments(2, order_ids=[order["id"]])
    line = first["lines"][0]
    assert line["purchaseOrderNumber"] == order["buyerOrder"]["purchaseOrderNumber"]
    assert line["meta"]["lastUpdatedAt"] == first["meta"]["lastUpdatedAt"]
    approved = sim.update_shipment(first["id"], event_name="ShipmentApprovedByBuyer")
    assert approved["status"]["processStatus"] == "Approved"
    _, answer = await poll(http, url, second["meta"]["lastUpdatedAt"], path="/v2/shipment/poll")
    assert [s["id"] for s in answer["data"]] == [first["id"]]
    assert answer["lastUpdatedAt"] == approved["meta"]["lastUpdatedAt"]


async def test_poll_accepts_basic_or_bearer_only(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    _, url = await sim_factory()
    access, _ = await login(http, url)
    assert (await poll(http, url, headers=bearer(access)))[0] == 200
    assert (await poll(http, url, headers={}))[0] == 401
    wrong = {"Authorization": basic_header(USER, "nope")}
    assert (await poll(http, url, headers=wrong, path="/v2/shipment/poll"))[0] == 401


# --- single objects ------------------------------------------------------------------------


async def test_get_by_id_needs_bearer(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory()
    order = sim.add_orders(1, lines=5)[0]
    shipment = sim.add_shipments(1)[0]
    access, _ = await login(http, url)
    status, body, _ = await call(http, "GET", f"{url}/v2/order/{order['id']}",
                                 headers=bearer(access))
    assert status == 200 and body == order and len(body["lines"]) == 5
    status, body, _ = await call(http, "GET", f"{url}/v2/shipment/{shipment['id']}",
                                 headers=bearer(access))
    assert status == 200 and body == shipment
    basic, _, _ = await call(http, "GET", f"{url}/v2/order/{order['id']}", headers=BASIC)
    assert basic == 401
    unknown, _, _ = await call(http, "GET", f"{url}/v2/order/nope", headers=bearer(access))
    assert unknown == 404


# --- rate limit and faults -----------------------------------------------------------------


async def test_rate_limit_answers_429_in_a_sliding_window(
    sim_factory: SimFactory, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim, url = await sim_factory(rate_limit_per_s=3)
    statuses = [(await poll(http, url))[0] for _ in range(3)]
    status, _, headers = await call(http, "POST", f"{url}/v2/order-search/poll", headers=BASIC,
                                    json={})
    assert statuses == [200, 200, 200] and status == 429 and headers["Retry-After"] == "1"
    clock.advance(0.5)
    assert (await poll(http, url))[0] == 429
    clock.advance(0.501)
    assert (await poll(http, url))[0] == 200
    assert [r["status"] for r in sim.requests] == [200, 200, 200, 429, 429, 200]


async def test_api_error_count_then_recovery(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory()
    sim.faults.api_error_status = 502
    sim.faults.api_error_count = 2
    assert [(await poll(http, url))[0] for _ in range(3)] == [502, 502, 200]
    status, faults, _ = await call(http, "POST", f"{url}/_sim/faults",
                                   json={"apiErrorStatus": 500, "api_error_count": 1})
    assert status == 200 and faults["api_error_count"] == 1
    assert [(await poll(http, url))[0] for _ in range(2)] == [500, 200]


async def test_api_error_rate_is_seeded(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    patterns = []
    for _ in range(2):
        sim, url = await sim_factory(seed=7)
        sim.faults.api_error_rate = 0.5
        patterns.append([(await poll(http, url))[0] for _ in range(20)])
    assert patterns[0] == patterns[1]
    assert set(patterns[0]) == {200, 503}


async def test_api_latency_delays_answers(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory()
    sim.faults.api_latency_s = 0.3
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await poll(http, url))[0] == 200
    assert loop.time() - started >= 0.3


@pytest.mark.parametrize("body", [{"nope": 1}, {"apiErrorRate": 2}, {"webhookReorder": "yes"},
                                  {"api_error_count": -1}, {"apiErrorStatus": 42}])
async def test_faults_route_rejects_bad_values(
    sim_factory: SimFactory, http: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    sim, url = await sim_factory()
    status, _, _ = await call(http, "POST", f"{url}/_sim/faults", json=body)
    assert status == 400
    assert sim.faults == Faults()


async def test_requests_are_logged_without_secrets(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory()
    await login(http, url)
    await poll(http, url, limit=5)
    await call(http, "GET", f"{url}/v2/order/x?expand=1")
    await call(http, "GET", f"{url}/_sim/truth")
    status, logged, _ = await call(http, "GET", f"{url}/_sim/requests")
    assert status == 200 and logged == sim.requests
    assert [(r["method"], r["path"], r["status"], r["auth"]) for r in logged] == [
        ("GET", "/v2/authentication/login", 200, "basic"),
        ("POST", "/v2/order-search/poll", 200, "basic"),
        ("GET", "/v2/order/x", 401, None),
    ]
    assert logged[1]["body"] == {"filters": {"lastUpdatedAfter": EPOCH}, "limit": 5}
    assert logged[2]["query"] == {"expand": "1"}
    assert PASSWORD not in json.dumps(logged)


# --- data and ground truth -----------------------------------------------------------------


async def test_updates_stamp_only_changed_lines(sim_factory: SimFactory) -> None:
    sim, _ = await sim_factory()
    order = sim.add_orders(1, lines=4)[0]
    updated = sim.update_order(order["id"], event_name="OrderChangesProposedBySupplier",
                               line_count=2)
    changed = [ln for ln in updated["lines"] if ln["lastUpdatedAt"] == updated["lastUpdatedAt"]]
    assert len(changed) == 2 and updated["version"] == 2
    assert updated["lastUpdatedAt"] > order["lastUpdatedAt"]
    assert all(ln["status"]["inProgressStatus"] == "OpenSupplierProposal" for ln in changed)
    assert all("supplierLine" in ln for ln in changed)
    unchanged = [ln for ln in updated["lines"] if ln not in changed]
    assert all(ln["lastUpdatedAt"] == order["lastUpdatedAt"] for ln in unchanged)
    assert updated["status"]["processStatus"] == "InProgress"
    with pytest.raises(KeyError):
        sim.update_order("missing")


async def test_new_lines_event_adds_lines(sim_factory: SimFactory) -> None:
    sim, _ = await sim_factory()
    order = sim.add_orders(1, lines=2)[0]
    updated = sim.update_order(order["id"], event_name="OrderLinesIssuedByBuyer", line_count=2)
    assert [ln["buyerLine"]["position"] for ln in updated["lines"]] == [
        "0010", "0020", "0030", "0040"]
    assert [ln["lastUpdatedAt"] == updated["lastUpdatedAt"] for ln in updated["lines"]] == [
        False, False, True, True]


async def test_truth_log_and_control_routes(
    sim_factory: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim, url = await sim_factory()
    _, created, _ = await call(http, "POST", f"{url}/_sim/orders",
                               json={"count": 3, "sameTimestamp": True, "lines": 2})
    assert len(created) == 3 and len({o["lastUpdatedAt"] for o in created}) == 1
    order_id = created[0]["id"]
    status, updated, _ = await call(http, "POST", f"{url}/_sim/orders/{order_id}/update",
                                    json={"eventName": "OrderLinesCancelledByBuyer",
                                          "lineCount": 2})
    assert status == 200 and updated["status"]["processStatus"] == "Cancelled"
    _, shipments, _ = await call(http, "POST", f"{url}/_sim/shipments",
                                 json={"count": 1, "orderIds": [order_id]})
    ship_id = shipments[0]["id"]
    await call(http, "POST", f"{url}/_sim/shipments/{ship_id}/update", json={})
    missing, _, _ = await call(http, "POST", f"{url}/_sim/orders/nope/update", json={})
    bad, _, _ = await call(http, "POST", f"{url}/_sim/orders", json={"count": -1})
    assert (missing, bad) == (404, 400)
    _, truth, _ = await call(http, "GET", f"{url}/_sim/truth")
    assert truth == sim.truth()
    assert [(t["kind"], t["eventName"], t["seq"]) for t in truth] == [
        ("order", "OrderIssuedByBuyer", 1), ("order", "OrderIssuedByBuyer", 2),
        ("order", "OrderIssuedByBuyer", 3), ("order", "OrderLinesCancelledByBuyer", 4),
        ("shipment", "ShipmentIssuedBySupplier", 5), ("shipment", "ShipmentApprovedByBuyer", 6)]
    assert truth[3]["entityId"] == order_id and truth[3]["lastUpdatedAt"] == updated[
        "lastUpdatedAt"]
    instants = [parse_instant_us(t["lastUpdatedAt"]) for t in truth[2:]]
    assert instants == sorted(set(instants))


async def test_random_changes_are_a_realistic_reproducible_mix(clock: FakeClock) -> None:
    runs = []
    for _ in range(2):
        sim = Simulator(seed=3, clock=clock)
        for _ in range(400):
            sim.random_change()
        runs.append(sim.truth())
    names = {t["eventName"] for t in runs[0]}
    assert runs[0] == runs[1]
    assert {"OrderIssuedByBuyer", "OrderLinesConfirmedBySupplier",
            "OrderChangesProposedBySupplier", "ShipmentIssuedBySupplier"} <= names
    per_stamp: dict[str, int] = {}
    for t in runs[0]:
        per_stamp[t["lastUpdatedAt"]] = per_stamp.get(t["lastUpdatedAt"], 0) + 1
    assert max(per_stamp.values()) >= 5


async def test_run_changes_runs_for_its_duration(clock: FakeClock) -> None:
    sim = Simulator(clock=clock)
    await asyncio.wait_for(sim.run_changes(200, duration_s=0.05), timeout=5)
    assert sim.truth()
    with pytest.raises(ValueError):
        await sim.run_changes(0)


# --- webhooks ------------------------------------------------------------------------------


async def test_webhooks_carry_only_the_changed_lines(
    sim_factory: SimFactory, receiver: Receiver
) -> None:
    sim, _ = await sim_factory(webhook_url=receiver.url, webhook_auth=("bearer", "hook-1"))
    order = sim.add_orders(1, lines=3)[0]
    updated = sim.update_order(order["id"], line_count=1)
    shipment = sim.add_shipments(1, order_ids=[order["id"]])[0]
    await sim.flush_webhooks()
    assert [c["path"] for c in receiver.calls] == ["/hook/order", "/hook/order", "/hook/shipment"]
    assert {c["auth"] for c in receiver.calls} == {"Bearer hook-1"}
    issued, confirmed, shipped = receiver.bodies()
    assert issued["eventName"] == "OrderIssuedByBuyer"
    assert len(issued["orderEvent"]["lines"]) == 3
    event = confirmed["orderEvent"]
    assert confirmed["eventName"] == "OrderLinesConfirmedBySupplier"
    assert (event["orderId"], event["version"], event["lastUpdatedAt"]) == (
        order["id"], 2, updated["lastUpdatedAt"])
    changed = [ln for ln in updated["lines"] if ln["lastUpdatedAt"] == updated["lastUpdatedAt"]]
    assert event["lines"] == changed and len(changed) == 1
    # The message meta sits at the top of the body (docs order/buyer/receive/README.md); it
    # used to be inside the event here.
    assert "meta" not in event
    assert confirmed["meta"]["messageId"] != issued["meta"]["messageId"]
    assert set(confirmed["meta"]) == {"messageId", "source", "createdDateTime"}
    assert set(confirmed["meta"]["source"]) >= {"traceId", "companyId"}
    assert shipped == {"eventName": "ShipmentIssuedBySupplier", "shipment": shipment,
                       "meta": shipped["meta"]}
    assert shipped["meta"]["messageId"] not in {issued["meta"]["messageId"],
                                                confirmed["meta"]["messageId"]}
    assert all(r["status"] == 200 and r["attempt"] == 1 for r in sim.webhook_results)


async def test_shipments_have_documented_lines_and_load_carriers(
    sim_factory: SimFactory,
) -> None:
    sim, _ = await sim_factory()
    order = sim.add_orders(1, lines=6)[0]
    shipments = sim.add_shipments(8, order_ids=[order["id"]])
    assert any(s["loadCarriers"] for s in shipments)
    for shipment in shipments:
        lines = shipment["lines"] + [ln for c in shipment["loadCarriers"] for ln in c["lines"]]
        for line in lines:  # docs shipment/buyer/receive/README.md: no line id
            assert "id" not in line
            assert set(line) == {"purchaseOrderNumber", "purchaseOrderLinePosition",
                                 "deliverySchedulePosition", "item", "supplierLine", "meta"}
            assert {"despatchAdviceNumber", "despatchAdviceLinePosition",
                    "despatchQuantity"} <= set(line["supplierLine"])
        keys = [(ln["supplierLine"]["despatchAdviceNumber"],
                 ln["supplierLine"]["despatchAdviceLinePosition"]) for ln in lines]
        assert len(set(keys)) == len(keys)
    loaded = next(s for s in shipments if s["loadCarriers"])
    reissued = sim.update_shipment(loaded["id"], event_name="ShipmentReissuedBySupplier")
    stamp = reissued["meta"]["lastUpdatedAt"]
    assert all(ln["meta"]["lastUpdatedAt"] == stamp
               for c in reissued["loadCarriers"] for ln in c["lines"])


async def test_order_ids_and_order_documents_events(
    sim_factory: SimFactory, receiver: Receiver
) -> None:
    sim, _ = await sim_factory(webhook_url=receiver.url)
    order = sim.add_orders(1, po_numbers=["PO/2024/7"])[0]
    assert order["id"] == order["buyerOrder"]["companyId"] + "-PO/2024/7"
    before = sim.world.order(order["id"])
    body = sim.attach_order_documents(order["id"])
    await sim.flush_webhooks()
    assert receiver.bodies()[-1] == body
    assert set(body) == {"eventName", "orderDocumentsEvent", "meta"}
    assert body["eventName"] == "OrderDocumentsAttachedBySupplier"
    event = body["orderDocumentsEvent"]
    assert event["orderId"] == order["id"] and "lastUpdatedAt" not in event
    assert event["supplierOrder"]["documents"][0]["objectId"]
    after = sim.world.order(order["id"])
    assert after is not None and before is not None
    # The documents are on the order now, but it is not restamped.
    assert after["supplierOrder"]["documents"] == event["supplierOrder"]["documents"]
    assert (after["lastUpdatedAt"], after["version"]) == (before["lastUpdatedAt"],
                                                          before["version"])


async def test_webhooks_retry_502_503_504_but_not_500_or_4xx(
    sim_factory: SimFactory, receiver: Receiver
) -> None:
    receiver.script = [503, 502, 504, 200, 500, 404]
    sim, _ = await sim_factory(webhook_url=receiver.url)
    first, second, third = sim.add_orders(3)
    await sim.flush_webhooks()
    assert [(r["entityId"], r["status"], r["attempt"]) for r in sim.webhook_results] == [
        (first["id"], 503, 1), (first["id"], 502, 2), (first["id"], 504, 3),
        (first["id"], 200, 4), (second["id"], 500, 1), (third["id"], 404, 1)]
    assert len(receiver.calls) == 6


async def test_webhooks_retry_connection_errors_and_timeouts(
    sim_factory: SimFactory, receiver: Receiver
) -> None:
    dead, _ = await sim_factory(webhook_url=f"http://127.0.0.1:{free_port()}/hook")
    dead.add_orders(1)
    await until(lambda: len(dead.webhook_results) >= 3)
    assert {r["status"] for r in dead.webhook_results} == {None}
    assert [r["attempt"] for r in dead.webhook_results[:3]] == [1, 2, 3]
    with pytest.raises(TimeoutError):
        await dead.flush_webhooks(timeout_s=0.05)

    receiver.script = ["hang"]
    slow, _ = await sim_factory(webhook_url=receiver.url, webhook_timeout_s=0.2)
    slow.add_orders(1)
    await slow.flush_webhooks()
    assert [r["status"] for r in slow.webhook_results] == [None, 200]


async def test_webhook_drops_and_duplicates_follow_the_seed(
    sim_factory: SimFactory, receiver: Receiver
) -> None:
    runs = []
    for _ in range(2):
        receiver.calls.clear()
        sim, _ = await sim_factory(webhook_url=receiver.url, seed=11)
        sim.faults.webhook_drop_rate = 0.25
        sim.faults.webhook_duplicate_rate = 0.25
        orders = sim.add_orders(40, lines=1)
        await sim.flush_webhooks()
        runs.append(list(sim.webhook_results))
        dropped = {r["entityId"] for r in sim.webhook_results if r["dropped"]}
        duplicates = [r for r in sim.webhook_results if r["duplicate"]]
        received = [b["orderEvent"]["orderId"] for b in receiver.bodies()]
        assert 0 < len(dropped) < 20 and 0 < len(duplicates) < 20
        assert set(received) == {o["id"] for o in orders} - dropped
        assert len(received) == 40 - len(dropped) + len(duplicates)
        assert received == sorted(received, key=[o["id"] for o in orders].index)
    assert runs[0] == runs[1]


async def test_webhook_reorder_and_delay(sim_factory: SimFactory, receiver: Receiver) -> None:
    sim, _ = await sim_factory(webhook_url=receiver.url)
    sim.faults.webhook_reorder = True
    sim.faults.webhook_delay_s = 0.001
    orders = sim.add_orders(30, lines=1)
    await sim.flush_webhooks()
    received = [b["orderEvent"]["orderId"] for b in receiver.bodies()]
    assert sorted(received) == sorted(o["id"] for o in orders)
    assert received != [o["id"] for o in orders]


async def test_webhook_get_mode_sends_ids_with_basic_auth(
    sim_factory: SimFactory, receiver: Receiver
) -> None:
    sim, _ = await sim_factory(webhook_url=receiver.url, webhook_mode="get",
                               webhook_auth=("basic", "hook:pw"))
    order = sim.add_orders(1)[0]
    shipment = sim.add_shipments(1)[0]
    await sim.flush_webhooks()
    assert [(c["method"], c["path"], c["body"]) for c in receiver.calls] == [
        ("GET", f"/hook/order/{order['id']}", None),
        ("GET", f"/hook/shipment/{shipment['id']}", None)]
    assert receiver.calls[0]["auth"] == basic_header("hook", "pw")


async def test_webhooks_queued_before_start_are_sent_after(
    clock: FakeClock, receiver: Receiver
) -> None:
    sim = Simulator(clock=clock, webhook_url=receiver.url)
    order = sim.add_orders(1)[0]
    await sim.start()
    try:
        await sim.flush_webhooks()
    finally:
        await sim.stop()
    assert [b["orderEvent"]["orderId"] for b in receiver.bodies()] == [order["id"]]


# --- command line --------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


async def test_run_from_args_serves_until_stopped(http: aiohttp.ClientSession) -> None:
    port = free_port()
    args = parse(["--port", str(port), "--rate", "50", "--initial-orders", "4", "--seed", "5",
                  "--webhook-auth", "basic:u:p", "--drop-rate", "0.5"])
    assert args.webhook_auth == ("basic", "u:p") and args.drop_rate == 0.5
    stop = asyncio.Event()
    task = asyncio.create_task(run_from_args(args, stop))
    truth: list[dict[str, Any]] = []

    async def fetch() -> None:
        nonlocal truth
        try:
            _, truth, _ = await call(http, "GET", f"http://127.0.0.1:{port}/_sim/truth")
        except aiohttp.ClientConnectionError:
            truth = []

    async with asyncio.timeout(5):
        while len(truth) <= 4:
            await fetch()
            await asyncio.sleep(0.02)
    stop.set()
    assert await asyncio.wait_for(task, 5) == 0
    assert [t["eventName"] for t in truth[:4]] == ["OrderIssuedByBuyer"] * 4
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch_raise(http, port)


async def fetch_raise(http: aiohttp.ClientSession, port: int) -> None:
    async with http.get(f"http://127.0.0.1:{port}/_sim/truth"):
        pass


@pytest.mark.parametrize("argv", [
    ["--webhook-auth", "token"], ["--webhook-auth", "digest:x"],
    ["--webhook-auth", "basic:nocolon"], ["--webhook-auth", "bearer:"],
    ["--drop-rate", "1.5"], ["--api-error-rate", "-0.1"], ["--delay-s", "-1"],
    ["--webhook-mode", "put"],
])
def test_options_are_validated(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(argv)


async def test_index_delay_shows_changes_late_and_never_an_older_version() -> None:
    now = [1_700_000_000.0]
    sim = Simulator(clock=lambda: now[0], index_delay_s=5, rate_limit_per_s=None)
    (order,) = sim.add_orders(1)
    assert sim.world.indexed("order") == []
    now[0] += 5
    assert [e.stamp for e in sim.world.indexed("order")] == [order["lastUpdatedAt"]]
    now[0] += 1
    updated = sim.update_order(order["id"])
    # the index still shows the version it has, as it was (a copy, not the live object)
    (shown,) = sim.world.indexed("order")
    assert shown.stamp == shown.obj["lastUpdatedAt"] == order["lastUpdatedAt"]
    sim.world.index_delay_s = 0
    now[0] += 1
    newest = sim.update_order(order["id"])
    assert [e.stamp for e in sim.world.indexed("order")] == [newest["lastUpdatedAt"]]
    now[0] += 10  # the delayed, older version is due now: it does not replace the newer one
    assert [e.stamp for e in sim.world.indexed("order")] == [newest["lastUpdatedAt"]]
    assert updated["lastUpdatedAt"] < newest["lastUpdatedAt"]


async def test_an_update_can_share_the_millisecond_of_the_previous_change() -> None:
    sim = Simulator(rate_limit_per_s=None)
    a, b = sim.add_orders(2)
    a2 = sim.update_order(a["id"])
    b2 = sim.update_order(b["id"], same_timestamp=True)
    assert b2["lastUpdatedAt"] == a2["lastUpdatedAt"]
    assert sim.update_order(a["id"])["lastUpdatedAt"] > a2["lastUpdatedAt"]


def test_an_oauth2_scope_without_default_is_refused_at_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The token endpoint (like Entra ID) takes only "<resource>/.default" for client
    # credentials: any other scope gave a sender that retried for ever, silently.
    with pytest.raises(SystemExit):
        parse(["--webhook-auth", "oauth2:tc:secret:api://tcbridge"])
    assert "/.default" in capsys.readouterr().err
    args = parse(["--webhook-auth", "oauth2:tc:secret:api://tcbridge/.default"])
    assert args.webhook_auth == ("oauth2", "tc:secret:api://tcbridge/.default")
