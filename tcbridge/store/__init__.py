"""The durable store: the interface the peers import, whatever the backend.

The value types live in ``types``, the deduplication rules in ``rules`` (pure functions
every backend calls), and each backend's SQL, schema and commit mechanics in its own
module (``sqlite``)."""

from __future__ import annotations

from tcbridge.store.sqlite import (
    MIGRATIONS,
    REDACTED_HEADERS,
    Store,
    envelope_json,
    ingest_one,
    migrate,
    read_cursor,
    run_batch,
)
from tcbridge.store.types import (
    Claim,
    DeliveryStatus,
    FetchRequest,
    Finished,
    IngestResult,
    IngestStatus,
    Rejected,
    Retention,
    WriterHealth,
)

__all__ = [
    "MIGRATIONS",
    "REDACTED_HEADERS",
    "Claim",
    "DeliveryStatus",
    "FetchRequest",
    "Finished",
    "IngestResult",
    "IngestStatus",
    "Rejected",
    "Retention",
    "Store",
    "WriterHealth",
    "envelope_json",
    "ingest_one",
    "migrate",
    "read_cursor",
    "run_batch",
]
