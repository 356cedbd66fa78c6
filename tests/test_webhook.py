"""The webhook listener over real HTTP on loopback, with a real store."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tcbridge.config import StoreSettings, WebhookSettings
from tcbridge.store import Store
from tcbridge.webhook import METRICS_KEY, build_app
from tests.conftest import basic_header, order_event_body, shipment_obj

TOKEN_VALUE = "hook-token-1-for-tests-0123456789ab"
TOKEN = {"Authorization": f"Bearer {TOKEN_VALUE}"}
Client = Callable[..., Awaitable[tuple[TestClient[Any, Any], asyncio.Event, asyncio.Event]]]


@pytest.fixture
async def client_factory(store: Store) -> AsyncIterator[Client]:
    clients: list[TestClient[Any, Any]] = []

    async def make(**overrides: Any) -> tuple[TestClient[Any, Any], asyncio.Event, asyncio.Event]:
        settings = WebhookSettings(**({"auth": "bearer", "bearer_token": TOKEN_VALUE}
                                      | overrides))
        wake, fetch_wake = asyncio.Event(), asyncio.Event()
        client = TestClient(TestServer(build_app(settings, store, wake, fetch_wake,
                                                 retry_after_s=7)))
        await client.start_server()
        clients.append(client)
        return client, wake, fetch_wake

    yield make
    for client in clients:
        await client.close()


def rejected_rows(store: Store) -> list[tuple[Any, ...]]:
    with sqlite3.connect(store.path) as conn:
        sql = "SELECT reason, method, path, query, body, headers FROM rejected"
        return conn.execute(sql).fetchall()


async def test_post_order_is_stored_then_duplicate(client_factory: Client, store: Store) -> None:
    client, wake, _ = await client_factory()
    body = order_event_body("o1")
    first = await client.post("/webhook/order", json=body, headers=TOKEN)
    assert first.status == 200
    answer = await first.json()
    assert answer["status"] == "stored" and len(answer["eventId"]) == 32
    assert wake.is_set()
    wake.clear()
    second = await client.post("/webhook/order", json=body, headers=TOKEN)
    assert (await second.json()) == {"status": "duplicate", "eventId": answer["eventId"]}
    assert not wake.is_set()
    counts = await store.counts()
    assert counts["events"] == 1 and counts["duplicates"] == 1


async def test_answers_and_arrivals_are_counted_each_time(client_factory: Client) -> None:
    """The metrics' labelled children are kept between requests: each one still counts."""
    client, _, _ = await client_factory()
    body = order_event_body("o1")
    for _ in range(3):
        assert (await client.post("/webhook/order", json=body, headers=TOKEN)).status == 200
    assert (await client.post("/webhook/order", json=body)).status == 401
    text = client.server.app[METRICS_KEY].render().decode()
    assert 'tcbridge_webhook_responses_total{status="200"} 3.0' in text
    assert 'tcbridge_webhook_responses_total{status="401"} 1.0' in text
    assert 'tcbridge_events_total{kind="order",source="webhook"} 1.0' in text
    assert 'tcbridge_duplicates_total{source="webhook"} 2.0' in text


async def test_post_shipment(client_factory: Client, store: Store) -> None:
    client, _, _ = await client_factory()
    response = await client.post(
        "/webhook/shipment", headers=TOKEN,
        json={"eventName": "ShipmentIssuedBySupplier", "shipmentEvent": shipment_obj("s1")})
    assert response.status == 200
    (event,) = await store.events()
    assert event["kind"] == "shipment" and event["entityId"] == "s1"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"", "empty body"),
        (b"[" * 100_000 + b"]" * 100_000, "malformed JSON"),
        (json.dumps({"eventName": "X"}).encode(), "exactly one of"),
        (json.dumps({"eventName": "X", "orderEvent": {"orderId": "o"}}).encode(),
         "no lastUpdatedAt"),
        (b"\xff\xfe\x00garbage", "malformed JSON"),
    ],
)
async def test_bad_bodies_get_400_and_are_kept(
    client_factory: Client, store: Store, raw: bytes, message: str
) -> None:
    client, wake, _ = await client_factory()
    response = await client.post("/webhook/order?x=1", data=raw, headers=TOKEN)
    assert response.status == 400
    answer = await response.json()
    assert answer["error"] == "invalid_event" and message in answer["message"]
    ((reason, method, path, query, body, headers),) = rejected_rows(store)
    assert message in reason and (method, path, query) == ("POST", "/webhook/order", "x=1")
    limit = StoreSettings().rejected_body_max_bytes
    assert body == raw[:limit]  # a body beyond the cap is kept cut (the reason says so)
    assert (len(raw) > limit) == ("cut to" in reason)
    assert "hook-token-1-for-tests-0123456789ab" not in headers
    assert (await store.counts())["events"] == 0 and not wake.is_set()


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic aG9vazp0b2tlbg=="}],
)
async def test_wrong_credentials_get_401_with_challenge(
    client_factory: Client, store: Store, headers: dict[str, str]
) -> None:
    client, _, _ = await client_factory()
    response = await client.post("/webhook/order", json=order_event_body(), headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await store.counts())["events"] == 0


async def test_basic_auth(client_factory: Client) -> None:
    client, _, _ = await client_factory(auth="basic", bearer_token=None,
                                        basic_username="tc", basic_password="pw")
    ok = await client.post("/webhook/order", json=order_event_body(),
                           headers={"Authorization": basic_header("tc", "pw")})
    bad = await client.post("/webhook/order", json=order_event_body(),
                            headers={"Authorization": basic_header("tc", "nope")})
    assert (ok.status, bad.status) == (200, 401)
    assert bad.headers["WWW-Authenticate"].startswith("Basic")


async def test_body_over_limit_gets_413(client_factory: Client, store: Store) -> None:
    client, _, _ = await client_factory(max_body_bytes=2048)
    body = order_event_body()
    body["padding"] = "x" * 4096
    response = await client.post("/webhook/order", json=body, headers=TOKEN)
    assert response.status == 413
    ((reason, *_),) = rejected_rows(store)
    assert "max_body_bytes" in reason


async def _send_in_two(port: int, body: bytes, pause_s: float | None) -> bytes:
    """POST ``body`` with its head and first byte at once, the rest after ``pause_s`` (never,
    when None); everything the server said before it closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /webhook/order HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 + f"Authorization: Bearer {TOKEN_VALUE}\r\n".encode()
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:1])
    try:
        if pause_s is not None:
            await asyncio.sleep(pause_s)
            writer.write(body[1:])
        return await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()


async def test_a_body_that_comes_after_its_head_is_read_within_the_body_timeout(
    client_factory: Client, store: Store,
) -> None:
    client, _, _ = await client_factory(body_timeout_s=10)
    body = json.dumps(order_event_body("o-later")).encode()
    answer = await _send_in_two(client.port, body, pause_s=0.3)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert (await store.counts())["events"] == 1


async def test_a_body_that_stops_coming_is_cut_off_with_a_503(
    client_factory: Client, store: Store,
) -> None:
    client, _, _ = await client_factory(body_timeout_s=0.3)
    body = json.dumps(order_event_body("o-never")).encode()
    answer = await _send_in_two(client.port, body, pause_s=None)
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"Retry-After: 7" in answer
    assert (await store.counts())["events"] == 0
    # and a whole body still is stored at once
    response = await client.post("/webhook/order", json=order_event_body("o-whole"),
                                 headers=TOKEN)
    assert response.status == 200


async def test_store_that_cannot_commit_gives_503(client_factory: Client, store: Store) -> None:
    client, _, _ = await client_factory()
    blocker = sqlite3.connect(store.path, isolation_level=None, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        response = await client.post("/webhook/order", json=order_event_body("o1"),
                                     headers=TOKEN)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert response.status == 503
    assert response.headers["Retry-After"] == "7"
    retried = await client.post("/webhook/order", json=order_event_body("o1"), headers=TOKEN)
    assert retried.status == 200


async def test_unexpected_fault_is_503_never_500(
    client_factory: Client, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _, _ = await client_factory()

    async def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(store, "ingest", broken)
    response = await client.post("/webhook/order", json=order_event_body(), headers=TOKEN)
    assert response.status == 503
    assert "Retry-After" in response.headers


@pytest.mark.parametrize(
    ("url", "kind", "entity"),
    [
        ("/webhook/order/o-42", "order", "o-42"),
        ("/webhook/order?orderId=o-43", "order", "o-43"),
        ("/webhook/shipment/s-1", "shipment", "s-1"),
        ("/webhook/shipment?shipmentId=s-2", "shipment", "s-2"),
        # An order id is <buyerCompanyId>-<purchaseOrderNumber>; the number may hold "/".
        ("/webhook/order/c1-PO/2024/7", "order", "c1-PO/2024/7"),
        ("/webhook/order/c1-PO%2F2024%2F8", "order", "c1-PO/2024/8"),
        ("/webhook/order?orderId=c1-PO%2F2024%2F9", "order", "c1-PO/2024/9"),
    ],
)
async def test_legacy_get_queues_a_durable_fetch(
    client_factory: Client, store: Store, url: str, kind: str, entity: str
) -> None:
    client, _, fetch_wake = await client_factory()
    response = await client.get(url, headers=TOKEN)
    assert response.status == 202
    assert (await response.json())["status"] == "queued"
    assert fetch_wake.is_set()
    (request,) = await store.due_fetches()
    assert (request.kind, request.entity_id) == (kind, entity)


async def test_legacy_get_without_id_is_400(client_factory: Client, store: Store) -> None:
    client, _, _ = await client_factory()
    response = await client.get("/webhook/order?other=1", headers=TOKEN)
    assert response.status == 400
    assert "orderId" in (await response.json())["message"]
    assert len(rejected_rows(store)) == 1


async def test_allow_list_refuses_other_sources(client_factory: Client) -> None:
    client, _, _ = await client_factory(allowed_ips=["10.9.9.9"])
    response = await client.post("/webhook/order", json=order_event_body(), headers=TOKEN)
    assert response.status == 403
    allowed, _, _ = await client_factory(allowed_ips=["127.0.0.0/8", "::1"])
    ok = await allowed.post("/webhook/order", json=order_event_body(), headers=TOKEN)
    assert ok.status == 200


XML_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Order><OrderHeader>'
            b"<OrderNumber>PO-1</OrderNumber></OrderHeader></Order>")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [("application/xml", XML_BODY), ("text/xml; charset=utf-8", XML_BODY),
     ("application/json", b"\xef\xbb\xbf  " + XML_BODY)],
)
async def test_an_xml_body_is_415_telling_to_choose_json_and_kept_whole(
    client_factory: Client, store: Store, content_type: str, body: bytes
) -> None:
    client, wake, _ = await client_factory()
    for kind in ("order", "shipment"):
        response = await client.post(f"/webhook/{kind}", data=body,
                                     headers={**TOKEN, "Content-Type": content_type})
        assert response.status == 415
        answer = await response.json()
        assert answer["error"] == "unsupported_media_type"
        assert "choose JSON" in answer["message"] and "Tradecloud portal" in answer["message"]
    rows = rejected_rows(store)
    assert [bytes(row[4]) for row in rows] == [body, body]
    assert all(row[1] == "POST" for row in rows)
    assert not wake.is_set()
@pytest.mark.parametrize(
    ("content_type", "prefix"),
    [("application/xml", b""), ("text/xml", b"\n "), ("application/json", b"\xef\xbb\xbf")],
)
async def test_a_json_body_is_stored_under_a_wrong_media_type_or_after_a_bom(
    client_factory: Client, store: Store, content_type: str, prefix: bytes
) -> None:
    # A JSON body is judged by what it is: a 415 or 400 here would lose it for good.
    client, _, _ = await client_factory()
    body = prefix + json.dumps(order_event_body("o1")).encode()
    response = await client.post("/webhook/order", data=body,
                                 headers={**TOKEN, "Content-Type": content_type})
    assert response.status == 200, await response.text()
    assert [e["entityId"] for e in await store.events()] == ["o1"]
    assert rejected_rows(store) == []


async def test_a_shipment_webhook_keeps_its_event_name(
    client_factory: Client, store: Store
) -> None:
    client, _, _ = await client_factory()
    body = {"eventName": "ShipmentDeliveredByCarrier", "shipmentEvent": shipment_obj("s1")}
    response = await client.post("/webhook/shipment", json=body, headers=TOKEN)
    assert response.status == 200
    (event,) = await store.events()
    assert (event["kind"], event["entityId"], event["eventName"]) == (
        "shipment", "s1", "ShipmentDeliveredByCarrier")
    with sqlite3.connect(store.path) as conn:
        (envelope,) = conn.execute("SELECT envelope FROM events").fetchone()
    assert json.loads(envelope)["eventName"] == "ShipmentDeliveredByCarrier"
