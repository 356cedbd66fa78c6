"""Supervision in process: a task that dies, is cancelled or ends early stops the daemon with
a non-zero exit code and a reason readiness shows; a clean stop is exit 0."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from tcbridge import app
from tcbridge.dispatch import Lane
from tcbridge.supervisor import Supervisor
from tests.test_app import settings


async def test_a_task_that_raises_stops_everything_with_its_reason() -> None:
    stop = asyncio.Event()
    supervisor = Supervisor(stop)

    async def boom() -> None:
        raise ValueError("not a store error")

    with capture_logs() as logs:
        supervisor.spawn("fetcher", boom())
        await asyncio.wait_for(stop.wait(), timeout=5)
    assert supervisor.exit_code == app.EXIT_FAILED
    assert supervisor.reasons() == ["failed: fetcher died: ValueError: not a store error"]
    assert any(line["event"] == "tcbridge.part_crashed" and line["part"] == "fetcher"
               for line in logs)


async def test_a_task_that_returns_or_is_cancelled_before_stop_is_a_failure() -> None:
    stop = asyncio.Event()
    supervisor = Supervisor(stop)

    async def quits() -> None:
        return None

    with capture_logs():
        supervisor.spawn("retention", quits())
        await asyncio.wait_for(stop.wait(), timeout=5)
        stop.clear()
        hang = supervisor.spawn("poller", asyncio.Event().wait())
        await asyncio.sleep(0)
        hang.cancel()
        await asyncio.wait_for(stop.wait(), timeout=5)
    assert supervisor.failures == ["retention stopped before the daemon did",
                                   "poller was cancelled"]


async def test_tasks_ending_after_stop_are_a_clean_exit() -> None:
    stop = asyncio.Event()
    supervisor = Supervisor(stop)
    supervisor.spawn("watchdog", stop.wait())
    cancelled = supervisor.spawn("poller", asyncio.Event().wait())
    await asyncio.sleep(0)
    stop.set()
    cancelled.cancel()  # shutdown cancels what is late
    await asyncio.gather(*supervisor.tasks.values(), return_exceptions=True)
    assert supervisor.exit_code == app.EXIT_OK
    assert supervisor.reasons() == []


async def test_failed_and_degraded_are_readiness_reasons() -> None:
    stop = asyncio.Event()
    supervisor = Supervisor(stop)
    supervisor.degraded("store", "store writer is slow")
    assert supervisor.reasons() == ["store writer is slow"]
    assert not stop.is_set()
    supervisor.degraded("store", None)
    with capture_logs():
        supervisor.failed("store writer thread died")
    assert stop.is_set()
    assert supervisor.reasons() == ["failed: store writer thread died"]
    assert supervisor.exit_code == app.EXIT_FAILED


async def test_a_dead_lane_stops_the_daemon_with_exit_1_and_readyz_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug 5: a lane that died of anything but a store error went unnoticed."""
    died = asyncio.Event()
    release = asyncio.Event()
    original_drain = Lane.drain

    async def crash(self: Lane) -> float | None:
        died.set()
        raise ValueError("lane bug")

    async def slow_drain(self: Lane, timeout_s: float) -> int:
        await release.wait()  # hold shutdown so /readyz can be asked meanwhile
        return await original_drain(self, timeout_s)

    monkeypatch.setattr(Lane, "_fill", crash)
    monkeypatch.setattr(Lane, "drain", slow_drain)
    config = settings(tmp_path, mode="webhook", shutdown_timeout_s=10, handlers=[
        {"name": "erp", "type": "file", "directory": str(tmp_path / "out")}])
    with capture_logs() as logs:
        serving = asyncio.create_task(app.serve(config, asyncio.Event()))
        await asyncio.wait_for(died.wait(), timeout=20)
        url = f"http://127.0.0.1:{config.admin.port}/readyz"
        async with aiohttp.ClientSession() as session:
            for _ in range(500):
                try:
                    async with session.get(url) as response:
                        body = await response.json()
                except aiohttp.ClientConnectionError:  # the admin listener is not up yet
                    await asyncio.sleep(0.02)
                    continue
                if any("lane erp died" in reason for reason in body["reasons"]):
                    break
                await asyncio.sleep(0.02)
        release.set()
        code = await asyncio.wait_for(serving, timeout=20)
    assert response.status == 503
    assert any("failed: dispatcher died: LaneFailed: lane erp died: ValueError: lane bug"
               == reason for reason in body["reasons"]), body
    assert code == app.EXIT_FAILED
    assert any(line["event"] == "tcbridge.failed" for line in logs)
