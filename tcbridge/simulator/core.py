"""The Simulator: a faithful local stand-in for the Tradecloud API, over real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from random import Random
from typing import Any

import structlog
from aiohttp import web

from tcbridge.simulator.api import Api, api_middleware
from tcbridge.simulator.changes import random_change
from tcbridge.simulator.control import Control
from tcbridge.simulator.documents import DocumentRoutes, DocumentStore, document_entry
from tcbridge.simulator.faults import Faults, RateLimiter
from tcbridge.simulator.model import JsonObj
from tcbridge.simulator.oauth import OAuthProvider, TokenClient
from tcbridge.simulator.tokens import TokenStore
from tcbridge.simulator.webhooks import SenderConfig, WebhookMode, WebhookSender
from tcbridge.simulator.world import Change, World

log = structlog.get_logger(__name__)


def _generated(filename: str, size: int) -> bytes:
    """``size`` bytes of reproducible content for a document."""
    seed = hashlib.sha256(filename.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def seeded(seed: int, purpose: str) -> Random:
    """A reproducible generator per purpose, so one stream's use never shifts another's."""
    return Random(f"tcbridge-simulator:{seed}:{purpose}")  # noqa: S311  (test data, not secrets)


class Simulator:
    """Tradecloud's API, data, clock and webhook sender in one object, with fault injection."""

    def __init__(
        self, *, username: str = "integration@example.com", password: str = "secret",  # noqa: S107
        access_token_ttl_s: float = 3600, refresh_token_ttl_s: float = 86400,
        rate_limit_per_s: float | None = 10.0, seed: int = 0,
        webhook_url: str | None = None, webhook_auth: tuple[str, str] | None = None,
        webhook_mode: WebhookMode = "post", webhook_backoff_initial_s: float = 0.05,
        webhook_backoff_max_s: float = 2.0, webhook_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        single_delivery: bool = False, search_cursor_filter: str = "lastUpdatedAfter",
        oauth_token_ttl_s: float = 3600.0, index_delay_s: float = 0.0,
    ) -> None:
        self.username = username
        self.password = password
        # The search API's cursor filter: lastUpdatedAfter since January 2024; set
        # "lastUpdatedSince" to play an old server. Other names are ignored, as by Tradecloud.
        self.search_cursor_filter = search_cursor_filter
        self.faults = Faults()
        self.requests: list[dict[str, Any]] = []
        self.fault_rng = seeded(seed, "faults")
        self.world = World(seeded(seed, "data"), clock, single_delivery=single_delivery)
        self.world.index_delay_s = index_delay_s
        self.documents = DocumentStore(clock)
        # Tests: called with (path, body) before a poll/search query is answered, to change
        # the data between two pages.
        self.before_query: Callable[[str, Any], None] | None = None
        self.tokens = TokenStore(clock=clock, access_ttl_s=access_token_ttl_s,
                                 refresh_ttl_s=refresh_token_ttl_s, faults=self.faults)
        self.rate_limiter = RateLimiter(rate_limit_per_s, clock) if rate_limit_per_s else None
        self._changes_rng = seeded(seed, "changes")
        self._sender: WebhookSender | None = None
        self.oauth = OAuthProvider(clock=clock, token_ttl_s=oauth_token_ttl_s)
        self.webhook_results: list[dict[str, Any]] = []
        if webhook_url:
            config = SenderConfig(webhook_url, webhook_auth, webhook_mode,
                                  webhook_backoff_initial_s, webhook_backoff_max_s,
                                  webhook_timeout_s)
            self._sender = WebhookSender(config, self.faults, seeded(seed, "webhooks"))
            self.webhook_results = self._sender.results
            self.world.listeners.append(self._sender.enqueue)
            if webhook_auth is not None and webhook_auth[0].lower() == "oauth2":
                self._sender.token_client = self._oauth_client(webhook_auth[1], clock)
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[api_middleware(self)])
        app.add_routes(Api(self).routes() + Control(self).routes() + self.oauth.routes()
                       + DocumentRoutes(self).routes())
        return app

    def _oauth_client(self, credentials: str, clock: Callable[[], float]) -> TokenClient:
        """The sender's client of this simulator's own token endpoint, registered there."""
        client = TokenClient.parse(credentials, lambda: self.oauth.token_url, clock)
        self.oauth.clients[client.client_id] = client.client_secret
        return client

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve the API and start the webhook sender; return the base URL."""
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        url = f"http://{host}:{bound_port}"
        self.oauth.base_url = url
        if self._sender is not None:
            await self._sender.start()
        log.debug("simulator.listening", url=url)
        return url

    async def stop(self) -> None:
        """Stop the webhook sender and the HTTP server."""
        if self._sender is not None:
            await self._sender.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def add_orders(self, count: int, *, same_timestamp: bool = False,
                   lines: int = 3, po_numbers: list[str] | None = None) -> list[JsonObj]:
        """Issue ``count`` new orders (OrderIssuedByBuyer); copies of the stored objects."""
        return self.world.add_orders(count, same_timestamp=same_timestamp, lines=lines,
                                     po_numbers=po_numbers)

    def attach_order_documents(
        self, order_id: str, *, event_name: str = "OrderDocumentsAttachedBySupplier"
    ) -> JsonObj:
        """Send an order documents event (no lastUpdatedAt); the webhook body."""
        return self.world.attach_order_documents(order_id, event_name=event_name)

    def update_order(self, order_id: str, *, event_name: str = "OrderLinesConfirmedBySupplier",
                     line_count: int = 1, line_ids: list[str] | None = None,
                     same_timestamp: bool = False) -> JsonObj:
        """Apply an order event to ``line_count`` random lines, or to ``line_ids``;
        ``same_timestamp``: in the millisecond of the previous change."""
        return self.world.update_order(order_id, event_name, line_count, line_ids,
                                       same_timestamp=same_timestamp)

    def add_shipments(self, count: int, *, order_ids: list[str] | None = None) -> list[JsonObj]:
        """Issue ``count`` shipments (ShipmentIssuedBySupplier) for the given or random orders."""
        return self.world.add_shipments(count, order_ids)

    def update_shipment(self, shipment_id: str, *,
                        event_name: str = "ShipmentApprovedByBuyer") -> JsonObj:
        """Apply a shipment event; KeyError for an unknown shipment."""
        return self.world.update_shipment(shipment_id, event_name)

    def attach_documents(
        self, kind: str, entity_id: str, specs: list[dict[str, Any]], *,
        line_id: str | None = None, base_url: str = "",
    ) -> list[JsonObj]:
        """Attach documents to an order (or one of its lines) or a shipment and announce it.

        Each spec: ``filename``, optional ``size`` (generated content) or ``content``,
        ``url`` (true: on the supplier's content server at ``base_url``; a string: that url),
        ``missing`` (listed but not stored: a 404), ``chunked`` (no Content-Length).
        Returns the ``documents[]`` entries added.
        """
        entries = [self._document(spec, base_url) for spec in specs]
        if kind == "shipment":
            self.world.attach_shipment_documents(entity_id, entries)
        else:
            self.world.attach_order_documents(entity_id, entries, line_id)
        return entries

    def _document(self, spec: dict[str, Any], base_url: str) -> JsonObj:
        filename = str(spec.get("filename", "document.pdf"))
        content = spec.get("content")
        data = (content.encode() if isinstance(content, str)
                else _generated(filename, int(spec.get("size", 1024))))
        object_id = self.world.factory.new_id()
        chunked = bool(spec.get("chunked", False))
        url = spec.get("url")
        name = str(spec.get("name", filename.rsplit(".", 1)[0]))
        if url:
            if not isinstance(url, str):
                url = f"{base_url}/_sim/content/{filename}"
            if not spec.get("missing"):
                self.documents.add(object_id, filename, data, chunked=chunked, on_server=True)
            return document_entry(None, url=url, name=name, stamp=None)
        if not spec.get("missing"):
            self.documents.add(object_id, filename, data, chunked=chunked,
                               content_type=str(spec.get("contentType", "application/pdf")))
        return document_entry(None, object_id=object_id, name=name, stamp=None)

    def truth(self) -> list[dict[str, Any]]:
        """The ground truth: one record per change, in order."""
        return [change.truth_entry() for change in self.world.changes]

    def changes(self) -> list[Change]:
        """The changes with their webhook bodies (for tests that compare payloads)."""
        return list(self.world.changes)

    async def flush_webhooks(self, timeout_s: float = 10) -> None:
        """Wait until no webhook is queued or in flight; TimeoutError after ``timeout_s``."""
        if self._sender is not None:
            await self._sender.flush(timeout_s)

    def random_change(self) -> None:
        """Make one change of the demo mix (see run_changes)."""
        random_change(self.world, self._changes_rng)

    async def run_changes(self, rate_per_s: float, duration_s: float | None = None) -> None:
        """Make random changes at ``rate_per_s`` for ``duration_s`` (None: until cancelled)."""
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        loop = asyncio.get_running_loop()
        deadline = None if duration_s is None else loop.time() + duration_s
        while deadline is None or loop.time() < deadline:
            self.random_change()
            await asyncio.sleep(1 / rate_per_s)
