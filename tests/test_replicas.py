"""Replicas on one PostgreSQL store, in process: delivery leases, order per entity across
replicas, and the poller page fence. (The daemons themselves: test_e2e_replicas.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from tcbridge.config import StoreSettings
from tcbridge.envelope import parse_order_webhook
from tcbridge.errors import Fenced
from tcbridge.store import Fence, PostgresStore
from tcbridge.store import coordination as co
from tests.backends import query
from tests.conftest import order_event_body

pytestmark = pytest.mark.backends("postgresql")

Make = Callable[..., PostgresStore]


@pytest.fixture
async def replicas(pg_dsn: str) -> AsyncIterator[Make]:
    """Stores on one database, each a replica of its own name."""
    opened: list[PostgresStore] = []

    async def make(replica_id: str, lease_s: float = 60.0) -> PostgresStore:
        store = PostgresStore(pg_dsn, StoreSettings(backend="postgresql", dsn=pg_dsn),
                              route=lambda envelope: ["erp"], replica_id=replica_id,
                              lease_s=lease_s)
        await store.open()
        opened.append(store)
        return store

    yield make  # type: ignore[misc]
    for store in opened:
        await store.close()


async def _ingest(store: PostgresStore, entity: str, second: int) -> str:
    body = order_event_body(entity, stamp=f"2024-05-01T10:00:{second:02d}.000Z")
    return (await store.ingest(parse_order_webhook(body))).event_id


async def _rows(store: PostgresStore) -> list[tuple[Any, ...]]:
    return await query(store, "SELECT entity_id, status, attempts, claimed_by FROM deliveries"
                              " ORDER BY id")


async def test_a_dead_replicas_claim_is_claimed_again_after_its_lease_and_counts(
    replicas: Any,
) -> None:
    a, b = await replicas("a", lease_s=0.3), await replicas("b", lease_s=60)
    await _ingest(a, "o1", 1)
    [claim] = await a.claim("erp", 10)
    assert claim.attempt == 1
    assert await b.claim("erp", 10) == []  # leased to a
    await asyncio.sleep(0.4)  # a "dies": its lease runs out, nobody renews it
    [again] = await b.claim("erp", 10)
    assert (again.id, again.attempt) == (claim.id, 2)  # the cut-off attempt counted
    attempts = await query(b, "SELECT attempt, outcome, error FROM delivery_attempts")
    assert attempts == [(1, "retry", "lease expired: replica a did not finish it "
                                     "(stopped or cut off)")]
    # a comes back and reports its old attempt: b's claim stands
    await a.finish(claim, "done")
    assert await _rows(a) == [("o1", "running", 1, "b")]
    await b.finish(again, "done")
    assert await _rows(a) == [("o1", "done", 2, None)]


async def test_renewed_leases_hold_and_a_lost_one_is_reported(replicas: Any) -> None:
    a, b = await replicas("a", lease_s=0.4), await replicas("b", lease_s=0.4)
    await _ingest(a, "o1", 1)
    [claim] = await a.claim("erp", 10)
    for _ in range(3):  # renewed well within the lease: never claimable elsewhere
        await asyncio.sleep(0.2)
        assert await a.renew("erp", [claim.id]) == [claim.id]
        assert await b.claim("erp", 10) == []
    await asyncio.sleep(0.5)
    [taken] = await b.claim("erp", 10)
    assert taken.id == claim.id
    assert await a.renew("erp", [claim.id]) == []  # no longer a's
    assert await b.renew("erp", [claim.id]) == [claim.id]


async def test_only_the_head_of_an_entity_is_claimed_across_replicas(replicas: Any) -> None:
    a, b = await replicas("a"), await replicas("b")
    for second in (1, 2, 3):
        await _ingest(a, "o1", second)
    await _ingest(a, "o2", 1)
    first = await a.claim("erp", 10)
    assert sorted(c.entity_id for c in first) == ["o1", "o2"]  # one per entity
    assert await b.claim("erp", 10) == []  # o1's next waits for its head, wherever it runs
    o1 = next(c for c in first if c.entity_id == "o1")
    await a.finish(o1, "done")
    [second] = await b.claim("erp", 10)
    assert second.entity_id == "o1" and second.id > o1.id


async def test_a_replica_releases_only_its_own_claims(replicas: Any) -> None:
    a, b = await replicas("a"), await replicas("b")
    await _ingest(a, "o1", 1)
    await _ingest(a, "o2", 1)
    [mine] = await a.claim("erp", 1)
    [theirs] = await b.claim("erp", 1)
    assert await a.release([mine.id, theirs.id]) == 1
    assert await a.release() == 0  # start-up: nothing of a's left, b's lease is live
    rows = {r[0]: r[1:] for r in await _rows(a)}
    assert rows[theirs.entity_id] == ("running", 0, "b")
    assert rows[mine.entity_id] == ("pending", 0, None)


async def test_a_page_with_a_stale_fence_is_refused_whole(replicas: Any, pg_dsn: str) -> None:
    a = await replicas("a")
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await co.take_over(conn, "order", "a") == 1
        assert await co.take_over(conn, "order", "b") == 2  # b took over since
    finally:
        await conn.close()
    page = [parse_order_webhook(order_event_body("o1", stamp="2024-05-01T10:00:01.000Z"))]
    with pytest.raises(Fenced):
        await a.ingest_page("order", page, [], "2024-05-01T10:00:01.000Z",
                            fence=Fence("order", 1))
    assert (await a.counts())["events"] == 0 and await a.get_cursor("order") is None
    results = await a.ingest_page("order", page, [], "2024-05-01T10:00:01.000Z",
                                  fence=Fence("order", 2))
    assert [r.status for r in results] == ["stored"]
    assert await a.get_cursor("order") == "2024-05-01T10:00:01.000Z"
