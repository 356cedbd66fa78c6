"""Logging never changes an answer: a broken sink drops lines; floods are cut to a count;
colour codes only on a terminal."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from tcbridge.logs import SafeStream, Throttle
from tests.conftest import DAEMON_ENV, Daemon, order_event_body

TOKEN = {"Authorization": "Bearer hook-token-1-for-tests-0123456789ab"}


def broken_pipe() -> Any:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    return os.fdopen(write_fd, "w", buffering=1)


def test_a_broken_pipe_drops_lines_instead_of_raising() -> None:
    stream = broken_pipe()
    sink = SafeStream(stream)
    assert sink.write("a line\n") == len("a line\n")
    sink.flush()
    assert sink.dropped >= 1 and sink.detached
    sink.write("later lines go to /dev/null\n")
    sink.flush()
    stream.close()  # the final flush does not fail either


def test_a_closed_stream_drops_lines() -> None:
    stream = broken_pipe()
    stream.close()
    sink = SafeStream(stream)
    sink.write("x\n")
    sink.flush()
    assert sink.dropped == 2 and not sink.isatty()


def test_repeated_warnings_are_cut_to_a_burst_and_a_count() -> None:
    now = [0.0]
    throttle = Throttle(burst=3, interval_s=60, clock=lambda: now[0])

    def log(event: str, level: str = "warning") -> dict[str, Any] | None:
        try:
            return dict(throttle(None, level, {"event": event, "level": level}))
        except structlog.DropEvent:
            return None

    passed = [log("webhook.auth_failed") for _ in range(100)]
    assert sum(p is not None for p in passed) == 3
    assert log("webhook.other") is not None  # counted per event name
    assert all(log("webhook.info", "info") is not None for _ in range(10))  # info passes
    now[0] = 61.0
    line = log("webhook.auth_failed")
    assert line is not None and line["suppressed"] == 97
    assert log("webhook.auth_failed") is not None and "suppressed" not in (
        log("webhook.auth_failed") or {"suppressed": 1})


def test_console_output_has_no_colour_codes_in_a_pipe() -> None:
    code = ("from tcbridge import logs; import structlog; logs.configure('info', 'console');"
            "structlog.get_logger().warning('hello', key='value')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert "hello" in done.stdout and "\x1b[" not in done.stdout


async def test_a_daemon_whose_stdout_is_a_broken_pipe_still_answers_200(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = daemon_factory({"handlers": [
        {"name": "drop", "type": "file", "directory": str(tmp_path / "out")}]})
    proc = subprocess.Popen(
        [sys.executable, "-m", "tcbridge", "run", "--config", str(daemon.config_path),
         "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ | DAEMON_ENV)
    assert proc.stdout is not None
    proc.stdout.close()  # every log line from now on meets a broken pipe
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"{daemon.admin_url}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("daemon never came up")
            statuses = []
            for i in range(5):
                async with session.post(f"{daemon.url}/webhook/order", headers=TOKEN,
                                        json=order_event_body(f"o-pipe-{i}")) as response:
                    statuses.append(response.status)
            async with session.post(f"{daemon.url}/webhook/order", json={},
                                    headers={"Authorization": "Bearer wrong"}) as response:
                statuses.append(response.status)
        assert statuses == [200] * 5 + [401]
        for _ in range(200):  # and the deliveries are done, not failed by their log lines
            if len(list((tmp_path / "out").glob("*.json"))) == 5:
                break
            await asyncio.sleep(0.05)
        assert len(list((tmp_path / "out").glob("*.json"))) == 5
    finally:
        proc.terminate()
        code = await asyncio.to_thread(proc.wait, 20)
    assert code == 0


def test_cli_warnings_into_a_pipe_have_no_colour_codes(tmp_path: Path) -> None:
    from tests.support import write_config

    config = write_config(tmp_path / "c.toml", {
        "mode": "poll", "store": {"path": "db.sqlite"},
        "tradecloud": {"base_url": "http://127.0.0.1:9", "username": "u", "password": "p",
                       "max_retries": 1, "retry_initial_s": 0.01, "retry_max_s": 0.02},
        "poll": {"kinds": ["order"]}})
    done = subprocess.run(
        [sys.executable, "-m", "tcbridge", "backfill", "--since", "2024-01-01T00:00:00Z",
         "--config", str(config)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "tradecloud.retry" in done.stderr and "http://127.0.0.1:9" in done.stderr
    assert "\x1b[" not in done.stderr + done.stdout


async def test_a_flood_of_401s_is_cut_to_a_burst_of_log_lines(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory({"log": {"level": "info", "repeat_burst": 5,
                                     "repeat_interval_s": 3600}})
    await daemon.start()
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.post(f"{daemon.url}/webhook/order", json={},
                                    headers={"Authorization": "Bearer wrong"}) as response:
                assert response.status == 401
        async with session.post(f"{daemon.url}/webhook/order", headers=TOKEN,
                                json=order_event_body("o-after-flood")) as response:
            assert response.status == 200
    await daemon.wait_for_log("webhook.stored")
    assert len([line for line in daemon.logs() if line.get("event") == "webhook.auth_failed"]) == 5
    assert await daemon.stop() == 0


def test_a_log_line_is_one_write_with_its_newline() -> None:
    """Unbuffered (PYTHONUNBUFFERED), every write is a syscall on the event loop: one per
    line, not the line and its newline apart."""
    import io

    from tcbridge import logs

    class Recorder(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return len(text)

    recorder = Recorder()
    try:
        logs.configure("info", "json", recorder)
        structlog.get_logger("t").info("webhook.stored", event_id="e1")
    finally:
        structlog.reset_defaults()
    assert len(recorder.writes) == 1
    assert recorder.writes[0].endswith("}\n") and '"event_id":"e1"' in recorder.writes[0]
