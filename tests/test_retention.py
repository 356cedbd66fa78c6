"""Retention: payloads purged after delivery, dedup keys kept longer, the file bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tcbridge import logs
from tcbridge.cli import main
from tcbridge.config import FileHandlerSettings, StoreSettings
from tcbridge.dispatch import make_route
from tcbridge.envelope import parse_order_webhook
from tcbridge.errors import StoreError
from tcbridge.retention import policy, purge_all
from tcbridge.store import Rejected, Retention, Store
from tests.backends import query, store_config
from tests.conftest import order_event_body
from tests.support import write_config

LONG_AGO = "2001-01-01T00:00:00.000Z"


pytestmark = pytest.mark.backends()


async def ingest(store: Store, entity: str) -> str:
    body = order_event_body(entity, stamp="2024-05-01T10:00:00.000Z")
    return (await store.ingest(parse_order_webhook(body))).event_id


async def test_payloads_go_keys_stay_then_rows_go(store: Store) -> None:
    first = await ingest(store, "o1")
    await ingest(store, "o1")  # a duplicate sighting
    await store.reject(Rejected(source="webhook", reason="bad"))
    await query(store, "UPDATE events SET received_at = ?", LONG_AGO)
    await query(store, "UPDATE sightings SET received_at = ?", LONG_AGO)
    await query(store, "UPDATE rejected SET received_at = ?", LONG_AGO)
    keep_keys = Retention(payload_days=30, dedup_days=1e9)
    totals = await purge_all(store, keep_keys)
    assert totals["payloads"] == 1 and totals["events"] == 0 and totals["rejected"] == 1
    assert await query(store, "SELECT id, envelope FROM events") == [(first, None)]
    again = await store.ingest(parse_order_webhook(order_event_body(
        "o1", stamp="2024-05-01T10:00:00.000Z")))
    assert again.status == "duplicate"  # a late duplicate is still recognised
    totals = await purge_all(store, Retention(payload_days=30, dedup_days=30))
    assert totals["events"] == 1
    assert await query(store, "SELECT count(*) FROM events") == [(0,)]


async def test_undelivered_and_dead_events_keep_their_payload(
    store_factory: Callable[..., Store], tmp_path: Any
) -> None:
    handler = FileHandlerSettings(name="drop", type="file", directory=tmp_path / "out")
    store = store_factory()
    store._route = make_route([handler])
    async with store:
        await ingest(store, "pending")
        await ingest(store, "dead")
        await ingest(store, "done")
        await query(store, "UPDATE deliveries SET status = 'dead' WHERE entity_id = 'dead'")
        await query(store, "UPDATE deliveries SET status = 'done' WHERE entity_id = 'done'")
        await query(store, "UPDATE events SET received_at = ?", LONG_AGO)
        await purge_all(store, Retention(payload_days=1, dedup_days=1))
        rows = await query(store, "SELECT entity_id, envelope IS NULL FROM events ORDER BY seq")
        assert rows == [("pending", 0), ("dead", 0)]
        assert await query(store, "SELECT entity_id FROM deliveries ORDER BY id") == [
            ("pending",), ("dead",)]


async def test_recent_rows_are_kept(store: Store) -> None:
    await ingest(store, "o1")
    assert await purge_all(store, policy(StoreSettings())) == {
        "payloads": 0, "events": 0, "sightings": 0, "rejected": 0, "fetches": 0}
    assert await query(store, "SELECT envelope IS NOT NULL FROM events") == [(1,)]


@pytest.mark.sqlite_only("the SQLite file's size; PostgreSQL reuses space by autovacuum")
async def test_file_size_stays_bounded_under_constant_load(store: Store) -> None:
    sizes = []
    for round_number in range(8):
        for i in range(400):  # the same orders change again and again
            await store.ingest(parse_order_webhook(order_event_body(
                f"o{i}", stamp=f"2024-05-01T10:00:{round_number:02d}.000Z")))
        await query(store, "UPDATE events SET received_at = ?", LONG_AGO)
        await purge_all(store, Retention(payload_days=1, dedup_days=1, batch=100))
        await query(store, "PRAGMA wal_checkpoint(TRUNCATE)")
        sizes.append(store.path.stat().st_size)
    assert await query(store, "SELECT count(*) FROM events") == [(0,)]
    # Freed pages are reused: no growth. (The entities table keeps one row per order, so
    # it grows with the number of orders, not with the number of events.)
    assert sizes[-1] <= sizes[1] * 1.05, sizes


async def test_open_or_dead_deliveries_keep_the_row_of_a_purged_event(
    store_factory: Callable[..., Store], tmp_path: Any
) -> None:
    """Deliveries of an event whose payload is already gone (a replay queued before the fix,
    or by an older version) are not deleted with the event whatever their status."""
    handler = FileHandlerSettings(name="drop", type="file", directory=tmp_path / "out")
    store = store_factory()
    store._route = make_route([handler])
    async with store:
        for entity in ("pending", "running", "dead", "done"):
            await ingest(store, entity)
        await query(store, "UPDATE deliveries SET status = 'done'")
        await query(store, "UPDATE events SET received_at = ?", LONG_AGO)
        assert (await purge_all(store, Retention(payload_days=1, dedup_days=1e9)))[
            "payloads"] == 4
        for status in ("pending", "running", "dead"):
            await query(store, "UPDATE deliveries SET status = ? WHERE entity_id = ?",
                        status, status)
        totals = await purge_all(store, Retention(payload_days=1, dedup_days=1))
        assert totals["events"] == 1
        assert await query(store, "SELECT entity_id, status FROM deliveries ORDER BY id") == [
            ("pending", "pending"), ("running", "running"), ("dead", "dead")]
        assert len(await query(store, "SELECT seq FROM events")) == 3


async def test_replaying_a_purged_event_says_why_it_cannot(store: Store) -> None:
    event_id = await ingest(store, "o1")
    await query(store, "UPDATE events SET received_at = ?", LONG_AGO)
    await purge_all(store, Retention(payload_days=1, dedup_days=1e9))
    with pytest.raises(StoreError, match="payload was purged by retention"):
        await store.replay(event_id, ["drop"])
    assert await query(store, "SELECT count(*) FROM deliveries") == [(0,)]


def test_cli_replay_of_a_purged_event_exits_non_zero_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    store_factory: Callable[..., Store],
) -> None:
    # The CLI would point the logging at this test's captured stderr, closed after it.
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    store = store_factory("db.sqlite")

    async def prepare() -> str:
        async with store:
            event_id = await ingest(store, "o1")
            await query(store, "UPDATE events SET received_at = ?", LONG_AGO)
            await purge_all(store, Retention(payload_days=1, dedup_days=1e9))
            return event_id

    event_id = asyncio.run(prepare())
    config = write_config(tmp_path / "c.toml", {"mode": "webhook", "store": store_config(store),
                                                "webhook": {"auth": "none",
                                                            "allow_unauthenticated": True}})
    code = main(["replay", "--event", event_id, "--config", str(config)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"event {event_id!r} cannot be replayed: its payload was purged" in err


@pytest.mark.sqlite_only("SQLite's own schema versions and query plans")
def test_migration_7_keeps_the_rows_and_retention_walks_the_payload_index(
        tmp_path: Path) -> None:
    """A store at schema 6 with events in it: migration 7 swaps the received_at index of
    held payloads for one on seq; no row changes, and the payload purge reads the new
    index, oldest first, never the purged rows."""
    import sqlite3

    from tcbridge.store.sqlite import MIGRATIONS, ingest_one, migrate, purge_batch

    conn = sqlite3.connect(tmp_path / "v6.db", isolation_level=None)
    for number, statements in enumerate(MIGRATIONS[:6], start=1):
        for statement in statements:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
    conn.execute("BEGIN")
    ids = [ingest_one(conn, parse_order_webhook(order_event_body(f"o{i}")), LONG_AGO,
                      lambda envelope: []).event_id for i in range(5)]
    conn.execute("COMMIT")
    conn.execute("UPDATE events SET envelope = NULL WHERE id = ?", (ids[0],))  # purged
    before = conn.execute("SELECT * FROM events ORDER BY seq").fetchall()
    assert migrate(conn) == len(MIGRATIONS) and len(MIGRATIONS) >= 7
    assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "events_payload_seq" in names and "events_payload_age" not in names
    assert conn.execute("SELECT * FROM events ORDER BY seq").fetchall() == before
    plan = " ".join(str(row[3]) for row in conn.execute(
        "EXPLAIN QUERY PLAN SELECT seq FROM events WHERE envelope IS NOT NULL AND seq <= ?"
        " ORDER BY seq LIMIT 2", (10,)))
    assert "events_payload_seq" in plan
    conn.execute("BEGIN")
    done = purge_batch(conn, Retention(payload_days=30, dedup_days=1e9, batch=2), 2e9)
    conn.execute("COMMIT")
    assert done["payloads"] == 2
    held = [row[0] for row in conn.execute(
        "SELECT id FROM events WHERE envelope IS NOT NULL ORDER BY seq")]
    assert held == ids[3:]  # the two oldest still held went first
    conn.close()
