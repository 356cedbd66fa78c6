"""End to end, hostile conditions (issue 11): secrets near command handlers, names from
payloads, crash leftovers, idle and slow clients, big bodies, against the real daemon."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import DAEMON_ENV, Daemon, order_event_body, until

TOKEN_VALUE = "hook-token-1-for-tests-0123456789ab"
TOKEN = {"Authorization": f"Bearer {TOKEN_VALUE}"}


async def post(daemon: Daemon, body: dict[str, Any]) -> str:
    async with aiohttp.ClientSession() as session, session.post(
        f"{daemon.url}/webhook/order", json=body, headers=TOKEN
    ) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["eventId"])


def attempts(daemon: Daemon) -> list[tuple[str, str | None]]:
    db = daemon.config_path.with_suffix(".db")
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT outcome, output FROM delivery_attempts ORDER BY id").fetchall()


async def test_command_handler_gets_no_secrets_and_kept_output_is_redacted(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    password = "tc-password-from-the-environment-4711"
    monkeypatch.setitem(DAEMON_ENV, "TCBRIDGE_TRADECLOUD__PASSWORD", password)
    monkeypatch.setitem(DAEMON_ENV, "ERP_URL", "http://erp.internal")
    monkeypatch.setitem(DAEMON_ENV, "UNRELATED_VARIABLE", "not for the child")
    printer = tmp_path / "printenv.py"
    # Prints its whole environment, as a careless import script might on an error.
    printer.write_text("import json, os, sys\nprint(json.dumps(dict(os.environ)))\n"
                       "print('password again:', os.environ.get('ERP_SECRET_COPY'))\n")
    daemon = daemon_factory({"handlers": [
        {"name": "cmd", "type": "command", "command": [sys.executable, str(printer)],
         "env": {"ERP_MODE": "test"}, "inherit_env": ["ERP_URL"]},
        {"name": "leaky", "type": "command", "command": [sys.executable, str(printer)],
         "env": {"ERP_SECRET_COPY": password}},
    ]})
    await daemon.start()
    await post(daemon, order_event_body("o-env"))
    await until(lambda: [o for o, _ in attempts(daemon)] == ["done", "done"])
    outputs = [output or "" for _, output in attempts(daemon)]
    child_env = json.loads(next(o for o in outputs if "password again: None" in o)
                           .splitlines()[0])
    assert set(child_env) - {"PATH", "LANG", "HOME"} == {
        "ERP_URL", "ERP_MODE", "TCBRIDGE_EVENT_ID", "TCBRIDGE_KIND", "TCBRIDGE_ENTITY_ID",
        "TCBRIDGE_EVENT_NAME", "TCBRIDGE_ATTEMPT",
    }
    assert "PATH" in child_env
    assert "UNRELATED_VARIABLE" not in child_env
    assert child_env["ERP_URL"] == "http://erp.internal"
    assert child_env["ERP_MODE"] == "test"
    leaky = next(o for o in outputs if "password again: ***" in o)
    assert password not in leaky
    assert password not in daemon.log_path.read_text()
    assert all(password not in o for o in outputs)
