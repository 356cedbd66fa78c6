"""End to end: the real daemon in a subprocess, real HTTP, a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable

import aiohttp

from tests.conftest import Daemon, order_event_body

TOKEN = {"Authorization": "Bearer hook-token-1"}


def query(daemon: Daemon, sql: str) -> list[tuple[object, ...]]:
    path = daemon.config_path.parent / "tcbridge.db"
    with sqlite3.connect(path, timeout=5) as conn:
        return conn.execute(sql).fetchall()


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
