"""The fetch worker for legacy GET webhooks: real store, real client, the simulator."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tcbridge.config import FetchSettings, TradecloudSettings
from tcbridge.fetcher import Fetcher, retry_delay_s
from tcbridge.store import Store
from tcbridge.tradecloud import TradecloudClient
from tests.conftest import tradecloud_config, until


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
    fetcher, _, _ = await fetcher_factory(max_attempts=2)
    await store.request_fetch("order", "no-such-order")
    await fetcher.run_once()
    ((_, status, attempts, error),) = fetch_rows(store)
    assert (status, attempts) == ("pending", 1) and "404" in error
    await asyncio.sleep(0.03)
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
