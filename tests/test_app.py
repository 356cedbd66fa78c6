"""The daemon's wiring in-process: start, clean stop, a crashed part stops everything."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tcbridge import app
from tcbridge.config import Settings
from tcbridge.poller import Poller
from tests.conftest import order_event_body
from tests.support import free_port


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "mode": "hybrid",
        "shutdown_timeout_s": 2,
        "store": {"path": tmp_path / "db.sqlite"},
        "tradecloud": {"base_url": "http://127.0.0.1:9", "username": "u", "password": "p",
                       "max_retries": 0},
        "webhook": {"host": "127.0.0.1", "port": free_port(), "auth": "none",
                    "allow_unauthenticated": True},
        "poll": {"interval_s": 60},
        "admin": {"host": "127.0.0.1", "port": free_port()},
    }
    return Settings(**(values | overrides))


async def test_serve_answers_webhooks_and_stops_cleanly(tmp_path: Path) -> None:
    config = settings(tmp_path)
    stop = asyncio.Event()
    serving = asyncio.create_task(app.serve(config, stop))
    url = f"http://127.0.0.1:{config.webhook.port}/webhook/order"
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.post(url, json=order_event_body()) as response:
                    assert response.status == 200
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("listener never came up")
    stop.set()
    assert await serving == app.EXIT_OK


async def test_a_crashed_part_stops_the_daemon_with_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def crash(self: Poller, stop: asyncio.Event) -> None:
        raise RuntimeError("poller bug")

    monkeypatch.setattr(Poller, "run", crash)
    stop = asyncio.Event()
    code = await asyncio.wait_for(app.serve(settings(tmp_path), stop), timeout=20)
    assert code == app.EXIT_FAILED
    assert stop.is_set()


async def test_a_port_in_use_fails_start_up(tmp_path: Path) -> None:
    config = settings(tmp_path)
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", config.webhook.port)
    try:
        with pytest.raises(OSError):
            await app.serve(config, asyncio.Event())
    finally:
        blocker.close()
        await blocker.wait_closed()
