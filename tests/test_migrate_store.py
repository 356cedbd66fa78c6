"""``tcbridge migrate-store``: a SQLite store copied into an empty PostgreSQL store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tcbridge import logs
from tcbridge.cli import main
from tcbridge.config import FileHandlerSettings, StoreSettings
from tcbridge.dispatch import make_route
from tcbridge.envelope import parse_order_webhook, parse_snapshot
from tcbridge.store import PostgresStore, Rejected, SqliteStore, transfer
from tests.backends import query
from tests.conftest import order_event_body, order_obj
from tests.support import write_config


@pytest.fixture(autouse=True)
def quiet_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI would point the logging at this test's captured stderr, closed after it.
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)


async def fill(path: Path, out: Path) -> dict[str, Any]:
    """A SQLite store with a row in every table; returns what it shows."""
    route = make_route([FileHandlerSettings(name="drop", type="file", directory=out)])
    async with SqliteStore(path, StoreSettings(), route=route) as store:
        body = order_event_body("o1", stamp="2024-05-01T10:00:00.000Z")
        await store.ingest(parse_order_webhook(body))
        await store.ingest(parse_order_webhook(body))  # a duplicate sighting
        await store.ingest(parse_order_webhook(order_event_body(
            "o1", stamp="2024-05-01T11:00:00.000Z")))
        await store.ingest_page("order", [parse_snapshot("order", order_obj(
            "o1", "2024-05-01T09:00:00.000Z"), "poll")], [], "2024-05-01T12:00:00.000Z")
        await store.reject(Rejected(source="webhook", reason="bad", body=b"\x00\xff{"))
        await store.request_fetch("order", "o2")
        await store.record_poll("order", error=None, items=1, stored=0)
        (claim,) = await store.claim("drop", 2)  # the head of o1: one at a time
        await store.finish(claim, "dead", error="gone")
        return {"status": await store.status(), "events": await store.events(),
                "deliveries": await store.deliveries(), "tables": await store.table_counts()}


def config_for(tmp_path: Path, db: Path) -> Path:
    return write_config(tmp_path / "c.toml", {
        "mode": "webhook", "store": {"path": db},
        "webhook": {"auth": "none", "allow_unauthenticated": True}})


def test_a_sqlite_store_is_copied_whole_and_the_counts_match(
    tmp_path: Path, pg_fresh_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "db.sqlite"
    before = asyncio.run(fill(db, tmp_path / "out"))
    assert all(before["tables"].values()), before["tables"]  # every table has a row
    assert main(["migrate-store", "--config", str(config_for(tmp_path, db)),
                 "--to", pg_fresh_dsn]) == 0
    out = capsys.readouterr().out
    assert "every count matches" in out and 'backend = "postgresql"' in out

    async def after() -> dict[str, Any]:
        settings = StoreSettings(backend="postgresql", dsn=pg_fresh_dsn)
        async with PostgresStore(pg_fresh_dsn, settings) as store:
            seen = {"status": await store.status(), "events": await store.events(),
                    "deliveries": await store.deliveries(),
                    "tables": await store.table_counts()}
            # the dedup keys came along: the old event again is a duplicate
            again = await store.ingest(parse_order_webhook(order_event_body(
                "o1", stamp="2024-05-01T10:00:00.000Z")))
            new = await store.ingest(parse_order_webhook(order_event_body("o9")))
            seen["again"], seen["new"] = again.status, new.status
            seen["seqs"] = await query(store, "SELECT max(seq) FROM events")
            seen["body"] = await query(store, "SELECT body FROM rejected")
            return seen

    seen = asyncio.run(after())
    for key in ("status", "events", "deliveries", "tables"):
        assert seen[key] == before[key], key
    assert (seen["again"], seen["new"]) == ("duplicate", "stored")
    assert seen["seqs"] == [(len(before["events"]) + 1,)]  # the sequences moved past the copy
    assert seen["body"] == [(b"\x00\xff{",)]


def test_a_target_that_is_not_empty_is_refused(
    tmp_path: Path, pg_fresh_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "db.sqlite"
    asyncio.run(fill(db, tmp_path / "out"))
    config = str(config_for(tmp_path, db))
    assert main(["migrate-store", "--config", config, "--to", pg_fresh_dsn]) == 0
    capsys.readouterr()
    assert main(["migrate-store", "--config", config, "--to", pg_fresh_dsn]) == 1
    err = capsys.readouterr().err
    assert "is not empty" in err and "events: 2 rows" in err


def test_a_missing_sqlite_store_or_a_wrong_target_is_refused(
    tmp_path: Path, pg_fresh_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(config_for(tmp_path, tmp_path / "missing.sqlite"))
    assert main(["migrate-store", "--config", config, "--to", pg_fresh_dsn]) == 1
    assert "no SQLite store at" in capsys.readouterr().err
    assert not (tmp_path / "missing.sqlite").exists()
    assert main(["migrate-store", "--config", config, "--to", "mysql://x"]) == 2
    assert "expected postgresql://" in capsys.readouterr().err


def test_a_copy_that_does_not_add_up_leaves_the_target_empty(
    tmp_path: Path, pg_fresh_dsn: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = tmp_path / "db.sqlite"
    asyncio.run(fill(db, tmp_path / "out"))
    real = transfer.sqlite.table_counts
    monkeypatch.setattr(transfer.sqlite, "table_counts",
                        lambda conn: real(conn) | {"events": 99})
    assert main(["migrate-store", "--config", str(config_for(tmp_path, db)),
                 "--to", pg_fresh_dsn]) == 1
    assert "events: 99 in SQLite, 2 copied" in capsys.readouterr().err

    async def counts() -> dict[str, int]:
        settings = StoreSettings(backend="postgresql", dsn=pg_fresh_dsn)
        async with PostgresStore(pg_fresh_dsn, settings) as store:
            return await store.table_counts()

    assert set(asyncio.run(counts()).values()) == {0}  # rolled back whole
