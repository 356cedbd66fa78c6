"""End to end: the real daemon in a subprocess, real HTTP, a real store (a SQLite file or
a PostgreSQL database)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Daemon, order_event_body

TOKEN = {"Authorization": "Bearer hook-token-1-for-tests-0123456789ab"}


pytestmark = pytest.mark.backends()


def query(daemon: Daemon, sql: str) -> list[tuple[object, ...]]:
    return daemon.rows(sql)


async def test_posted_event_is_stored_once_and_duplicate_recorded(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory({})
    await daemon.start()
    body = order_event_body("o-e2e-1")
    async with aiohttp.ClientSession() as session:
        for expected in ("stored", "duplicate"):
            async with session.post(f"{daemon.url}/webhook/order", json=body,
                                    headers=TOKEN) as response:
                assert response.status == 200
                assert (await response.json())["status"] == expected
    assert await daemon.stop() == 0
    assert query(daemon, "SELECT entity_id, source FROM events") == [("o-e2e-1", "webhook")]
    assert query(daemon, "SELECT reason, source FROM sightings") == [("duplicate", "webhook")]


@pytest.mark.sqlite_only("locks the SQLite file from another process")
async def test_bad_json_wrong_credentials_and_locked_store(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory({})
    await daemon.start()
    url = f"{daemon.url}/webhook/order"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=b'{"eventName": ', headers=TOKEN) as response:
            assert response.status == 400
            assert "malformed JSON" in (await response.json())["message"]
        async with session.post(url, json=order_event_body(),
                                headers={"Authorization": "Bearer nope"}) as response:
            assert response.status == 401
            assert "WWW-Authenticate" in response.headers
        blocker = sqlite3.connect(daemon.config_path.parent / "tcbridge.db",
                                  isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        try:
            async with session.post(url, json=order_event_body("o-locked"),
                                    headers=TOKEN) as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "1"
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        async with session.post(url, json=order_event_body("o-locked"),
                                headers=TOKEN) as response:
            assert response.status == 200  # the sender's retry succeeds
    assert await daemon.stop() == 0
    assert query(daemon, "SELECT body FROM rejected") == [(b'{"eventName": ',)]
    assert query(daemon, "SELECT entity_id FROM events") == [("o-locked",)]


async def test_sigterm_stops_cleanly_with_exit_zero(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory({})
    await daemon.start()
    assert await daemon.stop() == 0
    await daemon.wait_for_log("tcbridge.stopped")


async def test_concurrent_posts_are_all_stored(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory({})
    await daemon.start()
    bodies = [order_event_body(f"o-c-{i}") for i in range(200)]
    async with aiohttp.ClientSession() as session:

        async def post(body: dict[str, object]) -> int:
            async with session.post(f"{daemon.url}/webhook/order", json=body,
                                    headers=TOKEN) as response:
                return response.status

        statuses = await asyncio.gather(*(post(b) for b in bodies))
    assert set(statuses) == {200}
    await daemon.kill()  # every 200 was on disk before it was sent
    assert query(daemon, "SELECT count(*) FROM events") == [(200,)]


async def test_tls_listener(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    daemon = daemon_factory({"webhook": {"tls_cert": str(cert), "tls_key": str(key)}})
    await daemon.start()
    context = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession() as session:
        url = f"https://127.0.0.1:{daemon.port}/webhook/order"
        async with session.post(url, json=order_event_body(), headers=TOKEN,
                                ssl=context) as response:
            assert response.status == 200
        with pytest.raises(aiohttp.ClientError):  # plain HTTP is not answered
            async with session.post(f"{daemon.url}/webhook/order", json={}, headers=TOKEN):
                pass
    assert await daemon.stop() == 0


async def test_port_in_use_exits_1_with_a_message(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory({})
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", daemon.port)
    try:
        result = daemon.cli("run", expect=1)
    finally:
        blocker.close()
    assert "cannot start" in result.stderr and str(daemon.port) in result.stderr


async def test_events_and_cursor_commands(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory({})
    await daemon.start()
    async with aiohttp.ClientSession() as session:
        for entity in ("o-1", "o-2", "o-1"):
            body = order_event_body(entity, stamp="2024-05-01T10:00:00.000Z")
            async with session.post(f"{daemon.url}/webhook/order", json=body,
                                    headers=TOKEN) as response:
                assert response.status == 200
    events = [json.loads(line) for line in daemon.cli("events", "--json").stdout.splitlines()]
    assert [e["entityId"] for e in events] == ["o-2", "o-1"]
    assert [e["duplicates"] for e in events] == [0, 1]
    only = daemon.cli("events", "--entity", "o-2", "--limit", "5").stdout
    assert only.splitlines()[0].split()[:2] == ["seq", "id"] and len(only.splitlines()) == 2
    assert "order" in daemon.cli("cursor").stdout
    daemon.cli("cursor", "--set", "order=2024-02-01T00:00:00.000Z")
    assert "2024-02-01T00:00:00.000Z" in daemon.cli("cursor").stdout
    assert query(daemon, "SELECT value FROM cursors") == [("2024-02-01T00:00:00.000Z",)]
    bad = daemon.cli("cursor", "--set", "order=yesterday", expect=2)
    assert "not an ISO 8601" in bad.stderr
    assert await daemon.stop() == 0
