"""``tcbridge migrate-store``: copy a SQLite store into an empty PostgreSQL store.

Every table is copied as it is (the PostgreSQL schema mirrors SQLite's columns), with its
row ids, in one PostgreSQL transaction: the counts per table are compared before COMMIT,
so a copy that does not add up leaves the target empty. The daemon must be stopped while
it runs (the source must not change under the copy)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from tcbridge.config import StoreSettings, redact_dsn
from tcbridge.errors import StoreError
from tcbridge.store import postgres, sqlite

# Parents before children (deliveries reference events, attempts reference deliveries).
TABLES = ("events", "sightings", "entities", "cursors", "rejected", "fetch_requests",
          "deliveries", "delivery_attempts", "poll_state")
IDENTITIES = {"events": "seq", "sightings": "id", "rejected": "id", "fetch_requests": "id",
              "deliveries": "id", "delivery_attempts": "id"}
CHUNK_ROWS = 5000


@dataclass(frozen=True, slots=True)
class TableCopy:
    """One table's rows in the source and, after the copy, in the target."""

    table: str
    source_rows: int
    target_rows: int


async def migrate_store(source: Path, dsn: str, settings: StoreSettings) -> list[TableCopy]:
    """Copy the SQLite store at ``source`` into the empty PostgreSQL database at ``dsn``."""
    if not await asyncio.to_thread(source.exists):  # never create an empty one to copy
        raise StoreError(f"no SQLite store at {source}")
    async with sqlite.Store(source, settings):  # brings an older file to the current schema
        pass
    db = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        conn = await _connect(dsn)
        try:
            return await _copy_all(db, conn, dsn)
        finally:
            await conn.close()
    finally:
        db.close()


async def _connect(dsn: str) -> asyncpg.Connection:
    try:
        conn = await asyncpg.connect(dsn, timeout=postgres.CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise StoreError(f"cannot connect to {redact_dsn(dsn)}: {e}") from e
    try:
        await postgres.migrate(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


async def _copy_all(db: sqlite3.Connection, conn: asyncpg.Connection, dsn: str) -> list[TableCopy]:
    filled = {t: n for t, n in (await postgres.table_counts(conn)).items() if n}
    if filled:
        raise StoreError(f"the target {redact_dsn(dsn)} is not empty ("
                         + ", ".join(f"{t}: {n} rows" for t, n in filled.items())
                         + "); migrate-store only fills an empty store")
    async with conn.transaction():
        for table in TABLES:
            await _copy_table(db, conn, table)
        for table, column in IDENTITIES.items():
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'),"  # noqa: S608
                f" coalesce(max({column}), 0) + 1, false) FROM {table}")
        copies = [TableCopy(t, n, (await postgres.table_counts(conn))[t])
                  for t, n in sqlite.table_counts(db).items()]
        wrong = [c for c in copies if c.source_rows != c.target_rows]
        if wrong:  # raising here rolls the whole copy back
            raise StoreError("the copy does not add up: " + ", ".join(
                f"{c.table}: {c.source_rows} in SQLite, {c.target_rows} copied" for c in wrong))
    return copies


async def _copy_table(db: sqlite3.Connection, conn: asyncpg.Connection, table: str) -> None:
    columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
    types: dict[str, str] = {row[0]: row[1] for row in await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = $1", table)}
    kinds = [types[c] for c in columns]
    for chunk in _chunks(db.execute(f"SELECT {', '.join(columns)} FROM {table}")):  # noqa: S608
        await conn.copy_records_to_table(
            table, records=[_convert(row, kinds) for row in chunk], columns=columns)


def _chunks(cursor: sqlite3.Cursor) -> Iterator[list[tuple[Any, ...]]]:
    while True:
        rows = cursor.fetchmany(CHUNK_ROWS)
        if not rows:
            return
        yield rows


def _convert(row: Sequence[Any], kinds: Sequence[str]) -> tuple[Any, ...]:
    """A SQLite row as PostgreSQL's column types take it (SQLite stores what it is given)."""
    return tuple(_value(value, kind) for value, kind in zip(row, kinds, strict=True))


def _value(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "double precision":
        return float(value)
    if kind in ("bigint", "integer"):
        return int(value)
    if kind == "bytea":
        return value if isinstance(value, bytes) else str(value).encode()
    text = value if isinstance(value, str) else str(value)
    return text.replace("\x00", "\\x00")  # PostgreSQL text holds no NUL character
