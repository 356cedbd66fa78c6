"""Batched ingest (store.sqlite.ingest_many): the same answers and rows as one by one."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from tcbridge.envelope import (
    Candidate,
    parse_order_webhook,
    parse_shipment_webhook,
    parse_snapshot,
)
from tcbridge.store import IngestResult, migrate, run_batch
from tcbridge.store.rules import envelope_json
from tcbridge.store.sqlite import IngestOp, ingest_many, ingest_one
from tests.conftest import order_event_body, order_obj, shipment_obj

T1, T2, T3 = "2024-05-01T10:00:01.000Z", "2024-05-01T10:00:02.000Z", "2024-05-01T10:00:03.000Z"


def route(envelope: Mapping[str, Any]) -> Sequence[str]:
    """Two handlers for orders o1 and o3, one for the others (so rows differ per event)."""
    return ["a", "b"] if envelope["entityId"] in ("o1", "o3") else ["a"]


def tricky_candidates() -> list[Candidate]:
    """Repeats, siblings, late events, stale snapshots and Resent events on few entities."""
    first = order_event_body("o1", stamp=T2, line_ids=("l1",), message_id="m-1")
    return [
        parse_order_webhook(first),
        parse_order_webhook(first),  # a repeat: duplicate
        parse_order_webhook(order_event_body("o1", stamp=T2, line_ids=("l2",),
                                             message_id="m-2")),  # a sibling
        parse_order_webhook(order_event_body("o1", stamp=T2, line_ids=("l2",),
                                             message_id="m-2")),  # a repeat of the sibling
        parse_order_webhook(order_event_body("o1", stamp=T1)),  # late
        parse_snapshot("order", order_obj("o1", T1), "poll"),  # stale
        parse_snapshot("order", order_obj("o1", T2), "poll"),  # duplicate (a snapshot)
        parse_snapshot("order", order_obj("o2", T3), "poll"),
        parse_order_webhook(order_event_body("o2", stamp=T3, message_id="m-3")),  # duplicate
        parse_order_webhook(order_event_body("o2", stamp=T3, event_name="OrderResentByBuyer",
                                             message_id="m-4")),  # a Resent: stored
        parse_order_webhook(order_event_body("o2", stamp=T3, event_name="OrderResentByBuyer",
                                             message_id="m-4")),  # its repeat
        parse_order_webhook(order_event_body("o3", stamp=T1)),
        parse_order_webhook(order_event_body("o3", stamp=T3)),  # moves o3 forward
        parse_snapshot("order", order_obj("o3", T2), "poll"),  # stale against T3
        parse_order_webhook(order_event_body("o3", stamp=None, message_id="m-5")),  # no time
    ]


def fresh(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn)
    return conn


def dump(conn: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row ingest writes, but the delivery due time (time.time() when written)."""
    return {
        "events": conn.execute("SELECT * FROM events ORDER BY seq").fetchall(),
        "entities": conn.execute("SELECT * FROM entities ORDER BY 1, 2").fetchall(),
        "sightings": conn.execute("SELECT * FROM sightings ORDER BY id").fetchall(),
        "deliveries": conn.execute(
            "SELECT id, event_seq, event_id, handler, entity_id, status, created_at, replay"
            " FROM deliveries ORDER BY id").fetchall(),
    }


def one_by_one(conn: sqlite3.Connection, candidates: Sequence[Candidate]) -> list[IngestResult]:
    conn.execute("BEGIN")
    results = [ingest_one(conn, c, f"2024-06-01T00:00:{i:02d}.000Z", route)
               for i, c in enumerate(candidates)]
    conn.execute("COMMIT")
    return results


def batched(conn: sqlite3.Connection, candidates: Sequence[Candidate]) -> list[IngestResult]:
    conn.execute("BEGIN")
    results = ingest_many(conn, [IngestOp(c, f"2024-06-01T00:00:{i:02d}.000Z", route)
                                 for i, c in enumerate(candidates)])
    conn.execute("COMMIT")
    return results


@pytest.mark.parametrize("seed", [None, *range(12)])
@pytest.mark.parametrize("stored_first", [0, 3, 8])
def test_a_batch_answers_and_writes_what_one_by_one_does(
        tmp_path: Path, seed: int | None, stored_first: int) -> None:
    """Same id twice, same entity twice, siblings, late and stale inside one batch, on top
    of a store that already holds some of them: answers and rows equal, in order."""
    candidates = tricky_candidates()
    if seed is not None:
        random.Random(seed).shuffle(candidates)
    before, batch = candidates[:stored_first], candidates[stored_first:]
    seq_conn, batch_conn = fresh(tmp_path / "a.db"), fresh(tmp_path / "b.db")
    one_by_one(seq_conn, before)
    one_by_one(batch_conn, before)
    expected = one_by_one(seq_conn, batch)
    assert batched(batch_conn, batch) == expected
    assert dump(batch_conn) == dump(seq_conn)
    statuses = {r.status for r in expected}
    if seed is None and stored_first == 0:  # the unshuffled list has every kind of answer
        assert statuses == {"stored", "duplicate", "stale"}
        assert any(r.late for r in expected)


def test_a_batch_of_new_events_takes_a_handful_of_statements(tmp_path: Path) -> None:
    conn = fresh(tmp_path / "db")
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    candidates = [parse_order_webhook(order_event_body(f"n{i}")) for i in range(50)]
    results = batched(conn, candidates)
    assert [r.status for r in results] == ["stored"] * 50
    # BEGIN, one look-up, the events, the entities, the deliveries, COMMIT
    assert len(statements) == 6
    assert conn.execute("SELECT count(*) FROM events").fetchone() == (50,)
    assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (50,)


def test_more_events_than_one_insert_takes_are_written_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tcbridge.store import sqlite as backend

    monkeypatch.setattr(backend, "EVENT_ROWS_PER_INSERT", 3)
    conn = fresh(tmp_path / "db")
    candidates = [parse_order_webhook(order_event_body(f"n{i}")) for i in range(8)]
    results = batched(conn, candidates)
    assert [r.event_id for r in results] == [c.event_id for c in candidates]
    assert conn.execute("SELECT entity_id FROM events ORDER BY seq").fetchall() == [
        (f"n{i}",) for i in range(8)]
    assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (8,)


class _Future:
    """Enough of an asyncio.Future for run_batch (it only carries the answers back)."""


def run(conn: sqlite3.Connection, ops: Sequence[Any]) -> list[tuple[Any, BaseException | None]]:
    batch = [(op, _Future()) for op in ops]
    outcomes = run_batch(conn, batch)  # type: ignore[arg-type]
    assert [future for future, _, _ in outcomes] == [future for _, future in batch]
    return [(value, error) for _, value, error in outcomes]


def test_a_failing_operation_inside_a_run_of_ingests_fails_alone(tmp_path: Path) -> None:
    """The batch is rolled back and run again op by op in savepoints: the ingests around
    the failure hold, and the repeat after it is still a duplicate of the first."""
    conn = fresh(tmp_path / "db")
    body = order_event_body("o1", stamp=T1)

    def boom(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO cursors VALUES ('x', 'y', 'z')")
        raise ValueError("bug")

    def op(candidate: Candidate) -> IngestOp:
        return IngestOp(candidate, T3, route)

    outcomes = run(conn, [op(parse_order_webhook(body)), op(parse_order_webhook(
        order_event_body("o2"))), boom, op(parse_order_webhook(body)),
        op(parse_order_webhook(order_event_body("o3")))])
    assert [o[0].status if o[0] else None for o in outcomes] == [
        "stored", "stored", None, "duplicate", "stored"]
    assert isinstance(outcomes[2][1], ValueError)
    assert conn.execute("SELECT count(*) FROM events").fetchone() == (3,)
    assert conn.execute("SELECT count(*) FROM cursors").fetchone() == (0,)


def test_a_failing_route_fails_its_ingest_only_and_leaves_no_view_behind(
        tmp_path: Path) -> None:
    """The batch's own view (ids and newest instants decided so far) dies with the rolled
    back attempt: the fallback and the next batch see only what was committed."""
    conn = fresh(tmp_path / "db")

    def broken(envelope: Mapping[str, Any]) -> Sequence[str]:
        if envelope["entityId"] == "bad":
            raise RuntimeError("routing bug")
        return route(envelope)

    late_first = parse_order_webhook(order_event_body("o1", stamp=T3))
    ops = [IngestOp(late_first, T1, broken),
           IngestOp(parse_order_webhook(order_event_body("bad", stamp=T1)), T1, broken),
           IngestOp(parse_order_webhook(order_event_body("o1", stamp=T2)), T1, broken)]
    outcomes = run(conn, ops)
    assert isinstance(outcomes[1][1], RuntimeError)
    assert [o[0].status for o in (outcomes[0], outcomes[2])] == ["stored", "stored"]
    assert outcomes[2][0].late  # T2 after T3: the fallback saw the first event's instant
    assert conn.execute("SELECT entity_id FROM events ORDER BY seq").fetchall() == [
        ("o1",), ("o1",)]
    # The next batch: "bad" was never stored, so it is new now (the view did not leak).
    ops[1].route = route
    (again,) = run(conn, [ops[1]])
    assert again[0].status == "stored"
    assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (5,)


def test_the_batch_statements_find_rows_by_index_not_by_scan(tmp_path: Path) -> None:
    """With a million events a scan per batch would be the end: look-ups by key only."""
    from tcbridge.store import sqlite as backend

    conn = fresh(tmp_path / "db")

    def plan(sql: str, *args: object) -> str:
        return " | ".join(str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args))

    lookup = plan(backend._LOOKUP_SQL, '[["id", "order", "o1"]]')
    assert "SEARCH e USING INDEX sqlite_autoindex_events_1 (id=?)" in lookup
    assert "SEARCH n USING PRIMARY KEY (kind=? AND entity_id=?)" in lookup
    deliveries = plan(backend._INSERT_DELIVERIES_SQL, "[]", 1.0)
    assert "SEARCH e USING INDEX sqlite_autoindex_events_1 (id=?)" in deliveries
    assert "SCAN e" not in lookup + deliveries


def test_a_recovered_batch_marks_its_new_events_as_one_by_one_does(tmp_path: Path) -> None:
    """The poller's pages go through ingest_many too: ``recovered`` is kept per event."""
    candidates = tricky_candidates()
    expected_conn, got_conn = fresh(tmp_path / "one.db"), fresh(tmp_path / "many.db")
    expected_conn.execute("BEGIN")
    expected = [ingest_one(expected_conn, c, "2024-06-01T00:00:00.000Z", route, recovered=True)
                for c in candidates]
    expected_conn.execute("COMMIT")
    got_conn.execute("BEGIN")
    got = ingest_many(got_conn, [IngestOp(c, "2024-06-01T00:00:00.000Z", route, recovered=True)
                                 for c in candidates])
    got_conn.execute("COMMIT")
    assert got == expected
    assert any(r.recovered for r in got) and all(r.recovered for r in got if r.status == "stored")
    assert dump(got_conn) == dump(expected_conn)
    assert got_conn.execute("SELECT count(*) FROM events WHERE recovered = 1").fetchone()[0] == \
        sum(r.status == "stored" for r in got)


def test_an_empty_batch_writes_nothing(tmp_path: Path) -> None:
    conn = fresh(tmp_path / "empty.db")
    assert ingest_many(conn, []) == []
    assert dump(conn) == {"events": [], "entities": [], "sightings": [], "deliveries": []}


def test_the_spliced_payload_writes_the_rows_the_payload_written_again_does(
        tmp_path: Path) -> None:
    """The probe's text of the payload (orjson.Fragment) against the old path, the whole
    envelope written by orjson on the writer: the same answers, byte-identical rows."""
    candidates = [*tricky_candidates(),
                  parse_shipment_webhook({"eventName": "ShipmentIssuedBySupplier",
                                          "shipmentEvent": shipment_obj("s1")}),
                  parse_snapshot("shipment", shipment_obj("s2"), "poll")]
    assert all(c.payload_text is not None for c in candidates)
    spliced, written = fresh(tmp_path / "a.db"), fresh(tmp_path / "b.db")
    old_path = [replace(c, payload_dump=None) for c in candidates]
    assert all(c.payload_text is None for c in old_path)
    assert batched(spliced, candidates) == batched(written, old_path)
    assert dump(spliced) == dump(written)


def test_a_spliced_envelope_whose_other_fields_orjson_refuses_is_written_escaped() -> None:
    payload = {"id": "o1", "note": "caf\u00e9"}
    envelope = {"id": "e1", "meta": {"messageId": "m-\ud800"}, "payload": payload}
    text = envelope_json(envelope, orjson.dumps(payload))
    assert text == json.dumps(envelope, separators=(",", ":"))
    assert envelope_json({"id": "e1", "payload": payload}, orjson.dumps(payload)) == (
        orjson.dumps({"id": "e1", "payload": payload}).decode())
