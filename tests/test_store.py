"""The store: dedup rules, group commit, cursors, fetch requests, failures."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from tcbridge.config import StoreSettings
from tcbridge.envelope import parse_order_webhook, parse_snapshot
from tcbridge.errors import StoreError, StoreUnavailable
from tcbridge.store import (
    MIGRATIONS,
    PostgresStore,
    Rejected,
    Store,
    migrate,
    postgres,
    read_cursor,
    run_batch,
)
from tests.backends import execute, query, run_then_fail
from tests.conftest import order_event_body, order_obj
from tests.support import free_port

pytestmark = pytest.mark.backends()

SQLITE_MECHANICS = "SQLite's own file, locks, pragmas or writer thread"


async def test_first_arrival_is_an_event_later_ones_duplicates(store: Store) -> None:
    body = order_event_body("o1", stamp="2024-05-01T10:00:00.000Z")
    first = await store.ingest(parse_order_webhook(body))
    second = await store.ingest(parse_order_webhook(body))
    snapshot = await store.ingest(
        parse_snapshot("order", order_obj("o1", "2024-05-01T10:00:00Z"), "poll"))
    assert first.status == "stored"
    assert second.status == "duplicate" and second.event_id == first.event_id
    assert snapshot.status == "duplicate" and snapshot.event_id == first.event_id
    assert await store.counts() == {
        "events": 1, "duplicates": 2, "stale": 0, "rejected": 0, "fetch_pending": 0}
    sightings = await query(store, "SELECT source, reason FROM sightings ORDER BY id")
    assert sightings == [("webhook", "duplicate"), ("poll", "duplicate")]


async def test_older_snapshot_is_stale_older_event_is_late(store: Store) -> None:
    await store.ingest(parse_snapshot("order", order_obj("o1", "2024-05-02T00:00:00Z"), "poll"))
    stale = await store.ingest(
        parse_snapshot("order", order_obj("o1", "2024-05-01T00:00:00Z"), "poll"))
    late = await store.ingest(
        parse_order_webhook(order_event_body("o1", stamp="2024-05-01T12:00:00Z")))
    newer = await store.ingest(
        parse_snapshot("order", order_obj("o1", "2024-05-03T00:00:00Z"), "poll"))
    assert stale.status == "stale"
    assert late.status == "stored" and late.late
    assert newer.status == "stored" and not newer.late
    events = await store.events(entity_id="o1")
    assert [e["late"] for e in events] == [False, True, False]
    assert (await store.counts())["stale"] == 1


async def test_envelope_holds_changed_lines_against_newest_stored(store: Store) -> None:
    await store.ingest(parse_snapshot("order", order_obj("o1", "2024-05-01T00:00:00Z", lines=[
        ("a", "2024-05-01T00:00:00Z"), ("b", "2024-05-01T00:00:00Z")]), "poll"))
    await store.ingest(parse_snapshot("order", order_obj("o1", "2024-05-02T00:00:00Z", lines=[
        ("a", "2024-05-01T00:00:00Z"), ("b", "2024-05-02T00:00:00Z")]), "poll"))
    stored = await query(store, "SELECT envelope FROM events ORDER BY seq")
    envelopes = [json.loads(str(r[0])) for r in stored]
    assert [e["changedLineIds"] for e in envelopes] == [["a", "b"], ["b"]]
    first = envelopes[0]
    assert set(first) == {"id", "kind", "entityId", "lastUpdatedAt", "eventName", "source",
                          "receivedAt", "changedLineIds", "late", "sibling", "meta", "layout",
                          "payload"}
    assert first["payload"]["id"] == "o1" and first["eventName"] is None
    assert first["sibling"] is False and first["meta"] is None
    assert first["layout"] == "delivery-schedule"


async def test_concurrent_ingests_share_transactions_and_all_commit(store: Store) -> None:
    bodies = [order_event_body(f"o{i}", stamp="2024-05-01T10:00:00.000Z") for i in range(300)]
    results = await asyncio.gather(*(store.ingest(parse_order_webhook(b)) for b in bodies))
    assert {r.status for r in results} == {"stored"}
    assert (await store.counts())["events"] == 300


async def test_one_failing_operation_does_not_spoil_its_batch(store: Store) -> None:
    boom = run_then_fail(store, "INSERT INTO cursors VALUES ('x', 'y', 'z')", ValueError("bug"))
    good = [store.ingest(parse_order_webhook(order_event_body())) for _ in range(5)]
    results = await asyncio.gather(boom, *good, return_exceptions=True)
    assert isinstance(results[0], ValueError)
    assert all(not isinstance(r, BaseException) for r in results[1:])
    assert await query(store, "SELECT count(*) FROM cursors WHERE kind = 'x'") == [(0,)]
    assert (await store.counts())["events"] == 5


@pytest.mark.sqlite_only(SQLITE_MECHANICS)
async def test_locked_database_gives_store_unavailable_then_recovers(
    store_factory: Callable[..., Store],
) -> None:
    store = store_factory(busy_timeout_s=0.2)
    await store.open()
    try:
        blocker = sqlite3.connect(store.path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailable):
            await store.ingest(parse_order_webhook(order_event_body("o1")))
        blocker.execute("ROLLBACK")
        blocker.close()
        result = await store.ingest(parse_order_webhook(order_event_body("o1")))
        assert result.status == "stored"
    finally:
        await store.close()


async def test_closed_store_refuses(store_factory: Callable[..., Store]) -> None:
    store = store_factory()
    with pytest.raises(StoreUnavailable):
        await store.ingest(parse_order_webhook(order_event_body()))


async def test_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    from tcbridge.config import StoreSettings

    store = Store(tmp_path / "file" / "db.sqlite", StoreSettings())
    with pytest.raises(StoreUnavailable, match="cannot open store"):
        await store.open()


@pytest.mark.sqlite_only(SQLITE_MECHANICS)
async def test_migrations_are_versioned_and_reopen_is_a_no_op(
    store_factory: Callable[..., Store],
) -> None:
    store = store_factory()
    async with store:
        await store.ingest(parse_order_webhook(order_event_body()))
    async with store_factory() as again:
        assert (await again.counts())["events"] == 1
    assert await query(store, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert await query(store, "PRAGMA journal_mode") == [("wal",)]


@pytest.mark.sqlite_only(SQLITE_MECHANICS)
async def test_newer_schema_is_refused(store_factory: Callable[..., Store]) -> None:
    store = store_factory()
    async with store:
        pass
    with sqlite3.connect(store.path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer than this tcbridge"):
        await store_factory().open()


async def test_page_and_cursor_commit_together_and_never_move_back(store: Store) -> None:
    page = [parse_snapshot("order", order_obj(stamp="2024-05-02T00:00:00Z"), "poll")]
    await store.ingest_page("order", page, [], "2024-05-02T00:00:00.000Z")
    assert await store.get_cursor("order") == "2024-05-02T00:00:00.000Z"
    await store.ingest_page("order", [], [], "2024-05-01T00:00:00.000Z")
    assert await store.get_cursor("order") == "2024-05-02T00:00:00.000Z"
    await store.set_cursor("order", "2024-01-01T00:00:00.000+01:00")  # by hand: allowed
    assert await store.get_cursor("order") == "2024-01-01T00:00:00.000+01:00"


async def test_failed_page_commits_nothing(store: Store) -> None:
    good = parse_snapshot("order", order_obj(stamp="2024-05-02T00:00:00Z"), "poll")
    with pytest.raises(Exception, match="not an ISO 8601"):
        await store.ingest_page("order", [good], [], "not-a-time")
    assert await store.get_cursor("order") is None
    assert (await store.counts())["events"] == 0


async def test_rejected_requests_keep_body_and_redact_credentials(store: Store) -> None:
    rejected_id = await store.reject(Rejected(
        source="webhook", reason="malformed JSON", method="POST", path="/webhook/order",
        headers={"Authorization": "Bearer secret-token", "Content-Type": "application/json"},
        body=b"{not json",
    ))
    (headers, body, reason), = await query(
        store, f"SELECT headers, body, reason FROM rejected WHERE id = {rejected_id}")
    assert body == b"{not json" and reason == "malformed JSON"
    assert "secret-token" not in str(headers)
    assert json.loads(str(headers))["Authorization"] == "<redacted>"


async def test_fetch_requests_coalesce_and_complete(store: Store) -> None:
    first = await store.request_fetch("order", "o1")
    assert await store.request_fetch("order", "o1") == first
    (request,) = await store.due_fetches()
    snapshot = parse_snapshot("order", order_obj("o1"), "webhook_get")
    result = await store.complete_fetch(request, snapshot)
    assert result.status == "stored"
    assert await store.due_fetches() == []
    assert (await store.counts())["fetch_pending"] == 0


async def test_get_arriving_during_a_fetch_keeps_the_request_open(store: Store) -> None:
    await store.request_fetch("order", "o1")
    (request,) = await store.due_fetches()
    await asyncio.sleep(0.002)  # requested_at has millisecond resolution
    await store.request_fetch("order", "o1")  # a newer change while we were fetching
    await store.complete_fetch(request, parse_snapshot("order", order_obj("o1"), "webhook_get"))
    (again,) = await store.due_fetches()
    assert again.id == request.id and again.attempts == 1


async def test_failed_fetch_is_rescheduled_or_given_up(store: Store) -> None:
    await store.request_fetch("order", "o1")
    (request,) = await store.due_fetches()
    await store.fail_fetch(request, "503", retry_at=9e12)
    assert await store.due_fetches() == []
    assert await store.next_fetch_due_at() == 9e12
    await store.fail_fetch(request, "gone", retry_at=None)
    assert await store.next_fetch_due_at() is None
    assert await query(store, "SELECT status, last_error FROM fetch_requests") == [
        ("failed", "gone")]


async def test_payload_text_with_a_lone_surrogate_is_stored_escaped(store: Store) -> None:
    order = order_obj("o-s", "2024-05-01T10:00:00.000Z")
    order["note"] = "\udfff"
    # parse_snapshot refuses one since issue 9 (one parser: orjson's rules, at ingest); the
    # store still writes one escaped rather than fail a whole batch.
    candidate = replace(parse_snapshot("order", order_obj("o-s"), "poll"), payload=order)
    result = await store.ingest(candidate)
    assert result.status == "stored"
    (envelope,) = (await query(store, "SELECT envelope FROM events"))[0]
    assert "\\udfff" in str(envelope)
    assert json.loads(str(envelope))["payload"]["note"] == "\udfff"


def test_a_transaction_left_open_does_not_block_the_next_batch(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    migrate(conn)
    conn.execute("BEGIN")  # as a failed ROLLBACK after a failed COMMIT would leave it
    conn.execute("INSERT INTO cursors VALUES ('order', 'half-done', 'x')")
    future = object()
    (outcome,) = run_batch(conn, [(lambda c: read_cursor(c, "order"), future)])  # type: ignore[list-item]
    assert outcome == (future, None, None)  # the stale transaction was rolled back first
    assert not conn.in_transaction
    conn.close()


# -- distinct messages with one timestamp (siblings) -------------------------------------------

STAMP = "2024-05-01T10:00:00.000Z"


async def envelopes(store: Store) -> list[dict[str, object]]:
    return [json.loads(str(r[0]))
            for r in await query(store, "SELECT envelope FROM events ORDER BY seq")]


async def test_distinct_messages_with_one_timestamp_are_both_stored(store: Store) -> None:
    first = order_event_body("o1", stamp=STAMP, event_name="OrderLinesConfirmedBySupplier",
                             line_ids=("l1",), message_id="m-1")
    other = order_event_body("o1", stamp=STAMP, event_name="OrderLinesConfirmedBySupplier",
                             line_ids=("l2",), message_id="m-2")
    renamed = order_event_body("o1", stamp=STAMP, event_name="OrderLinesShippedByBuyer",
                               line_ids=("l1",), message_id="m-3")
    results = [await store.ingest(parse_order_webhook(b)) for b in (first, other, renamed)]
    assert [r.status for r in results] == ["stored"] * 3
    assert len({r.event_id for r in results}) == 3
    assert results[0].event_id == parse_order_webhook(first).event_id
    stored = await envelopes(store)
    assert [e["sibling"] for e in stored] == [False, True, True]
    assert [e["changedLineIds"] for e in stored] == [["l1"], ["l2"], ["l1"]]
    # Repeats of any of them, and a snapshot of that version, stay duplicates.
    for body in (first, other, renamed):
        again = await store.ingest(parse_order_webhook(body))
        assert again.status == "duplicate"
        assert again.event_id in {r.event_id for r in results}
    snapshot = await store.ingest(parse_snapshot("order", order_obj("o1", STAMP), "poll"))
    assert snapshot.status == "duplicate" and snapshot.event_id == results[0].event_id
    assert len(await envelopes(store)) == 3


async def test_same_content_under_another_message_id_is_a_duplicate(store: Store) -> None:
    body = order_event_body("o1", stamp=STAMP, line_ids=("l1",), message_id="m-1")
    await store.ingest(parse_order_webhook(body))
    body["orderEvent"]["meta"] = {"messageId": "m-2"}
    assert (await store.ingest(parse_order_webhook(body))).status == "duplicate"
    # The same message id with other content is a repeat of that message too.
    changed = order_event_body("o1", stamp=STAMP, line_ids=("l9",), message_id="m-1")
    assert (await store.ingest(parse_order_webhook(changed))).status == "duplicate"


async def test_a_webhook_after_a_snapshot_of_its_version_is_a_duplicate(store: Store) -> None:
    await store.ingest(parse_snapshot("order", order_obj("o1", STAMP), "poll"))
    body = order_event_body("o1", stamp=STAMP, line_ids=("l7",), message_id="m-1")
    assert (await store.ingest(parse_order_webhook(body))).status == "duplicate"


@pytest.mark.parametrize("first_source", ["webhook", "poll"])
async def test_resent_events_are_always_delivered(store: Store, first_source: str) -> None:
    if first_source == "poll":
        await store.ingest(parse_snapshot("order", order_obj("o1", STAMP), "poll"))
    else:
        await store.ingest(parse_order_webhook(
            order_event_body("o1", stamp=STAMP, line_ids=("o1-l1",), message_id="m-0")))
    ids = set()
    for message_id in ("m-1", "m-2"):
        resent = order_event_body("o1", stamp=STAMP, event_name="OrderResentByBuyer",
                                  line_ids=("o1-l1",), message_id=message_id)
        result = await store.ingest(parse_order_webhook(resent))
        assert result.status == "stored"
        ids.add(result.event_id)
        again = await store.ingest(parse_order_webhook(resent))
        assert again.status == "duplicate" and again.event_id == result.event_id
    assert len(ids) == 2
    assert [e["sibling"] for e in await envelopes(store)] == [False, True, True]
async def test_snapshot_t3_then_late_event_t1_then_snapshot_t2_is_stale(store: Store) -> None:
    """A late event is stored (it is news) but must not move the entity's newest version
    back: a snapshot older than the newest stays stale."""
    t1, t2, t3 = ("2024-05-01T10:00:01.000Z", "2024-05-01T10:00:02.000Z",
                  "2024-05-01T10:00:03.000Z")
    first = await store.ingest(parse_snapshot("order", order_obj("o1", t3), "poll"))
    late = await store.ingest(parse_order_webhook(order_event_body("o1", stamp=t1)))
    stale = await store.ingest(parse_snapshot("order", order_obj("o1", t2), "poll"))
    assert (first.status, first.late) == ("stored", False)
    assert (late.status, late.late) == ("stored", True)
    assert stale.status == "stale"
    assert await query(store, "SELECT newest_last_updated_at FROM entities") == [(t3,)]


async def test_routing_that_fails_leaves_no_event_row(store: Store) -> None:
    def broken_route(envelope: Any) -> list[str]:
        raise RuntimeError("routing bug")

    store._route = broken_route
    with pytest.raises(RuntimeError, match="routing bug"):
        await store.ingest(parse_order_webhook(order_event_body("o1")))
    assert (await store.counts())["events"] == 0
    assert await query(store, "SELECT count(*) FROM entities") == [(0,)]
    assert await query(store, "SELECT count(*) FROM deliveries") == [(0,)]
    store._route = lambda envelope: []
    assert (await store.ingest(parse_order_webhook(order_event_body("o1")))).status == "stored"


async def test_closed_fetch_requests_carry_their_finish_time(store: Store) -> None:
    """Retention removes finished requests by finished_at: it must be set on both ends."""
    await store.request_fetch("order", "o1")
    await store.request_fetch("order", "o2")
    done, gone = await store.due_fetches()
    await store.complete_fetch(done, parse_snapshot("order", order_obj(done.entity_id),
                                                    "webhook_get"))
    await store.fail_fetch(gone, "x" * 3000, retry_at=None)
    assert await query(store, "SELECT entity_id, status, finished_at IS NOT NULL,"
                            " length(last_error), attempts FROM fetch_requests ORDER BY id") == [
        (done.entity_id, "done", 1, None, 1), (gone.entity_id, "failed", 1, 2000, 1)]


async def test_a_rescheduled_fetch_keeps_a_bounded_error(store: Store) -> None:
    await store.request_fetch("order", "o1")
    (request,) = await store.due_fetches()
    await store.fail_fetch(request, "y" * 3000, retry_at=9e12)
    assert await query(store, "SELECT status, length(last_error), attempts, finished_at"
                            " FROM fetch_requests") == [("pending", 2000, 1, None)]


async def test_fetch_counts_count_pending_and_failed_only(store: Store) -> None:
    assert await store.fetch_counts() == {"pending": 0, "failed": 0}
    for entity in ("o1", "o2", "o3"):
        await store.request_fetch("order", entity)
    first, second, _ = await store.due_fetches()
    await store.complete_fetch(first, parse_snapshot("order", order_obj("o1"), "webhook_get"))
    await store.fail_fetch(second, "gone", retry_at=None)
    assert await store.fetch_counts() == {"pending": 1, "failed": 1}


async def test_cursor_moves_to_an_equal_instant_quietly_and_refuses_backwards_loudly(
    store: Store,
) -> None:
    await store.ingest_page("order", [], [], "2024-05-01T10:00:00.000Z")
    with capture_logs() as logs:
        await store.ingest_page("order", [], [], "2024-05-01T10:00:00Z")  # same instant
    assert logs == []
    assert await store.get_cursor("order") == "2024-05-01T10:00:00Z"  # the string received
    with capture_logs() as logs:
        await store.ingest_page("order", [], [], "2024-05-01T09:00:00Z")
    assert logs == [{"event": "poll.cursor_not_moved_back", "log_level": "warning",
                     "kind": "order", "stored": "2024-05-01T10:00:00Z",
                     "offered": "2024-05-01T09:00:00Z"}]
    assert await store.get_cursor("order") == "2024-05-01T10:00:00Z"


async def test_a_replay_is_marked_and_keeps_the_entity(store: Store) -> None:
    store._route = lambda envelope: ["erp", "audit"]
    result = await store.ingest(parse_order_webhook(order_event_body("o1")))
    assert await store.replay(result.event_id, None) == 2
    replayed = [row for row in await store.deliveries() if row["replay"]]
    assert sorted((r["handler"], r["entityId"], r["eventId"]) for r in replayed) == [
        ("audit", "o1", result.event_id), ("erp", "o1", result.event_id)]
    assert await store.replay(result.event_id, ["erp"]) == 1


async def test_ingest_results_say_what_was_stored(store: Store) -> None:
    store._route = lambda envelope: ["erp", "audit"]
    stamp = "2024-05-01T10:00:00.000Z"
    first = await store.ingest(parse_order_webhook(order_event_body("o1", stamp=stamp)))
    assert (first.status, first.late, first.deliveries) == ("stored", False, 2)
    assert first.recovered is False
    body = order_event_body("o2", stamp=stamp)
    stored = await store.ingest(parse_order_webhook(body))
    again = await store.ingest(parse_order_webhook(body))
    assert (again.status, again.event_id) == ("duplicate", stored.event_id)
    older = parse_snapshot("order", order_obj("o1", "2024-05-01T09:00:00.000Z"), "poll")
    stale = await store.ingest(older)
    assert (stale.status, stale.event_id) == ("stale", older.event_id)
    events = {e["id"]: e for e in await store.events()}
    assert events[stored.event_id]["duplicates"] == 1  # the sighting names its event
    assert (await store.status())["counts"]["recovered"] == 0
    envelope = json.loads((await query(store, "SELECT envelope FROM events WHERE id = '"
                                       + first.event_id + "'"))[0][0])
    assert envelope["late"] is False
    (claim, *_) = await store.claim("erp", 10)
    assert claim.handler == "erp"


@pytest.mark.sqlite_only(SQLITE_MECHANICS)
async def test_close_stops_the_writer_thread(store_factory: Callable[..., Store]) -> None:
    never_opened = store_factory("unused.db")
    await never_opened.close()  # nothing to do, no error
    store = store_factory()
    await store.open()
    thread = store._thread
    assert thread is not None and thread.is_alive()
    await store.close()
    assert not thread.is_alive()
    await store.close()  # twice is harmless


async def test_a_page_ingested_as_recovered_says_so(store: Store) -> None:
    page = [parse_snapshot("order", order_obj("o1"), "poll")]
    (result,) = await store.ingest_page("order", page, [], None, recovered=True)
    assert (result.status, result.recovered) == ("stored", True)
    assert (await store.status())["counts"]["recovered"] == 1


# -- PostgreSQL's own mechanics: migrations, two replicas at once ------------------------

pg_only = pytest.mark.backends("postgresql")


@pg_only
async def test_postgres_migrations_are_versioned_and_a_newer_schema_is_refused(
    pg_fresh_dsn: str,
) -> None:
    settings = StoreSettings(backend="postgresql", dsn=pg_fresh_dsn)
    async with PostgresStore(pg_fresh_dsn, settings) as store:
        await store.ingest(parse_order_webhook(order_event_body()))
    async with PostgresStore(pg_fresh_dsn, settings) as again:  # a reopen migrates nothing
        assert (await again.counts())["events"] == 1
        assert await query(again, "SELECT version FROM schema_version") == [
            (n,) for n in range(1, len(postgres.MIGRATIONS) + 1)]
        await execute(again, "INSERT INTO schema_version VALUES"
                      f" ({len(postgres.MIGRATIONS) + 1}, 'later')")
    with pytest.raises(StoreError, match="newer than this tcbridge"):
        await PostgresStore(pg_fresh_dsn, settings).open()


@pg_only
async def test_two_replicas_storing_the_same_events_at_once_give_one_event_each(
    store_factory: Callable[..., PostgresStore],
) -> None:
    first, second = store_factory(), store_factory()
    async with first, second:
        bodies = [order_event_body(f"o{i % 20}", stamp=f"2024-05-01T10:00:{i // 20:02d}.000Z")
                  for i in range(100)]
        results = await asyncio.gather(
            *(s.ingest(parse_order_webhook(b)) for b in bodies for s in (first, second)))
        assert sorted(r.status for r in results).count("stored") == 100
        assert (await first.counts())["events"] == 100
        assert (await first.counts())["duplicates"] == 100
        # the newest instant of every entity is its newest event, whoever stored it
        assert await query(first, "SELECT count(*) FROM entities WHERE"
                           " newest_last_updated_at = '2024-05-01T10:00:04.000Z'") == [(20,)]
        assert await query(first, "SELECT count(*) FROM events WHERE late = 1") == [(0,)]


@pg_only
async def test_an_unreachable_server_is_unavailable_then_keeps_trying() -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    store = PostgresStore(dsn, StoreSettings(backend="postgresql", dsn=dsn))
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        await store.open()
    await store.open(keep_trying=True)
    try:
        with pytest.raises(StoreUnavailable):
            await store.ingest(parse_order_webhook(order_event_body()))
        assert store.writer_alive and not store.health().connected
    finally:
        await store.close()


@pg_only
async def test_a_lost_connection_is_unavailable_then_the_writer_reconnects(
    store: PostgresStore,
) -> None:
    await store.ingest(parse_order_webhook(order_event_body("o1")))
    await query(store, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid != pg_backend_pid()")
    with pytest.raises(StoreUnavailable):
        await store.ingest(parse_order_webhook(order_event_body("o2")))
    assert store.health().errors == 1 and not store.health().connected
    store._next_connect_at = 0.0  # no need to wait for the reconnect pause
    assert (await store.ingest(parse_order_webhook(order_event_body("o3")))).status == "stored"
    assert store.health().connected and store.health().last_error is None
    assert (await store.counts())["events"] == 2


@pg_only
async def test_a_deadlocked_operation_is_run_again_in_its_savepoint(
    store: PostgresStore,
) -> None:
    tries: list[int] = []

    async def deadlocks_once(conn: Any) -> str:
        tries.append(1)
        await conn.execute("INSERT INTO cursors VALUES ('x', 'y', 'z')")
        if len(tries) <= 2:  # in the batch's fast path, then in its savepoint
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        return "ok"

    results = await asyncio.gather(
        store.run(deadlocks_once), store.ingest(parse_order_webhook(order_event_body())))
    assert results[0] == "ok" and len(tries) == 3  # the savepoint's retry went through
    assert await query(store, "SELECT count(*) FROM cursors WHERE kind = 'x'") == [(1,)]


@pg_only
async def test_a_deadlock_that_persists_is_unavailable_not_a_bug(store: PostgresStore) -> None:
    async def always(conn: Any) -> None:
        raise asyncpg.DeadlockDetectedError("deadlock detected")

    with pytest.raises(StoreUnavailable, match="deadlock"):
        await store.run(always)
    assert (await store.ingest(parse_order_webhook(order_event_body()))).status == "stored"


@pg_only
async def test_two_replicas_writing_the_same_entities_in_opposite_orders_do_not_deadlock(
    store_factory: Callable[..., PostgresStore],
) -> None:
    """Each batch takes its entities' locks at once, in one sorted order: pages that name
    the same orders in opposite orders, on two replicas at once, all commit."""
    first, second = store_factory(), store_factory()
    names = [f"o{i}" for i in range(30)]
    async with first, second:
        for round_number in range(5):
            stamp = f"2024-05-01T10:00:{round_number:02d}.000Z"
            pages = [[parse_snapshot("order", order_obj(n, stamp), "poll") for n in order]
                     for order in (names, names[::-1])]
            results = await asyncio.gather(
                first.ingest_page("order", pages[0], [], None),
                second.ingest_page("order", pages[1], [], None))
            statuses = [r.status for page in results for r in page]
            assert statuses.count("stored") == 30 and statuses.count("duplicate") == 30
        assert (await first.counts())["events"] == 150


@pg_only
async def test_a_database_holding_other_tables_of_those_names_is_refused_at_once(
    pg_fresh_dsn: str,
) -> None:
    settings = StoreSettings(backend="postgresql", dsn=pg_fresh_dsn)
    store = PostgresStore(pg_fresh_dsn, settings)
    await execute(store, "CREATE TABLE events (x integer)")  # another application's table
    with pytest.raises(StoreError, match="cannot migrate") as caught:
        await store.open(keep_trying=True)  # no point in retrying: not a 503 loop
    assert not isinstance(caught.value, StoreUnavailable)
