"""The simulator's object storage and content server, as Tradecloud's docs describe them
(`order/buyer/receive/download-document.md`): metadata needs credentials, the presigned URL
none, and it expires."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp

from tests.conftest import SIM_PASSWORD, SIM_USER, basic_header


async def test_metadata_presigned_download_and_faults(
    simulator_factory: Callable[..., Any],
) -> None:
    sim, url = await simulator_factory()
    (order,) = sim.add_orders(1)
    auth = {"Authorization": basic_header(SIM_USER, SIM_PASSWORD)}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/_sim/orders/{order['id']}/documents",
                          json={"documents": [{"filename": "a.pdf", "content": "hello"}]}) as r:
            assert r.status == 200
            (entry,) = await r.json()
        assert set(entry) >= {"code", "revision", "name", "objectId", "type"}
        meta_url = f"{url}/v2/object-storage/document/{entry['objectId']}/metadata"
        async with s.get(meta_url) as r:
            assert r.status == 401
        async with s.get(meta_url, headers=auth) as r:
            metadata = await r.json()
        assert metadata["id"] == entry["objectId"] and metadata["filename"] == "a.pdf"
        assert "X-Amz-Expires=59" in metadata["downloadUrl"]
        async with s.get(metadata["downloadUrl"]) as r:
            assert r.status == 200 and await r.text() == "hello"
        async with s.get(metadata["downloadUrl"].replace("Signature=", "Signature=0")) as r:
            assert r.status == 403
        async with s.post(f"{url}/_sim/documents/faults", json={"expireNext": 1}) as r:
            assert (await r.json())["expireNext"] == 1
        async with s.get(meta_url, headers=auth) as r:
            expired = (await r.json())["downloadUrl"]
        async with s.get(expired) as r:
            assert r.status == 403 and "Request has expired" in await r.text()
        async with s.get(f"{url}/v2/object-storage/document/nope/metadata", headers=auth) as r:
            assert r.status == 404
        async with s.post(f"{url}/_sim/documents/faults", json={"expireNext": -1}) as r:
            assert r.status == 400
        async with s.post(f"{url}/_sim/orders/unknown/documents", json={}) as r:
            assert r.status == 404
    body = sim.changes()[-1].webhook_body
    assert body["eventName"] == "OrderDocumentsAttachedBySupplier"
    assert body["orderDocumentsEvent"]["supplierOrder"]["documents"] == [entry]
    assert body["meta"]["source"]["companyId"]
    assert sim.world.order(order["id"])["supplierOrder"]["documents"] == [entry]  # type: ignore[index]
