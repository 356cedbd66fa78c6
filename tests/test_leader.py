"""The poller lock, its fencing epochs and the heartbeats, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tcbridge.errors import Fenced
from tcbridge.leader import MIN_ROUND_TIMEOUT_S, Coordinator
from tcbridge.store import Fence
from tcbridge.store import coordination as co

CHECK_S = 0.3


@pytest.fixture
async def dsn(pg_fresh_dsn: str) -> str:
    """A database of the test's own with the coordination tables (the PostgreSQL store's
    migration 2 creates them)."""
    conn = await asyncpg.connect(pg_fresh_dsn)
    try:
        await co.ensure_schema(conn)
    finally:
        await conn.close()
    return pg_fresh_dsn


@pytest.fixture
async def coordinators(dsn: str) -> AsyncIterator[Callable[..., Coordinator]]:
    made: list[Coordinator] = []

    def make(node_id: str, kinds: tuple[str, ...] = ("order", "shipment"),
             **kwargs: Any) -> Coordinator:
        coordinator = Coordinator(kwargs.pop("dsn", dsn), node_id=node_id, kinds=kinds,
                                  lock_check_s=CHECK_S, heartbeat_s=0.1, **kwargs)
        made.append(coordinator)
        return coordinator

    yield make
    for coordinator in made:
        await coordinator.close()


async def _backend_pid(dsn: str, node_id: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        pid = await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            f"tcbridge {node_id} coordinator")
    finally:
        await conn.close()
    assert pid is not None
    return int(pid)


async def test_one_replica_takes_every_kind_and_the_other_stands_by(
    coordinators: Callable[..., Coordinator],
) -> None:
    a, b = coordinators("a"), coordinators("b")
    await a.run_once()
    await b.run_once()
    assert (a.role, b.role) == ("active", "standby")
    assert a.active("order") and a.active("shipment") and not b.active("order")
    assert a.fence("order") == Fence("order", 1) and b.fence("order") is None
    assert a.changed.is_set() and not b.changed.is_set()


async def test_a_lost_session_stops_the_holder_at_once_and_the_other_takes_over(
    coordinators: Callable[..., Coordinator], dsn: str,
) -> None:
    a, b = coordinators("a"), coordinators("b")
    await a.run_once()
    await b.run_once()
    admin = await asyncpg.connect(dsn)
    try:
        assert await co.pollers(admin) == {"order": "a", "shipment": "a"}
        # the server ends a's session: as after a network cut noticed by keepalives
        await admin.execute("SELECT pg_terminate_backend($1, 5000)", await _backend_pid(dsn, "a"))
        assert await co.pollers(admin) == {}  # a's heartbeat may still say so: the locks don't
        await b.run_once()
        assert await co.pollers(admin) == {"order": "b", "shipment": "b"}
    finally:
        await admin.close()
    assert b.active("order") and b.fence("order") == Fence("order", 2)
    a.changed.clear()
    await a.run_once()  # notices the lost connection: active no more, at once
    assert a.role == "standby" and a.fence("order") is None and a.changed.is_set()
    assert a.last_error is not None
    await a.run_once()  # reconnected, but the locks are b's now
    assert a.role == "standby" and a.connected


async def test_a_stale_epoch_is_refused_in_the_page_transaction(
    coordinators: Callable[..., Coordinator], dsn: str,
) -> None:
    a = coordinators("a", kinds=("order",))
    await a.run_once()
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await co.check_fence(conn, Fence("order", 1))  # the current epoch passes
        await co.take_over(conn, "order", "someone-else")  # epoch 2
        with pytest.raises(Fenced, match="another replica took the poller over"):
            async with conn.transaction():
                await co.check_fence(conn, Fence("order", 1))
        with pytest.raises(Fenced):  # a kind nobody ever took
            async with conn.transaction():
                await co.check_fence(conn, Fence("shipment", 1))
    finally:
        await conn.close()
    await a.run_once()  # the holder sees its epoch moved: it drops it, and (the lock being
    # free) takes it again with a new epoch: pages fenced with the old one stay refused
    assert a.fence("order") == Fence("order", 3)


async def test_a_takeover_waits_for_a_page_commit_in_progress(
    coordinators: Callable[..., Coordinator], dsn: str,
) -> None:
    a = coordinators("a", kinds=("order",))
    await a.run_once()
    page, other = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        transaction = page.transaction()
        await transaction.start()
        await co.check_fence(page, Fence("order", 1))
        bump = asyncio.create_task(co.take_over(other, "order", "b"))
        await asyncio.sleep(0.3)
        assert not bump.done()  # blocked behind the page's FOR SHARE
        await transaction.commit()
        assert await asyncio.wait_for(bump, timeout=5) == 2
    finally:
        await page.close()
        await other.close()


async def test_close_gives_the_locks_back_and_clears_the_heartbeat(
    coordinators: Callable[..., Coordinator], dsn: str,
) -> None:
    a, b = coordinators("a"), coordinators("b")
    await a.run_once()
    await b.run_once()
    conn = await asyncpg.connect(dsn)
    try:
        seen = {r.id: r.holds_poller for r in await co.replicas_seen(conn, 60)}
        assert seen == {"a": ("order", "shipment"), "b": ()}
        await a.close()
        assert a.role == "standby"
        await b.run_once()
        assert b.role == "active"
        seen = {r.id: r.holds_poller for r in await co.replicas_seen(conn, 60)}
        assert seen == {"a": (), "b": ("order", "shipment")}
        assert [r.id for r in await co.replicas_seen(conn, 0.000001)] == []
    finally:
        await conn.close()


async def test_an_unreachable_database_is_standby_not_a_crash(
    coordinators: Callable[..., Coordinator],
) -> None:
    port = 1  # nothing listens there
    a = coordinators("a", dsn=f"postgresql://postgres@127.0.0.1:{port}/none")
    await a.run_once()
    assert a.role == "standby" and not a.connected and a.last_error is not None


async def test_run_stops_and_releases_on_stop(
    coordinators: Callable[..., Coordinator],
) -> None:
    a, b = coordinators("a", kinds=("order",)), coordinators("b", kinds=("order",))
    stop = asyncio.Event()
    task = asyncio.create_task(a.run(stop))
    while not a.active("order"):
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    await b.run_once()
    assert b.active("order")


class Cuttable:
    """A TCP relay to the PostgreSQL server that a test can cut like a network partition:
    no byte passes any more, the client's socket stays open (it hears only silence), and
    the server's side is closed (as the server's keepalives end the session, later)."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._pipes: list[asyncio.Task[None]] = []
        self._upstreams: list[asyncio.StreamWriter] = []
        self._clients: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._upstreams.append(up_writer)
        self._clients.append(writer)
        self._pipes += [asyncio.create_task(self._pipe(reader, up_writer)),
                        asyncio.create_task(self._pipe(up_reader, writer))]

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async def cut(self) -> None:
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        for up in self._upstreams:
            up.close()

    async def stop(self) -> None:
        await self.cut()
        for client in self._clients:
            client.close()
        self._server.close()
        await self._server.wait_closed()


async def test_a_cut_network_stops_the_holder_and_hands_the_kind_over(
    coordinators: Callable[..., Coordinator], dsn: str,
) -> None:
    server = urlsplit(dsn)
    relay = Cuttable(server.hostname or "127.0.0.1", server.port or 5432)
    await relay.start()
    try:
        a = coordinators("a", kinds=("order",), dsn=urlunsplit(
            server._replace(netloc=f"{server.username}@127.0.0.1:{relay.port}")))
        b = coordinators("b", kinds=("order",))
        await a.run_once()
        await b.run_once()
        assert a.active("order") and not b.active("order")
        await relay.cut()
        started = time.monotonic()
        await a.run_once()  # its check hangs: after the round timeout, it stops polling
        stopped_s = time.monotonic() - started
        assert a.role == "standby" and "TimeoutError" in str(a.last_error)
        assert stopped_s < MIN_ROUND_TIMEOUT_S + 1.0
        await b.run_once()
        assert b.fence("order") == Fence("order", 2)
    finally:
        await relay.stop()


HOLDER = """
import asyncio, sys
from tcbridge.leader import MIN_ROUND_TIMEOUT_S, Coordinator

async def main() -> None:
    c = Coordinator(sys.argv[1], node_id="victim", kinds=["order"], lock_check_s=0.3,
                    heartbeat_s=1)
    await c.run_once()
    print("ROLE", c.role, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_kill_9_of_the_holder_hands_the_kind_over_within_two_checks(
    coordinators: Callable[..., Coordinator], dsn: str,
) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, dsn], stdout=subprocess.PIPE,
                              text=True, cwd=os.getcwd())
    try:
        assert holder.stdout is not None
        stdout = holder.stdout

        def role() -> str:
            for line in stdout:
                if line.startswith("ROLE"):
                    return line.split()[1]
            return "exited"

        assert await asyncio.wait_for(asyncio.to_thread(role), timeout=30) == "active"
        b = coordinators("b", kinds=("order",))
        await b.run_once()
        assert not b.active("order")
        holder.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        stop = asyncio.Event()
        task = asyncio.create_task(b.run(stop))
        while not b.active("order"):
            await asyncio.sleep(0.01)
        failover_s = time.monotonic() - killed_at
        stop.set()
        await task
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    print(f"failover after kill -9: {failover_s:.3f} s")
    assert failover_s < 2 * CHECK_S + 1.0
    assert b.fence("order") is None  # released by run's end
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT epoch FROM poller_leases WHERE kind = 'order'") == 2
    finally:
        await conn.close()


def test_lock_keys_are_stable_signed_32_bit() -> None:
    assert co.lock_key("order") == co.lock_key("order") != co.lock_key("shipment")
    assert all(-(2**31) <= co.lock_key(k) < 2**31 for k in ("order", "shipment", "x" * 99))
