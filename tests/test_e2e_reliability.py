"""End to end reliability: the real daemon under kill -9 and injected faults, judged against
the simulator's ground truth.

Every test runs the real daemon (a subprocess) against tcbridge's Tradecloud simulator over
HTTP. The simulator makes a stream of changes (new orders, line updates, new lines,
shipments and their updates, bursts of orders sharing one ``lastUpdatedAt``), sends the
webhooks to the daemon and answers its polls and fetches. Two handlers receive every event:
a ``file`` handler writing ``{id}.json`` into a drop folder, and a ``python`` handler
(``tests/helpers/tcb_e2e_target.py``) appending one line per delivery to a ledger, so a
re-delivery is visible (the file handler overwrites the same file).

At the end of every test the change stream stops, the simulator's webhook queue is flushed,
the poller catches up (its cursor reaches the newest change of each kind), no fetch and no
delivery is left open, the daemon stops cleanly (exit 0), and ``Bridge.verify`` checks:

(a) Stored: every webhook the bridge answered 2xx is in ``events`` under its dedup key
    (kind, entity id, ``lastUpdatedAt`` as an instant). The webhook itself may have been
    recorded as a duplicate of a poll snapshot of the same version, so the key is checked,
    not the source. A legacy GET webhook's 202 only promises a fetch: its entity must be
    stored at that version or a newer one.
(b) Delivered: for each ground-truth change (kind, entityId, lastUpdatedAt) the drop folder
    holds an envelope of that entity with a ``lastUpdatedAt`` at least as new. The exact,
    stricter criterion checked is: the newest version of every entity the simulator changed
    was delivered (a file with that exact instant), and every event the bridge stored was
    delivered (a file and a ledger line per event id). A poll sees only snapshots: when a
    change's webhook is lost and the entity changes again before the next poll, that
    intermediate version never exists in the bridge and is delivered only as part of the
    newer snapshot, which is what "at least as new" accepts. Where no webhook can be lost
    (mode "webhook" with POST webhooks and no drops) every change must also be its own event.
    No delivery may be dead.
(c) At least once, not more: a ledger line whose event id repeats is a re-delivery; only
    deliveries running at a kill may repeat, so repeats <= kills x the handler's
    concurrency, and zero in the tests without kills.
(d) The committed cursor of each kind never moved backwards: read from the SQLite file after
    every kill and at the end, compared as instants.

The crash test runs ``TCBRIDGE_CRASH_ROUNDS`` kill -9 rounds (20 by default, as in CI) on a
schedule drawn from ``TCBRIDGE_CRASH_SEED``; a longer run, with its summary line shown::

    TCBRIDGE_CRASH_ROUNDS=200 .venv/bin/pytest tests/test_e2e_reliability.py -k crash -s

The per-test timeout grows with the number of rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import sqlite3
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from tcbridge.simulator import Simulator
from tcbridge.timefmt import instant_us
from tests.conftest import (
    DAEMON_ENV,
    SIM_PASSWORD,
    SIM_USER,
    Daemon,
    free_port,
    tradecloud_config,
)

CRASH_ROUNDS = int(os.environ.get("TCBRIDGE_CRASH_ROUNDS", "20"))
CRASH_SEED = int(os.environ.get("TCBRIDGE_CRASH_SEED", "20240501"))
START = "2020-01-01T00:00:00.000Z"
KINDS = ("order", "shipment")
CONCURRENCY = 4  # of each handler: the bound on deliveries a kill can interrupt
SETTLE_TIMEOUT_S = 90.0

Key = tuple[str, str]  # (kind, entity id)


# -- the daemon, its simulator and what they left on disk -------------------------------------


@dataclass
class Figures:
    """What one run did, for assertions and the summary line."""

    changes: int
    attempts: int
    statuses: Counter[int | None]
    dropped: int
    events: int
    sources: Counter[str]
    late: int
    duplicates: int
    deliveries: int
    repeats: int
    losses: int

    @property
    def answered_2xx(self) -> int:
        """Webhook attempts the bridge answered 2xx."""
        return sum(n for status, n in self.statuses.items() if status and 200 <= status < 300)

    def summary(self, name: str, **extra: object) -> str:
        """One line with the figures."""
        head = "".join(f" {k}={v}" for k, v in extra.items())
        other = {str(k): v for k, v in self.statuses.items()
                 if not (k and 200 <= k < 300)}
        return (
            f"{name}:{head} changes={self.changes} webhooks sent={self.attempts}"
            f" 2xx={self.answered_2xx} dropped={self.dropped} other={other}"
            f" events={self.events} sources={dict(self.sources)} late={self.late}"
            f" duplicates={self.duplicates} deliveries={self.deliveries}"
            f" repeats={self.repeats} losses={self.losses}"
        )


@dataclass
class Bridge:
    """One daemon, the simulator it talks to, and the checks against the ground truth."""

    sim: Simulator
    daemon: Daemon
    db_path: Path
    drop_dir: Path
    ledger_path: Path
    mode: Literal["webhook", "hybrid"]
    webhook_mode: Literal["post", "get"]
    kills: int = 0
    rotated: int = 0
    cursor_history: list[dict[str, str]] = field(default_factory=list)

    def query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """Read the daemon's store (short queries; WAL lets them run beside the daemon)."""
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=5)) as conn:
            return conn.execute(sql, params).fetchall()

    async def start(self) -> None:
        """Start the daemon; an earlier start's log is set aside so each start reads a short
        log (the harness re-reads the whole file while it waits)."""
        log = self.daemon.log_path
        if log.exists():
            self.rotated += 1
            log.rename(log.with_name(f"{log.stem}.{self.rotated}{log.suffix}"))
            self.daemon.starts = 0
        await self.daemon.start()

    async def kill(self) -> None:
        """kill -9, then check that the committed cursors did not move backwards."""
        await self.daemon.kill()
        self.kills += 1
        self.check_cursors()

    def cursors(self) -> dict[str, str]:
        """The committed cursor of each polled kind, exactly as stored."""
        rows = self.query("SELECT kind, value FROM cursors")
        return {kind: value for kind, value in rows if kind in KINDS}

    def check_cursors(self) -> None:
        """(d): compare the cursors now with every earlier reading, as instants."""
        now = self.cursors()
        for earlier in self.cursor_history:
            for kind, value in earlier.items():
                assert kind in now, f"cursor {kind} vanished after kill {self.kills}"
                assert instant_us(now[kind]) >= instant_us(value), (
                    f"cursor {kind} moved backwards from {value} to {now[kind]}"
                    f" (read after kill {self.kills})")
        self.cursor_history.append(now)

    def newest_by_kind(self) -> dict[str, int]:
        """The instant of the newest ground-truth change of each kind."""
        newest: dict[str, int] = {}
        for change in self.sim.truth():
            us = instant_us(change["lastUpdatedAt"])
            newest[change["kind"]] = max(newest.get(change["kind"], us), us)
        return newest

    def open_work(self) -> dict[str, Any]:
        """What the daemon still has to do; empty when it has caught up with the truth."""
        left: dict[str, Any] = {}
        if self.mode == "hybrid":
            cursors = self.cursors()
            for kind, newest in self.newest_by_kind().items():
                if kind not in cursors or instant_us(cursors[kind]) < newest:
                    left[f"cursor.{kind}"] = cursors.get(kind)
        ((fetches,),) = self.query(
            "SELECT count(*) FROM fetch_requests WHERE status = 'pending'")
        if fetches:
            left["fetches"] = fetches
        deliveries = self.query(
            "SELECT handler, status, count(*) FROM deliveries"
            " WHERE status IN ('pending', 'running') GROUP BY handler, status")
        if deliveries:
            left["deliveries"] = deliveries
        return left

    async def settle(self, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        """Flush the webhooks, then wait until the poller, fetcher and handlers caught up."""
        try:
            await self.sim.flush_webhooks(timeout_s)
        except TimeoutError:
            pending = len(self.sim.changes()) - len({r["seq"] for r in self.sim.webhook_results})
            raise AssertionError(f"webhooks not flushed in {timeout_s} s ({pending} never"
                                 f" tried):\n{self.daemon.tail()}") from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while left := self.open_work():
            if loop.time() > deadline:
                raise AssertionError(f"not caught up in {timeout_s} s: {left}; newest changes"
                                     f" {self.newest_by_kind()}\n{self.daemon.tail()}")
            await asyncio.sleep(0.1)

    async def finish(self, *, every_change_an_event: bool = False) -> Figures:
        """Settle, stop cleanly and verify (a)-(d); returns the figures."""
        await self.settle()
        code = await self.daemon.stop()
        assert code == 0, f"daemon exit status {code}:\n{self.daemon.tail()}"
        return self.verify(every_change_an_event=every_change_an_event)

    def verify(self, *, every_change_an_event: bool) -> Figures:
        """Check (a)-(d) against the ground truth; one assertion listing every problem."""
        truth = self.sim.truth()
        events = self.query("SELECT id, kind, entity_id, instant_us, source, late FROM events")
        stored = {(kind, entity, us) for _, kind, entity, us, _, _ in events}
        newest_stored: dict[Key, int] = {}
        for _, kind, entity, us, _, _ in events:
            newest_stored[(kind, entity)] = max(newest_stored.get((kind, entity), us), us)
        files = self._drop_files()
        ledger = self._ledger()
        problems = self._check_stored(truth, stored, newest_stored)
        problems += self._check_delivered(truth, [e[0] for e in events], files, ledger)
        if every_change_an_event:
            problems += [f"(b) change not stored as an event: {t}" for t in truth
                         if (t["kind"], t["entityId"], instant_us(t["lastUpdatedAt"]))
                         not in stored]
        losses = len(problems)
        problems += [f"(c) the ledger has an event the store does not: {i}"
                     for i in set(ledger) - {e[0] for e in events}]
        repeats = sum(n - 1 for n in ledger.values())
        bound = self.kills * CONCURRENCY
        if repeats > bound:
            twice = [i for i, n in ledger.items() if n > 1][:10]
            problems.append(f"(c) {repeats} repeated deliveries > {self.kills} kills x"
                            f" {CONCURRENCY}; e.g. {twice}")
        self.check_cursors()
        assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:25])
        return self._figures(truth, events, ledger, repeats, losses)

    def _check_stored(
        self, truth: list[dict[str, Any]], stored: set[tuple[str, str, int]],
        newest_stored: dict[Key, int],
    ) -> list[str]:
        """(a): every webhook answered 2xx is stored (a GET one at that version or newer)."""
        problems = []
        for result in self.sim.webhook_results:
            status = result["status"]
            if status is None or not 200 <= status < 300:
                continue
            change = truth[result["seq"] - 1]
            key = (change["kind"], change["entityId"])
            us = instant_us(change["lastUpdatedAt"])
            ok = ((*key, us) in stored if self.webhook_mode == "post"
                  else newest_stored.get(key, -1) >= us)
            if not ok:
                problems.append(f"(a) webhook answered {status} but not stored: {change}")
        return problems

    def _check_delivered(
        self, truth: list[dict[str, Any]], event_ids: list[str],
        files: dict[str, dict[str, Any]], ledger: Counter[str],
    ) -> list[str]:
        """(b): every stored event and the newest version of every entity were delivered."""
        problems = [f"(b) stored event {i} has no file in the drop folder"
                    for i in event_ids if i not in files]
        problems += [f"(b) stored event {i} never reached the ledger handler"
                     for i in event_ids if i not in ledger]
        delivered: dict[Key, set[int]] = defaultdict(set)
        for envelope in files.values():
            delivered[(envelope["kind"], envelope["entityId"])].add(
                instant_us(envelope["lastUpdatedAt"]))
        newest: dict[Key, int] = {}
        for change in truth:
            key, us = (change["kind"], change["entityId"]), instant_us(change["lastUpdatedAt"])
            newest[key] = max(newest.get(key, us), us)
            if max(delivered[key], default=-1) < us:
                problems.append(f"(b) change never delivered, nor a newer version: {change}")
        problems += [f"(b) newest version of {key} ({us} us) never delivered"
                     for key, us in newest.items() if us not in delivered[key]]
        ((dead,),) = self.query("SELECT count(*) FROM deliveries WHERE status = 'dead'")
        if dead:
            problems.append(f"(b) {dead} dead deliveries")
        return problems

    def _drop_files(self) -> dict[str, dict[str, Any]]:
        return {path.stem: json.loads(path.read_text())
                for path in self.drop_dir.glob("*.json")}

    def _ledger(self) -> Counter[str]:
        if not self.ledger_path.exists():
            return Counter()
        lines = self.ledger_path.read_text().splitlines()
        return Counter(json.loads(line)["id"] for line in lines)

    def _figures(
        self, truth: list[dict[str, Any]], events: list[tuple[Any, ...]], ledger: Counter[str],
        repeats: int, losses: int,
    ) -> Figures:
        results = self.sim.webhook_results
        ((duplicates,),) = self.query(
            "SELECT count(*) FROM sightings WHERE reason = 'duplicate'")
        return Figures(
            changes=len(truth),
            attempts=sum(1 for r in results if not r["dropped"]),
            statuses=Counter(r["status"] for r in results if not r["dropped"]),
            dropped=sum(1 for r in results if r["dropped"]),
            events=len(events),
            sources=Counter(e[4] for e in events),
            late=sum(1 for e in events if e[5]),
            duplicates=duplicates,
            deliveries=sum(ledger.values()),
            repeats=repeats,
            losses=losses,
        )


BridgeFactory = Callable[..., Awaitable[Bridge]]


@pytest.fixture
async def bridge_factory(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[BridgeFactory]:
    """A daemon with a drop-folder and a ledger handler, and a simulator sending it webhooks."""
    ledger = tmp_path / "ledger.jsonl"
    monkeypatch.setitem(DAEMON_ENV, "TCB_E2E_RECORD", str(ledger))
    simulators: list[Simulator] = []

    async def make(
        *, mode: Literal["webhook", "hybrid"] = "hybrid",
        webhook_mode: Literal["post", "get"] = "post", seed: int = 1,
        simulator: dict[str, Any] | None = None, tradecloud: dict[str, Any] | None = None,
        poll: dict[str, Any] | None = None, store: dict[str, Any] | None = None,
    ) -> Bridge:
        sim_port = free_port()  # the daemon's config needs it before the simulator starts
        sim_url = f"http://127.0.0.1:{sim_port}"
        config: dict[str, Any] = {
            "mode": mode,
            "log": {"level": "debug"},
            "tradecloud": tradecloud_config(sim_url, **(tradecloud or {})),
            "poll": {"kinds": list(KINDS), "interval_s": 0.5, "start_from": START,
                     "page_size": 10, "error_backoff_max_s": 0.5} | (poll or {}),
            "fetch": {"retry_initial_s": 0.05, "retry_max_s": 0.5},
            "store": store or {},
            "handlers": [
                {"name": "drop", "type": "file", "directory": str(tmp_path / "outbox"),
                 "concurrency": CONCURRENCY, "retry_initial_s": 0.05, "retry_max_s": 0.5},
                {"name": "ledger", "type": "python", "callable": "tcb_e2e_target:record",
                 "concurrency": CONCURRENCY, "retry_initial_s": 0.05, "retry_max_s": 0.5},
            ],
        }
        daemon = daemon_factory(config)
        sim = Simulator(
            username=SIM_USER, password=SIM_PASSWORD, seed=seed,
            webhook_url=f"{daemon.url}/webhook",
            webhook_auth=("bearer", "hook-token-1-for-tests-0123456789ab"),
            webhook_mode=webhook_mode, webhook_backoff_initial_s=0.05,
            webhook_backoff_max_s=0.3, **(simulator or {}),
        )
        simulators.append(sim)
        await sim.start(port=sim_port)
        return Bridge(sim=sim, daemon=daemon, db_path=tmp_path / "tcbridge.db",
                      drop_dir=tmp_path / "outbox", ledger_path=ledger, mode=mode,
                      webhook_mode=webhook_mode)

    yield make
    for sim in simulators:
        await sim.stop()


# -- the change stream ---------------------------------------------------------------------


async def _changes(
    sim: Simulator, rate_per_s: float, rng: random.Random, big_bursts: bool,
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        if big_bursts and rng.random() < 0.04:
            # More than a page (page_size 10) of orders on one lastUpdatedAt.
            sim.add_orders(rng.randint(11, 25), same_timestamp=True, lines=rng.randint(1, 3))
        else:
            sim.random_change()
        await asyncio.sleep(1 / rate_per_s)


@contextlib.asynccontextmanager
async def streaming(
    sim: Simulator, rate_per_s: float, *, seed: int, big_bursts: bool = True
) -> AsyncIterator[None]:
    """Make the simulator's random mix of changes (plus big bursts) while the block runs."""
    stop = asyncio.Event()
    rng = random.Random(seed)
    task = asyncio.create_task(_changes(sim, rate_per_s, rng, big_bursts, stop))
    try:
        yield
    finally:
        stop.set()
        await task


@contextlib.asynccontextmanager
async def exclusive_lock(path: Path) -> AsyncIterator[None]:
    """Hold SQLite's write lock on the store from another connection (as a backup tool might)."""
    conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(conn.execute, "BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            await asyncio.to_thread(conn.execute, "ROLLBACK")
    finally:
        conn.close()


def daemon_log_events(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    """Log lines of one event name."""
    return [line for line in daemon.logs() if line.get("event") == event]


# -- kill -9 -------------------------------------------------------------------------------


@pytest.mark.timeout(120 + CRASH_ROUNDS * 8)
async def test_crash_kill_9_at_random_moments_loses_nothing(
    bridge_factory: BridgeFactory,
) -> None:
    rng = random.Random(CRASH_SEED)
    bridge = await bridge_factory(seed=CRASH_SEED)
    bridge.sim.faults.webhook_drop_rate = 0.2
    async with streaming(bridge.sim, rate_per_s=12, seed=CRASH_SEED):
        for _ in range(CRASH_ROUNDS):
            await bridge.start()
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            await bridge.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.3))  # down: webhooks meet a closed port
    await bridge.start()
    figures = await bridge.finish()
    print(figures.summary("crash", rounds=CRASH_ROUNDS, seed=CRASH_SEED))
    assert bridge.kills == CRASH_ROUNDS
    assert figures.dropped > 0 and figures.sources["poll"] > 0, "the poller recovered nothing"
    assert figures.statuses[None] > 0, "no webhook ever met a dead daemon"
    assert figures.changes >= 10 * CRASH_ROUNDS, figures.summary("crash")


# -- the fault matrix ------------------------------------------------------------------------


async def test_api_5xx_bursts_lose_nothing(bridge_factory: BridgeFactory) -> None:
    rng = random.Random(501)
    bridge = await bridge_factory(seed=501)
    bridge.sim.faults.webhook_drop_rate = 0.3
    await bridge.start()
    async with streaming(bridge.sim, rate_per_s=8, seed=501):
        for _ in range(6):
            # A burst of 3 to 9 failures, some longer than the client's 5 retries.
            bridge.sim.faults.api_error_status = rng.choice((500, 502, 503, 504))
            bridge.sim.faults.api_error_count += rng.randint(3, 9)
            await asyncio.sleep(0.6)
    figures = await bridge.finish()
    print(figures.summary("5xx"))
    errors = Counter(r["status"] for r in bridge.sim.requests if (r["status"] or 0) >= 500)
    assert sum(errors.values()) >= 15, errors
    assert daemon_log_events(bridge.daemon, "poll.failed"), "no burst outlasted the retries"
    assert figures.sources["poll"] > 0, figures.summary("5xx")


async def test_rate_limited_429_loses_nothing(bridge_factory: BridgeFactory) -> None:
    # The client paces itself to 10 requests/s; this simulator admits 2/s.
    bridge = await bridge_factory(seed=429, simulator={"rate_limit_per_s": 2},
                                  poll={"interval_s": 0.2})
    bridge.sim.faults.webhook_drop_rate = 0.3
    await bridge.start()
    async with streaming(bridge.sim, rate_per_s=6, seed=429, big_bursts=False):
        await asyncio.sleep(3)
    figures = await bridge.finish()
    print(figures.summary("429"))
    limited = [r for r in bridge.sim.requests if r["status"] == 429]
    assert len(limited) >= 3, Counter(r["status"] for r in bridge.sim.requests)
    assert figures.sources["poll"] > 0, figures.summary("429")


async def test_api_latency_near_the_client_timeout_loses_nothing(
    bridge_factory: BridgeFactory,
) -> None:
    bridge = await bridge_factory(seed=504, tradecloud={"timeout_s": 0.5},
                                  poll={"page_size": 20})
    bridge.sim.faults.webhook_drop_rate = 0.3
    await bridge.start()
    async with streaming(bridge.sim, rate_per_s=4, seed=504, big_bursts=False):
        for latency_s in (0.4, 0.7, 0.45, 0.7, 0.4):
            bridge.sim.faults.api_latency_s = latency_s  # just under, then just over
            await asyncio.sleep(0.8)
    bridge.sim.faults.api_latency_s = 0.35
    figures = await bridge.finish()
    print(figures.summary("latency"))
    timeouts = [line for line in daemon_log_events(bridge.daemon, "tradecloud.retry")
                if "Timeout" in str(line.get("error"))]
    assert timeouts, "no request timed out"
    assert figures.sources["poll"] > 0, figures.summary("latency")


async def test_token_expiry_mid_run_with_legacy_get_webhooks_loses_nothing(
    bridge_factory: BridgeFactory,
) -> None:
    # Access tokens live 31.5 s and the client renews 30 s before exp: refreshes as well.
    bridge = await bridge_factory(mode="webhook", webhook_mode="get", seed=401,
                                  simulator={"access_token_ttl_s": 31.5})
    await bridge.start()
    async with streaming(bridge.sim, rate_per_s=5, seed=401, big_bursts=False):
        for _ in range(3):
            await asyncio.sleep(1.5)
            bridge.sim.faults.expire_tokens_now()
        await asyncio.sleep(1.0)
    figures = await bridge.finish()
    print(figures.summary("token"))
    paths = Counter(r["path"] for r in bridge.sim.requests)
    refused = [r for r in bridge.sim.requests
               if r["path"].startswith(("/v2/order/", "/v2/shipment/")) and r["status"] == 401]
    assert paths["/v2/authentication/login"] >= 2 and refused, paths
    assert paths["/v2/authentication/refresh"] >= 1, paths
    assert figures.statuses[202] > 0 and figures.sources["webhook_get"] > 0


async def test_30_percent_of_webhooks_dropped_loses_nothing(
    bridge_factory: BridgeFactory,
) -> None:
    bridge = await bridge_factory(seed=30)
    bridge.sim.faults.webhook_drop_rate = 0.3
    await bridge.start()
    async with streaming(bridge.sim, rate_per_s=10, seed=30):
        await asyncio.sleep(3)
    figures = await bridge.finish()
    print(figures.summary("drop"))
    assert figures.dropped >= 10, figures.summary("drop")
    assert figures.sources["poll"] > 0, figures.summary("drop")
    assert figures.repeats == 0


async def test_duplicated_and_reordered_webhooks_are_stored_once_and_delivered_once(
    bridge_factory: BridgeFactory,
) -> None:
    bridge = await bridge_factory(mode="webhook", seed=2)
    bridge.sim.faults.webhook_duplicate_rate = 0.3
    bridge.sim.faults.webhook_reorder = True
    await bridge.start()
    async with streaming(bridge.sim, rate_per_s=10, seed=2):
        for _ in range(4):
            # Several changes of one order queued at once: reordering makes some arrive late.
            (order,) = bridge.sim.add_orders(1, lines=4)
            for _ in range(5):
                bridge.sim.update_order(order["id"], event_name="OrderLinesUpdatedByBuyer")
            await asyncio.sleep(0.7)
    figures = await bridge.finish(every_change_an_event=True)
    print(figures.summary("dup"))
    seqs = [r["seq"] for r in bridge.sim.webhook_results if not r["duplicate"]]
    assert any(a > b for a, b in itertools.pairwise(seqs)), "nothing was reordered"
    assert figures.duplicates > 0 and figures.late > 0, figures.summary("dup")
    assert figures.events == figures.changes and figures.repeats == 0, figures.summary("dup")


async def test_store_locked_answers_503_then_webhook_retries_succeed(
    bridge_factory: BridgeFactory,
) -> None:
    bridge = await bridge_factory(mode="webhook", seed=503,
                                  store={"busy_timeout_s": 0.2, "retry_after_s": 1})
    await bridge.start()
    async with streaming(bridge.sim, rate_per_s=10, seed=503):
        await asyncio.sleep(0.5)
        async with exclusive_lock(bridge.db_path):
            await asyncio.sleep(2.0)
        await asyncio.sleep(0.5)
    figures = await bridge.finish(every_change_an_event=True)
    print(figures.summary("lock"))
    assert figures.statuses[503] > 0, figures.summary("lock")
    assert figures.events == figures.changes and figures.repeats == 0, figures.summary("lock")
