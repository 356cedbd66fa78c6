"""End to end operations: admin endpoints, metrics, SIGTERM mid-request, status, backfill,
purge, recovered events, and secrets never in the logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tcbridge.app import GC_THRESHOLDS
from tests.conftest import (
    DAEMON_ENV,
    PG_PASSWORD,
    Daemon,
    order_event_body,
    tradecloud_config,
    until,
)

TOKEN = {"Authorization": "Bearer hook-token-1-for-tests-0123456789ab"}
START = "2020-01-01T00:00:00.000Z"


def query(daemon: Daemon, sql: str) -> list[tuple[Any, ...]]:
    return daemon.rows(sql)


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def post(daemon: Daemon, body: object, headers: dict[str, str] = TOKEN) -> int:
    async with aiohttp.ClientSession() as session, session.post(
        f"{daemon.url}/webhook/order", json=body, headers=headers
    ) as response:
        return response.status


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in the Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_text = key.partition("{")
        got = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if sample == name and got == wanted:
            return float(value)
    return 0.0


async def test_admin_endpoints_and_metrics(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = daemon_factory({"handlers": [
        {"name": "drop", "type": "file", "directory": str(tmp_path / "out")}]})
    await daemon.start()
    [started] = await daemon.wait_for_log("tcbridge.started")
    assert started["gc_thresholds"] == list(GC_THRESHOLDS)  # the collector tuned (app.tune_gc)
    assert started["gc_frozen"] > 10_000  # the start's objects kept out of full collections
    assert (await get(f"{daemon.admin_url}/healthz"))[0] == 200
    status, document = await get(f"{daemon.admin_url}/openapi.json")
    assert status == 200 and "/webhook/order" in json.loads(document)["paths"]
    status, body = await get(f"{daemon.admin_url}/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    event = order_event_body("o-m1")
    assert [await post(daemon, event), await post(daemon, event)] == [200, 200]
    assert await post(daemon, {"nope": 1}) == 400
    assert await post(daemon, event, headers={"Authorization": "Bearer wrong"}) == 401
    await daemon.wait_for_log("delivery.done")  # the file is written before it is recorded
    status, text = await get(f"{daemon.admin_url}/metrics")
    assert status == 200
    assert metric(text, "tcbridge_events_total", source="webhook", kind="order") == 1
    assert metric(text, "tcbridge_duplicates_total", source="webhook") == 1
    assert metric(text, "tcbridge_rejected_total", source="webhook") == 1
    assert metric(text, "tcbridge_webhook_auth_failures_total") == 1
    assert metric(text, "tcbridge_deliveries_total", handler="drop", outcome="done") == 1
    assert metric(text, "tcbridge_delivery_latency_seconds_count", handler="drop") == 1
    assert metric(text, "tcbridge_deliveries_backlog", handler="drop", status="pending") == 0
    public, public_text = await get(f"{daemon.url}/metrics")
    assert public in (401, 404) and "tcbridge_events_total" not in public_text
    assert await daemon.stop() == 0


async def test_readyz_fails_when_polls_fail_and_recovers(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    sim, url = await simulator_factory()
    sim.faults.api_error_status, sim.faults.api_error_count = 503, 1_000_000
    daemon = daemon_factory({
        "mode": "poll", "tradecloud": tradecloud_config(url, max_retries=0),
        "poll": {"kinds": ["order"], "interval_s": 0.2, "start_from": START,
                 "error_backoff_max_s": 0.1}})
    await daemon.start()
    await daemon.wait_for_log("poll.failed", count=3)
    await asyncio.sleep(0.7)  # more than 3 intervals without a successful poll
    status, body = await get(f"{daemon.admin_url}/readyz")
    assert status == 503
    assert any("no successful order poll" in r for r in json.loads(body)["reasons"])
    status, text = await get(f"{daemon.admin_url}/metrics")
    assert metric(text, "tcbridge_poll_errors_total", kind="order") >= 3
    sim.faults.api_error_count = 0
    await daemon.wait_for_log("poll.done", kind="order")
    assert (await get(f"{daemon.admin_url}/readyz"))[0] == 200
    status, text = await get(f"{daemon.admin_url}/metrics")
    assert metric(text, "tcbridge_cursor_lag_seconds", kind="order") == 0  # empty: no cursor
    assert await daemon.stop() == 0


async def test_sigterm_in_the_middle_of_a_request_still_answers_and_stores(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory({})
    await daemon.start()
    body = json.dumps(order_event_body("o-term")).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    writer.write(
        b"POST /webhook/order HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer hook-token-1-for-tests-0123456789ab\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\n\r\n" + body[:20])
    await writer.drain()
    await asyncio.sleep(0.3)  # the handler is now waiting for the rest of the body
    assert daemon.proc is not None
    daemon.proc.terminate()
    await daemon.wait_for_log("tcbridge.stopping")
    writer.write(body[20:])
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout=10)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 200"), status_line
    assert await daemon.stop() == 0
    assert query(daemon, "SELECT entity_id FROM events") == [("o-term",)]


async def test_recovered_events_counted_warned_and_shown(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    daemon = daemon_factory({
        "mode": "hybrid", "poll": {"kinds": ["order"], "interval_s": 0.3, "start_from": START}})
    sim, url = await simulator_factory(
        webhook_url=f"{daemon.url}/webhook",
        webhook_auth=("bearer", "hook-token-1-for-tests-0123456789ab"))
    config = daemon.config_path.read_text().replace(
        "[tradecloud]\n", "").replace('mode = "hybrid"', 'mode = "hybrid"')
    daemon.config_path.write_text(config + _toml_section("tradecloud", tradecloud_config(url)))
    await daemon.start()
    await daemon.wait_for_log("poll.done", kind="order")  # the cursor now exists
    sim.faults.webhook_drop_rate = 1.0  # every webhook from now on is lost
    orders = sim.add_orders(3)
    (line,) = (await daemon.wait_for_log("poll.recovered", count=3))[:1]
    assert line["level"] == "warning" and line["source"] == "poll"
    assert {e["entity_id"] for e in await daemon.wait_for_log("poll.recovered", count=3)} == {
        o["id"] for o in orders}
    report = json.loads(daemon.cli("status", "--json").stdout)
    assert report["counts"]["recovered"] == 3 and report["mode"] == "hybrid"
    _, text = await get(f"{daemon.admin_url}/metrics")
    assert metric(text, "tcbridge_recovered_events_total", kind="order") == 3
    assert await daemon.stop() == 0


def _toml_section(name: str, values: dict[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


@pytest.mark.backends()
async def test_status_backfill_and_purge_commands(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any], tmp_path: Path
) -> None:
    sim, url = await simulator_factory()
    orders = sim.add_orders(130)
    daemon = daemon_factory({
        "mode": "webhook", "tradecloud": tradecloud_config(url),
        "poll": {"kinds": ["order"], "start_from": START},
        "handlers": [{"name": "drop", "type": "file", "directory": str(tmp_path / "out")}]})
    await daemon.start()
    assert await post(daemon, sim.changes()[0].webhook_body) == 200
    result = await asyncio.to_thread(daemon.cli, "backfill", "--since", START)
    assert "order: 130 fetched in 2 pages, 129 new, 1 duplicates" in result.stdout
    assert "130/130" in result.stderr  # the progress bar, sized by the API's total
    await until(lambda: len(list((tmp_path / "out").glob("*.json"))) == 130)
    text = daemon.cli("status").stdout
    assert "mode        webhook" in text and "events      130" in text
    assert "backfill:order" in text and orders[-1]["lastUpdatedAt"] in text
    report = json.loads(daemon.cli("status", "--json").stdout)
    assert report["counts"]["duplicates"] == {"poll": 1}
    assert "order" not in report["cursors"]  # the main cursor is untouched
    assert report["backlog"] == {}
    query(daemon, "UPDATE events SET received_at = '2001-01-01T00:00:00.000Z'")
    assert "payloads 130" in daemon.cli("purge").stdout
    assert await daemon.stop() == 0


@pytest.mark.backends()
async def test_secrets_never_appear_in_logs(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any], backend: str,
) -> None:
    secrets = {"tradecloud": "tc-pass-Zq81", "hook": "hook-token-1-for-tests-0123456789ab",
               "erp": "erp-token-Xy7"}
    if backend == "postgresql":  # the DSN's password (trust auth on the test server)
        secrets["dsn"] = PG_PASSWORD
    sim, url = await simulator_factory(password=secrets["tradecloud"])
    (order,) = sim.add_orders(1)
    daemon = daemon_factory({
        "mode": "hybrid",
        "tradecloud": tradecloud_config(url, password=secrets["tradecloud"], max_retries=1),
        "poll": {"kinds": ["order"], "interval_s": 0.2, "start_from": START},
        "fetch": {"retry_initial_s": 0.05, "retry_max_s": 0.1},
        "handlers": [{"name": "erp", "type": "http", "url": "http://127.0.0.1:9/x",
                      "auth": "bearer", "bearer_token": secrets["erp"], "max_attempts": 2,
                      "retry_initial_s": 0.05, "retry_max_s": 0.1}]})
    await daemon.start()
    await post(daemon, order_event_body("o-s"), headers={"Authorization": "Bearer wrong"})
    await post(daemon, order_event_body("o-s"))
    async with aiohttp.ClientSession() as session, session.get(
        f"{daemon.url}/webhook/order/{order['id']}", headers=TOKEN) as response:
        assert response.status == 202
    sim.faults.api_error_status, sim.faults.api_error_count = 401, 3
    await daemon.wait_for_log("delivery.dead", count=1)
    await until(lambda: any(line["event"] in ("fetch.stored", "fetch.duplicate")
                            for line in daemon.logs()))
    assert await daemon.stop() == 0
    log_text = daemon.log_path.read_text()
    assert "delivery.dead" in log_text and "poll.done" in log_text
    for name, secret in secrets.items():
        assert secret not in log_text, f"the {name} secret is in the log"
    if backend == "postgresql":
        assert "<redacted>" in log_text  # the store's location, without its password


async def test_systemd_notify_ready_watchdog_and_stopping(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, monkeypatch: Any
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setitem(DAEMON_ENV, "NOTIFY_SOCKET", str(path))
    monkeypatch.setitem(DAEMON_ENV, "WATCHDOG_USEC", "200000")
    daemon = daemon_factory({})
    messages: list[str] = []

    def receive() -> bool:
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(sock.recv(4096).decode())
        return True

    try:
        await daemon.start()
        await until(lambda: receive() and sum("WATCHDOG=1" in m for m in messages) >= 2)
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=webhook; 127.0.0.1:" in ready
        assert await daemon.stop() == 0
        receive()
        assert any("STOPPING=1" in m for m in messages)
        assert messages.index(ready) < next(
            i for i, m in enumerate(messages) if "STOPPING=1" in m)
    finally:
        sock.close()
