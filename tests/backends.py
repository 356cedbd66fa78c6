"""Both store backends for the tests (and the benchmarks): PostgreSQL databases of our own
on the machine's server, and backend-neutral raw reads into a store.

PostgreSQL: ``postgresql://postgres@127.0.0.1:5432/postgres`` (trust auth; override with
``TCBRIDGE_TEST_PG``). A test database is ``tcb_test_<random>``, dropped at the end."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import re
import secrets
import sqlite3
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg

from tcbridge.store import PostgresStore, SqliteStore, StoreBackend
from tcbridge.store.postgres import TABLES

ADMIN_DSN = os.environ.get("TCBRIDGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ("sqlite", "postgresql")
T = TypeVar("T")


def dsn_for(database: str) -> str:
    """The admin DSN pointed at another database."""
    return ADMIN_DSN.rsplit("/", 1)[0] + "/" + database


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end from sync code, even under a running loop (a thread)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def server_problem() -> str | None:
    """Why no PostgreSQL test can run here, or None when the server answers."""
    try:
        run_sync(_admin("SELECT 1"))
    except (TimeoutError, OSError, asyncpg.PostgresError) as e:
        return f"no PostgreSQL server at {ADMIN_DSN}: {e}"
    return None


async def create_database(prefix: str = "tcb_test") -> str:
    """A new, empty database; returns its DSN."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    await _admin(f'CREATE DATABASE "{name}"')
    return dsn_for(name)


async def drop_database(dsn: str) -> None:
    """Drop a test database, even with connections still open to it."""
    name = dsn.rsplit("/", 1)[1]
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def truncate(dsn: str) -> None:
    """Empty every table of a store database (its schema stays)."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        if await conn.fetchval("SELECT to_regclass('events') IS NOT NULL"):
            # With the replicas' coordination tables (poller epochs, heartbeats).
            tables = [*TABLES, "poller_leases", "replicas"]
            await conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


def numbered(sql: str) -> str:
    """SQLite's ``?`` placeholders as PostgreSQL's ``$1, $2, ...``."""
    count = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(count)}", sql)


async def query(store: StoreBackend, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (a read, or a write committed at once) run beside the store, on a
    connection of its own; ``?`` placeholders on both backends."""
    if isinstance(store, PostgresStore):
        conn = await asyncpg.connect(store.dsn, timeout=5)
        try:
            return [tuple(row) for row in await conn.fetch(numbered(sql), *args)]
        finally:
            await conn.close()
    assert isinstance(store, SqliteStore)
    with sqlite3.connect(store.path) as db:
        return db.execute(sql, args).fetchall()


async def execute(store: StoreBackend, sql: str) -> None:
    """Run one statement beside the store, committed."""
    if isinstance(store, PostgresStore):
        conn = await asyncpg.connect(store.dsn, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
        return
    assert isinstance(store, SqliteStore)
    with sqlite3.connect(store.path) as db:
        db.execute(sql)


async def run_raw(store: StoreBackend, sql: str) -> Any:
    """Run ``sql`` inside the store's own next group transaction (its writer)."""
    if isinstance(store, PostgresStore):
        return await store.run(lambda conn: conn.execute(sql))
    assert isinstance(store, SqliteStore)
    return await store.run(lambda conn: conn.execute(sql).rowcount)


async def run_then_fail(store: StoreBackend, sql: str, error: Exception) -> None:
    """Inside the store's next group transaction: run ``sql``, then raise ``error``."""
    if isinstance(store, PostgresStore):
        async def op(conn: asyncpg.Connection) -> None:
            await conn.execute(sql)
            raise error
        await store.run(op)
        return
    assert isinstance(store, SqliteStore)

    def sync_op(conn: sqlite3.Connection) -> None:
        conn.execute(sql)
        raise error
    await store.run(sync_op)


def store_config(store: StoreBackend) -> dict[str, Any]:
    """The ``[store]`` section of a configuration that opens ``store``."""
    if isinstance(store, PostgresStore):
        return {"backend": "postgresql", "dsn": store.dsn}
    assert isinstance(store, SqliteStore)
    return {"path": str(store.path)}


def store_rows(section: dict[str, Any], sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` in the store a ``[store]`` section names (blocking; for tests of a
    daemon in a subprocess). ``?`` placeholders on both backends."""
    if section.get("backend") == "postgresql":
        async def fetch() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(section["dsn"], timeout=5)
            try:
                return [tuple(row) for row in await conn.fetch(numbered(sql), *args)]
            finally:
                await conn.close()
        return run_sync(fetch())
    with sqlite3.connect(section["path"], timeout=5) as db:
        return db.execute(sql, args).fetchall()
