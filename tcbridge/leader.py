"""One active poller per kind among replicas on one PostgreSQL store, and their heartbeats.

An IO adapter below the peers: the poller asks it only ``active(kind)`` and ``fence(kind)``
(see :class:`tcbridge.poller.PollGate`). It holds one dedicated connection, on which it
takes each kind's session-level advisory lock (``tcbridge.store.coordination``) and
writes this replica's heartbeat. Every ``lock_check_s`` it checks that connection (and
that no one bumped the epochs it holds), tries the locks it does not hold, and beats.

A lost connection means lost locks: the coordinator stops being active at once (the
poller stops between pages, and the page fence refuses what was in flight), drops the
connection and tries again on the next round. PostgreSQL frees a killed replica's locks
at once and a cut one's when its keepalives fail (set short on this session), so another
replica takes over within ``lock_check_s`` of that.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from tcbridge import __version__
from tcbridge.store import coordination as co
from tcbridge.store.types import Fence

log = structlog.get_logger(__name__)

Connect = Callable[..., Awaitable[Any]]
CLOSE_TIMEOUT_S = 2.0
# A round (or a connect) slower than this on a busy machine is not a lost connection:
# dropping the locks for it would make the poller flap between replicas.
MIN_ROUND_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 5.0
FORGET_AFTER_S = 7 * 86_400.0  # heartbeat rows of replicas gone this long are deleted
# Server-side keepalives of the lock session: a replica cut off from the database loses
# its locks after about idle + interval * count seconds (or the unacknowledged-data
# timeout), not after the kernel's two hours.
LOCK_SESSION_SETTINGS = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",
}
# What a broken connection or a server that refuses us raises; anything else is a bug.
LOST = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class Coordinator:
    """This replica's poller locks (one per kind) and heartbeat, on their own connection."""

    def __init__(
        self, dsn: str, *, node_id: str, kinds: Sequence[str], lock_check_s: float,
        heartbeat_s: float, connect: Connect = asyncpg.connect,
    ) -> None:
        self.node_id = node_id
        self.kinds = list(kinds)
        self.changed = asyncio.Event()  # set whenever a kind is taken or lost
        self._dsn = dsn
        self._check_s = lock_check_s
        self._round_timeout_s = max(lock_check_s, MIN_ROUND_TIMEOUT_S)
        self._heartbeat_s = heartbeat_s
        self._connect_fn = connect
        self._conn: Any = None
        self._held: dict[str, int] = {}  # kind -> epoch granted
        self._since: dict[str, float] = {}  # kind -> loop time it was taken
        self._last_beat = -math.inf
        self.started_at = datetime.now(UTC)
        self.last_error: str | None = None

    def active(self, kind: str) -> bool:
        """Whether this replica holds the kind's poller lock now."""
        return kind in self._held

    def fence(self, kind: str) -> Fence | None:
        """The epoch to check in the kind's page transactions; None when not held."""
        epoch = self._held.get(kind)
        return None if epoch is None else Fence(kind, epoch)

    def active_since(self, kind: str) -> float | None:
        """The loop time this replica took the kind's lock (None: not held)."""
        return self._since.get(kind)

    @property
    def polling(self) -> list[str]:
        """The kinds this replica polls now."""
        return sorted(self._held)

    @property
    def role(self) -> str:
        """``active`` when this replica polls any kind, else ``standby``."""
        return "active" if self._held else "standby"

    @property
    def connected(self) -> bool:
        """Whether the coordination connection is open."""
        return self._conn is not None

    async def run(self, stop: asyncio.Event) -> None:
        """A round every ``lock_check_s`` until ``stop``; then give everything back."""
        try:
            while not stop.is_set():
                await self.run_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self._check_s)
        finally:
            await asyncio.shield(self.close())

    async def run_once(self) -> None:
        """Connect if needed, check what is held, try the rest, beat when due. A failure
        drops every lock at once; the next round reconnects."""
        try:
            if self._conn is None:
                await self._open()
            await asyncio.wait_for(self._round(), timeout=self._round_timeout_s)
            self.last_error = None
        except LOST as e:
            self._lost(f"{type(e).__name__}: {e}")

    async def _open(self) -> None:
        settings = {"application_name": f"tcbridge {self.node_id} coordinator"[:63],
                    **LOCK_SESSION_SETTINGS}
        timeout_s = max(self._check_s, CONNECT_TIMEOUT_S)
        self._conn = await asyncio.wait_for(
            self._connect_fn(self._dsn, timeout=timeout_s, server_settings=settings),
            timeout=timeout_s + 1)
        await co.forget(self._conn, FORGET_AFTER_S)
        log.info("leader.connected", node=self.node_id)

    async def _round(self) -> None:
        await self._verify()
        for kind in self.kinds:
            if kind not in self._held and await co.try_lock(self._conn, kind):
                await self._take(kind)
        now = asyncio.get_running_loop().time()
        if now - self._last_beat >= self._heartbeat_s:
            await co.heartbeat(self._conn, self._replica())
            self._last_beat = now

    async def _verify(self) -> None:
        """The connection answers, and every epoch held is still the kind's: a row bumped
        behind our back (an operator, a bug) means someone else thinks it polls."""
        current = await co.epochs(self._conn, self.kinds)
        for kind, epoch in list(self._held.items()):
            if current.get(kind) != epoch:
                log.error("leader.epoch_moved", kind=kind, held=epoch, now=current.get(kind))
                self._drop(kind)
                await co.unlock(self._conn, kind)

    async def _take(self, kind: str) -> None:
        try:
            epoch = await co.take_over(self._conn, kind, self.node_id)
        except BaseException:
            # Without an epoch we may not poll: do not sit on the lock either.
            with contextlib.suppress(*LOST):
                await co.unlock(self._conn, kind)
            raise
        self._held[kind] = epoch
        self._since[kind] = asyncio.get_running_loop().time()
        self._last_beat = -math.inf  # say so in the heartbeat now
        self.changed.set()
        log.warning("leader.poller_active", kind=kind, node=self.node_id, epoch=epoch)

    def _drop(self, kind: str) -> None:
        self._held.pop(kind, None)
        self._since.pop(kind, None)
        self.changed.set()

    def _lost(self, error: str) -> None:
        if self._held:
            log.error("leader.lock_lost", kinds=sorted(self._held), node=self.node_id,
                      error=error, message="poller stopped on this replica")
        elif self.last_error != error:
            log.warning("leader.unavailable", node=self.node_id, error=error)
        self.last_error = error
        for kind in list(self._held):
            self._drop(kind)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    def _replica(self) -> co.Replica:
        now = datetime.now(UTC)
        return co.Replica(self.node_id, socket.gethostname(), os.getpid(), __version__,
                          self.started_at, now, tuple(sorted(self._held)))

    async def close(self) -> None:
        """Give the locks back and say so in the heartbeat row, then close the connection."""
        conn, self._conn = self._conn, None
        held = list(self._held)
        for kind in held:
            self._drop(kind)
        if conn is None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                for kind in held:
                    await co.unlock(conn, kind)
                await co.leave(conn, self.node_id)
                await conn.close()
        except LOST as e:  # closing the session frees the locks anyway
            log.warning("leader.close_failed", error=str(e))
            conn.terminate()
        if held:
            log.info("leader.released", kinds=held, node=self.node_id)
