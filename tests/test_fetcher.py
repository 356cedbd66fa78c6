"""The fetch worker for legacy GET webhooks: real store, real client, the simulator."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from tcbridge.config import FetchSettings, TradecloudSettings
from tcbridge.envelope import parse_snapshot
from tcbridge.errors import ApiPermanentError
from tcbridge.fetcher import Fetcher, retry_delay_s
from tcbridge.metrics import Metrics
from tcbridge.store import Store
from tcbridge.tradecloud import TradecloudClient, _json_object, _Response
from tests.conftest import order_obj, tradecloud_config, until


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def fetcher_factory(
    store: Store, session: aiohttp.ClientSession, simulator_factory: Callable[..., Any]
) -> Callable[..., Any]:
    async def make(**fetch: Any) -> tuple[Fetcher, Any, asyncio.Event]:
        sim, url = await simulator_factory(rate_limit_per_s=None)
        client = TradecloudClient(session, TradecloudSettings(**tradecloud_config(
            url, max_retries=0)))
        wake = asyncio.Event()
        settings = FetchSettings(**({"retry_initial_s": 0.01, "retry_max_s": 0.02} | fetch))
        return Fetcher(settings, client, store, asyncio.Event(), wake), sim, wake

    return make


def fetch_rows(store: Store) -> list[tuple[Any, ...]]:
    with sqlite3.connect(store.path) as conn:
        return conn.execute(
            "SELECT entity_id, status, attempts, last_error FROM fetch_requests").fetchall()


async def test_fetch_stores_the_whole_order(
    fetcher_factory: Callable[..., Any], store: Store
) -> None:
    fetcher, sim, dispatch_wake = await fetcher_factory()
    (order,) = sim.add_orders(1, lines=5)
    await store.request_fetch("order", order["id"])
    assert await fetcher.run_once() == 1
    (event,) = await store.events()
    assert (event["entityId"], event["source"], event["eventName"]) == (
        order["id"], "webhook_get", None)
    assert fetch_rows(store) == [(order["id"], "done", 1, None)]
    assert dispatch_wake.is_set()


async def test_unknown_object_is_retried_then_given_up_after_max_attempts(
    fetcher_factory: Callable[..., Any], store: Store
) -> None:
    fetcher, _, _ = await fetcher_factory(max_attempts=2, retry_initial_s=60, retry_max_s=60)
    await store.request_fetch("order", "no-such-order")
    await fetcher.run_once()
    ((_, status, attempts, error),) = fetch_rows(store)
    assert (status, attempts) == ("pending", 1) and "404" in error
    with sqlite3.connect(store.path) as conn:  # the backoff has passed (without waiting)
        conn.execute("UPDATE fetch_requests SET next_attempt_at = 0")
    await fetcher.run_once()
    assert fetch_rows(store)[0][1:3] == ("failed", 2)


async def test_other_client_errors_give_up_at_once(
    fetcher_factory: Callable[..., Any], store: Store
) -> None:
    fetcher, sim, _ = await fetcher_factory()
    (order,) = sim.add_orders(1)
    sim.faults.api_error_status, sim.faults.api_error_count = 400, 10
    await store.request_fetch("order", order["id"])
    await fetcher.run_once()
    assert fetch_rows(store)[0][1:3] == ("failed", 1)


async def test_transient_errors_retry_until_it_succeeds(
    fetcher_factory: Callable[..., Any], store: Store
) -> None:
    fetcher, sim, _ = await fetcher_factory()
    (shipment,) = sim.add_shipments(1)
    sim.faults.api_error_status, sim.faults.api_error_count = 503, 6  # login + fetch fail
    await store.request_fetch("shipment", shipment["id"])
    attempts = 0
    while fetch_rows(store)[0][1] != "done":
        attempts += await fetcher.run_once()
        assert attempts < 20
        await asyncio.sleep(0.05)
    assert attempts > 1
    assert (await store.events())[0]["kind"] == "shipment"


class UnusableClient:
    """Answers with an object that has no lastUpdatedAt."""

    async def get_object(self, kind: str, entity_id: str) -> dict[str, Any]:
        return {"id": entity_id, "lines": []}


async def test_unusable_object_is_given_up_and_kept(store: Store) -> None:
    fetcher = Fetcher(FetchSettings(), UnusableClient(), store, asyncio.Event(), asyncio.Event())
    await store.request_fetch("order", "o1")
    await fetcher.run_once()
    assert fetch_rows(store)[0][1] == "failed"
    with sqlite3.connect(store.path) as conn:
        ((source, reason),) = conn.execute("SELECT source, reason FROM rejected").fetchall()
    assert source == "webhook_get" and "no lastUpdatedAt" in reason


async def test_run_is_woken_by_new_requests(
    fetcher_factory: Callable[..., Any], store: Store
) -> None:
    fetcher, sim, dispatch_wake = await fetcher_factory()
    wake, stop = asyncio.Event(), asyncio.Event()
    fetcher._wake = wake
    runner = asyncio.create_task(fetcher.run(stop))
    await asyncio.sleep(0.05)
    (order,) = sim.add_orders(1)
    await store.request_fetch("order", order["id"])
    wake.set()
    await until(dispatch_wake.is_set, timeout_s=5)
    stop.set()
    await runner
    assert fetch_rows(store)[0][1] == "done"


def test_retry_delay_grows_and_respects_retry_after() -> None:
    settings = FetchSettings(retry_initial_s=1, retry_max_s=10)
    assert 1 <= retry_delay_s(settings, 1, None) <= 2
    assert 5 <= retry_delay_s(settings, 10, None) <= 10
    assert retry_delay_s(settings, 1, 30.0) == 30.0


class SurrogateClient:
    """Answers with an object holding a lone surrogate, as Python's JSON parser reads one."""

    async def get_object(self, kind: str, entity_id: str) -> dict[str, Any]:
        return {"id": entity_id, "lastUpdatedAt": "2024-05-01T10:00:00.000Z", "note": "\ud800"}


async def test_fetched_object_that_cannot_be_stored_as_json_is_rejected_and_kept(
    store: Store,
) -> None:
    # Stored escaped, it was refused later by the dispatcher's parser and wedged the entity.
    fetcher = Fetcher(FetchSettings(), SurrogateClient(), store, asyncio.Event(), asyncio.Event())
    await store.request_fetch("order", "o1")
    await fetcher.run_once()
    assert fetch_rows(store)[0][1] == "failed"
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
        ((source, reason),) = conn.execute("SELECT source, reason FROM rejected").fetchall()
    assert source == "webhook_get" and "cannot be stored as JSON" in reason
class ScriptedClient:
    """Answers each fetch with the next scripted object, or raises the next scripted error;
    the last answer repeats."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def get_object(self, kind: str, entity_id: str) -> dict[str, Any]:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, bytes):  # what the real client makes of this body
            return _json_object(_Response(200, {}, answer), f"/v2/order/{entity_id}")
        return dict(answer)


def scripted_fetcher(store: Store, client: Any, **settings: Any) -> Fetcher:
    values = {"retry_initial_s": 0.001, "retry_max_s": 0.001} | settings
    return Fetcher(FetchSettings(**values), client, store, asyncio.Event(), asyncio.Event())


async def run_until_settled(fetcher: Fetcher, store: Store) -> None:
    for _ in range(200):
        await fetcher.run_once()
        if fetch_rows(store)[0][1] != "pending":
            return
        await asyncio.sleep(0.005)
    pytest.fail("the fetch request never settled")


async def test_a_200_whose_body_is_not_json_is_retried_not_given_up(store: Store) -> None:
    client = ScriptedClient(b"<html>proxy error</html>", order_obj("o1"))
    fetcher = scripted_fetcher(store, client)
    await store.request_fetch("order", "o1")
    with capture_logs() as logs:
        await run_until_settled(fetcher, store)
    assert fetch_rows(store)[0][1:3] == ("done", 2)
    assert client.calls == 2
    assert (await store.events())[0]["entityId"] == "o1"
    (retry,) = [line for line in logs if line["event"] == "fetch.retry"]
    assert "not JSON" in retry["error"]


async def test_an_unexpected_exception_is_a_retried_attempt(store: Store) -> None:
    client = ScriptedClient(RecursionError("maximum recursion depth exceeded"), order_obj("o1"))
    fetcher = scripted_fetcher(store, client)
    await store.request_fetch("order", "o1")
    with capture_logs():
        await run_until_settled(fetcher, store)
    assert fetch_rows(store)[0][1:3] == ("done", 2)
    assert client.calls == 2


async def test_404_gives_up_after_a_finite_default(store: Store) -> None:
    assert FetchSettings().max_attempts == 0
    limit = FetchSettings().not_found_max_attempts
    assert 0 < limit <= 50
    gone = ApiPermanentError("tradecloud /v2/order/o1: HTTP 404", status=404)
    client = ScriptedClient(*([gone] * limit))
    metrics = Metrics()
    fetcher = Fetcher(FetchSettings(retry_initial_s=0.001, retry_max_s=0.001), client, store,
                      asyncio.Event(), asyncio.Event(), metrics=metrics)
    await store.request_fetch("order", "o1")
    with capture_logs():
        await run_until_settled(fetcher, store)
    assert fetch_rows(store)[0][1:3] == ("failed", limit)
    assert client.calls == limit
    # Shown where an operator looks: `tcbridge status` and /metrics.
    assert (await store.status())["counts"]["fetchFailed"] == 1
    assert await store.fetch_counts() == {"pending": 0, "failed": 1}
    metrics.set_fetches(await store.fetch_counts())
    text = metrics.render().decode()
    assert 'tcbridge_fetch_requests{status="failed"} 1.0' in text
    assert 'tcbridge_fetch_failures_total{kind="order"} 1.0' in text


async def test_not_found_limit_zero_keeps_trying(store: Store) -> None:
    gone = ApiPermanentError("HTTP 404", status=404)
    client = ScriptedClient(gone)
    fetcher = scripted_fetcher(store, client, not_found_max_attempts=0)
    await store.request_fetch("order", "o1")
    with capture_logs():
        while client.calls < 25:  # beyond the default limit
            await asyncio.sleep(0.002)
            await fetcher.run_once()
    assert fetch_rows(store)[0][1:3] == ("pending", client.calls)


async def test_an_older_fetched_object_is_stale(store: Store) -> None:
    newer = parse_snapshot("order", order_obj("o1", "2024-05-02T00:00:00.000Z"), "poll")
    assert (await store.ingest(newer)).status == "stored"
    metrics = Metrics()
    fetcher = Fetcher(FetchSettings(), ScriptedClient(order_obj("o1", "2024-05-01T00:00:00.000Z")),
                      store, asyncio.Event(), asyncio.Event(), metrics=metrics)
    await store.request_fetch("order", "o1")
    with capture_logs() as logs:
        await fetcher.run_once()
    assert [line["event"] for line in logs] == ["fetch.stale"]
    assert fetch_rows(store)[0][1] == "done"
    assert len(await store.events()) == 1
    assert (await store.counts())["stale"] == 1


async def test_two_gets_in_the_same_millisecond_do_not_close_each_other(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tcbridge.store.sqlite

    monkeypatch.setattr(tcbridge.store.sqlite, "utc_now_iso", lambda: "2024-05-01T10:00:00.000Z")
    await store.request_fetch("order", "o1")
    (request,) = await store.due_fetches()
    await store.request_fetch("order", "o1")  # a newer change, same millisecond
    await store.complete_fetch(request, parse_snapshot("order", order_obj("o1"), "webhook_get"))
    (again,) = await store.due_fetches()  # the later GET still gets its own fetch
    assert again.id == request.id and again.attempts == 1
    await store.fail_fetch(request, "gone", retry_at=None)  # the earlier one's give-up too
    assert len(await store.due_fetches()) == 1
