"""End to end, hostile conditions (issue 11): secrets near command handlers, names from
payloads, crash leftovers, idle and slow clients, big bodies, against the real daemon."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import resource
import sqlite3
import subprocess
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


# --- idle and slow clients ---------------------------------------------------------------


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name))


async def start_with_open_files_limit(
    daemon: Daemon, limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start the daemon with RLIMIT_NOFILE soft = hard = ``limit`` (systemd's usual soft
    limit), so that it cannot raise it."""

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with monkeypatch.context() as patch:
        patch.setattr(subprocess, "Popen", functools.partial(subprocess.Popen,
                                                             preexec_fn=preexec))
        await daemon.start()


async def open_idle(daemon: Daemon, count: int) -> list[asyncio.StreamWriter]:
    """Open ``count`` connections that never send a byte (those that get through)."""

    async def one() -> asyncio.StreamWriter | None:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", daemon.port), timeout=10)
        except (OSError, TimeoutError):
            return None
        return writer

    writers: list[asyncio.StreamWriter] = []
    for start in range(0, count, 100):
        batch = await asyncio.gather(*(one() for _ in range(min(100, count - start))))
        writers += [w for w in batch if w is not None]
    return writers


async def test_1100_idle_connections_do_not_stop_real_webhooks(
    daemon_factory: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With 1,024 file descriptors, 1,100 idle connections used to exhaust them: accept()
    # failed and every real webhook waited for an hour-long keep-alive to end.
    daemon = daemon_factory({"webhook": {"idle_timeout_s": 600}})  # the limit must act
    await start_with_open_files_limit(daemon, 1024, monkeypatch)
    await daemon.wait_for_log("webhook.max_connections_lowered")
    idle = await open_idle(daemon, 1100)
    try:
        timeout = aiohttp.ClientTimeout(total=15)
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            for i in range(20):
                async with session.post(f"{daemon.url}/webhook/order", headers=TOKEN,
                                        json=order_event_body(f"o-idle-{i}")) as response:
                    assert response.status == 200, await response.text()
            async with session.get(f"{daemon.admin_url}/metrics") as response:
                text = await response.text()
        assert metric(text, 'tcbridge_webhook_shed_total{reason="idle_evicted"}') >= 20
    finally:
        for writer in idle:
            writer.close()


async def test_slow_headers_and_slow_bodies_are_cut_off(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory({"webhook": {"idle_timeout_s": 1, "body_timeout_s": 1}})
    await daemon.start()

    async def trickle(head: bytes, drip: bytes) -> bytes:
        """Send ``head``, then ``drip`` every 0.1 s for up to 30 s; what the server said
        before it closed the connection."""
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(head)
        try:
            for _ in range(300):
                with contextlib.suppress(TimeoutError):
                    answer = await asyncio.wait_for(reader.read(65536), timeout=0.1)
                    return answer  # an answer, or b"" when closed
                writer.write(drip)
                await writer.drain()
        except ConnectionError:
            return b""
        finally:
            writer.close()
        raise AssertionError("a client trickling bytes for 30 s was never cut off")

    # Slow loris: a request head that never ends (one header, so no header count limit
    # of aiohttp's stops it; its 8 KiB field limit would take 800 s at this pace).
    assert await trickle(b"POST /webhook/order HTTP/1.1\r\nHost: x\r\nX-a: ", b"b") == b""
    # A whole head, then a body one byte at a time: 503 (retry), and the connection closed.
    head = (b"POST /webhook/order HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN_VALUE}\r\n".encode()
            + b"Content-Length: 100000\r\n\r\n{")
    answer = await trickle(head, b" ")
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"Retry-After" in answer
    await daemon.wait_for_log("webhook.body_timeout")
    # An idle connection is closed too; a real webhook still works.
    assert await trickle(b"", b"") == b""
    assert await post(daemon, order_event_body("o-after-slow"))


async def test_a_daemon_without_webhook_auth_refuses_to_start_and_none_is_warned_about(
    daemon_factory: Callable[..., Daemon],
) -> None:
    open_default = daemon_factory({"webhook": {"auth": "none"}}, name="open")
    result = open_default.cli("check-config", expect=2)
    assert "allow_unauthenticated" in result.stderr
    with pytest.raises(AssertionError, match="exited 2"):
        await open_default.start(timeout_s=20)
    explicit = daemon_factory({"webhook": {"auth": "none", "allow_unauthenticated": True}},
                              name="explicit")
    for _ in range(2):  # at every start
        await explicit.start()
        assert await explicit.stop() == 0
    assert len(await explicit.wait_for_log("webhook.auth_disabled", count=2)) == 2
