"""The durable store: the interface the peers import, whatever the backend.

The interface is ``base.StoreBackend`` (a Protocol both backends satisfy), the value types
live in ``types``, the deduplication rules in ``rules`` (pure functions every backend
calls), and each backend's SQL, schema and commit mechanics in its own module (``sqlite``,
``postgres``). ``make_store`` builds the one ``[store] backend`` names."""

from __future__ import annotations

from tcbridge.config import StoreSettings
from tcbridge.store import postgres
from tcbridge.store.base import Route, StoreBackend
from tcbridge.store.rules import envelope_json
from tcbridge.store.sqlite import (
    MIGRATIONS,
    REDACTED_HEADERS,
    Store,
    ingest_one,
    migrate,
    read_cursor,
    run_batch,
)
from tcbridge.store.types import (
    Claim,
    DeliveryStatus,
    Fence,
    FetchRequest,
    Finished,
    IngestResult,
    IngestStatus,
    Rejected,
    Retention,
    WriterHealth,
)

SqliteStore = Store
PostgresStore = postgres.Store


def _no_routes(envelope: object) -> list[str]:
    return []


def make_store(settings: StoreSettings, *, route: Route = _no_routes,
               replica_id: str | None = None, lease_s: float | None = None) -> StoreBackend:
    """The (unopened) store ``settings.backend`` names. On PostgreSQL, claims are leased to
    ``replica_id`` (``[node] id``) for ``lease_s`` (``[delivery] lease_s``) at a time;
    the same id after a restart releases the claims a crash cut off at once on start-up
    rather than when their lease ends."""
    if settings.backend == "postgresql":
        assert settings.dsn is not None  # the settings' validator made sure
        return postgres.Store(settings.dsn.get_secret_value(), settings, route=route,
                              replica_id=replica_id, lease_s=lease_s)
    return Store(settings.path, settings, route=route)


__all__ = [
    "MIGRATIONS",
    "REDACTED_HEADERS",
    "Claim",
    "DeliveryStatus",
    "Fence",
    "FetchRequest",
    "Finished",
    "IngestResult",
    "IngestStatus",
    "PostgresStore",
    "Rejected",
    "Retention",
    "Route",
    "SqliteStore",
    "Store",
    "StoreBackend",
    "WriterHealth",
    "envelope_json",
    "ingest_one",
    "make_store",
    "migrate",
    "read_cursor",
    "run_batch",
]
