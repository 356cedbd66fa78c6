"""Replicas on one PostgreSQL store, in process: delivery leases, order per entity across
replicas, and the poller page fence. (The daemons themselves: test_e2e_replicas.py.)"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from tcbridge.config import StoreSettings
from tcbridge.envelope import parse_order_webhook
from tcbridge.errors import Fenced
from tcbridge.store import Fence, PostgresStore, postgres
from tcbridge.store import coordination as co
from tests.backends import query
from tests.conftest import order_event_body

pytestmark = pytest.mark.backends("postgresql")

Make = Callable[..., Awaitable[PostgresStore]]


def _replicas_on(dsn: str) -> tuple[Make, list[PostgresStore]]:
    """A maker of stores on ``dsn``, each a replica of its own name, and the stores made."""
    opened: list[PostgresStore] = []

    async def make(replica_id: str, lease_s: float = 60.0) -> PostgresStore:
        store = PostgresStore(dsn, StoreSettings(backend="postgresql", dsn=dsn),
                              route=lambda envelope: ["erp"], replica_id=replica_id,
                              lease_s=lease_s)
        await store.open()
        opened.append(store)
        return store

    return make, opened


@pytest.fixture
async def replicas(pg_dsn: str) -> AsyncIterator[Make]:
    """Stores on one database, each a replica of its own name."""
    make, opened = _replicas_on(pg_dsn)
    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def fresh_replicas(pg_fresh_dsn: str) -> AsyncIterator[Make]:
    """Replicas on a database of the test's own: its tables never analyzed (no planner
    statistics), as in a new deployment filling with its first backlog."""
    make, opened = _replicas_on(pg_fresh_dsn)
    yield make
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


async def test_replicas_ingesting_the_same_events_in_different_orders_all_commit(
    replicas: Any,
) -> None:
    """Three replicas get events of the same entities (some to every replica, with
    repeats; the others to one replica each), each in its own order and all at once, so
    that their group commits hold overlapping batches: none hangs or fails, each event is
    stored once, by one replica (the others answer duplicate of it), and each entity's
    events are decided as if they came one after the other."""
    stores = [await replicas(name) for name in ("a", "b", "c")]
    stamps = [f"2024-05-01T10:{i * 37 % 60:02d}:{i % 60:02d}.000Z" for i in range(150)]
    bodies = [order_event_body(f"o{i % 7}", stamp=stamp, message_id=f"m-{i}")
              for i, stamp in enumerate(stamps)]
    shared = list(range(30)) * 2  # to every replica, twice
    shares = [shared + list(range(30 + k, len(bodies), 3)) for k in range(3)]

    async def send(store: PostgresStore, share: list[int],
                   seed: int) -> list[tuple[int, str, str]]:
        order = share[:]
        random.Random(seed).shuffle(order)
        results = await asyncio.gather(*(store.ingest(parse_order_webhook(bodies[i]))
                                         for i in order))
        return [(i, r.status, r.event_id) for i, r in zip(order, results, strict=True)]

    async with asyncio.timeout(60):  # a hung writer fails here, not at the suite timeout
        per_replica = await asyncio.gather(*(send(store, share, seed) for seed, (store, share)
                                             in enumerate(zip(stores, shares, strict=True))))
    answers = [answer for replica in per_replica for answer in replica]
    stored = Counter(event_id for _, status, event_id in answers if status == "stored")
    assert len(stored) == len(bodies) and set(stored.values()) == {1}
    named = {i: {event_id for j, _, event_id in answers if j == i} for i in range(len(bodies))}
    assert all(len(ids) == 1 for ids in named.values())  # one event per body, everywhere
    assert Counter(status for _, status, _ in answers) == {
        "stored": len(bodies), "duplicate": len(answers) - len(bodies)}
    assert await query(stores[0], "SELECT count(*) FROM events") == [(len(bodies),)]
    newest_stamps = {f"o{e}": max(stamps[e::7]) for e in range(7)}
    assert dict(await query(stores[0], "SELECT entity_id, newest_last_updated_at"
                                       " FROM entities")) == newest_stamps
    # The entity locks make each entity's ingests serial in seq order: an event is late
    # exactly when an event stored before it (in seq) is newer.
    newest: dict[str, int] = {}
    for entity_id, instant, late in await query(
            stores[0], "SELECT entity_id, instant_us, late FROM events ORDER BY seq"):
        assert late == (instant < newest.get(entity_id, instant)), (entity_id, instant)
        newest[entity_id] = max(instant, newest.get(entity_id, instant))


@pytest.mark.parametrize("plan", ["force_custom_plan", "force_generic_plan"])
async def test_a_claim_probes_each_head_before_the_deliveries_are_analyzed(
    fresh_replicas: Any, plan: str,
) -> None:
    """A new database filling with a backlog has no planner statistics until autovacuum's
    first ANALYZE: the claim must not then walk every open delivery for each one (an
    anti join that took 50-77 s for 9,000, each replica's writer stuck behind it; bench
    row 1c at 0 req/s). Measured in buffers, not seconds: about a few per delivery."""
    a = await fresh_replicas("a")
    backlog = 1500
    conn = await asyncpg.connect(a.dsn)
    try:
        await conn.execute("ALTER TABLE deliveries SET (autovacuum_enabled = false)")
        page = [parse_order_webhook(order_event_body(f"o{i}")) for i in range(backlog)]
        await a.ingest_page("order", page, [], None)
        [held] = await a.claim("erp", 1)
        assert await conn.fetchval("SELECT count(*) FROM pg_stats"
                                   " WHERE tablename = 'deliveries'") == 0
        await conn.execute(f"SET plan_cache_mode = {plan}")
        await conn.execute("PREPARE claim (text, float8, int, float8, text) AS "
                           + postgres._CLAIM_SQL)
        transaction = conn.transaction()  # rolled back: the claim is only measured
        await transaction.start()
        now = time.time()
        [[text]] = await conn.fetch(
            f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE claim ('erp', {now}, 5,"
            f" {now + 60}, 'b')")
        await transaction.rollback()
    finally:
        await conn.close()
    top = json.loads(text)[0]["Plan"]
    assert top["Actual Rows"] == 5
    assert top["Shared Hit Blocks"] + top["Shared Read Blocks"] < 10 * backlog
    b = await fresh_replicas("b")
    claims = await b.claim("erp", 5)  # the oldest heads but the one a holds
    assert [c.entity_id for c in claims] == [f"o{i}" for i in range(1, 6)]
    assert held.entity_id == "o0"
