"""End to end: a long-lived task that dies makes the real daemon stop with exit 1 (so systemd
restarts it) instead of running on with a handler that never delivers again."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable

from tests.conftest import Daemon, order_event_body
from tests.test_e2e_delivery import post_events


async def test_a_lane_that_dies_stops_the_daemon_with_exit_1(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory({"handlers": [
        {"name": "py", "type": "python", "callable": "tcb_lane_killer:deliver"}]})
    await daemon.start()
    (event_id,) = await post_events(daemon, [order_event_body("o1")])
    assert daemon.proc is not None
    for _ in range(600):  # it stops by itself: no signal is sent
        if daemon.proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    assert daemon.proc.returncode == 1, daemon.tail()
    (failed,) = [line for line in daemon.logs() if line["event"] == "tcbridge.failed"]
    assert "lane py died: RuntimeError: injected lane bug" in failed["reason"]
    store = daemon.config_path.parent / "tcbridge.db"
    with sqlite3.connect(store) as conn:  # what was delivered is recorded: nothing repeats
        assert conn.execute("SELECT event_id, status FROM deliveries").fetchall() == [
            (event_id, "done")]
