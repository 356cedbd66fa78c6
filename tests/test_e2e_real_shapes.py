"""End to end with the shapes Tradecloud documents (issue 10): the real daemon, real HTTP,
bodies from tests/fixtures/ (built from Tradecloud's docs) and from the simulator."""

from __future__ import annotations

import copy
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import Daemon, tradecloud_config, until

TOKEN = {"Authorization": "Bearer hook-token-1-for-tests-0123456789ab"}
FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text()))


def envelopes(daemon: Daemon) -> list[dict[str, Any]]:
    with sqlite3.connect(daemon.config_path.parent / "tcbridge.db", timeout=5) as conn:
        rows = conn.execute("SELECT envelope FROM events ORDER BY seq").fetchall()
    return [json.loads(r[0]) for r in rows]


def query(daemon: Daemon, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(daemon.config_path.parent / "tcbridge.db", timeout=5) as conn:
        return conn.execute(sql).fetchall()


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body, headers=TOKEN) as response:
        return response.status, await response.json()


async def test_documented_bodies_are_stored_with_meta_layout_and_line_ids(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory({})
    await daemon.start()
    async with aiohttp.ClientSession() as session:
        for kind, name in [("order", "order_event.json"),
                           ("order", "single_delivery_order_event.json"),
                           ("order", "order_documents_event.json"),
                           ("shipment", "shipment_event.json")]:
            status, answer = await post(session, f"{daemon.url}/webhook/{kind}", fixture(name))
            assert (status, answer["status"]) == (200, "stored"), (name, answer)
    assert await daemon.stop() == 0
    order, single, documents, shipment = envelopes(daemon)
    assert order["meta"] == fixture("order_event.json")["meta"]
    assert order["layout"] == "delivery-schedule" and single["layout"] == "single-delivery"
    assert documents["kind"] == "order_documents" and documents["lastUpdatedAt"] is None
    assert documents["meta"]["messageId"] == "6e5d4c3b-2a19-4087-b6a5-948372615049"
    assert shipment["changedLineIds"] == ["DA%2F77/3", "DA%2F77/1"]
    assert shipment["meta"]["messageId"] == "2c3d4e5f-6a7b-4c8d-9e0f-1a2b3c4d5e6f"
    assert [e["sibling"] for e in (order, single, documents, shipment)] == [False] * 4


async def test_distinct_messages_with_one_timestamp_are_both_delivered(
    daemon_factory: Callable[..., Daemon], tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    daemon = daemon_factory({"handlers": [{"name": "drop", "type": "file",
                                           "directory": str(out)}]})
    await daemon.start()
    first = fixture("order_event.json")
    second = copy.deepcopy(first)  # another event of the same update: other line, other id
    second["meta"]["messageId"] = "4a5b6c7d-8e9f-4a0b-9c1d-2e3f4a5b6c7d"
    second["orderEvent"]["lines"][0]["id"] = "another-line"
    resent = copy.deepcopy(first)  # the buyer asks for the order again: same stamp and lines
    resent["eventName"] = "OrderResentByBuyer"
    resent["meta"]["messageId"] = "5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d8e"
    url = f"{daemon.url}/webhook/order"
    async with aiohttp.ClientSession() as session:
        answers = [await post(session, url, body) for body in (first, second, resent)]
        repeats = [await post(session, url, body) for body in (first, second, resent)]
    assert [a["status"] for _, a in answers] == ["stored"] * 3
    assert [a["status"] for _, a in repeats] == ["duplicate"] * 3
    assert [a["eventId"] for _, a in repeats] == [a["eventId"] for _, a in answers]
    await until(lambda: len(list(out.glob("*.json"))) == 3)
    assert await daemon.stop() == 0
    delivered = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert sorted(e["sibling"] for e in delivered) == [False, True, True]
    assert {e["eventName"] for e in delivered} == {"OrderLinesConfirmedBySupplier",
                                                   "OrderResentByBuyer"}
    line = first["orderEvent"]["lines"][0]["id"]
    assert sorted(e["changedLineIds"] for e in delivered) == sorted(
        [["another-line"], [line], [line]])


async def test_simulator_webhooks_in_the_real_shapes(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any],
) -> None:
    daemon = daemon_factory({})
    await daemon.start()
    sim, _ = await simulator_factory(webhook_url=f"{daemon.url}/webhook",
                                     webhook_auth=("bearer", "hook-token-1-for-tests-0123456789ab"))
    order = sim.add_orders(1, lines=4)[0]
    shipment = sim.add_shipments(1, order_ids=[order["id"]])[0]
    sim.update_shipment(shipment["id"], event_name="ShipmentReissuedBySupplier")
    sim.attach_order_documents(order["id"])
    await sim.flush_webhooks()
    assert {r["status"] for r in sim.webhook_results} == {200}
    assert await daemon.stop() == 0
    by_kind = {(e["kind"], e["eventName"]): e for e in envelopes(daemon)}
    issued = by_kind[("shipment", "ShipmentIssuedBySupplier")]
    lines = shipment["lines"] + [ln for c in shipment["loadCarriers"] for ln in c["lines"]]
    expected = [f"{ln['supplierLine']['despatchAdviceNumber']}/"
                f"{ln['supplierLine']['despatchAdviceLinePosition']}" for ln in lines]
    assert issued["changedLineIds"] == expected and expected
    assert by_kind[("shipment", "ShipmentReissuedBySupplier")]["changedLineIds"] == expected
    documents = by_kind[("order_documents", "OrderDocumentsAttachedBySupplier")]
    assert documents["lastUpdatedAt"] is None and documents["meta"]["messageId"]
    assert by_kind[("order", "OrderIssuedByBuyer")]["meta"]["source"]["traceId"]


async def test_legacy_get_with_a_slash_in_the_order_id_fetches_the_right_order(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any],
) -> None:
    sim, url = await simulator_factory()
    order = sim.add_orders(1, po_numbers=["PO/2024/0042"])[0]
    daemon = daemon_factory({"tradecloud": tradecloud_config(url),
                             "fetch": {"retry_initial_s": 0.2}})
    await daemon.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{daemon.url}/webhook/order/{order['id']}",
                               headers=TOKEN) as response:
            assert response.status == 202
    await daemon.wait_for_log("fetch.stored", timeout_s=20)
    assert await daemon.stop() == 0
    gets = [r for r in sim.requests if r["method"] == "GET" and r["path"].startswith("/v2/order/")]
    assert [r["status"] for r in gets] == [200]
    (envelope,) = envelopes(daemon)
    assert envelope["entityId"] == order["id"] and envelope["source"] == "webhook_get"


async def test_an_xml_webhook_is_415_and_kept(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory({})
    await daemon.start()
    body = b'<?xml version="1.0"?><tXML><Order/></tXML>'
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/webhook/order", data=body,
                                headers={**TOKEN, "Content-Type": "application/xml"}) as response:
            assert response.status == 415
            assert "choose JSON" in (await response.json())["message"]
    assert await daemon.stop() == 0
    assert query(daemon, "SELECT body FROM rejected") == [(body,)]
