"""The dispatcher with a real store and real handlers: order, retries, dead letters, replay."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from structlog.testing import capture_logs

from tcbridge.config import FileHandlerSettings, HandlerSettings, PythonHandlerSettings
from tcbridge.dispatch import (
    IDLE_CHECK_S,
    Dispatcher,
    Lane,
    LaneFailed,
    decide,
    make_route,
    retry_delay_s,
)
from tcbridge.envelope import parse_order_webhook, parse_snapshot
from tcbridge.errors import StoreUnavailable, describe
from tcbridge.handlers import FileHandler, Outcome, build_handler
from tcbridge.metrics import Metrics
from tcbridge.store import Finished, Store
from tests.backends import query
from tests.conftest import order_event_body, order_obj, until
from tests.support import writer_argv
from tests.test_files import FAILING_DIRECTORY_FSYNC, record_batches

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import tcb_dispatch_target as target


@pytest.fixture(autouse=True)
def clean_target() -> Iterator[None]:
    target.reset()
    yield
    target.reset()


def python_handler(name: str = "erp", **overrides: Any) -> PythonHandlerSettings:
    values: dict[str, Any] = {"name": name, "type": "python",
                              "callable": "tcb_dispatch_target:deliver",
                              "retry_initial_s": 0.01, "retry_max_s": 0.02}
    return PythonHandlerSettings(**(values | overrides))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


Rig = tuple[Store, Dispatcher]

pytestmark = pytest.mark.backends()
SQLITE_LOCK = "locks the SQLite file from another connection"
SQLITE_JSON = "edits a stored envelope with SQLite's JSON functions"


@pytest.fixture
async def rig(
    store_factory: Callable[..., Store], session: aiohttp.ClientSession
) -> AsyncIterator[Callable[..., Any]]:
    """A store routed to the given handlers, and a dispatcher with a lane for each."""
    opened: list[Store] = []

    async def make(*handlers: HandlerSettings, name: str = "tcbridge.db") -> Rig:
        store = store_factory(name, busy_timeout_s=0.5)
        store._route = make_route(handlers)
        await store.open()
        opened.append(store)
        lanes = [Lane(h, build_handler(h, session), store) for h in handlers]
        return store, Dispatcher(lanes, store, asyncio.Event())

    yield make
    for store in opened:
        await store.close()


async def ingest(store: Store, entity: str, stamp: str, **kw: Any) -> str:
    result = await store.ingest(parse_order_webhook(order_event_body(entity, stamp=stamp, **kw)))
    return result.event_id


async def statuses(store: Store) -> list[tuple[Any, ...]]:
    return await query(
        store, "SELECT handler, entity_id, status, attempts FROM deliveries ORDER BY id")


async def make_due(store: Store) -> None:
    await query(store, "UPDATE deliveries SET next_attempt_at = 0 WHERE status = 'pending'")


def test_decide() -> None:
    settings = python_handler(max_attempts=3, retry_initial_s=1, retry_max_s=10)
    assert decide(settings, Outcome("done"), 1, 100.0).status == "done"
    assert decide(settings, Outcome("dead", error="x"), 1, 100.0).status == "dead"
    retry = decide(settings, Outcome("retry", error="x"), 1, 100.0)
    assert retry.status == "pending" and retry.next_attempt_at is not None
    assert 101.0 <= retry.next_attempt_at <= 101.0 + 1.0
    assert decide(settings, Outcome("retry"), 3, 100.0).status == "dead"


def test_backoff_grows_is_capped_and_honours_retry_after() -> None:
    settings = python_handler(retry_initial_s=1, retry_max_s=8)
    assert 1 <= retry_delay_s(settings, 1, None) <= 1
    assert 2 <= retry_delay_s(settings, 3, None) <= 4
    assert all(4 <= retry_delay_s(settings, n, None) <= 8 for n in range(4, 40))
    assert retry_delay_s(settings, 1, 5.0) == 5.0
    assert retry_delay_s(settings, 1, 3600.0) == 8  # never beyond retry_max_s


async def test_deliveries_are_created_with_the_event_per_matching_handler(
    rig: Callable[..., Any], tmp_path: Path
) -> None:
    orders = FileHandlerSettings(name="orders", type="file", directory=tmp_path / "o",
                                 kinds=["order"], event_names=["OrderLines*"], snapshots=False)
    everything = FileHandlerSettings(name="all", type="file", directory=tmp_path / "a")
    store, dispatcher = await rig(orders, everything)
    await ingest(store, "o1", "2024-05-01T00:00:00Z", event_name="OrderLinesConfirmedBySupplier")
    await ingest(store, "o2", "2024-05-01T00:00:00Z", event_name="OrderIssuedByBuyer")
    await store.ingest(parse_snapshot("order", order_obj("o3"), "poll"))
    await ingest(store, "o1", "2024-05-01T00:00:00Z")  # a duplicate: no new deliveries
    assert [(h, e) for h, e, *_ in await statuses(store)] == [
        ("orders", "o1"), ("all", "o1"), ("all", "o2"), ("all", "o3")]
    assert await dispatcher.run_once() == 4
    assert len(list((tmp_path / "o").glob("*.json"))) == 1
    assert len(list((tmp_path / "a").glob("*.json"))) == 3
    assert {s for *_, s, _ in await statuses(store)} == {"done"}
    delivered = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    assert delivered["entityId"] == "o1" and delivered["eventName"].startswith("OrderLines")


async def test_failing_handler_retries_then_succeeds(rig: Callable[..., Any]) -> None:
    store, dispatcher = await rig(python_handler(retry_initial_s=60, retry_max_s=60))
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    target.FAILURES["o1"] = 2
    for expected_attempts in (1, 2):
        await dispatcher.run_once()
        assert await statuses(store) == [("erp", "o1", "pending", expected_attempts)]
        assert await dispatcher.run_once() == 0  # not due yet: backoff is a row, not a sleep
        await make_due(store)  # the backoff has passed (without waiting a minute)
    await dispatcher.run_once()
    assert await statuses(store) == [("erp", "o1", "done", 3)]
    attempts = await query(store, "SELECT attempt, outcome, error FROM delivery_attempts")
    assert [a[:2] for a in attempts] == [(1, "retry"), (2, "retry"), (3, "done")]
    assert "ERP down" in attempts[0][2]


async def test_out_of_attempts_is_dead_and_replay_dead_delivers(
    rig: Callable[..., Any],
) -> None:
    store, dispatcher = await rig(python_handler(max_attempts=2))
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    target.FAILURES["o1"] = 5
    await dispatcher.run_once()
    await asyncio.sleep(0.03)
    await dispatcher.run_once()
    assert await statuses(store) == [("erp", "o1", "dead", 2)]
    (dead,) = await store.deliveries(status="dead")
    assert "ERP down" in dead["lastError"]
    target.FAILURES.clear()
    assert await store.requeue_dead("erp") == 1
    await dispatcher.run_once()
    assert await statuses(store) == [("erp", "o1", "done", 1)]
    assert [e for e, _ in target.DELIVERED] == ["o1"]


async def test_permanent_failure_is_dead_at_once(rig: Callable[..., Any]) -> None:
    store, dispatcher = await rig(python_handler(max_attempts=10))
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    target.PERMANENT.add("o1")
    await dispatcher.run_once()
    assert await statuses(store) == [("erp", "o1", "dead", 1)]


async def test_order_per_entity_while_other_entities_proceed(rig: Callable[..., Any]) -> None:
    store, dispatcher = await rig(python_handler(concurrency=4))
    a1 = await ingest(store, "A", "2024-05-01T00:00:01Z")
    a2 = await ingest(store, "A", "2024-05-01T00:00:02Z")
    b1 = await ingest(store, "B", "2024-05-01T00:00:01Z")
    a3 = await ingest(store, "A", "2024-05-01T00:00:03Z")
    target.GATES["A"] = asyncio.Event()
    stop = asyncio.Event()
    runner = asyncio.create_task(dispatcher.run(stop))
    await until(lambda: ("B", b1) in target.DELIVERED)
    assert target.STARTED == [a1, b1]  # A2 and A3 wait for A1, B is not held up
    target.GATES["A"].set()
    await until(lambda: len(target.DELIVERED) == 4)
    assert [e for ent, e in target.DELIVERED if ent == "A"] == [a1, a2, a3]
    stop.set()
    await runner


async def test_failed_earlier_event_blocks_later_ones_of_its_entity(
    rig: Callable[..., Any],
) -> None:
    store, dispatcher = await rig(python_handler())
    first = await ingest(store, "A", "2024-05-01T00:00:01Z")
    second = await ingest(store, "A", "2024-05-01T00:00:02Z")
    target.FAILURES["A"] = 1
    await dispatcher.run_once()
    assert target.STARTED == [first]  # the second waits for the retry of the first
    await asyncio.sleep(0.03)
    await dispatcher.run_once()
    await dispatcher.run_once()
    assert [e for _, e in target.DELIVERED] == [first, second]


async def test_slow_handler_does_not_hold_up_another(
    rig: Callable[..., Any], tmp_path: Path
) -> None:
    fast = FileHandlerSettings(name="fast", type="file", directory=tmp_path / "fast")
    store, dispatcher = await rig(python_handler("slow", concurrency=1), fast)
    for i in range(20):
        await ingest(store, f"e{i}", "2024-05-01T00:00:00Z")
    for i in range(20):
        target.GATES[f"e{i}"] = asyncio.Event()  # the slow handler never finishes
    stop = asyncio.Event()
    runner = asyncio.create_task(dispatcher.run(stop))
    await until(lambda: len(list((tmp_path / "fast").glob("*.json"))) == 20)

    async def fast_recorded() -> None:  # a file is in place before its directory fsync
        while (await store.delivery_counts()).get("fast") != {"done": 20}:  # and outcome
            await asyncio.sleep(0.02)

    await asyncio.wait_for(fast_recorded(), timeout=30)
    assert target.DELIVERED == []
    stop.set()
    await runner
    assert await dispatcher.drain(0.05) == 1  # the slow delivery is cut off...
    counts = await store.delivery_counts()
    assert counts["slow"] == {"pending": 20}  # ...and left pending, not lost
    assert counts["fast"] == {"done": 20}


async def test_new_events_wake_the_dispatcher_at_once(rig: Callable[..., Any]) -> None:
    store, dispatcher = await rig(python_handler())
    stop = asyncio.Event()
    runner = asyncio.create_task(dispatcher.run(stop))
    await asyncio.sleep(0.05)
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    dispatcher._wake.set()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await until(lambda: len(target.DELIVERED) == 1)
    assert loop.time() - started < 1.0  # well under the 2 s idle check: woken, not polled
    stop.set()
    await runner


async def test_interrupted_deliveries_are_released_at_start(
    rig: Callable[..., Any], store_factory: Callable[..., Store], session: aiohttp.ClientSession
) -> None:
    store, _ = await rig(python_handler())
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    (claim,) = await store.claim("erp", 4)  # the crash happens now: the row stays running
    await store.close()
    store2, dispatcher = await rig(python_handler())
    assert await statuses(store2) == [("erp", "o1", "running", 0)]
    with capture_logs() as logs:
        assert await dispatcher.start() == 1
    assert {"event": "dispatch.resumed_interrupted", "deliveries": 1,
            "log_level": "warning"} in logs
    await dispatcher.run_once()
    assert await statuses(store2) == [("erp", "o1", "done", 1)]
    assert target.DELIVERED == [("o1", claim.event_id)]


async def test_replay_event_delivers_again_with_the_same_id(rig: Callable[..., Any]) -> None:
    store, dispatcher = await rig(python_handler())
    event_id = await ingest(store, "o1", "2024-05-01T00:00:00Z")
    await dispatcher.run_once()
    assert await store.replay(event_id, None) == 1
    await dispatcher.run_once()
    assert target.DELIVERED == [("o1", event_id), ("o1", event_id)]
    with pytest.raises(Exception, match="no event with id"):
        await store.replay("nope", None)


class RaisingHandler:
    """A handler with a bug: it raises instead of returning an Outcome."""

    name = "buggy"

    async def deliver(self, envelope: Any, body: bytes, attempt: int) -> Outcome:
        raise KeyError("oops")

    async def close(self) -> None:
        return None


async def test_a_handler_that_raises_is_retried_not_fatal(store: Store) -> None:
    settings = python_handler("buggy", retry_initial_s=5, retry_max_s=5)
    store._route = make_route([settings])
    lane = Lane(settings, RaisingHandler(), store)
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    with capture_logs() as logs:
        assert await lane.run_once() == 1
    assert await statuses(store) == [("buggy", "o1", "pending", 1)]
    (row,) = await store.deliveries()
    assert row["lastError"] == "KeyError: 'oops'"
    assert any(line["event"] == "dispatch.handler_raised" for line in logs)


@pytest.mark.sqlite_only(SQLITE_LOCK)
async def test_outcome_is_recorded_once_the_store_is_writable_again(
    rig: Callable[..., Any],
) -> None:
    store, dispatcher = await rig(python_handler())
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    target.GATES["o1"] = asyncio.Event()
    with capture_logs() as logs:
        delivering = asyncio.create_task(dispatcher.run_once())
        await until(lambda: len(target.STARTED) == 1)
        blocker = sqlite3.connect(store.path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # the store cannot write the outcome now
        target.GATES["o1"].set()
        await until(lambda: any(e["event"] == "dispatch.record_failed" for e in logs))
        blocker.execute("ROLLBACK")
        blocker.close()
        await delivering
    assert await statuses(store) == [("erp", "o1", "done", 1)]
    failed = next(e for e in logs if e["event"] == "dispatch.record_failed")
    assert "locked" in failed["error"]


@pytest.mark.sqlite_only(SQLITE_LOCK)
async def test_lane_keeps_running_while_the_store_is_locked(rig: Callable[..., Any]) -> None:
    store, dispatcher = await rig(python_handler())
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    stop = asyncio.Event()
    with capture_logs() as logs:
        runner = asyncio.create_task(dispatcher.run(stop))
        await until(lambda: any(e["event"] == "dispatch.store_failed" for e in logs))
        blocker.execute("ROLLBACK")
        blocker.close()
        await ingest(store, "o1", "2024-05-01T00:00:00Z")
        await until(lambda: len(target.DELIVERED) == 1)
    stop.set()
    failed = next(e for e in logs if e["event"] == "dispatch.store_failed")
    assert failed["handler"] == "erp" and "locked" in failed["error"]
    await runner


# -- nothing stuck: any exception inside a delivery is a recorded attempt -------------------


@pytest.mark.parametrize("stored", ['{"id":"\\ud800"}', "not json {", "[1, 2]"])
async def test_an_envelope_the_dispatcher_cannot_read_is_dead_not_stuck(
    rig: Callable[..., Any], stored: str
) -> None:
    store, dispatcher = await rig(python_handler())
    bad = await ingest(store, "o1", "2024-05-01T00:00:00Z")
    good = await ingest(store, "o1", "2024-05-01T00:00:01Z")
    # as a bug or an old version might have left it
    await query(store, "UPDATE events SET envelope = ? WHERE id = ?", stored, bad)
    with capture_logs():
        await dispatcher.run_once()
        await dispatcher.run_once()  # the entity's lane is free: the next event goes
    assert await statuses(store) == [("erp", "o1", "dead", 1), ("erp", "o1", "done", 1)]
    dead = (await store.deliveries(status="dead"))[0]
    assert "stored envelope" in dead["lastError"]
    if stored == "[1, 2]":
        assert dead["lastError"] == "the stored envelope is not a JSON object"
    assert target.DELIVERED == [("o1", good)]


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken too")


class OddHandler:
    """Handler bugs of the unexpected kinds: an exception that cannot be printed, an error
    text the store cannot bind (a lone surrogate quoted from a payload)."""

    name = "odd"

    def __init__(self, mode: str) -> None:
        self.mode = mode

    async def deliver(self, envelope: Any, body: bytes, attempt: int) -> Outcome:
        if self.mode == "unprintable":
            raise Unprintable
        return Outcome("retry", error="bad value \ud800 in field", output="out \udcff")

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("mode", ["unprintable", "surrogate"])
async def test_a_handler_failing_in_an_unexpected_way_is_a_failed_attempt(
    store: Store, mode: str
) -> None:
    settings = python_handler("odd", retry_initial_s=5, retry_max_s=5)
    store._route = make_route([settings])
    lane = Lane(settings, OddHandler(mode), store)
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    with capture_logs():
        assert await lane.run_once() == 1
    assert await statuses(store) == [("odd", "o1", "pending", 1)]
    (row,) = await store.deliveries()
    expected = "Unprintable: <unprintable>" if mode == "unprintable" else "bad value \\ud800"
    assert expected in row["lastError"]


async def test_a_delivery_task_that_dies_fails_its_lane(store: Store) -> None:
    settings = python_handler("odd")
    lane = Lane(settings, OddHandler("unprintable"), store)

    async def broken(claim: Any) -> None:
        raise RuntimeError("bug outside every guard")

    lane._deliver = broken  # type: ignore[method-assign]
    store._route = make_route([settings])
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    dispatcher = Dispatcher([lane], store, asyncio.Event())
    with capture_logs() as logs, pytest.raises(Exception, match="lane odd") as caught:
        await asyncio.wait_for(dispatcher.run(asyncio.Event()), timeout=10)
    assert "bug outside every guard" in str(caught.value)
    (died,) = [line for line in logs if line["event"] == "dispatch.delivery_task_died"]
    assert died["handler"] == "odd" and died["delivery"] == 1
    assert died["error"] == "RuntimeError('bug outside every guard')"


async def test_a_lane_that_dies_fails_the_dispatcher(
    rig: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, dispatcher = await rig(python_handler())

    async def crash(self: Lane) -> float | None:
        raise ValueError("not a store error")

    monkeypatch.setattr(Lane, "_fill", crash)
    with pytest.raises(Exception, match="lane erp died: ValueError: not a store error"):
        await asyncio.wait_for(dispatcher.run(asyncio.Event()), timeout=10)


# -- a clean stop delivers nothing twice ------------------------------------------------------


class HeldClaims:
    """The store, but a claim returns only when the test lets it (the drain race)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.entered = asyncio.Event()
        self.go = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def claim_and_next_due(self, handler: str, limit: int) -> Any:
        self.entered.set()
        await self.go.wait()
        return await self._store.claim_and_next_due(handler, limit)


async def test_drain_waits_for_a_claim_in_flight_and_starts_nothing(
    rig: Callable[..., Any],
) -> None:
    store, dispatcher = await rig(python_handler())
    (lane,) = dispatcher.lanes
    held = HeldClaims(store)
    lane._store = held  # type: ignore[assignment]
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    stop = asyncio.Event()
    running = asyncio.create_task(dispatcher.run(stop))
    await held.entered.wait()  # the claim is in flight
    stop.set()
    draining = asyncio.create_task(dispatcher.drain(5))
    await asyncio.sleep(0)  # drain has begun
    held.go.set()  # now the claim returns, with the delivery marked running
    assert await draining == 0
    await running
    # The claim came back after drain began: released unstarted, nothing runs unwatched.
    assert await statuses(store) == [("erp", "o1", "pending", 0)]
    await asyncio.sleep(0.05)
    assert target.STARTED == []


class RetryAfterHandler:
    name = "limited"

    async def deliver(self, envelope: Any, body: bytes, attempt: int) -> Outcome:
        return Outcome("retry", error="HTTP 429", retry_after_s=30.0)

    async def close(self) -> None:
        return None


async def test_the_dispatcher_honours_retry_after(store: Store) -> None:
    settings = python_handler("limited", retry_initial_s=0.01, retry_max_s=600)
    store._route = make_route([settings])
    lane = Lane(settings, RetryAfterHandler(), store)
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    before = time.time()
    with capture_logs():
        assert await lane.run_once() == 1
    (row,) = await store.deliveries()
    assert row["status"] == "pending"
    assert row["nextAttemptAt"] >= before + 30.0  # not the 0.01 s backoff
    assert await lane.run_once() == 0  # and nothing is claimed before then


# -- what a delivery tells the handler, the logs and the metrics ----------------------------


class ScriptedHandler:
    """Returns the scripted outcomes in turn; records what each call saw."""

    name = "ctx"

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.seen: list[dict[str, Any]] = []

    async def deliver(self, envelope: Any, body: bytes, attempt: int) -> Outcome:
        self.seen.append({"attempt": attempt, "id": envelope["id"], "body": body,
                          "context": structlog.contextvars.get_contextvars()})
        return self.outcomes.pop(0)

    async def close(self) -> None:
        return None


def samples(metrics: Metrics, name: str) -> dict[tuple[str, ...], float]:
    return {tuple(sample.labels.values()): sample.value
            for metric in metrics.registry.collect() for sample in metric.samples
            if sample.name == name}


async def test_a_delivery_binds_its_context_and_is_counted(store: Store) -> None:
    settings = python_handler("ctx", retry_initial_s=60, retry_max_s=60, max_attempts=5)
    store._route = make_route([settings])
    handler = ScriptedHandler(Outcome("retry", error="busy"), Outcome("done"),
                              Outcome("dead", error="unknown order"))
    metrics = Metrics()
    lane = Lane(settings, handler, store, metrics=metrics)
    event_id = await ingest(store, "o1", "2024-05-01T00:00:00Z")
    with capture_logs():
        await lane.run_once()
        await make_due(store)
        await lane.run_once()
        await ingest(store, "o2", "2024-05-01T00:00:00Z")
        await lane.run_once()
    first, second, _ = handler.seen
    assert first["context"] == {"event_id": event_id, "entity_id": "o1", "kind": "order",
                                "source": "webhook", "handler": "ctx", "attempt": 1}
    assert (first["attempt"], second["attempt"]) == (1, 2)
    assert json.loads(first["body"])["id"] == event_id
    assert samples(metrics, "tcbridge_deliveries_total") == {
        ("ctx", "retry"): 1.0, ("ctx", "done"): 1.0, ("ctx", "dead"): 1.0}
    assert samples(metrics, "tcbridge_delivery_latency_seconds_count") == {("ctx",): 1.0}
    (latency_s,) = samples(metrics, "tcbridge_delivery_latency_seconds_sum").values()
    assert 0.0 <= latency_s < 60.0


@pytest.mark.sqlite_only(SQLITE_JSON)
async def test_a_delivery_without_receipt_time_is_counted_without_latency(store: Store) -> None:
    settings = python_handler("ctx")
    store._route = make_route([settings])
    metrics = Metrics()
    lane = Lane(settings, ScriptedHandler(Outcome("done")), store, metrics=metrics)
    event_id = await ingest(store, "o1", "2024-05-01T00:00:00Z")
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE events SET envelope = json_remove(envelope, '$.receivedAt')"
                     " WHERE id = ?", (event_id,))
    with capture_logs():
        await lane.run_once()
    assert samples(metrics, "tcbridge_deliveries_total") == {("ctx", "done"): 1.0}
    assert samples(metrics, "tcbridge_delivery_latency_seconds_count") == {}


async def test_an_attempt_that_fails_outside_the_handler_is_recorded(store: Store) -> None:
    settings = python_handler("ctx", retry_initial_s=60, retry_max_s=60)
    store._route = make_route([settings])
    lane = Lane(settings, ScriptedHandler(), store)

    async def broken(claim: Any, envelope: Any) -> Outcome:
        raise RuntimeError("between claim and outcome")

    lane._attempt = broken  # type: ignore[method-assign]
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    with capture_logs() as logs:
        await lane.run_once()
    assert await statuses(store) == [("ctx", "o1", "pending", 1)]
    (row,) = await store.deliveries()
    assert row["lastError"] == "RuntimeError: between claim and outcome"
    assert any(e["event"] == "dispatch.attempt_failed" for e in logs)


async def test_a_purged_payload_is_dead_with_the_reason(store: Store) -> None:
    settings = python_handler("ctx")
    store._route = make_route([settings])
    handler = ScriptedHandler(Outcome("done"))
    lane = Lane(settings, handler, store)
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    # as an older version's retention left it
    await query(store, "UPDATE events SET envelope = NULL")
    with capture_logs():
        await lane.run_once()
    assert await statuses(store) == [("ctx", "o1", "dead", 1)]
    (row,) = await store.deliveries()
    assert row["lastError"] == "the event's payload was purged by retention"
    assert handler.seen == []


async def test_outputs_are_stored_escaped(store: Store) -> None:
    settings = python_handler("odd", retry_initial_s=5, retry_max_s=5)
    store._route = make_route([settings])
    lane = Lane(settings, OddHandler("surrogate"), store)
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    with capture_logs():
        await lane.run_once()
    assert await query(store, "SELECT error, output FROM delivery_attempts") == [
            ("bad value \\ud800 in field", "out \\udcff")]


def test_error_text() -> None:
    assert describe(ValueError("bad")) == "ValueError: bad"
    assert describe(ValueError()) == "ValueError"
    assert describe(Unprintable()) == "Unprintable: <unprintable>"


# -- drain: running deliveries finish, late ones are cut off and released ---------------------


async def start_gated(rig: Callable[..., Any]) -> tuple[Store, Dispatcher, asyncio.Event,
                                                         asyncio.Task[None]]:
    store, dispatcher = await rig(python_handler())
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    target.GATES["o1"] = asyncio.Event()
    stop = asyncio.Event()
    running = asyncio.create_task(dispatcher.run(stop))
    await until(lambda: len(target.STARTED) == 1)
    stop.set()
    return store, dispatcher, target.GATES["o1"], running


async def test_drain_lets_a_running_delivery_finish(rig: Callable[..., Any]) -> None:
    store, dispatcher, gate, running = await start_gated(rig)
    with capture_logs() as logs:
        draining = asyncio.create_task(dispatcher.drain(30))
        await asyncio.sleep(0)
        gate.set()
        assert await draining == 0
        await running
    assert await statuses(store) == [("erp", "o1", "done", 1)]
    assert not any(e["event"] == "dispatch.delivery_task_died" for e in logs)


async def test_drain_cuts_off_what_runs_past_the_deadline_and_releases_it(
    rig: Callable[..., Any],
) -> None:
    store, dispatcher, _, running = await start_gated(rig)
    with capture_logs() as logs:
        assert await dispatcher.drain(0.05) == 1
        # released before drain returns
        assert await statuses(store) == [("erp", "o1", "pending", 0)]
        await running
    assert not any(e["event"] == "dispatch.delivery_task_died" for e in logs)


class FailingRelease(HeldClaims):
    async def release(self, ids: Any = None) -> int:
        raise StoreUnavailable("disk gone")


async def test_a_failed_release_is_logged_and_left_for_start_up(rig: Callable[..., Any]) -> None:
    store, dispatcher, _, running = await start_gated(rig)
    (lane,) = dispatcher.lanes
    lane._store = FailingRelease(store)  # type: ignore[assignment]
    with capture_logs() as logs:
        assert await dispatcher.drain(0.05) == 1
        await running
    assert {"event": "dispatch.release_failed", "error": "disk gone",
            "log_level": "warning"} in logs
    assert await statuses(store) == [("erp", "o1", "running", 0)]


@pytest.mark.parametrize("release", ["works", "fails"])
async def test_drain_does_not_wait_for_ever_for_a_hung_claim(
    rig: Callable[..., Any], release: str
) -> None:
    store, dispatcher = await rig(python_handler())
    (lane,) = dispatcher.lanes
    held = HeldClaims(store) if release == "works" else FailingRelease(store)
    lane._store = held  # type: ignore[assignment]
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    stop = asyncio.Event()
    running = asyncio.create_task(dispatcher.run(stop))
    await held.entered.wait()
    stop.set()
    # another process's claim, still running
    await query(store, "INSERT INTO deliveries (event_seq, event_id, handler, entity_id, status,"
                " next_attempt_at, created_at) SELECT event_seq, event_id, 'other',"
                " 'o9', 'running', 0, created_at FROM deliveries")
    with capture_logs() as logs:
        assert await dispatcher.drain(0.05) == 0  # the claim never came back in time
        held.go.set()  # it does now: released unstarted (or left for start-up)
        await running
    if release == "works":
        assert await statuses(store) == [("erp", "o1", "pending", 0), ("other", "o9", "running", 0)]
    else:
        assert {"event": "dispatch.release_failed", "error": "disk gone",
                "log_level": "warning"} in logs
    assert target.STARTED == []


# -- a lane that ends early fails the dispatcher, one that ends on stop does not --------------


async def lane_outcome(rig: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
                       how: str) -> BaseException | None:
    _, dispatcher = await rig(python_handler("a"), python_handler("b"))
    first, _second = dispatcher.lanes
    stop = asyncio.Event()

    async def ends(self: Lane, stop_: asyncio.Event) -> None:
        if self is first:
            await stop_.wait()
        elif how == "returns":
            return
        elif how == "cancelled":
            raise asyncio.CancelledError
        elif how == "drained":
            await self.drain(0.01)
            await stop_.wait()
        else:
            await stop_.wait()
            raise ValueError("died while stopping")

    monkeypatch.setattr(Lane, "run", ends)
    running = asyncio.create_task(dispatcher.run(stop))
    if how in ("drained", "dies_on_stop"):
        await asyncio.sleep(0.05)
        stop.set()
    try:
        await asyncio.wait_for(running, timeout=10)
    except Exception as e:
        return e
    return None


@pytest.mark.parametrize(("how", "message"), [
    ("returns", "lane b stopped before the daemon did"),
    ("cancelled", "lane b was cancelled"),
    ("dies_on_stop", "lane b died: ValueError: died while stopping"),
    ("drained", None),
])
async def test_lanes_are_watched(
    rig: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, how: str, message: str | None
) -> None:
    error = await lane_outcome(rig, monkeypatch, how)
    if message is None:
        assert error is None
    else:
        assert isinstance(error, LaneFailed) and str(error) == message


async def test_each_decision_is_logged_with_what_an_operator_needs(store: Store) -> None:
    settings = python_handler("ctx", retry_initial_s=60, retry_max_s=60, max_attempts=5)
    store._route = make_route([settings])
    handler = ScriptedHandler(Outcome("retry", error="busy"), Outcome("done"),
                              Outcome("dead", error="unknown", output="ERP said no"))
    lane = Lane(settings, handler, store)
    with capture_logs() as logs:
        await ingest(store, "o1", "2024-05-01T00:00:00Z")
        await lane.run_once()
        await make_due(store)
        await lane.run_once()
        await ingest(store, "o2", "2024-05-01T00:00:00Z")
        await lane.run_once()
    decisions = [e for e in logs if e["event"].startswith("delivery.")]
    retry, done, dead = decisions
    assert (retry["event"], retry["error"], retry["log_level"]) == (
        "delivery.retry", "busy", "warning")
    assert isinstance(retry["delay_s"], float) and 50 <= retry["delay_s"] <= 60
    assert retry["delay_s"] == round(retry["delay_s"], 2)
    assert done == {"event": "delivery.done", "log_level": "info"}
    assert dead == {"event": "delivery.dead", "error": "unknown", "output": "ERP said no",
                    "log_level": "error"}


class RefusingFinish:
    """The store, but ``finish_many`` raises a non-store error the first ``times`` calls."""

    def __init__(self, store: Store, times: int) -> None:
        self._store = store
        self.times = times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def finish_many(self, outcomes: Any) -> None:
        if self.times > 0:
            self.times -= 1
            raise ValueError("row refused")
        await self._store.finish_many(outcomes)


async def test_an_outcome_the_store_refuses_is_recorded_without_its_texts(store: Store) -> None:
    settings = python_handler("ctx", retry_initial_s=60, retry_max_s=60)
    store._route = make_route([settings])
    lane = Lane(settings, ScriptedHandler(Outcome("retry", error="e", output="o")),
                RefusingFinish(store, 1))  # type: ignore[arg-type]
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    with capture_logs() as logs:
        await lane.run_once()
    assert await statuses(store) == [("ctx", "o1", "pending", 1)]
    assert await query(store, "SELECT error, output FROM delivery_attempts") == [
            ("the outcome could not be recorded: ValueError", None)]
    assert any(e["event"] == "dispatch.record_refused" for e in logs)


@pytest.mark.parametrize("texts", [("e", None), (None, "o")])
async def test_either_text_is_dropped_when_the_store_refuses_it(
    store: Store, texts: tuple[str | None, str | None]
) -> None:
    settings = python_handler("ctx", retry_initial_s=60, retry_max_s=60)
    store._route = make_route([settings])
    error, output = texts
    lane = Lane(settings, ScriptedHandler(Outcome("retry", error=error, output=output)),
                RefusingFinish(store, 1))  # type: ignore[arg-type]
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    with capture_logs():
        await lane.run_once()
    assert await statuses(store) == [("ctx", "o1", "pending", 1)]


async def test_an_outcome_without_texts_the_store_refuses_is_a_bug_that_stops_the_lane(
    store: Store,
) -> None:
    settings = python_handler("ctx")
    store._route = make_route([settings])
    lane = Lane(settings, ScriptedHandler(Outcome("done")), RefusingFinish(store, 99))  # type: ignore[arg-type]
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    with capture_logs(), pytest.raises(ValueError, match="row refused"):
        await lane.run_once()


async def test_a_cut_off_delivery_releases_only_its_own_row(rig: Callable[..., Any]) -> None:
    store, dispatcher, _, running = await start_gated(rig)
    # another process's claim, still running
    await query(store, "INSERT INTO deliveries (event_seq, event_id, handler, entity_id, status,"
                " next_attempt_at, created_at) SELECT event_seq, event_id, 'other',"
                " entity_id, 'running', 0, created_at FROM deliveries")
    with capture_logs():
        assert await dispatcher.drain(0.05) == 1
        await running
    assert await statuses(store) == [("erp", "o1", "pending", 0), ("other", "o1", "running", 0)]


@pytest.mark.sqlite_only(SQLITE_JSON)
async def test_a_receipt_time_in_the_future_or_unreadable_gives_no_negative_latency(
    store: Store,
) -> None:
    settings = python_handler("ctx")
    store._route = make_route([settings])
    metrics = Metrics()
    lane = Lane(settings, ScriptedHandler(Outcome("done"), Outcome("done")), store,
                metrics=metrics)
    for entity, received in (("o1", "2999-01-01T00:00:00.000Z"), ("o2", "not a time")):
        event_id = await ingest(store, entity, "2024-05-01T00:00:00Z")
        with sqlite3.connect(store.path) as conn:
            conn.execute("UPDATE events SET envelope = json_set(envelope, '$.receivedAt', ?)"
                         " WHERE id = ?", (received, event_id))
    with capture_logs():
        assert await lane.run_once() == 2
    assert samples(metrics, "tcbridge_deliveries_total") == {("ctx", "done"): 2.0}
    assert samples(metrics, "tcbridge_delivery_latency_seconds_count") == {("ctx",): 1.0}
    assert samples(metrics, "tcbridge_delivery_latency_seconds_sum") == {("ctx",): 0.0}


@pytest.mark.sqlite_only(SQLITE_JSON)
async def test_latency_is_counted_from_receipt_in_seconds(store: Store) -> None:
    settings = python_handler("ctx")
    store._route = make_route([settings])
    metrics = Metrics()
    lane = Lane(settings, ScriptedHandler(Outcome("done")), store, metrics=metrics)
    event_id = await ingest(store, "o1", "2024-05-01T00:00:00Z")
    received = datetime.fromtimestamp(time.time() - 10, tz=UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE events SET envelope = json_set(envelope, '$.receivedAt', ?)"
                     " WHERE id = ?", (received, event_id))
    with capture_logs():
        await lane.run_once()
    (latency_s,) = samples(metrics, "tcbridge_delivery_latency_seconds_sum").values()
    assert 10.0 <= latency_s < 70.0


def test_the_lane_sleeps_until_the_next_due_delivery_at_most_the_idle_check(
    store: Store,
) -> None:
    lane = Lane(python_handler(), ScriptedHandler(), store)
    assert lane._delay(None) == IDLE_CHECK_S
    assert lane._delay(time.time() - 100) == 0.0
    assert 0.0 < lane._delay(time.time() + 0.5) <= 0.5
    assert lane._delay(time.time() + 1000) == IDLE_CHECK_S


async def test_each_attempt_is_recorded_with_its_outcome_and_the_end_with_its_time(
    store: Store,
) -> None:
    settings = python_handler("ctx", retry_initial_s=60, retry_max_s=60, max_attempts=5)
    store._route = make_route([settings])
    lane = Lane(settings, ScriptedHandler(Outcome("retry", error="busy"), Outcome("done"),
                                          Outcome("dead", error="unknown")), store)
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    with capture_logs():
        await lane.run_once()
        assert await query(store, "SELECT finished_at FROM deliveries") == [(None,)]
        await make_due(store)
        await lane.run_once()
        await ingest(store, "o2", "2024-05-01T00:00:00Z")
        await lane.run_once()
    attempts = await query(store, "SELECT delivery_id, attempt, outcome, error"
                           " FROM delivery_attempts ORDER BY id")
    ends = await query(store, "SELECT status, finished_at IS NOT NULL FROM deliveries"
                       " ORDER BY id")
    assert attempts == [(1, 1, "retry", "busy"), (1, 2, "done", None), (2, 1, "dead", "unknown")]
    assert ends == [("done", 1), ("dead", 1)]


class Renewals:
    """The store, recording lease renewals; ``lose`` ids are reported no longer held, and
    ``fail`` makes the next renewal raise."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.calls: list[tuple[str, list[int]]] = []
        self.lose: set[int] = set()
        self.fail = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def renew(self, handler: str, ids: Any) -> list[int]:
        self.calls.append((handler, list(ids)))
        if self.fail:
            self.fail -= 1
            raise StoreUnavailable("database gone")
        return [i for i in ids if i not in self.lose]


async def test_leases_are_renewed_while_the_handler_runs_and_no_more_after(
    store: Store, session: aiohttp.ClientSession,
) -> None:
    settings = python_handler()
    store._route = make_route([settings])
    renewals = Renewals(store)
    lane = Lane(settings, build_handler(settings, session), renewals,  # type: ignore[arg-type]
                lease_s=0.3)
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    target.GATES["o1"] = asyncio.Event()
    renewals.fail = 1  # the first renewal fails: logged, tried again
    stop = asyncio.Event()
    with capture_logs() as logs:
        running = asyncio.create_task(lane.run(stop))
        await until(lambda: len(renewals.calls) >= 3)
        renewals.lose = {renewals.calls[0][1][0]}
        await until(lambda: any(e["event"] == "dispatch.lease_lost" for e in logs))
        target.GATES["o1"].set()
        while await statuses(store) != [("erp", "o1", "done", 1)]:
            await asyncio.sleep(0.02)
        stop.set()
        await running
    assert all(call == ("erp", renewals.calls[0][1]) for call in renewals.calls)
    assert any(e["event"] == "dispatch.renew_failed" for e in logs)
    done_at = len(renewals.calls)
    await asyncio.sleep(0.3)  # every 0.1 s while it ran; none once nothing runs
    assert len(renewals.calls) == done_at
    assert lane._renewal is None


@pytest.mark.sqlite_only("PostgreSQL's renewals: tests/test_replicas.py")
async def test_a_sqlite_store_keeps_every_claim(store: Store) -> None:
    assert await store.renew("erp", [3, 1]) == [3, 1]


# -- batches: claims and outcomes -------------------------------------------------------------


class HeldOutcomes:
    """The store, but ``finish_many`` waits for ``gate`` (then writes, unless ``lose``: the
    process died before its outcome write); the sizes of the writes are kept."""

    def __init__(self, store: Store, *, lose: bool = False) -> None:
        self._store = store
        self.gate = asyncio.Event()
        self.lose = lose
        self.sizes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def finish_many(self, outcomes: Any) -> None:
        self.sizes.append(len(outcomes))
        await self.gate.wait()
        if not self.lose:
            await self._store.finish_many(outcomes)


async def test_a_batch_claim_takes_only_the_head_of_each_entity(store: Store) -> None:
    store._route = make_route([python_handler()])
    a1 = await ingest(store, "A", "2024-05-01T00:00:01Z")
    a2 = await ingest(store, "A", "2024-05-01T00:00:02Z")
    b1 = await ingest(store, "B", "2024-05-01T00:00:01Z")
    c1 = await ingest(store, "C", "2024-05-01T00:00:01Z")
    claims, due = await store.claim_and_next_due("erp", 10)
    assert [c.event_id for c in claims] == [a1, b1, c1]  # A2 waits for A1, in id order
    assert due is not None and due <= time.time()
    assert await store.claim("erp", 10) == []  # A1 is running: A2 still blocked
    await store.finish_many([Finished(c, "done") for c in claims])
    (claim,) = await store.claim("erp", 10)
    assert claim.event_id == a2


async def test_a_claim_that_fills_its_limit_says_more_may_be_due_now(store: Store) -> None:
    store._route = make_route([python_handler()])
    await ingest(store, "A", "2024-05-01T00:00:01Z")
    await ingest(store, "B", "2024-05-01T00:00:01Z")
    before = time.time()
    claims, due = await store.claim_and_next_due("erp", 1)
    assert len(claims) == 1 and due is not None and before <= due <= time.time()
    claims, due = await store.claim_and_next_due("erp", 5)
    assert len(claims) == 1 and due is None  # nothing else pending


async def test_outcomes_of_a_batch_are_written_together_a_failure_in_the_middle_its_own_row(
    rig: Callable[..., Any],
) -> None:
    store, dispatcher = await rig(python_handler(concurrency=3, retry_initial_s=60,
                                                 retry_max_s=60))
    (lane,) = dispatcher.lanes
    held = HeldOutcomes(store)
    held.gate.set()
    lane._store = held  # type: ignore[assignment]
    lane._outcomes._store = held  # type: ignore[assignment]
    for entity in ("o1", "o2", "o3"):
        await ingest(store, entity, "2024-05-01T00:00:00Z")
    target.FAILURES["o2"] = 1
    assert await lane.run_once() == 3
    assert held.sizes == [3]  # one store operation for the three outcomes
    assert await statuses(store) == [("erp", "o1", "done", 1), ("erp", "o2", "pending", 1),
                               ("erp", "o3", "done", 1)]
    rows = await query(store, "SELECT d.entity_id, a.outcome, a.error FROM delivery_attempts a"
                       " JOIN deliveries d ON d.id = a.delivery_id ORDER BY d.id")
    assert [r[:2] for r in rows] == [("o1", "done"), ("o2", "retry"), ("o3", "done")]
    assert "ERP down for o2" in rows[1][2]


async def test_a_crash_between_handler_and_outcome_write_redelivers_never_loses(
    store_factory: Callable[..., Store], session: aiohttp.ClientSession,
) -> None:
    settings = python_handler(concurrency=3)
    first = store_factory("crash.db")
    first._route = make_route([settings])
    await first.open()
    try:
        for entity in ("o1", "o2", "o3"):
            await ingest(first, entity, "2024-05-01T00:00:00Z")
        lost = HeldOutcomes(first, lose=True)
        lane = Lane(settings, build_handler(settings, session), lost)  # type: ignore[arg-type]
        running = asyncio.create_task(lane.run_once())
        await until(lambda: len(target.DELIVERED) == 3 and lost.sizes == [3])
        # The process dies here: the handler ran, its outcomes are still in the buffer.
        assert {s for *_, s, _ in await statuses(first)} == {"running"}
        restarted = store_factory("crash.db")
        await restarted.open()
        try:
            again = Dispatcher([Lane(settings, build_handler(settings, session), restarted)],
                               restarted, asyncio.Event())
            assert await again.start() == 3
            assert await again.run_once() == 3
            assert await statuses(restarted) == [("erp", e, "done", 1) for e in ("o1", "o2", "o3")]
        finally:
            await restarted.close()
        assert sorted(e for e, _ in target.DELIVERED) == ["o1", "o1", "o2", "o2", "o3", "o3"]
        lost.gate.set()
        await running
    finally:
        await first.close()


async def test_drain_waits_for_a_buffered_outcome(rig: Callable[..., Any]) -> None:
    store, dispatcher = await rig(python_handler())
    (lane,) = dispatcher.lanes
    held = HeldOutcomes(store)
    lane._store = held  # type: ignore[assignment]
    lane._outcomes._store = held  # type: ignore[assignment]
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    stop = asyncio.Event()
    running = asyncio.create_task(dispatcher.run(stop))
    await until(lambda: held.sizes == [1])  # delivered; the outcome write is in flight
    stop.set()
    draining = asyncio.create_task(dispatcher.drain(30))
    await asyncio.sleep(0.05)
    assert not draining.done()
    assert await statuses(store) == [("erp", "o1", "running", 0)]
    held.gate.set()
    assert await draining == 0
    await running
    assert await statuses(store) == [("erp", "o1", "done", 1)]


async def test_a_batch_the_store_refuses_is_written_row_by_row(store: Store) -> None:
    settings = python_handler("ctx", concurrency=2, retry_initial_s=60, retry_max_s=60)
    store._route = make_route([settings])
    refusing = RefusingFinish(store, 1)
    lane = Lane(settings, ScriptedHandler(Outcome("done"), Outcome("retry", error="e")),
                refusing)  # type: ignore[arg-type]
    lane._outcomes._store = refusing  # type: ignore[assignment]
    await ingest(store, "o1", "2024-05-01T00:00:00Z")
    await ingest(store, "o2", "2024-05-01T00:00:00Z")
    with capture_logs() as logs:
        assert await lane.run_once() == 2
    assert await statuses(store) == [("ctx", "o1", "done", 1), ("ctx", "o2", "pending", 1)]
    assert any(e["event"] == "dispatch.record_batch_refused" for e in logs)


async def test_a_failed_directory_fsync_retries_every_delivery_of_its_batch(
    rig: Callable[..., Any], tmp_path: Path,
) -> None:
    batches = tmp_path / "batches"
    settings = FileHandlerSettings(name="drop", type="file", directory=tmp_path / "drop",
                                   concurrency=3, retry_initial_s=60, retry_max_s=60)
    store, dispatcher = await rig(settings)
    (lane,) = dispatcher.lanes
    await lane.handler.close()
    lane.handler = FileHandler(settings,
                               writer_argv(record_batches(batches) + FAILING_DIRECTORY_FSYNC))
    for entity in ("o1", "o2", "o3"):
        await ingest(store, entity, "2024-05-01T00:00:00Z")
    with capture_logs():
        assert await dispatcher.run_once() == 3
    await lane.handler.close()
    assert await statuses(store) == [("drop", e, "pending", 1) for e in ("o1", "o2", "o3")]
    assert batches.read_text().split() == ["3"]  # the three deliveries shared one batch
    errors = [e for (e,) in await query(store, "SELECT error FROM delivery_attempts")]
    assert len(errors) == 3 and all("Input/output error" in e for e in errors)
