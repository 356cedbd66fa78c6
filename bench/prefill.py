"""Pre-fill a store with N delivered events, in bulk, for the dedup-at-scale benchmark.

Ingesting a million events one by one through ``tcbridge.store.ingest_one`` takes minutes on
a small machine, so the store is seeded and then multiplied:

1. ``seed`` realistic events (the same bodies the load uses) go through the store's own
   ``migrate`` and ``ingest_one`` with one handler routed, so every row (events, entities,
   deliveries, and whatever columns the schema has by then) is exactly what tcbridge writes;
2. the rows are copied in SQL until there are N events, each copy with a new random event
   id and entity id (so the unique indexes get realistic random keys), its own entities row
   and delivery; every delivery is then marked done, as in a store that has been running.

Copies keep the seed's envelope text, so their payloads do not match their new ids: nothing
reads them here (their deliveries are done), only their size and the indexes matter.
"""

# SQL text below is built from PRAGMA table_info column names and integers, never input.
# ruff: noqa: S608

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from bench.bodies import BodyMaker
from tcbridge.envelope import parse_order_webhook
from tcbridge.store import ingest_one, migrate
from tcbridge.timefmt import utc_now_iso

NEW_ID = "lower(hex(randomblob(16)))"


def prefill(path: Path, count: int, templates: Sequence[str], handler: str,
            *, seed: int = 2000, chunk: int = 50_000) -> float:
    """Create ``path`` holding ``count`` delivered events; returns the seconds it took."""
    started = time.perf_counter()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # Set-up only: no journal and no fsync while filling; the daemon uses WAL and FULL.
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -500000")
        migrate(conn)
        _seed(conn, min(seed, count), templates, handler)
        conn.execute("UPDATE deliveries SET status = 'done', attempts = 1,"
                     " finished_at = created_at")
        _multiply(conn, count, chunk)
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()
    return time.perf_counter() - started


def _seed(conn: sqlite3.Connection, count: int, templates: Sequence[str], handler: str) -> None:
    maker = BodyMaker(list(templates), "prefill0", 0xFFF)
    received_at = utc_now_iso()
    conn.execute("BEGIN")
    for _ in range(count):
        candidate = parse_order_webhook(json.loads(maker.next()[1]))
        ingest_one(conn, candidate, received_at, lambda envelope: [handler])
    conn.execute("COMMIT")


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def _multiply(conn: sqlite3.Connection, count: int, chunk: int) -> None:
    """Copy the seed events (with new ids) until there are ``count``."""
    seed_max = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    total = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    event_cols = [c for c in _columns(conn, "events") if c != "seq"]
    exprs = [{"id": NEW_ID, "entity_id": "'pf-' || " + NEW_ID}.get(c, c) for c in event_cols]
    delivery_cols = [c for c in _columns(conn, "deliveries") if c != "id"]
    while total < count:
        n = min(chunk, count - total)
        conn.execute("BEGIN")
        last = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
        # Seed rows, repeated as often as needed to make n copies.
        conn.execute(
            f"INSERT INTO events ({', '.join(event_cols)})"
            f" SELECT {', '.join(exprs)} FROM events"
            f" JOIN (WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k"
            f"   WHERE i < {-(-n // seed_max)}) SELECT i FROM k)"
            f" WHERE seq <= {seed_max} LIMIT {n}"
        )
        conn.execute(
            "INSERT INTO entities (kind, entity_id, newest_us, newest_last_updated_at)"
            " SELECT kind, entity_id, instant_us, last_updated_at FROM events"
            f" WHERE seq > {last} AND instant_us IS NOT NULL"
        )
        template = {c: c for c in delivery_cols} | {
            "event_seq": "e.seq", "event_id": "e.id", "entity_id": "e.entity_id"}
        source = ", ".join(
            template[c] if c in ("event_seq", "event_id", "entity_id") else f"d.{c}"
            for c in delivery_cols)
        conn.execute(
            f"INSERT INTO deliveries ({', '.join(delivery_cols)})"
            f" SELECT {source} FROM events e"
            " JOIN deliveries d ON d.id = (SELECT min(id) FROM deliveries)"
            f" WHERE e.seq > {last}"
        )
        conn.execute("COMMIT")
        total += n
