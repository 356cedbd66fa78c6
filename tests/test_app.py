"""The daemon's wiring in-process: start, clean stop, a crashed part stops everything."""

from __future__ import annotations

import asyncio
import gc
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


class StandbyThenActive:
    """A coordinator stand-in: standby until ``take`` is called."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.since: float | None = None

    @property
    def role(self) -> str:
        return "standby" if self.since is None else "active"

    def active_since(self, kind: str) -> float | None:
        return self.since


async def test_a_standby_replica_is_ready_and_says_so(tmp_path: Path) -> None:
    from tcbridge.store import make_store
    from tcbridge.supervisor import Supervisor

    config = settings(tmp_path)
    parts = app.Parts(store=make_store(config.store), supervisor=Supervisor(asyncio.Event()))
    await parts.store.open()
    try:
        parts.poller = Poller(config.poll, None, parts.store, asyncio.Event(),  # type: ignore[arg-type]
                              api="poll")
        parts.started_at -= 3600  # no poll for an hour
        assert any("no successful order poll" in r for r in await app.readiness(config, parts))
        assert app.poller_role(config, parts) == "active"  # SQLite: always polls
        coordinator = StandbyThenActive()
        parts.coordinator = coordinator  # type: ignore[assignment]
        assert await app.readiness(config, parts) == []  # another replica polls
        assert app.poller_role(config, parts) == "standby"
        coordinator.since = asyncio.get_running_loop().time()  # just taken over
        assert await app.readiness(config, parts) == []
        assert app.poller_role(config, parts) == "active"
        coordinator.since -= 3 * 60 + 1  # taken over and never polled since
        assert any("no successful order poll" in r for r in await app.readiness(config, parts))
        webhook_only = settings(tmp_path, mode="webhook")
        assert app.poller_role(webhook_only, parts) == "disabled"
    finally:
        await parts.store.close()


def test_tune_gc_sets_the_thresholds_and_freezes_what_exists() -> None:
    thresholds = gc.get_threshold()
    try:
        kept = type("Kept", (), {})()  # a tracked object made before the call
        app.tune_gc()
        assert gc.get_threshold() == app.GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # frozen: no longer collected
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
