"""End to end: handler filters on status and on the message's source, seen from outside.

Bodies follow Tradecloud's docs (`order/buyer/receive/README.md`, `api/polling/README.md`):
an `orderEvent` with the order and changed lines' `status`, and the message `meta` with
`source{userId, companyId}` at the top of the webhook body.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import Daemon, until

TOKEN = {"Authorization": "Bearer hook-token-1-for-tests-0123456789ab"}
ERP_USER = "3a0fe3d9-0bba-4b5c-a1a4-a0e0e5a3f7b1"
SUPPLIER_USER = "e2a7c0b4-1111-4a5d-9c2e-2b3c4d5e6f70"


def body(order_id: str, process: str, user_id: str, stamp: str) -> dict[str, Any]:
    return {
        "eventName": "OrderLinesConfirmedBySupplier",
        "orderEvent": {
            "orderId": order_id, "version": 2, "lastUpdatedAt": stamp,
            "status": {"processStatus": process, "logisticsStatus": "Open"},
            "lines": [{"id": f"{order_id}-l1", "lastUpdatedAt": stamp,
                       "status": {"processStatus": process, "inProgressStatus": None,
                                  "logisticsStatus": "Open"}}],
        },
        "meta": {"messageId": f"msg-{order_id}", "createdDateTime": stamp,
                 "source": {"traceId": "t", "userId": user_id, "companyId": "c-1"}},
    }


async def post(daemon: Daemon, bodies: list[dict[str, Any]]) -> list[str]:
    ids = []
    async with aiohttp.ClientSession() as session:
        for item in bodies:
            async with session.post(f"{daemon.url}/webhook/order", json=item,
                                    headers=TOKEN) as response:
                assert response.status == 200, await response.text()
                ids.append((await response.json())["eventId"])
    return ids


async def metrics_text(daemon: Daemon) -> str:
    async with aiohttp.ClientSession() as session, session.get(
            f"{daemon.admin_url}/metrics") as response:
        return await response.text()


def events_json(daemon: Daemon) -> dict[str, dict[str, Any]]:
    rows = [json.loads(line) for line in daemon.cli("events", "--json").stdout.splitlines()]
    return {row["id"]: row for row in rows}


def outbox(path: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(path.glob("*.json"))]


async def test_status_filter_routes_visibly(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = daemon_factory({"handlers": [
        {"name": "confirmed", "type": "file", "directory": str(tmp_path / "confirmed"),
         "process_status": ["Confirmed"]},
        {"name": "all", "type": "file", "directory": str(tmp_path / "all")},
    ]})
    await daemon.start()
    confirmed, issued = await post(daemon, [
        body("o1", "Confirmed", SUPPLIER_USER, "2024-05-01T10:00:00.000Z"),
        body("o2", "Issued", SUPPLIER_USER, "2024-05-01T10:00:01.000Z"),
    ])
    await until(lambda: len(outbox(tmp_path / "all")) == 2
                and len(outbox(tmp_path / "confirmed")) == 1)
    assert [e["id"] for e in outbox(tmp_path / "confirmed")] == [confirmed]
    text = await metrics_text(daemon)
    assert 'tcbridge_deliveries_skipped_total{handler="confirmed",reason="process_status"} 1.0' \
        in text
    assert await daemon.stop() == 0
    rows = events_json(daemon)
    assert rows[confirmed]["routedTo"] == ["all", "confirmed"]
    assert rows[confirmed]["skipped"] == {}
    assert rows[issued]["routedTo"] == ["all"]
    assert rows[issued]["skipped"] == {"confirmed": "process_status"}
    table = daemon.cli("events").stdout
    assert "routedTo" in table and "all,confirmed" in table


async def test_echo_suppression_end_to_end(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = daemon_factory({"handlers": [
        {"name": "erp", "type": "file", "directory": str(tmp_path / "erp"),
         "exclude_source_user_ids": [ERP_USER]},
    ]})
    await daemon.start()
    own, theirs = await post(daemon, [
        body("o1", "Confirmed", ERP_USER, "2024-05-01T10:00:00.000Z"),
        body("o2", "Confirmed", SUPPLIER_USER, "2024-05-01T10:00:01.000Z"),
    ])
    await until(lambda: len(outbox(tmp_path / "erp")) >= 1)
    delivered = outbox(tmp_path / "erp")
    assert await daemon.stop() == 0
    assert delivered[0]["meta"]["source"]["userId"] == SUPPLIER_USER  # the message meta
    assert [e["id"] for e in delivered] == [theirs]
    rows = events_json(daemon)
    assert rows[own]["routedTo"] == [] and rows[own]["skipped"] == {"erp": "source_user"}


# --- documents, downloaded next to the envelope file -------------------------------------------


async def test_documents_downloaded_next_to_the_envelope(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any], tmp_path: Path
) -> None:
    from tests.conftest import tradecloud_config

    daemon = daemon_factory({"handlers": [
        {"name": "drop", "type": "file", "directory": str(tmp_path / "outbox"),
         "filename": "{kind}-{id}.json", "kinds": ["order_documents"], "max_attempts": 3,
         "retry_initial_s": 0.05, "retry_max_s": 0.1,
         "documents": "download", "documents_allowed_hosts": ["127.0.0.1"],
         "documents_max_bytes": 100_000},
    ]})
    sim, url = await simulator_factory(
        webhook_url=f"{daemon.url}/webhook",
        webhook_auth=("bearer", "hook-token-1-for-tests-0123456789ab"))
    daemon.config_path.write_text(daemon.config_path.read_text() + "[tradecloud]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in tradecloud_config(url).items()))
    await daemon.start()
    good, gone, big = (o["id"] for o in sim.add_orders(3))
    sim.documents.expire_next = 1  # the first presigned URL has expired by the time it is used
    sim.attach_documents("order", good, [
        {"filename": "confirmation.pdf", "size": 5000},
        {"filename": "drawing.pdf", "url": True, "content": "supplier drawing"},
        {"filename": "offsite.pdf", "url": url.replace("127.0.0.1", "localhost") + "/x"}],
        base_url=url)
    sim.attach_documents("order", gone, [{"filename": "lost.pdf", "missing": True}],
                         base_url=url)
    sim.attach_documents("order", big, [{"filename": "huge.bin", "size": 200_000}],
                         base_url=url)
    await sim.flush_webhooks()
    outbox = tmp_path / "outbox"

    def dead() -> list[dict[str, Any]]:
        result = daemon.cli("deliveries", "--status", "dead", "--json")
        return [json.loads(line) for line in result.stdout.splitlines()]

    await until(lambda: len(list(outbox.glob("*.json"))) == 1)
    await until(lambda: len(dead()) == 2, timeout_s=30)
    (envelope_file,) = outbox.glob("*.json")
    envelope = json.loads(envelope_file.read_text())
    assert envelope["entityId"] == good
    folder = outbox / (envelope_file.stem + ".documents")
    assert sorted(p.name for p in folder.iterdir()) == [
        ".tcbridge-documents.json", "confirmation.pdf", "drawing.pdf"]
    by_name = {Path(d["path"]).name: d for d in envelope["documents"] if d["path"]}
    assert (folder / "drawing.pdf").read_text() == "supplier drawing"
    assert by_name["drawing.pdf"]["url"] == f"{url}/_sim/content/drawing.pdf"
    assert by_name["confirmation.pdf"]["size"] == 5000
    (offsite,) = [d for d in envelope["documents"] if d["path"] is None]
    assert "is not in documents_allowed_hosts" in offsite["skipped"]  # listed, no stall
    assert not [p for p in outbox.iterdir() if p.name.startswith(".")]  # no temp folders
    errors = {row["entityId"]: row["lastError"] for row in dead()}
    assert "not found in Tradecloud's object storage" in errors[gone]
    assert "over documents_max_bytes (100000)" in errors[big]
    assert {row["attempts"] for row in dead()} == {1}  # dead at once, not after max_attempts
    assert any(e.get("refused") == "Request has expired" for e in sim.documents.log)
    text = await metrics_text(daemon)
    assert 'tcbridge_documents_downloaded_total{handler="drop"} 2.0' in text
    assert await daemon.stop() == 0
    ledger = list((tmp_path / "documents" / "drop" / ".ledger").iterdir())
    assert len(ledger) == 1  # remembered next to the store
