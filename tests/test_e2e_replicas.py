"""End to end: three daemons on one PostgreSQL store behind the simulator, webhooks spread
over them by a round-robin proxy (a load balancer), the poller as safety net (hybrid mode,
some webhooks dropped), and kill -9 of one replica, then of the one holding the poller
lock, in the middle of the stream.

Judged by the reliability harness's checks (tests/test_e2e_reliability.py, ``Bridge.verify``)
read from the PostgreSQL store: every webhook answered 2xx stored, every change delivered
(or a newer version), to both handlers, no delivery dead, repeated deliveries only of those
cut off by a kill (at most kills x concurrency), no cursor moving backwards. Also: the
poller failed over (a survivor's /readyz says ``"poller": "active"`` within two poll
intervals), every replica served webhooks, and ``tcbridge status --json`` lists the
replicas and which one polls.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tcbridge.simulator import Simulator
from tests.backends import run_sync
from tests.conftest import (
    DAEMON_ENV,
    SIM_PASSWORD,
    SIM_USER,
    Daemon,
    free_port,
    order_event_body,
    tradecloud_config,
)
from tests.test_e2e_reliability import CONCURRENCY, KINDS, START, Bridge, Figures, streaming

pytestmark = pytest.mark.backends("postgresql")

TOKEN = "hook-token-1-for-tests-0123456789ab"
POLL_INTERVAL_S = 1.0
LOCK_CHECK_S = 0.25
LEASE_S = 2.0
HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class RoundRobin:
    """A load balancer on loopback: each request to the next replica; one that does not
    answer (down, or cut off mid-request) is skipped, 502 when none answers."""

    def __init__(self, upstreams: list[str]) -> None:
        self.upstreams = upstreams
        self.served = [0] * len(upstreams)
        self._next = 0
        self._session: aiohttp.ClientSession | None = None
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        self.url = ""

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        for step in range(len(self.upstreams)):
            index = (self._next + step) % len(self.upstreams)
            try:
                async with self._session.request(
                    request.method, self.upstreams[index] + request.path_qs, data=body,
                    headers=headers,
                ) as response:
                    answer = await response.read()
            except (aiohttp.ClientError, OSError, TimeoutError):
                continue  # down or cut off: a committed request is a duplicate next time
            self._next = index + 1
            self.served[index] += 1
            return web.Response(status=response.status, body=answer,
                                content_type=response.content_type)
        return web.Response(status=502, text="no replica answered")


async def _pg_rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return [tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


@dataclass
class Replicas(Bridge):
    """The harness's bridge, with three daemons on one PostgreSQL database."""

    dsn: str = ""
    replicas: list[Daemon] = field(default_factory=list)
    proxy: RoundRobin | None = None

    def query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        assert not params
        return run_sync(_pg_rows(self.dsn, sql))

    async def start_replica(self, index: int) -> None:
        await self.replicas[index].start()

    async def kill_replica(self, index: int) -> None:
        await self.replicas[index].kill()
        self.kills += 1
        self.check_cursors()

    def alive(self) -> list[int]:
        return [i for i, d in enumerate(self.replicas)
                if d.proc is not None and d.proc.poll() is None]

    async def finish(self, *, every_change_an_event: bool = False) -> Figures:
        await self.settle()
        for index in self.alive():
            code = await self.replicas[index].stop()
            assert code == 0, f"replica {index} exit {code}:\n{self.replicas[index].tail()}"
        return self.verify(every_change_an_event=every_change_an_event)


async def readyz(daemon: Daemon) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(
            f"{daemon.admin_url}/readyz") as response:
        return dict(await response.json())


async def pollers(bridge: Replicas) -> dict[str, list[int]]:
    """kind -> the live replicas whose /readyz says they poll it."""
    alive = bridge.alive()
    answers = await asyncio.gather(*(readyz(bridge.replicas[i]) for i in alive))
    return {kind: [i for i, a in zip(alive, answers, strict=True) if kind in a["polls"]]
            for kind in KINDS}


async def one_poller_each(bridge: Replicas, timeout_s: float = 20.0) -> tuple[dict[str, int],
                                                                             float]:
    """The one live replica polling each kind (waiting until every kind has exactly one),
    and how long that took."""
    started = time.monotonic()
    while True:
        now = await pollers(bridge)
        if all(len(holders) == 1 for holders in now.values()):
            return {kind: holders[0] for kind, holders in now.items()}, \
                time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"pollers: {now}"
        await asyncio.sleep(0.02)


ReplicasFactory = Callable[..., Any]


@pytest.fixture
async def replicas_factory(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, pg_fresh_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[ReplicasFactory]:
    ledger = tmp_path / "ledger.jsonl"
    monkeypatch.setitem(DAEMON_ENV, "TCB_E2E_RECORD", str(ledger))
    cleanup: list[Any] = []

    async def make(*, count: int = 3, seed: int = 1, mode: str = "hybrid") -> Replicas:
        sim_port = free_port()
        sim_url = f"http://127.0.0.1:{sim_port}"
        daemons = [daemon_factory(_config(tmp_path, sim_url, pg_fresh_dsn, f"r{i + 1}", mode),
                                  name=f"r{i + 1}") for i in range(count)]
        proxy = RoundRobin([d.url for d in daemons])
        await proxy.start()
        cleanup.append(proxy)
        sim = Simulator(username=SIM_USER, password=SIM_PASSWORD, seed=seed,
                        webhook_url=f"{proxy.url}/webhook", webhook_auth=("bearer", TOKEN),
                        webhook_backoff_initial_s=0.05, webhook_backoff_max_s=0.3)
        await sim.start(port=sim_port)
        cleanup.append(sim)
        return Replicas(sim=sim, daemon=daemons[0], db_path=Path("/nonexistent"),
                        drop_dir=tmp_path / "outbox", ledger_path=ledger, mode="hybrid",
                        webhook_mode="post", dsn=pg_fresh_dsn, replicas=daemons, proxy=proxy)

    yield make
    for part in reversed(cleanup):
        await part.stop()


def _config(tmp_path: Path, sim_url: str, dsn: str, node: str, mode: str) -> dict[str, Any]:
    return {
        "mode": mode,
        "log": {"level": "debug"},
        "tradecloud": tradecloud_config(sim_url),
        "poll": {"kinds": list(KINDS), "interval_s": POLL_INTERVAL_S, "start_from": START,
                 "page_size": 10, "error_backoff_max_s": 0.5},
        "fetch": {"retry_initial_s": 0.05, "retry_max_s": 0.5},
        "store": {"backend": "postgresql", "dsn": dsn},
        "node": {"id": node, "lock_check_s": LOCK_CHECK_S, "heartbeat_s": 0.5},
        "delivery": {"lease_s": LEASE_S},
        "handlers": [
            {"name": "drop", "type": "file", "directory": str(tmp_path / "outbox"),
             "concurrency": CONCURRENCY, "retry_initial_s": 0.05, "retry_max_s": 0.5},
            {"name": "ledger", "type": "python", "callable": "tcb_e2e_target:record",
             "concurrency": CONCURRENCY, "retry_initial_s": 0.05, "retry_max_s": 0.5},
        ],
    }


@pytest.mark.timeout(300)
async def test_three_replicas_lose_nothing_when_one_and_then_the_poller_are_killed(
    replicas_factory: ReplicasFactory,
) -> None:
    bridge: Replicas = await replicas_factory(seed=14)
    bridge.sim.faults.webhook_drop_rate = 0.2
    await asyncio.gather(*(bridge.start_replica(i) for i in range(3)))
    first, _ = await one_poller_each(bridge)
    answers = [await readyz(d) for d in bridge.replicas]
    assert [a["status"] for a in answers] == ["ready"] * 3  # the standbys too
    assert {a["poller"] for i, a in enumerate(answers) if i not in first.values()} <= {
        "standby"}
    async with streaming(bridge.sim, rate_per_s=10, seed=14):
        await asyncio.sleep(2.0)
        standby = next(i for i in range(3) if i not in first.values())
        await bridge.kill_replica(standby)  # a replica serving webhooks and deliveries
        await asyncio.sleep(1.0)
        await bridge.start_replica(standby)  # back, under the same node id
        await asyncio.sleep(1.5)
        before, _ = await one_poller_each(bridge)
        holder = before["order"]
        await bridge.kill_replica(holder)  # the poller itself
        after, failover_s = await one_poller_each(bridge)
        new_holder = after["order"]
        await asyncio.sleep(2.0)
        status = json.loads(await asyncio.to_thread(
            lambda: bridge.replicas[new_holder].cli("status", "--json").stdout))
        text = await asyncio.to_thread(lambda: bridge.replicas[standby].cli("status").stdout)
    figures = await bridge.finish()
    assert bridge.proxy is not None
    print(figures.summary("replicas", kills=bridge.kills, failover_s=round(failover_s, 3),
                          served=bridge.proxy.served))
    assert new_holder != holder
    assert failover_s < 2 * POLL_INTERVAL_S, f"failover took {failover_s:.2f} s"
    assert status["pollers"] == {kind: f"r{after[kind] + 1}" for kind in KINDS}
    assert f"poller      order      r{new_holder + 1}" in text, text
    seen = {r["id"] for r in status["replicas"]}
    assert f"r{new_holder + 1}" in seen and f"r{standby + 1}" in seen
    assert all(n > 0 for n in bridge.proxy.served), bridge.proxy.served
    assert figures.dropped > 0 and figures.sources["poll"] > 0, "the poller recovered nothing"
    epochs = dict(bridge.query("SELECT kind, epoch FROM poller_leases"))
    # Each kind's lock is its own: the killed replica's kinds were taken over and fenced
    # (a kind another replica held all along keeps its first epoch).
    killed = [kind for kind in KINDS if before[kind] == holder]
    assert killed and all(epochs[kind] >= 2 for kind in killed), (epochs, before)
    assert all(epochs[kind] >= 1 for kind in KINDS), epochs


async def test_the_same_event_at_two_replicas_at_once_is_one_event_and_one_duplicate(
    replicas_factory: ReplicasFactory,
) -> None:
    bridge: Replicas = await replicas_factory(count=2, mode="webhook")
    await asyncio.gather(*(bridge.start_replica(i) for i in range(2)))
    answer = await readyz(bridge.replicas[0])
    assert (answer["status"], answer["poller"], answer["node"]) == ("ready", "disabled", "r1")
    bodies = [order_event_body(f"same-{i}", stamp="2024-05-01T10:00:00.000Z")
              for i in range(20)]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as session:

        async def post(daemon: Daemon, body: dict[str, Any]) -> str:
            async with session.post(f"{daemon.url}/webhook/order", json=body,
                                    headers=headers) as response:
                assert response.status == 200
                return str((await response.json())["status"])

        for body in bodies:
            answers = await asyncio.gather(*(post(d, body) for d in bridge.replicas))
            assert sorted(answers) == ["duplicate", "stored"]
    for daemon in bridge.replicas:
        assert await daemon.stop() == 0
    assert bridge.query("SELECT count(*) FROM events") == [(20,)]
    assert bridge.query("SELECT count(*) FROM sightings WHERE reason = 'duplicate'") == [(20,)]
    assert bridge.query("SELECT count(*) FROM deliveries") == [(40,)]  # 2 handlers x 20
