"""The store's writer thread under faults: a full disk, failing ROLLBACK TO and COMMIT,
a broken connection, a file that cannot be opened yet, and a writer that dies anyway."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tcbridge.config import StoreSettings
from tcbridge.envelope import parse_order_webhook
from tcbridge.errors import StoreUnavailable
from tcbridge.store import Store
from tcbridge.store import sqlite as store_module
from tests.conftest import order_event_body

GUARD_S = 10.0  # a hang fails the test instead of blocking it; no timing is asserted


def big_event(order_id: str, size: int = 120_000) -> Any:
    body = order_event_body(order_id)
    body["orderEvent"]["notes"] = "x" * size
    return parse_order_webhook(body)


async def answers(*calls: Any) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), GUARD_S)


async def fill_up(store: Store) -> None:
    """A real SQLITE_FULL: the file may not grow beyond its current size."""
    def op(conn: sqlite3.Connection) -> None:
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        conn.execute(f"PRAGMA max_page_count = {pages + 1}")

    await store.run(op)


async def free_space(store: Store) -> None:
    await store.run(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))


async def test_full_disk_fails_every_waiter_and_the_writer_survives(store: Store) -> None:
    await store.ingest(big_event("o-before"))
    await fill_up(store)
    results = await answers(*(store.ingest(big_event(f"o{i}")) for i in range(20)))
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    health = store.health()
    assert health.alive and health.errors >= 20
    assert health.last_error is not None and "full" in health.last_error
    await free_space(store)
    result = await asyncio.wait_for(store.ingest(big_event("o-after")), GUARD_S)
    assert result.status == "stored"
    assert store.health().last_error is None
    assert (await store.counts())["events"] == 2


async def test_a_big_event_on_a_full_disk_does_not_fail_small_ones_beside_it(
    store: Store,
) -> None:
    await store.ingest(big_event("o-before"))
    await fill_up(store)
    small = [store.run(lambda conn: conn.execute("SELECT 1").fetchone()) for _ in range(5)]
    results = await answers(store.ingest(big_event("o-big")), *small)
    assert isinstance(results[0], StoreUnavailable)
    assert results[1:] == [(1,)] * 5


class FaultyConnection:
    """A real connection whose ``execute`` raises for chosen statements."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.faults: dict[str, BaseException] = {}
        self.closed = False

    def execute(self, sql: str, *args: Any) -> Any:
        for prefix, error in self.faults.items():
            if sql.startswith(prefix):
                raise error
        return self._conn.execute(sql, *args)

    def close(self) -> None:
        self.closed = True
        self._conn.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.fixture
async def faulty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    connections: list[FaultyConnection] = []
    real_connect = Store._connect

    def connect(self: Store) -> Any:
        conn = FaultyConnection(real_connect(self))
        connections.append(conn)
        return conn

    monkeypatch.setattr(Store, "_connect", connect)
    store = Store(tmp_path / "faulty.db", StoreSettings(busy_timeout_s=0.5))
    await store.open()
    yield store, connections
    await store.close()


def failing_insert(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO cursors VALUES ('x', 'y', 'z')")
    raise sqlite3.OperationalError("database or disk is full")


async def test_rollback_to_raising_answers_everyone_and_keeps_serving(faulty: Any) -> None:
    store, connections = faulty
    connections[-1].faults["ROLLBACK TO"] = sqlite3.OperationalError(
        "no such savepoint: op")
    results = await answers(store.run(failing_insert),
                            *(store.ingest(parse_order_webhook(order_event_body()))
                              for _ in range(3)))
    assert isinstance(results[0], StoreUnavailable)
    assert all(r.status == "stored" for r in results[1:]), results  # run alone, they fit
    connections[-1].faults.clear()
    assert (await store.ingest(parse_order_webhook(order_event_body()))).status == "stored"
    assert store.writer_alive


async def test_commit_failing_gives_unavailable_then_recovers(faulty: Any) -> None:
    store, connections = faulty
    connections[-1].faults["COMMIT"] = sqlite3.OperationalError("database or disk is full")
    results = await answers(*(store.ingest(parse_order_webhook(order_event_body()))
                              for _ in range(3)))
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert "commit failed" in (store.health().last_error or "")
    connections[-1].faults.clear()
    assert (await store.ingest(parse_order_webhook(order_event_body()))).status == "stored"
    assert (await store.counts())["events"] == 1  # nothing of the failed commits holds


async def test_an_unforeseen_error_reopens_the_connection(faulty: Any) -> None:
    store, connections = faulty
    connections[-1].faults["BEGIN"] = RuntimeError("a bug below us")
    results = await answers(store.ingest(parse_order_webhook(order_event_body())))
    assert isinstance(results[0], StoreUnavailable)
    assert connections[0].closed and len(connections) == 1  # reopened on the next batch
    assert (await store.ingest(parse_order_webhook(order_event_body()))).status == "stored"
    assert len(connections) == 2 and store.health().connected


async def test_a_broken_connection_is_reopened(faulty: Any) -> None:
    store, connections = faulty
    error = sqlite3.ProgrammingError("Cannot operate on a closed database.")
    connections[-1].faults.update({"BEGIN": error, "SELECT": error, "ROLLBACK": error})
    results = await answers(store.ingest(parse_order_webhook(order_event_body())))
    assert isinstance(results[0], StoreUnavailable)
    assert (await store.ingest(parse_order_webhook(order_event_body()))).status == "stored"
    assert len(connections) == 2


async def test_a_store_that_cannot_open_yet_answers_unavailable_until_it_can(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "not-yet"
    blocker.write_text("a file where the directory should be")
    store = Store(blocker / "tcbridge.db", StoreSettings())
    await asyncio.wait_for(store.open(keep_trying=True), GUARD_S)
    try:
        results = await answers(store.ingest(parse_order_webhook(order_event_body())))
        assert isinstance(results[0], StoreUnavailable)
        health = store.health()
        assert health.alive and not health.connected and "cannot open" in str(health.last_error)
        blocker.unlink()
        result = await asyncio.wait_for(
            store.ingest(parse_order_webhook(order_event_body())), GUARD_S)
        assert result.status == "stored" and store.health().connected
    finally:
        await store.close()


async def test_a_dying_writer_answers_everyone_and_says_so(
    store_factory: Callable[..., Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Fatal(BaseException):
        pass

    def die(conn: sqlite3.Connection, batch: Any) -> Any:
        raise Fatal

    store = store_factory()
    await store.open()
    monkeypatch.setattr(store_module, "run_batch", die)
    results = await answers(store.ingest(parse_order_webhook(order_event_body())))
    assert isinstance(results[0], StoreUnavailable)
    assert store.failed is not None
    assert "writer" in await asyncio.wait_for(store.failed, GUARD_S)
    assert not store.writer_alive and not store.health().alive
    with pytest.raises(StoreUnavailable, match="writer"):
        await asyncio.wait_for(store.ping(), GUARD_S)
    await store.close()


async def test_only_a_commit_that_wrote_clears_the_last_error(store: Store) -> None:
    await store.ingest(big_event("o-before"))
    await fill_up(store)
    await answers(store.ingest(big_event("o-big")))
    await store.ping()  # commits, but writes nothing: proves nothing about space
    await store.counts()
    assert store.health().last_error is not None
    await free_space(store)
    await store.ingest(big_event("o-after"))
    assert store.health().last_error is None


def rejected_rows(path: Path) -> list[tuple[int, int, str]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT id, length(body), reason FROM rejected ORDER BY id").fetchall()


async def test_rejected_bodies_are_capped_and_the_oldest_dropped(
    store_factory: Callable[..., Store],
) -> None:
    store = store_factory(rejected_body_max_bytes=1000, rejected_max_bytes=10_000)
    async with store:
        ids = [await store.reject(store_module.Rejected(
            source="webhook", reason=f"bad {i}", body=b"x" * 5000)) for i in range(30)]
        kept = rejected_rows(store.path)
        assert all(size == 1000 for _, size, _ in kept)
        assert "body of 5000 bytes cut to 1000" in kept[0][2]
        assert kept[-1][0] == ids[-1]  # the newest stays, the oldest went first
        assert [row[0] for row in kept] == ids[-len(kept):]
        with sqlite3.connect(store.path) as conn:
            assert store_module.rejected_bytes(conn) <= 10_000
        assert store.rejected_truncated == 30
        assert store.rejected_dropped == 30 - len(kept) > 0


async def test_the_rejected_cap_holds_across_a_restart(
    store_factory: Callable[..., Store],
) -> None:
    async with store_factory(rejected_max_bytes=100_000) as store:
        for _ in range(10):
            await store.reject(store_module.Rejected(source="poll", reason="r",
                                                     body=b"y" * 9000))
    async with store_factory(rejected_max_bytes=20_000, rejected_body_max_bytes=9000) as again:
        await again.reject(store_module.Rejected(source="poll", reason="r", body=b"z"))
        with sqlite3.connect(again.path) as conn:
            assert store_module.rejected_bytes(conn) <= 20_000
        assert again.rejected_dropped >= 8
