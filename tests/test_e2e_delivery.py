"""End to end: the daemon delivering to real handlers, surviving kill -9, replaying."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import DAEMON_ENV, Daemon, Receiver, order_event_body, until

TOKEN = {"Authorization": "Bearer hook-token-1-for-tests-0123456789ab"}
pytestmark = pytest.mark.backends()


async def post_events(daemon: Daemon, bodies: list[dict[str, Any]]) -> list[str]:
    ids = []
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            async with session.post(f"{daemon.url}/webhook/order", json=body,
                                    headers=TOKEN) as response:
                assert response.status == 200
                ids.append((await response.json())["eventId"])
    return ids


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / name
    path.write_text("import json, os, sys, time\n" + body)
    return [sys.executable, str(path)]


async def test_every_handler_type_delivers(
    daemon_factory: Callable[..., Daemon], receiver: Receiver, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = tmp_path / "python.log"
    monkeypatch.setitem(DAEMON_ENV, "TCB_E2E_RECORD", str(record))
    command_log = tmp_path / "command.log"
    command = script(tmp_path, "cmd.py", (
        f"env = json.load(sys.stdin)\nopen({str(command_log)!r}, 'a').write("
        "os.environ['TCBRIDGE_EVENT_ID'] + ' ' + os.environ['TCBRIDGE_ATTEMPT'] + ' '"
        " + env['entityId'] + '\\n')\n"))
    daemon = daemon_factory({"handlers": [
        {"name": "drop", "type": "file", "directory": str(tmp_path / "outbox")},
        {"name": "cmd", "type": "command", "command": command},
        {"name": "erp", "type": "http", "url": receiver.url + "/events", "auth": "bearer",
         "bearer_token": "erp-token"},
        {"name": "py", "type": "python", "callable": "tcb_e2e_target:record"},
    ]})
    await daemon.start()
    ids = await post_events(daemon, [order_event_body(f"o{i}") for i in range(3)])
    await until(lambda: len(lines(record)) == 3 and len(receiver.bodies(200)) == 3
                and len(lines(command_log)) == 3
                and len(list((tmp_path / "outbox").glob("*.json"))) == 3)
    assert await daemon.stop() == 0
    assert sorted(json.loads(line)["id"] for line in lines(record)) == sorted(ids)
    assert sorted(line.split()[0] for line in lines(command_log)) == sorted(ids)
    assert {line.split()[1] for line in lines(command_log)} == {"1"}
    (call,) = receiver.calls[:1]
    assert call["headers"]["Idempotency-Key"] == call["body"]["id"]
    assert call["auth"] == "Bearer erp-token"
    files = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "outbox").glob("*.json")}
    assert sorted(files) == sorted(ids)
    assert not list((tmp_path / "outbox").glob(".*"))  # no temp files left behind


async def test_kill_9_during_deliveries_loses_nothing(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    delivered = tmp_path / "delivered.log"
    slow = script(tmp_path, "slow.py", (
        "sys.stdin.read()\ntime.sleep(0.1)\n"
        f"open({str(delivered)!r}, 'a').write(os.environ['TCBRIDGE_EVENT_ID'] + '\\n')\n"))
    daemon = daemon_factory({"handlers": [
        {"name": "slow", "type": "command", "command": slow, "concurrency": 2},
    ]})
    await daemon.start()
    ids = await post_events(daemon, [order_event_body(f"o{i}") for i in range(30)])
    await until(lambda: len(lines(delivered)) >= 5)
    await daemon.kill()
    assert len(set(lines(delivered))) < 30  # the kill really was mid-way
    await daemon.start()
    await until(lambda: set(lines(delivered)) == set(ids))
    await daemon.wait_for_log("dispatch.resumed_interrupted")
    assert await daemon.stop() == 0
    repeated = len(lines(delivered)) - len(set(lines(delivered)))
    assert repeated <= 2  # only the deliveries running at the kill (concurrency 2) repeat


async def test_dead_delivery_then_replay_dead_and_replay_event(
    daemon_factory: Callable[..., Daemon], receiver: Receiver
) -> None:
    receiver.default = 500
    daemon = daemon_factory({"handlers": [
        {"name": "erp", "type": "http", "url": receiver.url + "/events", "max_attempts": 2,
         "retry_initial_s": 0.05, "retry_max_s": 0.1},
    ]})
    await daemon.start()
    (event_id,) = await post_events(daemon, [order_event_body("o-dead")])
    await daemon.wait_for_log("delivery.dead", event_id=event_id)
    dead = daemon.cli("deliveries", "--status", "dead", "--json").stdout
    assert [json.loads(line)["eventId"] for line in dead.splitlines()] == [event_id]
    receiver.default = 200
    assert "re-queued 1" in daemon.cli("replay", "--dead").stdout
    await until(lambda: len(receiver.bodies(200)) == 1)
    assert "queued 1" in daemon.cli("replay", "--event", event_id).stdout
    await until(lambda: len(receiver.bodies(200)) == 2)
    assert [body["id"] for body in receiver.bodies(200)] == [event_id, event_id]
    table = daemon.cli("deliveries", "--handler", "erp").stdout
    assert table.splitlines()[0].split()[:3] == ["id", "eventId", "handler"]
    assert await daemon.stop() == 0


async def test_permanent_4xx_is_dead_at_once(
    daemon_factory: Callable[..., Daemon], receiver: Receiver
) -> None:
    receiver.default = 422
    daemon = daemon_factory({"handlers": [
        {"name": "erp", "type": "http", "url": receiver.url + "/events", "max_attempts": 10},
    ]})
    await daemon.start()
    (event_id,) = await post_events(daemon, [order_event_body("o-422")])
    (line,) = await daemon.wait_for_log("delivery.dead", event_id=event_id)
    assert line["attempt"] == 1 and "422" in line["error"]
    assert await daemon.stop() == 0
