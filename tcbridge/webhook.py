"""The webhook listener Tradecloud calls: authenticate, validate, store durably, wake, answer.

Status codes matter here because of how Tradecloud retries: it never retries a 4xx or a
500, but retries 502/503/504 forever. So anything that is not the caller's fault and
might pass later (the store is busy, a bug) is a 503 with ``Retry-After``, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
import structlog
from aiohttp import web

from tcbridge import auth
from tcbridge.config import WebhookSettings
from tcbridge.envelope import parse_order_webhook, parse_shipment_webhook, plain_text
from tcbridge.errors import InvalidEvent, StoreUnavailable
from tcbridge.metrics import Metrics
from tcbridge.store import Rejected, Store

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InFlight:
    """Counts requests inside their handler, so shutdown can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        """A request entered its handler."""
        self.count += 1
        self.idle.clear()

    def leave(self) -> None:
        """A request left its handler."""
        self.count -= 1
        if self.count == 0:
            self.idle.set()

STORE_KEY = web.AppKey("store", Store)
WAKE_KEY = web.AppKey("wake", asyncio.Event)
FETCH_WAKE_KEY = web.AppKey("fetch_wake", asyncio.Event)
SETTINGS_KEY = web.AppKey("settings", WebhookSettings)
RETRY_AFTER_KEY = web.AppKey("retry_after_s", int)
METRICS_KEY = web.AppKey("metrics", Metrics)
DRAINING_KEY = web.AppKey("draining", asyncio.Event)
IN_FLIGHT_KEY = web.AppKey("in_flight", InFlight)
PARSERS = {"order": parse_order_webhook, "shipment": parse_shipment_webhook}
ID_PARAMS = {"order": "orderId", "shipment": "shipmentId"}
KEPT_HEADERS = ("content-type", "content-length", "user-agent", "x-forwarded-for", "authorization")


def build_app(
    settings: WebhookSettings,
    store: Store,
    wake: asyncio.Event,
    fetch_wake: asyncio.Event,
    *,
    retry_after_s: int = 5,
    metrics: Metrics | None = None,
    draining: asyncio.Event | None = None,
) -> web.Application:
    """The aiohttp application; ``wake`` tells the dispatcher of new events, ``fetch_wake``
    the fetch worker of new legacy GET requests."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[_guard, _admit(settings)],
    )
    app[STORE_KEY] = store
    app[WAKE_KEY] = wake
    app[FETCH_WAKE_KEY] = fetch_wake
    app[SETTINGS_KEY] = settings
    app[RETRY_AFTER_KEY] = retry_after_s
    app[METRICS_KEY] = metrics or Metrics()
    app[DRAINING_KEY] = draining or asyncio.Event()
    app[IN_FLIGHT_KEY] = InFlight()
    for kind in ("order", "shipment"):
        app.router.add_post(f"/webhook/{kind}", _post_handler(kind))
        app.router.add_get(f"/webhook/{kind}", _get_handler(kind), allow_head=False)
        app.router.add_get(
            f"/webhook/{kind}/{{entity_id}}", _get_handler(kind), allow_head=False
        )
    return app


def _json(status: int, body: dict[str, Any], **headers: str) -> web.Response:
    return web.json_response(body, status=status, headers=headers or None, dumps=_dumps)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def unavailable(request: web.Request, message: str) -> web.Response:
    """A 503 that makes Tradecloud retry later."""
    retry_after = str(request.app[RETRY_AFTER_KEY])
    return _json(503, {"error": "unavailable", "message": message}, **{"Retry-After": retry_after})


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every unforeseen fault into a 503: a 500 would make Tradecloud drop the event."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except StoreUnavailable as e:
        log.warning("webhook.store_unavailable", path=request.path, error=str(e))
        return unavailable(request, "the store cannot commit right now")
    except Exception:
        log.exception("webhook.internal_error", path=request.path)
        return unavailable(request, "internal error; please retry")


async def drain(runner: web.AppRunner, app: web.Application, timeout_s: float) -> int:
    """Stop listening, let requests in flight finish (their bodies may still be arriving),
    then close everything; returns how many requests were still running at the timeout.

    aiohttp's own shutdown stops reading from connections at once, which would cut off a
    request whose body is still on its way; so the sockets close first and the
    connections only after the handlers are done."""
    app[DRAINING_KEY].set()
    for site in list(runner.sites):
        await site.stop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(app[IN_FLIGHT_KEY].idle.wait(), timeout=timeout_s)
    left = app[IN_FLIGHT_KEY].count
    await runner.cleanup()
    return left


def _admit(settings: WebhookSettings) -> Callable[..., Awaitable[web.StreamResponse]]:
    """One middleware for what every request must pass (one layer is cheaper than three):
    not draining, an allowed source address, valid credentials. Admitted requests are
    counted in flight, so shutdown can wait for them."""
    allowed = auth.parse_networks(settings.allowed_ips)
    proxies = auth.parse_networks(settings.trusted_proxies)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        app = request.app
        if app[DRAINING_KEY].is_set():
            # Requests already in a handler finish and get their answer; new ones retry.
            return unavailable(request, "shutting down; please retry")
        if allowed:
            ip = auth.client_ip(
                request.remote, request.headers.getall("X-Forwarded-For", []), proxies
            )
            if not auth.ip_allowed(ip, allowed):
                log.warning("webhook.ip_refused", remote=ip, path=request.path)
                return _json(403, {"error": "forbidden", "message": "source address not allowed"})
        if not auth.check_credentials(settings, request.headers.get("Authorization")):
            log.warning("webhook.auth_failed", remote=request.remote, path=request.path)
            app[METRICS_KEY].auth_failures.inc()
            return _json(
                401, {"error": "unauthorized", "message": "missing or wrong credentials"},
                **{"WWW-Authenticate": auth.challenge(settings)},
            )
        in_flight = app[IN_FLIGHT_KEY]
        in_flight.enter()
        try:
            return await handler(request)
        finally:
            in_flight.leave()

    return middleware


def _post_handler(kind: Literal["order", "shipment"]) -> Handler:
    parse = PARSERS[kind]

    async def handle(request: web.Request) -> web.StreamResponse:
        store = request.app[STORE_KEY]
        body = await _read_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            candidate = parse(decode_body(body))
        except InvalidEvent as e:
            return await _reject(request, body, str(e))
        result = await store.ingest(candidate)
        request.app[METRICS_KEY].count_ingest(result.status, candidate.source, candidate.kind)
        log.info(f"webhook.{result.status}", event_id=result.event_id,
                 entity_id=candidate.entity_id, kind=candidate.kind, source=candidate.source,
                 event_name=candidate.event_name, late=result.late)
        if result.status == "stored":
            request.app[WAKE_KEY].set()
        return _json(200, {"status": result.status, "eventId": result.event_id})

    return handle


def _get_handler(kind: Literal["order", "shipment"]) -> Handler:
    param = ID_PARAMS[kind]

    async def handle(request: web.Request) -> web.StreamResponse:
        entity_id = request.match_info.get("entity_id") or request.query.get(param, "")
        if not plain_text(entity_id):  # the same rule as ids in event bodies
            return await _reject(request, b"", f"missing or invalid {param}")
        fetch_id = await request.app[STORE_KEY].request_fetch(kind, entity_id)
        log.info("webhook.fetch_queued", kind=kind, entity_id=entity_id, fetch_id=fetch_id)
        request.app[FETCH_WAKE_KEY].set()
        return _json(202, {"status": "queued", "fetchId": fetch_id})

    return handle


async def _read_body(request: web.Request) -> bytes | web.Response:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS_KEY].max_body_bytes
        await _keep(request, b"", f"body larger than max_body_bytes ({limit})")
        request.app[METRICS_KEY].rejected.labels("webhook").inc()
        return _json(413, {"error": "too_large", "message": f"body exceeds {limit} bytes"})


def decode_body(body: bytes) -> object:
    """Parse a webhook body: UTF-8 JSON (orjson: strict, and three times faster here)."""
    if not body:
        raise InvalidEvent("empty body; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidEvent(f"malformed JSON: {str(e)[:200]}") from e


async def _reject(request: web.Request, body: bytes, reason: str) -> web.Response:
    rejected_id = await _keep(request, body, reason)
    request.app[METRICS_KEY].rejected.labels("webhook").inc()
    log.warning("webhook.rejected", path=request.path, reason=reason, rejected_id=rejected_id)
    return _json(400, {"error": "invalid_event", "message": reason, "rejectedId": rejected_id})


async def _keep(request: web.Request, body: bytes, reason: str) -> int:
    """Keep the raw request; if even that cannot be stored, the 503 asks for a retry."""
    headers = {k: v for k, v in request.headers.items() if k.lower() in KEPT_HEADERS}
    rejected = Rejected(
        source="webhook", reason=reason, method=request.method, path=request.path,
        query=request.query_string, remote=request.remote, headers=headers, body=body,
    )
    return await request.app[STORE_KEY].reject(rejected)
