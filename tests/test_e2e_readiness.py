"""Readiness from outside, on the real daemon: a wrong Tradecloud password is reported at
once (not after three poll intervals), and recovers when the password is right again."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.conftest import Daemon, tradecloud_config


async def readyz(daemon: Daemon) -> tuple[int, list[str]]:
    async with aiohttp.ClientSession() as session, session.get(
        f"{daemon.admin_url}/readyz"
    ) as response:
        return response.status, json.loads(await response.text())["reasons"]


async def test_a_wrong_password_makes_readiness_false_at_once(
    daemon_factory: Callable[..., Daemon], simulator_factory: Callable[..., Any]
) -> None:
    _, url = await simulator_factory()
    daemon = daemon_factory({
        "mode": "poll", "tradecloud": tradecloud_config(url, password="wrong-password"),
        "poll": {"kinds": ["order"], "interval_s": 3600, "start_from": "2020-01-01T00:00:00Z"}})
    await daemon.start()
    (line,) = await daemon.wait_for_log("poll.credentials_refused")
    assert line["level"] == "error" and "401" in line["error"]
    status, reasons = await readyz(daemon)
    assert status == 503
    assert any("refuses the credentials" in r for r in reasons), reasons
    assert not any("no successful" in r for r in reasons)  # long before 3 intervals
    assert await daemon.stop() == 0
