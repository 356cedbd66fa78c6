"""Batched ingest on PostgreSQL (store.postgres.ingest_many): the same answers and rows as
one by one, and as the SQLite batch; a failing batch falls back op by op."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tcbridge.envelope import Candidate, parse_order_webhook
from tcbridge.store import IngestResult, postgres
from tcbridge.store.postgres import IngestOp, ingest_many, ingest_one, lock_keys, run_batch
from tests.backends import truncate
from tests.conftest import order_event_body
from tests.test_store_batch import T1, T3, fresh, route, tricky_candidates
from tests.test_store_batch import batched as sqlite_batched


@pytest.fixture
async def conn(pg_dsn: str) -> Any:
    """A connection to the session's database, migrated and empty."""
    connection = await asyncpg.connect(pg_dsn)
    await postgres.migrate(connection)
    yield connection
    await connection.close()


def stamp(i: int) -> str:
    return f"2024-06-01T00:00:{i:02d}.000Z"


async def dump(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row ingest writes, but the delivery due time (time.time() when written)."""
    return {
        "events": [tuple(r) for r in await conn.fetch("SELECT * FROM events ORDER BY seq")],
        "entities": [tuple(r) for r in await conn.fetch(
            "SELECT * FROM entities ORDER BY 1, 2")],
        "sightings": [tuple(r) for r in await conn.fetch(
            "SELECT * FROM sightings ORDER BY id")],
        "deliveries": [tuple(r) for r in await conn.fetch(
            "SELECT id, event_seq, event_id, handler, entity_id, status, created_at, replay"
            " FROM deliveries ORDER BY id")],
    }


async def one_by_one(conn: asyncpg.Connection,
                     candidates: Sequence[Candidate]) -> list[IngestResult]:
    async with conn.transaction():
        return [await ingest_one(conn, c, stamp(i), route) for i, c in enumerate(candidates)]


async def batched(conn: asyncpg.Connection,
                  candidates: Sequence[Candidate]) -> list[IngestResult]:
    ops = [IngestOp(c, stamp(i), route) for i, c in enumerate(candidates)]
    async with conn.transaction():
        await lock_keys(conn, sorted({k for op in ops for k in op.keys}))
        return await ingest_many(conn, ops)


@pytest.mark.parametrize("seed", [None, *range(12)])
@pytest.mark.parametrize("stored_first", [0, 3, 8])
async def test_a_batch_answers_and_writes_what_one_by_one_does(
        conn: asyncpg.Connection, pg_dsn: str, tmp_path: Path, seed: int | None,
        stored_first: int) -> None:
    """Repeats, siblings, late and stale inside one batch, on top of a store that holds
    some of them: answers and rows equal to one by one, and answers equal to SQLite's."""
    candidates = tricky_candidates()
    if seed is not None:
        random.Random(seed).shuffle(candidates)
    before, batch = candidates[:stored_first], candidates[stored_first:]
    await one_by_one(conn, before)
    expected = await one_by_one(conn, batch)
    rows = await dump(conn)
    await truncate(pg_dsn)
    await one_by_one(conn, before)
    assert await batched(conn, batch) == expected
    assert await dump(conn) == rows
    lite = fresh(tmp_path / "lite.db")
    sqlite_batched(lite, before)
    assert sqlite_batched(lite, batch) == expected


class _Future:
    """Enough of an asyncio.Future for run_batch (it only carries the answers back)."""


async def run(conn: asyncpg.Connection,
              ops: Sequence[Any]) -> list[tuple[Any, BaseException | None]]:
    batch = [(op, _Future()) for op in ops]
    outcomes = await run_batch(conn, batch)  # type: ignore[arg-type]
    assert [future for future, _, _ in outcomes] == [future for _, future in batch]
    return [(value, error) for _, value, error in outcomes]


async def test_a_batch_failing_midway_falls_back_op_by_op(conn: asyncpg.Connection) -> None:
    """The batched attempt is rolled back and run again op by op in savepoints: the
    ingests around the failure hold, and the repeat after it is a duplicate of the first."""
    body = order_event_body("o1", stamp=T1)

    async def boom(c: asyncpg.Connection) -> None:
        await c.execute("INSERT INTO cursors VALUES ('x', 'y', 'z')")
        raise ValueError("bug")

    def op(candidate: Candidate) -> IngestOp:
        return IngestOp(candidate, T3, route)

    outcomes = await run(conn, [op(parse_order_webhook(body)), op(parse_order_webhook(
        order_event_body("o2"))), boom, op(parse_order_webhook(body)),
        op(parse_order_webhook(order_event_body("o3")))])
    assert [o[0].status if o[0] else None for o in outcomes] == [
        "stored", "stored", None, "duplicate", "stored"]
    assert isinstance(outcomes[2][1], ValueError)
    assert await conn.fetchval("SELECT count(*) FROM events") == 3
    assert await conn.fetchval("SELECT count(*) FROM cursors") == 0
    assert await conn.fetchval("SELECT count(*) FROM sightings") == 1
    assert await conn.fetchval("SELECT count(*) FROM deliveries") == 5


async def test_an_id_taken_behind_the_look_up_fails_the_batch_then_is_a_duplicate(
        conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that bypassed the entity lock stored an event after the batch's look-up:
    the write says so (fewer events written than decided), the batch is rolled back and
    runs op by op, and there that event is a duplicate; nothing is half written."""
    first, other = (parse_order_webhook(order_event_body(e, stamp=T1)) for e in ("o1", "o2"))
    look_up = postgres._look_up
    calls = 0

    async def blind_once(c: asyncpg.Connection, ops: Sequence[IngestOp]) -> Any:
        nonlocal calls
        calls += 1
        view, taken = await look_up(c, ops)
        if calls == 1:  # the batched attempt: as if the row came after the look-up
            view.stored.clear()
        return view, taken

    await one_by_one(conn, [first])
    monkeypatch.setattr(postgres, "_look_up", blind_once)
    outcomes = await run(conn, [IngestOp(first, T3, route), IngestOp(other, T3, route)])
    assert calls == 3  # the batch, then each op alone
    assert [o[0].status for o in outcomes] == ["duplicate", "stored"]
    assert await conn.fetchval("SELECT count(*) FROM events") == 2
    assert await conn.fetchval("SELECT count(*) FROM deliveries") == 3

