"""The webhook sender: Tradecloud's delivery semantics, one message at a time, with faults."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass
from random import Random
from typing import Any, Literal

import aiohttp
import structlog

from tcbridge.simulator.faults import Faults
from tcbridge.simulator.oauth import TokenClient, TokenError
from tcbridge.simulator.world import Change

log = structlog.get_logger(__name__)

WebhookMode = Literal["post", "get"]
RETRYABLE = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class SenderConfig:
    """Where and how to deliver, and the retry timing."""

    url: str
    auth: tuple[str, str] | None = None
    mode: WebhookMode = "post"
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    timeout_s: float = 5.0


def auth_header(auth: tuple[str, str] | None) -> dict[str, str]:
    """The Authorization header for ("bearer", token) or ("basic", "user:pass"); for
    ("oauth2", ...) the sender's TokenClient adds one per request."""
    if auth is None or auth[0].lower() == "oauth2":
        return {}
    scheme, secret = auth
    if scheme.lower() == "bearer":
        return {"Authorization": f"Bearer {secret}"}
    if scheme.lower() == "basic":
        return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode("ascii")}
    raise ValueError(f"unknown webhook auth scheme {scheme!r}")


def is_retryable(status: int | None) -> bool:
    """Tradecloud retries 502/503/504, timeouts and connection errors; not 4xx or 500."""
    return status is None or status in RETRYABLE


class WebhookSender:
    """Delivers changes to the receiver in order, retrying forever until stopped."""

    def __init__(self, config: SenderConfig, faults: Faults, rng: Random) -> None:
        self._config = config
        self._headers = auth_header(config.auth)
        self._faults = faults
        self._rng = rng
        # One record per attempt: kind, entityId, eventName, seq (the change's ground-truth
        # seq), status (None: unreachable or timed out), attempt, dropped, duplicate.
        self.results: list[dict[str, Any]] = []
        self._pending: list[Change] = []
        self._unfinished = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.token_client: TokenClient | None = None  # set for auth ("oauth2", ...)

    def enqueue(self, change: Change) -> None:
        """Queue one change for delivery (works before start())."""
        self._pending.append(change)
        self._unfinished += 1
        self._idle.clear()
        self._wake.set()

    async def start(self) -> None:
        """Start the background sender task."""
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._task = asyncio.create_task(self._run(), name="simulator-webhook-sender")

    async def stop(self) -> None:
        """Stop sending; undelivered changes stay queued."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def flush(self, timeout_s: float) -> None:
        """Wait until every queued change is delivered, given up or dropped; TimeoutError if not."""
        await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def _run(self) -> None:
        while True:
            change = await self._take()
            try:
                await self._handle(change)
            except asyncio.CancelledError:
                self._pending.insert(0, change)
                raise
            except Exception:
                log.exception("simulator.webhook_failed", entity_id=change.entity_id)
            self._finish_one()

    async def _take(self) -> Change:
        while not self._pending:
            self._wake.clear()
            await self._wake.wait()
        reorder = self._faults.webhook_reorder and len(self._pending) > 1
        return self._pending.pop(self._rng.randrange(len(self._pending)) if reorder else 0)

    def _finish_one(self) -> None:
        self._unfinished -= 1
        if self._unfinished == 0:
            self._idle.set()

    async def _handle(self, change: Change) -> None:
        if self._rng.random() < self._faults.webhook_drop_rate:
            self._record(change, None, 0, dropped=True, duplicate=False)
            log.debug("simulator.webhook_dropped", entity_id=change.entity_id)
            return
        if self._faults.webhook_delay_s > 0:
            await asyncio.sleep(self._faults.webhook_delay_s)
        await self._deliver(change, duplicate=False)
        if self._rng.random() < self._faults.webhook_duplicate_rate:
            await self._deliver(change, duplicate=True)

    async def _deliver(self, change: Change, *, duplicate: bool) -> None:
        delay_s = self._config.backoff_initial_s
        attempt = 0
        while True:
            attempt += 1
            status = await self._send_once(change)
            self._record(change, status, attempt, dropped=False, duplicate=duplicate)
            if not is_retryable(status):
                return
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, self._config.backoff_max_s)

    async def _send_once(self, change: Change) -> int | None:
        assert self._session is not None
        post = self._config.mode == "post"
        path = f"/{change.kind}" if post else f"/{change.kind}/{change.entity_id}"
        headers = await self._auth_headers()
        if headers is None:
            return None  # no token from the identity provider: retried like a network error
        try:
            async with self._session.request(
                "POST" if post else "GET", self._config.url.rstrip("/") + path,
                json=change.webhook_body if post else None, headers=headers,
                allow_redirects=False,
            ) as response:
                await response.read()
                return response.status
        except (aiohttp.ClientError, TimeoutError) as e:
            log.debug("simulator.webhook_unreachable", error=repr(e))
            return None

    async def _auth_headers(self) -> dict[str, str] | None:
        if self.token_client is None:
            return self._headers
        assert self._session is not None
        try:
            return {"Authorization": f"Bearer {await self.token_client.bearer(self._session)}"}
        except TokenError as e:
            log.debug("simulator.webhook_no_token", error=str(e))
            return None

    def _record(
        self, change: Change, status: int | None, attempt: int, *, dropped: bool, duplicate: bool
    ) -> None:
        self.results.append({
            "kind": change.kind, "entityId": change.entity_id, "eventName": change.event_name,
            "seq": change.seq, "status": status, "attempt": attempt, "dropped": dropped,
            "duplicate": duplicate,
        })
