"""The fetch worker: answers legacy GET webhooks by fetching the whole object.

A GET webhook carries only an id. The webhook stores a durable fetch request and answers
202; this worker fetches the object (``GET /v2/order/{id}``, ``GET /v2/shipment/{id}``),
ingests it as a snapshot and closes the request in the same transaction. Failed attempts
are rescheduled in the store, so a restart resumes them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal, Protocol

import structlog

from tcbridge.aio import wait_any
from tcbridge.backoff import backoff_s
from tcbridge.config import FetchSettings
from tcbridge.envelope import parse_snapshot
from tcbridge.errors import (
    ApiError,
    ApiPermanentError,
    InvalidEvent,
    StoreError,
)
from tcbridge.metrics import Metrics
from tcbridge.store import FetchRequest, Rejected, StoreBackend

log = structlog.get_logger(__name__)


class FetchClient(Protocol):
    """The part of the Tradecloud client the fetch worker needs."""

    async def get_object(
        self, kind: Literal["order", "shipment"], entity_id: str
    ) -> dict[str, Any]: ...


def retry_delay_s(settings: FetchSettings, attempts: int, retry_after_s: float | None) -> float:
    """Exponential backoff with jitter; a server's Retry-After is a floor, honoured in full
    (asking again sooner only earns another 429)."""
    return backoff_s(settings.retry_initial_s, settings.retry_max_s, attempts, retry_after_s,
                     cap_retry_after=False)


class Fetcher:
    """Works through due fetch requests; woken by new GET webhooks."""

    def __init__(
        self,
        settings: FetchSettings,
        client: FetchClient,
        store: StoreBackend,
        wake: asyncio.Event,
        dispatch_wake: asyncio.Event,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._client = client
        self._store = store
        self._wake = wake
        self._dispatch_wake = dispatch_wake

    async def run_once(self) -> int:
        """Attempt every due request once; returns how many were attempted."""
        attempted = 0
        while batch := await self._store.due_fetches():
            for request in batch:
                await self._attempt(request)
            attempted += len(batch)
        return attempted

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch until ``stop`` is set, sleeping until the next due request or a wake-up."""
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.run_once()
                due = await self._store.next_fetch_due_at()
            except StoreError as e:
                log.warning("fetch.store_failed", error=str(e))
                due = time.time() + 5
            timeout = None if due is None else max(0.0, due - time.time())
            await wait_any(stop, self._wake, timeout)

    async def _attempt(self, request: FetchRequest) -> None:
        with structlog.contextvars.bound_contextvars(
            kind=request.kind, entity_id=request.entity_id, fetch_id=request.id
        ):
            try:
                obj = await self._client.get_object(request.kind, request.entity_id)
                candidate = parse_snapshot(request.kind, obj, "webhook_get")
            except InvalidEvent as e:
                await self._give_up(request, f"fetched object is not usable: {e}", obj)
                return
            except ApiError as e:
                await self._failed(request, e)
                return
            except Exception as e:  # a bug of ours (or a parser's) must not stop the worker
                log.exception("fetch.attempt_raised")
                await self._failed(request, ApiError(f"{type(e).__name__}: {e}"))
                return
            result = await self._store.complete_fetch(request, candidate)
            self._metrics.count_ingest(result.status, candidate.source, candidate.kind)
            log.info(f"fetch.{result.status}", event_id=result.event_id,
                     source=candidate.source)
            if result.status == "stored":
                self._dispatch_wake.set()

    async def _failed(self, request: FetchRequest, error: ApiError) -> None:
        attempts = request.attempts + 1
        if self._gives_up(error, attempts):
            await self._give_up(request, str(error), None)
            return
        retry_after = getattr(error, "retry_after_s", None)
        delay = retry_delay_s(self._settings, attempts, retry_after)
        log.warning("fetch.retry", error=str(error), attempts=attempts, delay_s=round(delay, 2))
        await self._store.fail_fetch(request, str(error), retry_at=time.time() + delay)

    def _gives_up(self, error: ApiError, attempts: int) -> bool:
        """Whether this failed attempt is the last: a client error other than 404 at once;
        a 404 (maybe not visible yet) after ``not_found_max_attempts``; anything after
        ``max_attempts``. A 2xx we could not read (a truncated or proxied answer) is retried
        like a 5xx: the object itself was never seen."""
        limit = self._settings.max_attempts
        if limit and attempts >= limit:
            return True
        if not isinstance(error, ApiPermanentError) or _unreadable_answer(error):
            return False
        if error.status == 404:
            not_found_limit = self._settings.not_found_max_attempts
            return bool(not_found_limit) and attempts >= not_found_limit
        return True

    async def _give_up(self, request: FetchRequest, reason: str, obj: object) -> None:
        log.error("fetch.failed", reason=reason)
        self._metrics.fetch_failures.labels(request.kind).inc()
        if obj is not None:
            self._metrics.rejected.labels("webhook_get").inc()
            await self._store.reject(Rejected(
                source="webhook_get", reason=reason, path=f"{request.kind}/{request.entity_id}",
                body=repr(obj).encode()[:1_000_000],
            ))
        await self._store.fail_fetch(request, reason, retry_at=None)



def _unreadable_answer(error: ApiError) -> bool:
    """A success status whose body was not a JSON object (the client says so with the 2xx)."""
    return error.status is not None and 200 <= error.status < 300
