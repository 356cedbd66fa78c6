"""Replicas on one PostgreSQL store: the poller lock's keys, fencing epochs, heartbeats.

Only the SQL lives here (asyncpg), so the PostgreSQL backend (the page transaction's
fencing check) and the coordinator (``tcbridge.leader``) share one definition.

- The poller lock is a session-level advisory lock, ``pg_try_advisory_lock(ns, kind)``:
  PostgreSQL releases it by itself when the session ends (a killed process, a cut
  connection once the server notices), so there is no expiry to tune.
- A lock alone does not stop a holder that lost its session without noticing from
  committing one more page. So taking the lock also bumps the kind's epoch in
  ``poller_leases``, and each page's transaction reads that row ``FOR SHARE`` and compares
  it with the epoch its poller was granted: a stale holder's page is refused, and a
  takeover waits for a page commit in progress (Kleppmann's fencing token).
"""

from __future__ import annotations

import os
import socket
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tcbridge.errors import Fenced
from tcbridge.store.types import Fence

# Advisory locks share one key space per database: ours are (NAMESPACE, kind key).
NAMESPACE = 0x74636272  # "tcbr"

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS poller_leases (
        kind TEXT PRIMARY KEY,
        epoch BIGINT NOT NULL,
        holder TEXT NOT NULL,
        acquired_at TIMESTAMPTZ NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS replicas (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        version TEXT NOT NULL,
        started_at TIMESTAMPTZ NOT NULL,
        last_seen_at TIMESTAMPTZ NOT NULL,
        holds_poller TEXT[] NOT NULL DEFAULT '{}'
    )""",
]


def lock_key(kind: str) -> int:
    """The advisory lock's second key for a kind: a stable signed 32-bit hash of its name."""
    value = zlib.crc32(kind.encode())
    return value - (1 << 32) if value >= (1 << 31) else value


def default_node_id() -> str:
    """``<hostname>-<pid>``: unique on a host, new for each start."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Replica:
    """A replica as its heartbeat row describes it."""

    id: str
    host: str
    pid: int
    version: str
    started_at: datetime
    last_seen_at: datetime
    holds_poller: tuple[str, ...]


async def ensure_schema(conn: Any) -> None:
    """Create the coordination tables if missing. Replicas start together: the statements
    run under a transaction-level advisory lock, as concurrent ``CREATE TABLE IF NOT
    EXISTS`` can fail on the catalog's unique index."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", NAMESPACE)
        for statement in SCHEMA:
            await conn.execute(statement)


async def try_lock(conn: Any, kind: str) -> bool:
    """Take the kind's poller lock on this session if free."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)",
                                    NAMESPACE, lock_key(kind)))


async def unlock(conn: Any, kind: str) -> None:
    """Give the kind's poller lock back (closing the session does it too)."""
    await conn.execute("SELECT pg_advisory_unlock($1, $2)", NAMESPACE, lock_key(kind))


async def take_over(conn: Any, kind: str, holder: str) -> int:
    """Bump the kind's epoch for a new holder (the lock is held); returns the new epoch."""
    epoch = await conn.fetchval(
        """INSERT INTO poller_leases (kind, epoch, holder, acquired_at)
           VALUES ($1, 1, $2, now())
           ON CONFLICT (kind) DO UPDATE
           SET epoch = poller_leases.epoch + 1, holder = $2, acquired_at = now()
           RETURNING epoch""", kind, holder)
    return int(epoch)


async def epochs(conn: Any, kinds: Sequence[str]) -> dict[str, int]:
    """The current epoch of each kind that has one."""
    rows = await conn.fetch("SELECT kind, epoch FROM poller_leases WHERE kind = ANY($1)",
                            list(kinds))
    return {str(row["kind"]): int(row["epoch"]) for row in rows}


async def check_fence(conn: Any, fence: Fence) -> None:
    """Inside a page's transaction: refuse the page unless ``fence`` is still the kind's
    epoch. ``FOR SHARE`` makes a takeover's epoch bump wait for this transaction."""
    epoch = await conn.fetchval(
        "SELECT epoch FROM poller_leases WHERE kind = $1 FOR SHARE", fence.kind)
    if epoch is None or int(epoch) != fence.epoch:
        raise Fenced(f"{fence.kind}: another replica took the poller over "
                     f"(epoch {epoch}, this one holds {fence.epoch}); page not committed")


async def heartbeat(conn: Any, replica: Replica) -> None:
    """Upsert this replica's row; ``last_seen_at`` is the server's clock."""
    await conn.execute(
        """INSERT INTO replicas (id, host, pid, version, started_at, last_seen_at, holds_poller)
           VALUES ($1, $2, $3, $4, $5, now(), $6)
           ON CONFLICT (id) DO UPDATE
           SET host = $2, pid = $3, version = $4, started_at = $5, last_seen_at = now(),
               holds_poller = $6""",
        replica.id, replica.host, replica.pid, replica.version, replica.started_at,
        list(replica.holds_poller))


async def leave(conn: Any, replica_id: str) -> None:
    """On a clean stop: this replica holds no poller any more (its row stays, aging)."""
    await conn.execute("UPDATE replicas SET holds_poller = '{}' WHERE id = $1", replica_id)


async def pollers(conn: Any) -> dict[str, str]:
    """kind -> the replica polling it now: the last taker (``poller_leases.holder``) of
    each kind whose lock some session holds (``pg_locks``). A kind whose holder died and
    that nobody took over yet is absent; a dead replica's heartbeat row may still say it
    polls, this does not."""
    rows = await conn.fetch(
        """SELECT p.kind, p.holder, l.objid::bigint AS objid FROM poller_leases p
           JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
             AND l.classid = $1::bigint::oid
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        """, NAMESPACE)
    return {str(r["kind"]): str(r["holder"]) for r in rows
            if int(r["objid"]) == lock_key(str(r["kind"])) % (1 << 32)}


async def forget(conn: Any, older_than_s: float) -> int:
    """Delete the heartbeat rows of replicas not seen for ``older_than_s``."""
    result = await conn.execute(
        "DELETE FROM replicas WHERE last_seen_at < now() - make_interval(secs => $1)",
        older_than_s)
    return int(str(result).rsplit(" ", 1)[-1])


async def replicas_seen(conn: Any, within_s: float) -> list[Replica]:
    """Replicas whose heartbeat is at most ``within_s`` old, by id."""
    rows = await conn.fetch(
        """SELECT id, host, pid, version, started_at, last_seen_at, holds_poller
           FROM replicas WHERE last_seen_at >= now() - make_interval(secs => $1)
           ORDER BY id""", within_s)
    return [Replica(str(r["id"]), str(r["host"]), int(r["pid"]), str(r["version"]),
                    r["started_at"], r["last_seen_at"], tuple(r["holds_poller"]))
            for r in rows]
