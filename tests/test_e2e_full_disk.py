"""The real daemon with its store on a small filesystem (a tmpfs with size=): large events
until the disk is full, then space back. Every request is answered within seconds, 503
while full, 200 again once space is freed, and nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import sqlite3
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Daemon, order_event_body

TOKEN = {"Authorization": "Bearer hook-token-1-for-tests-0123456789ab"}
ANSWER_WITHIN_S = 10.0  # a hang fails the test; no timing is asserted
EVENT_BYTES = 150_000


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs mounted under tmp_path, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    """Write zeros into ``path`` until the filesystem is full."""
    chunk = b"\0" * 65536
    with path.open("wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    with contextlib.suppress(OSError):
        os.truncate(path, path.stat().st_size)


def big_event(order_id: str) -> dict[str, Any]:
    body = order_event_body(order_id)
    body["orderEvent"]["notes"] = uuid.uuid4().hex * (EVENT_BYTES // 32)
    return body


async def post(session: aiohttp.ClientSession, daemon: Daemon, body: object) -> int:
    async with session.post(f"{daemon.url}/webhook/order", json=body, headers=TOKEN) as r:
        await r.read()
        return r.status


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


def stored_ids(db: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        return {row[0] for row in conn.execute("SELECT entity_id FROM events")}


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ANSWER_WITHIN_S))


async def test_full_disk_gives_503_then_200_when_space_is_back(
    daemon_factory: Callable[..., Daemon], small_fs: Path
) -> None:
    ballast = small_fs / "ballast"
    ballast.write_bytes(b"\0" * 1_500_000)
    db = small_fs / "tcbridge.db"
    daemon = daemon_factory({"store": {"path": str(db)}})
    await daemon.start()
    acknowledged: list[str] = []
    async with session() as client:
        statuses: list[int] = []
        # Concurrent posts share transactions of several MB: SQLite then spills pages
        # while an operation runs, and SQLITE_FULL hits inside a savepoint.
        for round_ in range(8):  # 6 MiB hold about 40 of these
            ids = [f"o-{round_}-{i}" for i in range(20)]
            answers = await asyncio.gather(*(post(client, daemon, big_event(i)) for i in ids))
            statuses += answers
            acknowledged += [i for i, status in zip(ids, answers, strict=True) if status == 200]
            if 503 in answers:
                break
        assert 503 in statuses and set(statuses) <= {200, 503}, statuses
        for i in range(60):  # one at a time, until not even one more fits
            status = await post(client, daemon, big_event(f"o-single-{i}"))
            assert status in (200, 503)
            if status == 503:
                break
            acknowledged.append(f"o-single-{i}")
        assert status == 503
        # Still full: more large events get 503, and every endpoint answers.
        assert [await post(client, daemon, big_event(f"x-{i}")) for i in range(5)] == [503] * 5
        status, body = await get(client, f"{daemon.admin_url}/readyz")
        assert status == 503, body
        assert any("store" in reason for reason in json.loads(body)["reasons"])
        status, text = await get(client, f"{daemon.admin_url}/metrics")
        assert status == 200 and "tcbridge_store_errors_total" in text
        assert 'tcbridge_webhook_responses_total{status="503"}' in text
        # Space comes back: ingest resumes, no restart.
        ballast.unlink()
        assert await post(client, daemon, big_event("o-after")) == 200
        acknowledged.append("o-after")
        assert (await get(client, f"{daemon.admin_url}/readyz"))[0] == 200
    assert await daemon.stop() == 0
    assert set(acknowledged) <= stored_ids(db)


async def test_a_daemon_started_on_a_full_disk_answers_503_until_it_can_write(
    daemon_factory: Callable[..., Daemon], small_fs: Path
) -> None:
    ballast = small_fs / "ballast"
    fill(ballast)
    db = small_fs / "tcbridge.db"
    daemon = daemon_factory({"store": {"path": str(db)}})
    await daemon.start()
    async with session() as client:
        assert await post(client, daemon, order_event_body("o-1")) == 503
        status, body = await get(client, f"{daemon.admin_url}/readyz")
        assert status == 503 and "store" in body
        ballast.unlink()
        await daemon.wait_for_log("tcbridge.started")
        for _ in range(50):  # the writer retries opening every second
            status = await post(client, daemon, order_event_body("o-2"))
            if status == 200:
                break
            assert status == 503
            await asyncio.sleep(0.2)
        assert status == 200
    assert await daemon.stop() == 0
    assert "o-2" in stored_ids(db)
