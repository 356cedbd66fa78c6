"""The store's value types: what every backend takes and gives back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

IngestStatus = Literal["stored", "duplicate", "stale"]
DeliveryStatus = Literal["pending", "running", "done", "dead"]


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What became of one candidate."""

    status: IngestStatus
    event_id: str
    late: bool = False
    deliveries: int = 0
    recovered: bool = False


@dataclass(frozen=True, slots=True)
class WriterHealth:
    """What the writer thread says about itself (for readiness, the watchdog and metrics)."""

    alive: bool  # the thread runs; False once it stopped (closed, or died)
    connected: bool  # it holds an open connection (False while the file cannot be opened)
    last_error: str | None  # why the last batch failed; None once a batch committed
    errors: int  # store operations answered StoreUnavailable since open


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request or item we could not accept, kept for inspection."""

    source: str
    reason: str
    method: str = ""
    path: str = ""
    query: str = ""
    remote: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """A durable request to fetch a whole object (from a legacy GET webhook)."""

    id: int
    kind: Literal["order", "shipment"]
    entity_id: str
    attempts: int
    requested_at: str
    generation: int = 0  # bumped by every GET for the object: which request a fetch answers


@dataclass(frozen=True, slots=True)
class Claim:
    """A delivery claimed for one attempt, with the envelope it carries."""

    id: int
    event_id: str
    entity_id: str
    handler: str
    attempt: int
    body: str
    started_at: str


@dataclass(frozen=True, slots=True)
class Finished:
    """One attempt's outcome to record: done, dead, or pending again at ``next_attempt_at``."""

    claim: Claim
    status: DeliveryStatus
    error: str | None = None
    output: str | None = None
    next_attempt_at: float | None = None


@dataclass(frozen=True, slots=True)
class Retention:
    """How long what is kept (see ``[store]`` retention settings)."""

    payload_days: float
    dedup_days: float
    batch: int = 500


@dataclass(frozen=True, slots=True)
class Fence:
    """The right to commit poller pages for one kind: the epoch this replica got when it
    took the kind's poller lock. A backend with several replicas checks it in the page's
    transaction; a later takeover bumps the epoch, so a stale holder's page is refused."""

    kind: str
    epoch: int
