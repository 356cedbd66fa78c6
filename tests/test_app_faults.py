"""The daemon's wiring under faults: a dying store writer, a start-up failure, a stop
while the poller waits out a retry, and readiness that tells the truth."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tcbridge import app
from tcbridge.config import Settings
from tcbridge.errors import ApiAuthError
from tcbridge.poller import Poller
from tcbridge.store import Store
from tcbridge.store import sqlite as store_module
from tcbridge.systemd import Notifier
from tests.conftest import order_event_body
from tests.support import free_port

GUARD_S = 15.0  # a hang fails the test; no timing is asserted


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "mode": "webhook",
        "shutdown_timeout_s": 100,
        "store": {"path": tmp_path / "db.sqlite"},
        "webhook": {"host": "127.0.0.1", "port": free_port(), "auth": "none",
                    "allow_unauthenticated": True},
        "admin": {"host": "127.0.0.1", "port": free_port()},
    }
    return Settings(**(values | overrides))


def hybrid(tmp_path: Path, **overrides: Any) -> Settings:
    # The poller talks to a closed port and waits 50 s between retries.
    return settings(tmp_path, mode="hybrid", tradecloud={
        "base_url": "http://127.0.0.1:9", "username": "u", "password": "p",
        "max_retries": 5, "retry_initial_s": 50, "retry_max_s": 60}, **overrides)


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, json.loads(await response.text())


async def started(config: Settings) -> None:
    url = f"http://127.0.0.1:{config.admin.port}/healthz"
    for _ in range(200):
        try:
            await get(url)
            return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    pytest.fail("admin listener never came up")


async def post(config: Settings) -> int:
    url = f"http://127.0.0.1:{config.webhook.port}/webhook/order"
    async with aiohttp.ClientSession() as session, session.post(
        url, json=order_event_body()
    ) as response:
        return response.status


async def test_a_dying_store_writer_stops_the_daemon_with_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = settings(tmp_path)
    stop = asyncio.Event()
    serving = asyncio.create_task(app.serve(config, stop))
    await started(config)
    assert await post(config) == 200

    def die(conn: Any, batch: Any) -> Any:
        raise SystemExit("writer bug")

    monkeypatch.setattr(store_module, "run_batch", die)
    assert await post(config) == 503  # the request in hand is answered
    assert await asyncio.wait_for(serving, GUARD_S) == app.EXIT_FAILED


async def test_the_watchdog_is_not_fed_once_the_writer_is_dead(tmp_path: Path) -> None:
    sent: list[dict[str, str]] = []

    class Recorder(Notifier):
        def notify(self, **fields: str) -> bool:
            sent.append(fields)
            return True

    notifier = Recorder(b"/nowhere", watchdog_interval_s=0.01)
    healthy = [True]
    stop = asyncio.Event()
    loop = asyncio.create_task(notifier.watchdog_loop(stop, healthy=lambda: healthy[0]))
    while not sent:
        await asyncio.sleep(0.01)
    healthy[0] = False
    await asyncio.sleep(0.05)
    count = len(sent)
    await asyncio.sleep(0.1)
    assert len(sent) == count  # no ping while unhealthy
    healthy[0] = True
    while len(sent) == count:
        await asyncio.sleep(0.01)
    stop.set()
    await loop


async def test_a_start_up_failure_does_not_wait_out_the_poller_backoff(tmp_path: Path) -> None:
    config = hybrid(tmp_path)
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", config.webhook.port)
    try:
        with pytest.raises(OSError):
            await asyncio.wait_for(app.serve(config, asyncio.Event()), GUARD_S)
    finally:
        blocker.close()
        await blocker.wait_closed()


async def test_a_stop_does_not_wait_out_the_poller_backoff(tmp_path: Path) -> None:
    config = hybrid(tmp_path)
    stop = asyncio.Event()
    serving = asyncio.create_task(app.serve(config, stop))
    await started(config)
    await asyncio.sleep(0.3)  # the poller is in its first retry wait now
    stop.set()
    assert await asyncio.wait_for(serving, GUARD_S) == app.EXIT_OK


async def test_refused_credentials_make_readiness_false_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(self: Poller, kind: str) -> Any:
        raise ApiAuthError("tradecloud /v2/order-search/poll: credentials refused (HTTP 401)")

    monkeypatch.setattr(Poller, "run_once", refused)
    config = hybrid(tmp_path, poll={"interval_s": 3600})
    stop = asyncio.Event()
    serving = asyncio.create_task(app.serve(config, stop))
    await started(config)
    url = f"http://127.0.0.1:{config.admin.port}/readyz"
    for _ in range(100):
        status, body = await get(url)
        if status == 503:
            break
        await asyncio.sleep(0.05)
    assert status == 503
    assert any("refuses the credentials" in r and "401" in r for r in body["reasons"])
    stop.set()
    assert await asyncio.wait_for(serving, GUARD_S) == app.EXIT_OK


async def test_readiness_says_when_the_last_commit_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = settings(tmp_path)
    stop = asyncio.Event()
    serving = asyncio.create_task(app.serve(config, stop))
    await started(config)
    url = f"http://127.0.0.1:{config.admin.port}/readyz"
    assert (await get(url))[0] == 200
    real = Store.ingest

    async def full(self: Store, candidate: Any) -> Any:
        def op(conn: Any) -> Any:
            raise sqlite3.OperationalError("database or disk is full")
        return await self.run(op)

    monkeypatch.setattr(Store, "ingest", full)
    assert await post(config) == 503
    status, body = await get(url)
    assert status == 503
    assert any("last store commit failed" in r and "full" in r for r in body["reasons"])
    monkeypatch.setattr(Store, "ingest", real)
    assert await post(config) == 200
    assert (await get(url))[0] == 200
    status, _ = await get(f"http://127.0.0.1:{config.admin.port}/healthz")
    stop.set()
    assert await asyncio.wait_for(serving, GUARD_S) == app.EXIT_OK


async def test_healthz_is_503_once_the_store_writer_is_gone() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from tcbridge.admin import build_admin_app
    from tcbridge.metrics import Metrics

    async def no_reasons() -> list[str]:
        return []

    async def nothing() -> None:
        return None

    alive = [True]
    admin = build_admin_app(Metrics(), no_reasons, nothing, alive=lambda: alive[0])
    async with TestClient(TestServer(admin)) as client:
        assert (await client.get("/healthz")).status == 200
        alive[0] = False
        response = await client.get("/healthz")
        assert response.status == 503 and "writer" in (await response.json())["reason"]
