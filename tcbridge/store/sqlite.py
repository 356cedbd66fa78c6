"""The SQLite store: one file, one writer thread, group commit.

Every write goes through one dedicated thread that owns the connection. Operations
queued while a commit is in progress are run together in the next transaction, each
inside its own savepoint, and each caller is answered only after that transaction
has committed (``synchronous=FULL``). So a webhook's 200 always means "on disk",
while many concurrent requests share one fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import orjson
import structlog

from tcbridge.config import StoreSettings
from tcbridge.envelope import Candidate
from tcbridge.errors import StoreError, StoreUnavailable, UnknownName
from tcbridge.store import rules
from tcbridge.store.types import (
    Claim,
    DeliveryStatus,
    Fence,
    FetchRequest,
    Finished,
    IngestResult,
    Rejected,
    Retention,
    WriterHealth,
)
from tcbridge.timefmt import instant_us, utc_now_iso

log = structlog.get_logger(__name__)

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]
Route = Callable[[Mapping[str, Any]], Sequence[str]]
Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]
CLOSE_TIMEOUT_S = 10.0
CLOSE_POLL_S = 0.005


def _no_routes(envelope: Mapping[str, Any]) -> Sequence[str]:
    return ()


MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            entity_id TEXT NOT NULL,
            version_key TEXT NOT NULL,
            last_updated_at TEXT,
            instant_us INTEGER,
            event_name TEXT,
            source TEXT NOT NULL,
            received_at TEXT NOT NULL,
            late INTEGER NOT NULL DEFAULT 0,
            envelope TEXT
        )""",
        "CREATE INDEX events_entity ON events (entity_id, seq)",
        """CREATE TABLE entities (
            kind TEXT NOT NULL,
            entity_id TEXT NOT NULL,
            newest_us INTEGER NOT NULL,
            newest_last_updated_at TEXT NOT NULL,
            PRIMARY KEY (kind, entity_id)
        ) WITHOUT ROWID""",
        """CREATE TABLE sightings (
            id INTEGER PRIMARY KEY,
            event_id TEXT,
            kind TEXT NOT NULL,
            entity_id TEXT NOT NULL,
            last_updated_at TEXT,
            source TEXT NOT NULL,
            reason TEXT NOT NULL CHECK (reason IN ('duplicate', 'stale')),
            received_at TEXT NOT NULL
        )""",
        "CREATE INDEX sightings_event ON sightings (event_id)",
        """CREATE TABLE cursors (
            kind TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE rejected (
            id INTEGER PRIMARY KEY,
            received_at TEXT NOT NULL,
            source TEXT NOT NULL,
            reason TEXT NOT NULL,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            query TEXT NOT NULL,
            remote TEXT,
            headers TEXT NOT NULL,
            body BLOB NOT NULL
        )""",
        """CREATE TABLE fetch_requests (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            entity_id TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'done', 'failed')),
            requested_at TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            last_error TEXT,
            finished_at TEXT
        )""",
        """CREATE UNIQUE INDEX fetch_pending ON fetch_requests (kind, entity_id)
            WHERE status = 'pending'""",
        "CREATE INDEX fetch_due ON fetch_requests (status, next_attempt_at)",
    ],
    [
        # The outbox: one row per (event, handler), written in the event's transaction.
        """CREATE TABLE deliveries (
            id INTEGER PRIMARY KEY,
            event_seq INTEGER NOT NULL REFERENCES events (seq),
            event_id TEXT NOT NULL,
            handler TEXT NOT NULL,
            entity_id TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'running', 'done', 'dead')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            last_error TEXT,
            created_at TEXT NOT NULL,
            finished_at TEXT,
            replay INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX deliveries_queue ON deliveries (handler, status, id)",
        """CREATE INDEX deliveries_open ON deliveries (handler, entity_id, id)
            WHERE status IN ('pending', 'running')""",
        "CREATE INDEX deliveries_event ON deliveries (event_id)",
        """CREATE TABLE delivery_attempts (
            id INTEGER PRIMARY KEY,
            delivery_id INTEGER NOT NULL REFERENCES deliveries (id),
            attempt INTEGER NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT NOT NULL,
            outcome TEXT NOT NULL,
            error TEXT,
            output TEXT
        )""",
        "CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id)",
    ],
    [
        "ALTER TABLE events ADD COLUMN recovered INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX deliveries_status ON deliveries (status, handler)",
        # Retention walks the payloads still held, oldest first; purged rows leave the index.
        "CREATE INDEX events_payload_age ON events (received_at) WHERE envelope IS NOT NULL",
        "CREATE INDEX sightings_age ON sightings (received_at)",
        """CREATE TABLE poll_state (
            kind TEXT PRIMARY KEY,
            last_attempt_at TEXT NOT NULL,
            last_success_at TEXT,
            last_error TEXT,
            last_items INTEGER,
            last_stored INTEGER
        )""",
    ],
    [
        # Retention and replay find an event's deliveries by its seq.
        "DROP INDEX deliveries_event",
        "CREATE INDEX deliveries_event_seq ON deliveries (event_seq)",
    ],
    [
        # The next due time is asked after every claim: O(log n), not a walk over the backlog.
        """CREATE INDEX deliveries_pending_due ON deliveries (handler, next_attempt_at)
            WHERE status = 'pending'""",
    ],
    [
        # Two GETs in one millisecond have the same requested_at: a counter tells them apart.
        "ALTER TABLE fetch_requests ADD COLUMN generation INTEGER NOT NULL DEFAULT 0",
    ],
    [
        # Retention finds the payloads still held by seq, which grows with received_at (as
        # _last_seq_before already counts on): an index of integers is about 25 bytes per
        # event smaller than one of received_at texts (bench/README.md, store bytes).
        "DROP INDEX events_payload_age",
        "CREATE INDEX events_payload_seq ON events (seq) WHERE envelope IS NOT NULL",
    ],
]


class Store:
    """The async face of the SQLite store; all SQL runs on the writer thread."""

    def __init__(self, path: Path, settings: StoreSettings, *, route: Route = _no_routes) -> None:
        self.path = path
        self.location = str(path)
        self._settings = settings
        self._route = route
        self._queue: queue.SimpleQueue[tuple[Op, asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = True
        # Writer state, written by the writer thread, read by the loop (plain attributes).
        self._connected = False
        self._last_error: str | None = None
        self._errors = 0
        self._dead: str | None = None  # why the writer thread died, once it has
        self._dead_lock = threading.Lock()  # so no operation is queued behind a dead writer
        self._rejected_bytes: int | None = None  # writer thread only: kept rejected bytes
        self._in_hand: Sequence[tuple[Op, asyncio.Future[Any]]] = []  # the batch running
        self.rejected_truncated = 0  # rejected bodies cut to rejected_body_max_bytes
        self.rejected_dropped = 0  # rejected rows dropped (oldest first) for rejected_max_bytes
        self.failed: asyncio.Future[str] | None = None  # set to the reason if the writer dies

    # -- lifecycle ---------------------------------------------------------------

    async def open(self, *, keep_trying: bool = False) -> None:
        """Open the file, apply migrations and start the writer thread.

        ``keep_trying`` (the daemon): if the file cannot be opened now (a full disk, a
        missing mount), start anyway; every operation fails with StoreUnavailable (a 503)
        while the writer keeps trying to open it. A schema newer than ours still raises."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self.failed = self._loop.create_future()
        self._dead = None
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready, keep_trying), name="tcbridge-store",
            daemon=True,
        )
        self._closed = False
        self._thread.start()
        try:
            await ready
        except BaseException:
            self._closed = True
            raise

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Finish queued work, then stop the thread and close the file; a writer hung (on a
        dead disk) longer than ``timeout_s`` is abandoned and logged, so shutdown ends."""
        if self._closed or self._thread is None:
            return
        self._closed = True
        self._queue.put(None)
        # Polled, not joined in a thread: a hung join in the default executor would keep
        # asyncio.run from returning. The writer is a daemon thread, so the process exits;
        # what it had not committed is lost exactly as in a crash (nobody was answered).
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive():
            if time.monotonic() >= deadline:
                log.error("store.close_abandoned", timeout_s=timeout_s,
                          queued=self._queue.qsize(), path=str(self.path))
                return
            await asyncio.sleep(CLOSE_POLL_S)

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the writer thread ---------------------------------------------------------

    @property
    def writer_alive(self) -> bool:
        """Whether the writer thread runs and answers (False when closed or dead)."""
        return (not self._closed and self._dead is None and self._thread is not None
                and self._thread.is_alive())

    def health(self) -> WriterHealth:
        """The writer's state now (cheap: no SQL, no waiting)."""
        return WriterHealth(alive=self.writer_alive, connected=self._connected,
                            last_error=self._dead or self._last_error, errors=self._errors)

    def _thread_main(self, ready: asyncio.Future[None], keep_trying: bool) -> None:
        conn: sqlite3.Connection | None = None
        try:
            conn = self._open_connection()
        except StoreUnavailable as e:
            if not keep_trying:
                self._resolve([(ready, None, e)])
                return
            self._last_error = str(e)
            log.error("store.unavailable", error=str(e), message="retrying; webhooks get 503")
        except StoreError as e:
            self._resolve([(ready, None, e)])
            return
        self._resolve([(ready, None, None)])
        try:
            self._serve(conn)
        except BaseException:  # the thread ends here: the daemon must know at once
            log.critical("store.writer_crashed", exc_info=True)
            self._writer_died()

    def _open_connection(self) -> sqlite3.Connection:
        """Connect and migrate; StoreUnavailable when the file cannot be used now."""
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            migrate(conn)
        except (sqlite3.Error, OSError) as e:
            _close_quietly(conn)
            raise StoreUnavailable(f"cannot open store {self.path}: {e}") from e
        except BaseException:
            _close_quietly(conn)
            raise
        self._connected = True
        return conn

    def _writer_died(self) -> None:
        """The thread is ending on an error nothing caught: answer everybody, say so."""
        reason = "the store's writer thread stopped on an unexpected error"
        with self._dead_lock:
            self._dead = reason
            self._connected = False
            waiting = _fail_all(self._in_hand, StoreUnavailable(reason))
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    waiting.append((item[1], None, StoreUnavailable(reason)))
        log.critical("store.writer_died", message=reason)
        self._resolve(waiting)
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_set_failed, self.failed, reason)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False,
            timeout=self._settings.busy_timeout_s,
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self._settings.busy_timeout_s * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"cannot switch {self.path} to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _serve(self, conn: sqlite3.Connection | None) -> None:
        """Run batches until told to stop. No error of a batch ends this loop: its waiters
        get StoreUnavailable, and a connection that cannot be trusted is reopened."""
        while True:
            batch, stop = self._next_batch(REOPEN_EVERY_S if conn is None else None)
            if conn is None:
                conn = self._reopen()
            if batch:
                self._in_hand = batch  # answered by _writer_died if this thread dies now
                outcomes, conn = self._run_safely(conn, batch)
                self._resolve(outcomes)
                self._in_hand = []
            if stop:
                _close_quietly(conn)
                return

    def _next_batch(
        self, timeout_s: float | None
    ) -> tuple[list[tuple[Op, asyncio.Future[Any]]], bool]:
        """Up to ``commit_batch_max`` queued operations, and whether to stop after them."""
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return [], False
        if item is None:
            return [], True
        batch = [item]
        while len(batch) < self._settings.commit_batch_max:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _run_safely(
        self, conn: sqlite3.Connection | None, batch: Sequence[tuple[Op, asyncio.Future[Any]]]
    ) -> tuple[list[Outcome], sqlite3.Connection | None]:
        if conn is None:
            outcomes = _fail_all(batch, StoreUnavailable(f"store not open: {self._last_error}"))
            self._account(outcomes, wrote=False)
            return outcomes, None
        changes = conn.total_changes
        try:
            outcomes = run_batch(conn, batch)
        except Exception as e:  # a fault run_batch did not foresee: never end the thread
            log.exception("store.batch_failed")
            outcomes = _fail_all(batch, StoreUnavailable(f"store failed: {e}"))
            self._account(outcomes, wrote=False)
            return outcomes, self._discard(conn)
        self._account(outcomes, wrote=conn.total_changes > changes)
        if any(isinstance(error, StoreUnavailable) for _, _, error in outcomes) and (
            not _usable(conn)
        ):
            conn = self._discard(conn)
        return outcomes, conn

    def _discard(self, conn: sqlite3.Connection) -> sqlite3.Connection | None:
        """Close a connection that cannot be trusted; the next batch opens a new one."""
        log.warning("store.reopening", path=str(self.path))
        _close_quietly(conn)
        self._connected = False
        self._rejected_bytes = None
        return None

    def _reopen(self) -> sqlite3.Connection | None:
        try:
            conn = self._open_connection()
        except StoreError as e:
            self._last_error = str(e)
            return None
        log.info("store.reopened", path=str(self.path))
        return conn

    def _account(self, outcomes: Sequence[Outcome], *, wrote: bool) -> None:
        """Remember the last failure until a batch that wrote something commits (a batch
        that only read proves nothing: small writes may fit where an event does not)."""
        failures = [error for _, _, error in outcomes if isinstance(error, StoreUnavailable)]
        if failures:
            self._errors += len(failures)
            self._last_error = str(failures[0])
        elif wrote:
            self._last_error = None

    def _resolve(self, results: list[Outcome]) -> None:
        assert self._loop is not None
        # RuntimeError: the loop is gone, so nobody waits for these answers any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_set_results, results)

    async def run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``op`` on the writer thread inside the next group transaction."""
        if self._closed or self._loop is None:
            raise StoreUnavailable("store is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        with self._dead_lock:
            if self._dead is not None:
                raise StoreUnavailable(self._dead)
            self._queue.put((op, future))
        return await future

    # -- ingest --------------------------------------------------------------------

    async def ingest(self, candidate: Candidate) -> IngestResult:
        """Store one candidate as an event, a duplicate or a stale sighting, durably."""
        return await self.run(IngestOp(candidate, utc_now_iso(), self._route))

    async def ingest_page(
        self,
        kind: str,
        candidates: Sequence[Candidate],
        rejects: Sequence[Rejected],
        cursor: str | None,
        *,
        recovered: bool = False,
        fence: Fence | None = None,
    ) -> list[IngestResult]:
        """Store a poll page and move the cursor in one transaction: all of it or none.

        ``recovered``: new events are marked as recovered (the webhook missed them).
        ``fence`` is not checked: one SQLite file has one daemon, whose poller always polls."""
        received_at = utc_now_iso()

        def op(conn: sqlite3.Connection) -> list[IngestResult]:
            # The page's items written together, like neighbouring webhooks (the same
            # answers as one by one: tests/test_store_batch.py).
            results = ingest_many(conn, [
                IngestOp(c, received_at, self._route, recovered=recovered) for c in candidates])
            for rejected in rejects:
                self._keep_rejected(conn, rejected, received_at)
            if cursor is not None:
                advance_cursor(conn, kind, cursor)
            return results

        return await self.run(op)

    async def reject(self, rejected: Rejected) -> int:
        """Keep a rejected request for inspection; returns its row id."""
        received_at = utc_now_iso()
        return await self.run(lambda conn: self._keep_rejected(conn, rejected, received_at))

    def _keep_rejected(self, conn: sqlite3.Connection, rejected: Rejected,
                       received_at: str) -> int:
        """Keep a rejected request within ``rejected_body_max_bytes`` per request and
        ``rejected_max_bytes`` in all (oldest out first): a sender must not fill the disk."""
        limit = self._settings.rejected_body_max_bytes
        if len(rejected.body) > limit:
            self.rejected_truncated += 1
            rejected = replace(
                rejected, body=rejected.body[:limit],
                reason=f"{rejected.reason} (body of {len(rejected.body)} bytes cut to {limit})")
        row_id = insert_rejected(conn, rejected, received_at)
        if self._rejected_bytes is None:
            self._rejected_bytes = rejected_bytes(conn)
        else:
            self._rejected_bytes += _rejected_size(rejected)
        if self._rejected_bytes > self._settings.rejected_max_bytes:
            dropped, self._rejected_bytes = trim_rejected(
                conn, self._settings.rejected_max_bytes, keep=row_id)
            self.rejected_dropped += dropped
        return row_id

    # -- cursors -------------------------------------------------------------------

    async def get_cursor(self, kind: str) -> str | None:
        """The committed cursor of a kind, exactly as received."""
        return await self.run(lambda conn: read_cursor(conn, kind))

    async def set_cursor(self, kind: str, value: str) -> None:
        """Set a cursor by hand (operator's choice: it may move backwards)."""
        instant_us(value)  # refuse anything that is not a timestamp
        await self.run(lambda conn: write_cursor(conn, kind, value))

    async def cursors(self) -> dict[str, tuple[str, str]]:
        """All cursors: kind -> (value, updated_at)."""
        rows = await self.run(
            lambda conn: conn.execute("SELECT kind, value, updated_at FROM cursors").fetchall()
        )
        return {kind: (value, updated) for kind, value, updated in rows}

    # -- legacy GET fetches ----------------------------------------------------------

    async def request_fetch(self, kind: str, entity_id: str) -> int:
        """Record (or refresh) a durable request to fetch a whole object."""
        now = utc_now_iso()
        return await self.run(lambda conn: upsert_fetch(conn, kind, entity_id, now))

    async def fetch_counts(self) -> dict[str, int]:
        """Fetch requests pending and given up (for ``/metrics``)."""
        return await self.run(fetch_counts)

    async def due_fetches(self, limit: int = 10) -> list[FetchRequest]:
        """Pending fetch requests whose next attempt is due."""
        return await self.run(lambda conn: select_due_fetches(conn, time.time(), limit))

    async def next_fetch_due_at(self) -> float | None:
        """Epoch seconds of the earliest pending fetch, or None."""
        return await self.run(
            lambda conn: conn.execute(
                "SELECT min(next_attempt_at) FROM fetch_requests WHERE status = 'pending'"
            ).fetchone()[0]
        )

    async def complete_fetch(self, request: FetchRequest, candidate: Candidate) -> IngestResult:
        """Ingest a fetched object and close its request in one transaction."""
        received_at = utc_now_iso()

        def op(conn: sqlite3.Connection) -> IngestResult:
            result = ingest_one(conn, candidate, received_at, self._route)
            finish_fetch(conn, request, "done", None, received_at)
            return result

        return await self.run(op)

    async def fail_fetch(
        self, request: FetchRequest, error: str, *, retry_at: float | None
    ) -> None:
        """Record a failed fetch attempt: retry at ``retry_at``, or give up when None."""
        now = utc_now_iso()

        def op(conn: sqlite3.Connection) -> None:
            if retry_at is None:
                finish_fetch(conn, request, "failed", error, now)
            else:
                conn.execute(
                    "UPDATE fetch_requests SET attempts = attempts + 1, next_attempt_at = ?,"
                    " last_error = ? WHERE id = ?",
                    (retry_at, error[:2000], request.id),
                )

        await self.run(op)

    # -- deliveries --------------------------------------------------------------------

    async def claim(self, handler: str, limit: int) -> list[Claim]:
        """Claim due deliveries of one handler, in order per entity."""
        return await self.run(lambda conn: claim_deliveries(conn, handler, limit, time.time()))

    async def claim_and_next_due(
        self, handler: str, limit: int
    ) -> tuple[list[Claim], float | None]:
        """Claim due deliveries and say when the next pending one is due, in one step. A
        claim that filled ``limit`` answers "now" without asking: more may be due."""
        def op(conn: sqlite3.Connection) -> tuple[list[Claim], float | None]:
            now = time.time()
            claims = claim_deliveries(conn, handler, limit, now)
            if len(claims) >= limit:
                return claims, now
            return claims, next_delivery_due(conn, handler)

        return await self.run(op)

    async def finish(
        self,
        claim: Claim,
        status: DeliveryStatus,
        *,
        error: str | None = None,
        output: str | None = None,
        next_attempt_at: float | None = None,
    ) -> None:
        """Record the outcome of one attempt."""
        await self.finish_many([Finished(claim, status, error, output, next_attempt_at)])

    async def finish_many(self, outcomes: Sequence[Finished]) -> None:
        """Record the outcomes of many attempts in one operation: all of them or none."""
        if outcomes:
            await self.run(lambda conn: finish_deliveries(conn, outcomes))

    async def renew(self, handler: str, ids: Sequence[int]) -> list[int]:
        """Extend the claims' leases; returns the ids still held. One process owns a SQLite
        store, so no claim is ever taken from it: every id is still held."""
        return list(ids)

    async def release(self, ids: Sequence[int] | None = None) -> int:
        """Interrupted deliveries back to pending; all running ones when ``ids`` is None."""
        return await self.run(lambda conn: release_running(conn, ids))

    async def replay(self, event_id: str, handlers: Sequence[str] | None) -> int:
        """Deliver a stored event again (to ``handlers``, or to those it went to before)."""
        return await self.run(lambda conn: replay_event(conn, event_id, handlers))

    async def requeue_dead(self, handler: str | None = None) -> int:
        """Give dead deliveries another full round of attempts."""
        return await self.run(lambda conn: requeue_dead(conn, handler))

    async def deliveries(
        self, *, status: str | None = None, handler: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Deliveries, newest first."""
        return await self.run(lambda conn: select_deliveries(conn, status, handler, limit))

    async def delivery_counts(self) -> dict[str, dict[str, int]]:
        """handler -> status -> count."""
        return await self.run(delivery_counts)

    # -- poll state, status and retention ---------------------------------------------

    async def record_poll(
        self, kind: str, *, error: str | None, items: int | None, stored: int | None
    ) -> None:
        """Remember the outcome of the last poll cycle of a kind (for ``tcbridge status``)."""
        now = utc_now_iso()
        await self.run(lambda conn: record_poll(conn, kind, now, error, items, stored))

    async def poll_succeeded(self, kind: str) -> bool:
        """Whether a poll cycle of this kind has ever completed."""
        row = await self.run(lambda conn: conn.execute(
            "SELECT last_success_at FROM poll_state WHERE kind = ?", (kind,)).fetchone())
        return row is not None and row[0] is not None

    async def status(self) -> dict[str, Any]:
        """Everything ``tcbridge status`` shows, read in one transaction."""
        return await self.run(read_status)

    async def replicas(self, within_s: float) -> list[dict[str, Any]]:
        """Replicas sharing the store: none, a SQLite file has one daemon."""
        return []

    async def backlog(self) -> dict[str, dict[str, int]]:
        """handler -> status -> count of deliveries not done (pending, running, dead)."""
        return await self.run(backlog_counts)

    async def purge(self, policy: Retention) -> dict[str, int]:
        """One batch of retention work; call until it returns all zeros."""
        return await self.run(lambda conn: purge_batch(conn, policy, time.time()))

    async def ping(self) -> None:
        """A no-op write transaction: proves the writer thread answers and can lock the file."""
        await self.run(lambda conn: None)

    # -- reading -------------------------------------------------------------------

    async def events(
        self, *, entity_id: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The newest events (optionally of one entity), newest first."""
        return await self.run(lambda conn: select_events(conn, entity_id, limit))

    async def routing(self, seqs: Sequence[int]) -> dict[int, tuple[list[str], str | None]]:
        """seq -> (the handlers the event has deliveries for, its envelope JSON or None)."""
        return await self.run(lambda conn: select_routing(conn, seqs))

    async def counts(self) -> dict[str, int]:
        """Row counts for status output and tests."""
        return await self.run(count_rows)

    async def table_counts(self) -> dict[str, int]:
        """table -> rows, for every table the store keeps (``migrate-store`` checks these)."""
        return await self.run(table_counts)


REOPEN_EVERY_S = 1.0  # while the file cannot be opened, try again this often


def _set_failed(future: asyncio.Future[str] | None, reason: str) -> None:
    if future is not None and not future.done():
        future.set_result(reason)


def _close_quietly(conn: sqlite3.Connection | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


def _usable(conn: sqlite3.Connection) -> bool:
    """Whether a connection can run the next batch: answers, and no transaction is stuck."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.execute("SELECT 1").fetchone()
    except sqlite3.Error:
        return False
    return not conn.in_transaction


def _set_results(results: Iterable[Outcome]) -> None:
    for future, value, error in results:
        if future.done():  # the caller went away (a client disconnect); the work is done anyway
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


def run_batch(
    conn: sqlite3.Connection, batch: Sequence[tuple[Op, asyncio.Future[Any]]]
) -> list[Outcome]:
    """Run queued operations in one transaction and commit once.

    The fast path runs them one after the other; if one raises, the transaction is rolled
    back and the batch runs again with each operation in its own savepoint, so one failing
    operation never spoils its neighbours (operations are functions of the database
    state, so running them again is safe)."""
    failed = _begin(conn, batch)
    if failed is not None:
        return failed
    try:
        outcomes = _run_ops(conn, batch)
    except Exception:
        _rollback(conn)
        return _run_batch_guarded(conn, batch)
    return _commit(conn, batch, outcomes)


def _run_ops(
    conn: sqlite3.Connection, batch: Sequence[tuple[Op, asyncio.Future[Any]]]
) -> list[Outcome]:
    """Run the batch's operations in order; neighbouring ingests are written together."""
    outcomes: list[Outcome] = []
    for is_ingest, group in itertools.groupby(batch, key=lambda item: isinstance(
            item[0], IngestOp)):
        items = list(group)
        if is_ingest and len(items) > 1:
            results = ingest_many(conn, [op for op, _ in items])  # type: ignore[misc]
            outcomes.extend((future, result, None)
                            for (_, future), result in zip(items, results, strict=True))
        else:
            outcomes.extend((future, op(conn), None) for op, future in items)
    return outcomes


def _run_batch_guarded(
    conn: sqlite3.Connection, batch: Sequence[tuple[Op, asyncio.Future[Any]]]
) -> list[Outcome]:
    failed = _begin(conn, batch)
    if failed is not None:
        return failed
    try:
        outcomes = [(future, *_run_in_savepoint(conn, op)) for op, future in batch]
    except (sqlite3.Error, _TransactionLost) as e:
        # A savepoint could not be set, rolled back or released: SQLite has rolled the
        # whole transaction back (SQLITE_FULL, an I/O error), so no operation of it holds.
        _rollback(conn)
        if len(batch) == 1:
            return _fail_all(batch, StoreUnavailable(f"store transaction failed: {e}"))
        # One operation that cannot fit must not fail the small ones beside it.
        return [outcome for item in batch for outcome in run_batch(conn, [item])]
    return _commit(conn, batch, outcomes)


def _begin(
    conn: sqlite3.Connection, batch: Sequence[tuple[Op, asyncio.Future[Any]]]
) -> list[Outcome] | None:
    """Start the batch's transaction; on failure, the answers for the whole batch."""
    if conn.in_transaction:  # a failed ROLLBACK left one open: never stay stuck in it
        _rollback(conn)
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as e:
        return _fail_all(batch, StoreUnavailable(f"cannot begin a transaction: {e}"))
    return None


def _commit(
    conn: sqlite3.Connection,
    batch: Sequence[tuple[Op, asyncio.Future[Any]]],
    outcomes: list[Outcome],
) -> list[Outcome]:
    if not conn.in_transaction:  # SQLite rolled it back under us: nothing of it holds
        return _fail_all(batch, StoreUnavailable("the transaction was rolled back"))
    try:
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        _rollback(conn)
        return _fail_all(batch, StoreUnavailable(f"commit failed: {e}"))
    return outcomes


def _fail_all(
    batch: Sequence[tuple[Op, asyncio.Future[Any]]], error: BaseException
) -> list[Outcome]:
    return [(future, None, error) for _, future in batch]


class _TransactionLost(Exception):
    """An operation failed and its savepoint could not be undone: the transaction is gone."""


def _run_in_savepoint(conn: sqlite3.Connection, op: Op) -> tuple[Any, BaseException | None]:
    conn.execute("SAVEPOINT op")
    try:
        value = op(conn)
    except Exception as e:  # one failing operation must not spoil its neighbours
        try:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
        except sqlite3.Error as undo:
            raise _TransactionLost(f"{e} (then: {undo})") from e
        if isinstance(e, sqlite3.OperationalError):
            return None, StoreUnavailable(f"store operation failed: {e}")
        return None, e
    conn.execute("RELEASE op")
    return value, None


def _rollback(conn: sqlite3.Connection) -> None:
    if not conn.in_transaction:  # SQLite rolled it back itself (SQLITE_FULL does)
        return
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        log.warning("store.rollback_failed")


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version; each step is one transaction."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > len(MIGRATIONS):
        raise StoreError(
            f"store schema version {version} is newer than this tcbridge ({len(MIGRATIONS)})"
        )
    for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except sqlite3.Error:
            _rollback(conn)
            raise
        log.info("store.migrated", version=number)
    return len(MIGRATIONS)


def ingest_one(
    conn: sqlite3.Connection,
    candidate: Candidate,
    received_at: str,
    route: Route,
    *,
    recovered: bool = False,
) -> IngestResult:
    """The dedup rules, inside the caller's transaction: a batch of one (one decision
    procedure for a webhook, a page and the savepoint fallback)."""
    op = IngestOp(candidate, received_at, route, recovered=recovered)
    return ingest_many(conn, [op])[0]


class IngestOp:
    """One candidate to ingest, as a queued operation. Called alone (and in the savepoint
    fallback) it is :func:`ingest_one`; neighbours in a batch are written together by
    :func:`ingest_many`, with the same answers."""

    __slots__ = ("candidate", "received_at", "recovered", "route")

    def __init__(self, candidate: Candidate, received_at: str, route: Route, *,
                 recovered: bool = False) -> None:
        self.candidate = candidate
        self.received_at = received_at
        self.route = route
        self.recovered = recovered

    def __call__(self, conn: sqlite3.Connection) -> IngestResult:
        return ingest_one(conn, self.candidate, self.received_at, self.route,
                          recovered=self.recovered)


# Each sqlite3 call releases the GIL around sqlite3_step and must win it back from the busy
# event loop, so a batch is looked up in one statement and written in three (the small rows
# over json_each(?), the events in one multi-row INSERT), not five calls per event
# (bench/README.md, ingest).
_LOOKUP_SQL = (
    "SELECT json_group_array(json_array(j.key, e.source, e.envelope, e.id IS NOT NULL,"
    " n.newest_us)) FROM json_each(?) j"
    " LEFT JOIN events e ON e.id = json_extract(j.value, '$[0]')"
    " LEFT JOIN entities n ON n.kind = json_extract(j.value, '$[1]')"
    "  AND n.entity_id = json_extract(j.value, '$[2]')"
    " WHERE e.id IS NOT NULL OR n.newest_us IS NOT NULL"
)
_INSERT_EVENTS_SQL = (
    "INSERT INTO events (id, kind, entity_id, version_key, last_updated_at, instant_us,"
    " event_name, source, received_at, late, envelope, recovered) VALUES "
)
_EVENT_VALUES = "(?,?,?,?,?,?,?,?,?,?,?,?)"
# Rows per multi-row INSERT: 768 parameters (SQLite allowed 999 before 3.32), and at most
# 64 statement texts for the sqlite3 module's statement cache (128).
EVENT_ROWS_PER_INSERT = 64


def _insert_events_sql(rows: int) -> str:
    """One INSERT of ``rows`` events: one sqlite3_step for all of them. (executemany steps
    once per row, giving the GIL away each time; JSON made SQLite unescape every envelope.)"""
    return _INSERT_EVENTS_SQL + ",".join([_EVENT_VALUES] * rows)
_UPSERT_ENTITIES_SQL = (
    "INSERT INTO entities (kind, entity_id, newest_us, newest_last_updated_at)"
    " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
    " json_extract(value, '$[2]'), json_extract(value, '$[3]') FROM json_each(?)"
    " WHERE true"  # the parser needs it before ON CONFLICT in an INSERT ... SELECT
    " ON CONFLICT (kind, entity_id) DO UPDATE SET newest_us = excluded.newest_us,"
    " newest_last_updated_at = excluded.newest_last_updated_at"
)
_INSERT_DELIVERIES_SQL = (
    "INSERT INTO deliveries (event_seq, event_id, handler, entity_id, next_attempt_at,"
    " created_at, replay)"
    " SELECT e.seq, e.id, json_extract(j.value, '$[1]'), e.entity_id, ?2,"
    " json_extract(j.value, '$[2]'), 0 FROM json_each(?1) j"
    " JOIN events e ON e.id = json_extract(j.value, '$[0]') ORDER BY j.key"
)


def ingest_many(conn: sqlite3.Connection, ops: Sequence[IngestOp]) -> list[IngestResult]:
    """Ingest candidates as :func:`ingest_one` one after the other would (the same rules,
    the same answers, the same rows in the same order), in about five statements."""
    if not ops:
        return []
    keys = [[op.candidate.event_id, op.candidate.kind, op.candidate.entity_id] for op in ops]
    found: dict[int, list[Any]] = {
        row[0]: row for row in orjson.loads(
            conn.execute(_LOOKUP_SQL, (orjson.dumps(keys),)).fetchone()[0])}
    writes = rules.BatchView()
    for k, (event_id, kind, entity_id) in enumerate(keys):
        row = found.get(k)
        if row is not None and row[3]:
            writes.stored.setdefault(event_id, (row[1], row[2]))
        writes.newest.setdefault((kind, entity_id), None if row is None else row[4])

    def exists(event_id: str) -> bool:
        return conn.execute("SELECT 1 FROM events WHERE id = ?", (event_id,)).fetchone() is not None

    sighting = functools.partial(_sighting, conn)
    results = [rules.decide(op.candidate, op.received_at, op.route, writes, exists=exists,
                            sighting=sighting, recovered=op.recovered) for op in ops]
    for start in range(0, len(writes.events), EVENT_ROWS_PER_INSERT):
        rows = writes.events[start:start + EVENT_ROWS_PER_INSERT]
        conn.execute(_insert_events_sql(len(rows)), [value for row in rows for value in row])
    if writes.entities:
        conn.execute(_UPSERT_ENTITIES_SQL, (orjson.dumps(list(writes.entities.values())),))
    if writes.deliveries:
        conn.execute(_INSERT_DELIVERIES_SQL, (orjson.dumps(writes.deliveries), time.time()))
    return results


def _sighting(
    conn: sqlite3.Connection,
    candidate: Candidate,
    event_id: str | None,
    reason: str,
    received_at: str,
) -> None:
    conn.execute(
        "INSERT INTO sightings (event_id, kind, entity_id, last_updated_at, source, reason,"
        " received_at) VALUES (?,?,?,?,?,?,?)",
        (event_id, candidate.kind, candidate.entity_id, candidate.last_updated_at,
         candidate.source, reason, received_at),
    )


REDACTED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


def insert_rejected(conn: sqlite3.Connection, rejected: Rejected, received_at: str) -> int:
    """Keep a rejected request; credentials in headers are redacted."""
    headers = {
        name: ("<redacted>" if name.lower() in REDACTED_HEADERS else value)
        for name, value in rejected.headers.items()
    }
    cursor = conn.execute(
        "INSERT INTO rejected (received_at, source, reason, method, path, query, remote,"
        " headers, body) VALUES (?,?,?,?,?,?,?,?,?)",
        (received_at, rejected.source, rejected.reason[:2000], rejected.method, rejected.path,
         rejected.query, rejected.remote, json.dumps(headers), rejected.body),
    )
    return int(cursor.lastrowid or 0)


_REJECTED_BYTES_SQL = (
    "SELECT coalesce(sum(length(body) + length(headers) + length(reason)), 0) FROM rejected")
_OLDEST_REJECTED_SQL = (
    "SELECT id, length(body) + length(headers) + length(reason) FROM rejected"
    " WHERE id != ? ORDER BY id LIMIT 100")


def _rejected_size(rejected: Rejected) -> int:
    # About what insert_rejected stores (headers as JSON); the exact sum is read when it
    # matters, before anything is dropped.
    return len(rejected.body) + len(json.dumps(dict(rejected.headers))) + len(rejected.reason)


def rejected_bytes(conn: sqlite3.Connection) -> int:
    """Bytes held by rejected requests (bodies, headers, reasons)."""
    return int(conn.execute(_REJECTED_BYTES_SQL).fetchone()[0])


def trim_rejected(conn: sqlite3.Connection, max_bytes: int, *, keep: int) -> tuple[int, int]:
    """Drop the oldest rejected requests until at most ``max_bytes`` are held, never row
    ``keep`` (the one just stored); returns (rows dropped, bytes now held)."""
    held = rejected_bytes(conn)
    dropped = 0
    while held > max_bytes:
        rows = conn.execute(_OLDEST_REJECTED_SQL, (keep,)).fetchall()
        if not rows:
            break
        victims = []
        for row_id, size in rows:
            if held <= max_bytes:
                break
            victims.append((row_id,))
            held -= int(size)
        conn.executemany("DELETE FROM rejected WHERE id = ?", victims)
        dropped += len(victims)
    return dropped, held


def read_cursor(conn: sqlite3.Connection, kind: str) -> str | None:
    """The stored cursor string of a kind."""
    row = conn.execute("SELECT value FROM cursors WHERE kind = ?", (kind,)).fetchone()
    return None if row is None else str(row[0])


def write_cursor(conn: sqlite3.Connection, kind: str, value: str) -> None:
    """Store a cursor exactly as given."""
    conn.execute(
        "INSERT INTO cursors (kind, value, updated_at) VALUES (?,?,?) ON CONFLICT (kind)"
        " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        (kind, value, utc_now_iso()),
    )


def advance_cursor(conn: sqlite3.Connection, kind: str, value: str) -> None:
    """Move a cursor forward; a value behind the stored one is ignored (never backwards)."""
    offered = instant_us(value)  # never store something that is not a timestamp
    current = read_cursor(conn, kind)
    if current is not None and offered < instant_us(current):
        log.warning("poll.cursor_not_moved_back", kind=kind, stored=current, offered=value)
        return
    write_cursor(conn, kind, value)


def upsert_fetch(conn: sqlite3.Connection, kind: str, entity_id: str, now: str) -> int:
    """One pending request per object; a new GET bumps its ``generation`` (and refreshes
    ``requested_at``) so an in-flight fetch that started before it is not taken as its
    answer, even within the same millisecond."""
    conn.execute(
        "INSERT INTO fetch_requests (kind, entity_id, requested_at, next_attempt_at)"
        " VALUES (?,?,?,?) ON CONFLICT (kind, entity_id) WHERE status = 'pending'"
        " DO UPDATE SET requested_at = excluded.requested_at, generation = generation + 1,"
        " next_attempt_at = min(next_attempt_at, excluded.next_attempt_at)",
        (kind, entity_id, now, time.time()),
    )
    row = conn.execute(
        "SELECT id FROM fetch_requests WHERE kind = ? AND entity_id = ? AND status = 'pending'",
        (kind, entity_id),
    ).fetchone()
    return int(row[0])


def fetch_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """status -> count of fetch requests (pending, failed; done ones are not counted)."""
    rows = conn.execute("SELECT status, count(*) FROM fetch_requests"
                        " WHERE status != 'done' GROUP BY status")
    return {"pending": 0, "failed": 0} | {str(status): int(n) for status, n in rows}


def select_due_fetches(conn: sqlite3.Connection, now: float, limit: int) -> list[FetchRequest]:
    """Pending fetches due at ``now``, oldest first."""
    rows = conn.execute(
        "SELECT id, kind, entity_id, attempts, requested_at, generation FROM fetch_requests"
        " WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
        (now, limit),
    ).fetchall()
    return [FetchRequest(*row) for row in rows]


def finish_fetch(
    conn: sqlite3.Connection, request: FetchRequest, status: str, error: str | None, now: str
) -> None:
    """Close a fetch request, unless a newer GET for the same object arrived meanwhile
    (its generation moved on)."""
    conn.execute(
        "UPDATE fetch_requests SET status = ?, last_error = ?, finished_at = ?,"
        " attempts = attempts + 1 WHERE id = ? AND generation = ?",
        (status, None if error is None else error[:2000], now, request.id, request.generation),
    )
    conn.execute(
        "UPDATE fetch_requests SET attempts = attempts + 1 WHERE id = ? AND status = 'pending'",
        (request.id,),
    )


_EVENTS_SQL = (
    "SELECT e.seq, e.id, e.kind, e.entity_id, e.last_updated_at, e.event_name, e.source,"
    " e.received_at, e.late,"
    " (SELECT count(*) FROM sightings s WHERE s.event_id = e.id) AS duplicates FROM events e"
)


def select_events(
    conn: sqlite3.Connection, entity_id: str | None, limit: int
) -> list[dict[str, Any]]:
    """Events, newest first, with their duplicate sightings counted."""
    if entity_id is None:
        rows = conn.execute(_EVENTS_SQL + " ORDER BY e.seq DESC LIMIT ?", (limit,)).fetchall()
    else:
        rows = conn.execute(
            _EVENTS_SQL + " WHERE e.entity_id = ? ORDER BY e.seq DESC LIMIT ?", (entity_id, limit)
        ).fetchall()
    names = ("seq", "id", "kind", "entityId", "lastUpdatedAt", "eventName", "source",
             "receivedAt", "late", "duplicates")
    return [dict(zip(names, row, strict=True)) | {"late": bool(row[8])} for row in rows]


def select_routing(
    conn: sqlite3.Connection, seqs: Sequence[int]
) -> dict[int, tuple[list[str], str | None]]:
    """seq -> (handlers with a delivery of the event, sorted; the envelope, None if purged)."""
    out: dict[int, tuple[list[str], str | None]] = {}
    for seq in seqs:
        row = conn.execute("SELECT envelope FROM events WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            continue
        handlers = [h for (h,) in conn.execute(
            "SELECT DISTINCT handler FROM deliveries WHERE event_seq = ? ORDER BY handler",
            (seq,))]
        out[seq] = (handlers, row[0])
    return out


def count_rows(conn: sqlite3.Connection) -> dict[str, int]:
    """Counts of events, duplicates, stale sightings, rejections and pending fetches."""
    def one(sql: str) -> int:
        return int(conn.execute(sql).fetchone()[0])

    return {
        "events": one("SELECT count(*) FROM events"),
        "duplicates": one("SELECT count(*) FROM sightings WHERE reason = 'duplicate'"),
        "stale": one("SELECT count(*) FROM sightings WHERE reason = 'stale'"),
        "rejected": one("SELECT count(*) FROM rejected"),
        "fetch_pending": one("SELECT count(*) FROM fetch_requests WHERE status = 'pending'"),
    }


TABLES = ("events", "sightings", "entities", "cursors", "rejected", "fetch_requests",
          "deliveries", "delivery_attempts", "poll_state")


def table_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """table -> rows of every table the store keeps."""
    return {table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608
            for table in TABLES}


# -- deliveries (the outbox) ---------------------------------------------------------

def insert_deliveries(
    conn: sqlite3.Connection,
    seq: int,
    event_id: str,
    entity_id: str,
    handlers: Iterable[str],
    now: str,
    *,
    replay: bool = False,
) -> int:
    """One pending delivery per handler, due at once."""
    due = time.time()
    rows = [(seq, event_id, name, entity_id, due, now, int(replay)) for name in handlers]
    if len(rows) == 1:  # the common case; execute is cheaper than executemany
        conn.execute(_INSERT_DELIVERY_SQL, rows[0])
    else:
        conn.executemany(_INSERT_DELIVERY_SQL, rows)
    return len(rows)


_INSERT_DELIVERY_SQL = (
    "INSERT INTO deliveries (event_seq, event_id, handler, entity_id, next_attempt_at,"
    " created_at, replay) VALUES (?,?,?,?,?,?,?)"
)


_CLAIM_SQL = (
    "SELECT d.id, d.event_id, d.entity_id, d.attempts, e.envelope FROM deliveries d"
    " JOIN events e ON e.seq = d.event_seq"
    # unary + keeps the planner on the id-ordered index (no sort of the whole backlog)
    " WHERE d.handler = ? AND d.status = 'pending' AND +d.next_attempt_at <= ?"
    # in order per entity: an earlier open delivery of the same entity blocks this one
    " AND NOT EXISTS (SELECT 1 FROM deliveries p WHERE p.handler = d.handler"
    "   AND p.entity_id = d.entity_id AND p.id < d.id AND p.status IN ('pending', 'running'))"
    " ORDER BY d.id LIMIT ?"
)


def claim_deliveries(
    conn: sqlite3.Connection, handler: str, limit: int, now: float
) -> list[Claim]:
    """Mark up to ``limit`` due, unblocked deliveries as running and return them."""
    rows = conn.execute(_CLAIM_SQL, (handler, now, limit)).fetchall()
    started = utc_now_iso()
    conn.executemany(
        "UPDATE deliveries SET status = 'running' WHERE id = ?", [(row[0],) for row in rows]
    )
    return [
        Claim(id=row[0], event_id=row[1], entity_id=row[2], handler=handler,
              attempt=int(row[3]) + 1, body=row[4] or "", started_at=started)
        for row in rows
    ]


def finish_delivery(
    conn: sqlite3.Connection,
    claim: Claim,
    status: DeliveryStatus,
    *,
    error: str | None,
    output: str | None,
    next_attempt_at: float | None,
) -> None:
    """Record one attempt's outcome: done, dead, or pending again at ``next_attempt_at``."""
    finish_deliveries(conn, [Finished(claim, status, error, output, next_attempt_at)])


_FINISH_SQL = (
    "UPDATE deliveries SET status = ?, attempts = ?, last_error = ?,"
    " next_attempt_at = coalesce(?, next_attempt_at),"
    " finished_at = CASE WHEN ? IN ('done', 'dead') THEN ? ELSE finished_at END"
    " WHERE id = ?"
)
_ATTEMPT_SQL = (
    "INSERT INTO delivery_attempts (delivery_id, attempt, started_at, finished_at, outcome,"
    " error, output) VALUES (?,?,?,?,?,?,?)"
)


def finish_deliveries(conn: sqlite3.Connection, outcomes: Sequence[Finished]) -> None:
    """Record many attempts' outcomes with two statements (one update, one attempts insert)."""
    now = utc_now_iso()
    conn.executemany(_FINISH_SQL, [
        (o.status, o.claim.attempt, o.error, o.next_attempt_at, o.status, now, o.claim.id)
        for o in outcomes])
    conn.executemany(_ATTEMPT_SQL, [
        (o.claim.id, o.claim.attempt, o.claim.started_at, now,
         o.status if o.status in ("done", "dead") else "retry", o.error, o.output)
        for o in outcomes])


def release_running(conn: sqlite3.Connection, ids: Sequence[int] | None = None) -> int:
    """Put interrupted deliveries back to pending (all of them at start-up, after a crash)."""
    if ids is None:
        cursor = conn.execute("UPDATE deliveries SET status = 'pending' WHERE status = 'running'")
    else:
        cursor = conn.executemany(
            "UPDATE deliveries SET status = 'pending' WHERE id = ? AND status = 'running'",
            [(i,) for i in ids],
        )
    return int(cursor.rowcount)


def next_delivery_due(conn: sqlite3.Connection, handler: str) -> float | None:
    """Epoch seconds of the handler's earliest pending delivery."""
    row = conn.execute(
        "SELECT min(next_attempt_at) FROM deliveries WHERE handler = ? AND status = 'pending'",
        (handler,),
    ).fetchone()
    return None if row[0] is None else float(row[0])


def replay_event(
    conn: sqlite3.Connection, event_id: str, handlers: Sequence[str] | None
) -> int:
    """New deliveries of a stored event, even if it was delivered before."""
    row = conn.execute(
        "SELECT seq, entity_id, envelope IS NULL FROM events WHERE id = ?", (event_id,)
    ).fetchone()
    if row is None:
        raise UnknownName(f"no event with id {event_id!r}")
    if row[2]:  # a delivery without its payload could only go dead
        raise StoreError(f"event {event_id!r} cannot be replayed: its payload was purged by"
                         " retention ([store] retention_days); only its dedup key is kept")
    if handlers is None:
        handlers = [h for (h,) in conn.execute(
            "SELECT DISTINCT handler FROM deliveries WHERE event_seq = ? ORDER BY handler",
            (row[0],))]
    return insert_deliveries(conn, row[0], event_id, row[1], handlers, utc_now_iso(),
                             replay=True)


def requeue_dead(conn: sqlite3.Connection, handler: str | None) -> int:
    """Dead deliveries become pending again with a fresh budget of attempts."""
    cursor = conn.execute(
        "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?,"
        " finished_at = NULL, replay = 1 WHERE status = 'dead' AND (? IS NULL OR handler = ?)",
        (time.time(), handler, handler),
    )
    return int(cursor.rowcount)


def select_deliveries(
    conn: sqlite3.Connection, status: str | None, handler: str | None, limit: int
) -> list[dict[str, Any]]:
    """Deliveries, newest first, filtered by status and handler."""
    rows = conn.execute(
        "SELECT d.id, d.event_id, d.handler, e.kind, d.entity_id, e.event_name, d.status,"
        " d.attempts, d.next_attempt_at, d.last_error, d.created_at, d.finished_at, d.replay"
        " FROM deliveries d JOIN events e ON e.seq = d.event_seq"
        " WHERE (?1 IS NULL OR d.status = ?1) AND (?2 IS NULL OR d.handler = ?2)"
        " ORDER BY d.id DESC LIMIT ?3",
        (status, handler, limit),
    ).fetchall()
    names = ("id", "eventId", "handler", "kind", "entityId", "eventName", "status", "attempts",
             "nextAttemptAt", "lastError", "createdAt", "finishedAt", "replay")
    return [dict(zip(names, row, strict=True)) for row in rows]


def delivery_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """handler -> status -> count, done included (a scan: for tools and tests)."""
    rows = conn.execute("SELECT handler, status, count(*) FROM deliveries GROUP BY 1, 2")
    return _by_handler(rows)


def _by_handler(rows: Iterable[tuple[str, str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for handler, status, count in rows:
        out.setdefault(handler, {})[status] = int(count)
    return out


# -- poll state, status, retention -----------------------------------------------------


def record_poll(
    conn: sqlite3.Connection, kind: str, now: str, error: str | None,
    items: int | None, stored: int | None,
) -> None:
    """Upsert the last poll outcome of a kind."""
    if error is None:
        conn.execute(
            "INSERT INTO poll_state (kind, last_attempt_at, last_success_at, last_error,"
            " last_items, last_stored) VALUES (?,?,?,NULL,?,?) ON CONFLICT (kind) DO UPDATE SET"
            " last_attempt_at = excluded.last_attempt_at,"
            " last_success_at = excluded.last_success_at, last_error = NULL,"
            " last_items = excluded.last_items, last_stored = excluded.last_stored",
            (kind, now, now, items, stored),
        )
    else:
        conn.execute(
            "INSERT INTO poll_state (kind, last_attempt_at, last_error) VALUES (?,?,?)"
            " ON CONFLICT (kind) DO UPDATE SET last_attempt_at = excluded.last_attempt_at,"
            " last_error = excluded.last_error",
            (kind, now, error[:500]),
        )


def backlog_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """handler -> status -> count for deliveries that are not done (uses an index)."""
    return _by_handler(conn.execute(
        "SELECT handler, status, count(*) FROM deliveries"
        " WHERE status IN ('pending', 'running', 'dead') GROUP BY handler, status"))


def read_status(conn: sqlite3.Connection) -> dict[str, Any]:
    """Counts, cursors, poll state and backlog for ``tcbridge status``."""
    counts = count_rows(conn)
    sources = dict(conn.execute(
        "SELECT source, count(*) FROM sightings WHERE reason = 'duplicate' GROUP BY source"
    ).fetchall())
    polls = {
        row[0]: {"lastAttemptAt": row[1], "lastSuccessAt": row[2], "lastError": row[3],
                 "lastItems": row[4], "lastStored": row[5]}
        for row in conn.execute("SELECT kind, last_attempt_at, last_success_at, last_error,"
                                " last_items, last_stored FROM poll_state")
    }
    return {
        "counts": {
            "events": counts["events"],
            "duplicates": {str(k): int(v) for k, v in sources.items()},
            "stale": counts["stale"],
            "rejected": counts["rejected"],
            "recovered": int(conn.execute(
                "SELECT count(*) FROM events WHERE recovered = 1").fetchone()[0]),
            "fetchPending": counts["fetch_pending"],
            "fetchFailed": int(conn.execute(
                "SELECT count(*) FROM fetch_requests WHERE status = 'failed'").fetchone()[0]),
        },
        "cursors": {kind: {"value": value, "updatedAt": updated} for kind, value, updated
                    in conn.execute("SELECT kind, value, updated_at FROM cursors")},
        "polls": polls,
        "backlog": backlog_counts(conn),
    }


_PURGE_PAYLOADS_SQL = (
    "UPDATE events SET envelope = NULL WHERE seq IN (SELECT seq FROM events"
    # events_payload_seq: only the payloads still held, so purged rows are never walked
    " WHERE envelope IS NOT NULL AND seq <= ?"
    # payloads stay while a delivery is pending, running or dead (it may be replayed)
    " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = events.seq"
    "   AND d.status != 'done')"
    " ORDER BY seq LIMIT ?)"
)


def _last_seq_before(conn: sqlite3.Connection, cutoff: str) -> int:
    """The last event seq received before ``cutoff``: a binary search over the primary key
    (seq grows with received_at), so retention needs no index on received_at."""
    lo, hi = conn.execute("SELECT coalesce(min(seq), 1), coalesce(max(seq), 0) FROM events")\
        .fetchone()
    answer = lo - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        row = conn.execute(
            "SELECT seq, received_at FROM events WHERE seq >= ? ORDER BY seq LIMIT 1", (mid,)
        ).fetchone()
        if row is None or row[1] >= cutoff:
            hi = mid - 1
        else:
            answer, lo = row[0], row[0] + 1
    return int(answer)


def purge_batch(conn: sqlite3.Connection, policy: Retention, now: float) -> dict[str, int]:
    """One small batch: drop payloads of old, fully delivered events (keeping their dedup
    keys), then whole rows past the dedup retention, old sightings and rejections."""
    payload_cutoff = rules.cutoff_iso(now, policy.payload_days)
    dedup_cutoff = rules.cutoff_iso(now, max(policy.dedup_days, policy.payload_days))
    payloads = conn.execute(
        _PURGE_PAYLOADS_SQL, (_last_seq_before(conn, payload_cutoff), policy.batch)).rowcount
    old = [row[0] for row in conn.execute(
        "SELECT seq FROM events WHERE seq <= ? AND envelope IS NULL"
        # a delivery still open or dead (of a replay queued before its payload went) keeps
        # its row: deleting it would hide that it never got through
        " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = events.seq"
        "   AND d.status != 'done')"
        " ORDER BY seq LIMIT ?",
        (_last_seq_before(conn, dedup_cutoff), policy.batch))]
    conn.executemany(
        "DELETE FROM delivery_attempts WHERE delivery_id IN"
        " (SELECT id FROM deliveries WHERE event_seq = ?)", [(seq,) for seq in old])
    conn.executemany("DELETE FROM deliveries WHERE event_seq = ?", [(seq,) for seq in old])
    conn.executemany(
        "DELETE FROM sightings WHERE event_id = (SELECT id FROM events WHERE seq = ?)",
        [(seq,) for seq in old])
    conn.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq in old])
    sightings = conn.execute(
        "DELETE FROM sightings WHERE id IN (SELECT id FROM sightings WHERE received_at < ?"
        " ORDER BY received_at LIMIT ?)", (dedup_cutoff, policy.batch)).rowcount
    rejected = conn.execute(
        "DELETE FROM rejected WHERE id IN (SELECT id FROM rejected WHERE received_at < ?"
        " ORDER BY id LIMIT ?)", (payload_cutoff, policy.batch)).rowcount
    fetches = conn.execute(
        "DELETE FROM fetch_requests WHERE id IN (SELECT id FROM fetch_requests"
        " WHERE status != 'pending' AND finished_at < ? ORDER BY id LIMIT ?)",
        (payload_cutoff, policy.batch)).rowcount
    return {"payloads": payloads, "events": len(old), "sightings": sightings,
            "rejected": rejected, "fetches": fetches}
