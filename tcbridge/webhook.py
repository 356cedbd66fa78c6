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
from tcbridge.envelope import (
    Candidate,
    parse_order_webhook,
    parse_shipment_webhook,
    plain_text,
)
from tcbridge.errors import InvalidEvent, KeySetUnavailable, StoreUnavailable, TokenRejected
from tcbridge.metrics import Metrics
from tcbridge.oauth2 import TokenVerifier
from tcbridge.store import Rejected, StoreBackend

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


class ParseBudget:
    """Bytes of request bodies being read and parsed at once: parsing a body of tiny JSON
    objects costs about 27 times its size, so eight 10 MiB bodies at once took 2.2 GB."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (nothing reserved) when that would pass the limit."""
        if self.used_bytes + size > self.limit_bytes:
            return False
        self.used_bytes += size
        return True

    def give(self, size: int) -> None:
        """Return bytes reserved by :meth:`take`."""
        self.used_bytes -= size


STORE_KEY = web.AppKey("store", StoreBackend)
WAKE_KEY = web.AppKey("wake", asyncio.Event)
FETCH_WAKE_KEY = web.AppKey("fetch_wake", asyncio.Event)
SETTINGS_KEY = web.AppKey("settings", WebhookSettings)
RETRY_AFTER_KEY = web.AppKey("retry_after_s", int)
METRICS_KEY = web.AppKey("metrics", Metrics)
DRAINING_KEY = web.AppKey("draining", asyncio.Event)
IN_FLIGHT_KEY = web.AppKey("in_flight", InFlight)
VERIFIER_KEY = web.AppKey("oauth2_verifier", TokenVerifier)
BUDGET_KEY = web.AppKey("parse_budget", ParseBudget)
BUSY_KEY: web.AppKey[set[object]] = web.AppKey("busy_connections")
# Bodies larger than this are parsed in a worker thread, so the loop keeps answering.
PARSE_INLINE_BYTES = 256 * 1024
# At a stop, requests still running after the drain time get this long to unwind.
CUT_OFF_S = 1.0
PARSERS = {"order": parse_order_webhook, "shipment": parse_shipment_webhook}
ID_PARAMS = {"order": "orderId", "shipment": "shipmentId"}
KEPT_HEADERS = ("content-type", "content-length", "user-agent", "x-forwarded-for", "authorization")


def build_app(
    settings: WebhookSettings,
    store: StoreBackend,
    wake: asyncio.Event,
    fetch_wake: asyncio.Event,
    *,
    retry_after_s: int = 5,
    metrics: Metrics | None = None,
    draining: asyncio.Event | None = None,
    verifier: TokenVerifier | None = None,
) -> web.Application:
    """The aiohttp application; ``wake`` tells the dispatcher of new events, ``fetch_wake``
    the fetch worker of new legacy GET requests; ``verifier`` checks tokens (auth = oauth2)."""
    if settings.auth == "oauth2" and verifier is None:
        raise ValueError("auth = 'oauth2' needs a TokenVerifier")
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
    if verifier is not None:
        app[VERIFIER_KEY] = verifier
        app.on_cleanup.append(lambda _: verifier.close())
    app[BUDGET_KEY] = ParseBudget(settings.max_parse_bytes)
    app[BUSY_KEY] = set()
    for kind in ("order", "shipment"):
        app.router.add_post(f"/webhook/{kind}", _post_handler(kind))
        app.router.add_get(f"/webhook/{kind}", _get_handler(kind), allow_head=False)
        # ``.+``: an order id is <buyerCompanyId>-<purchaseOrderNumber>, and a purchase
        # order number may hold "/": the path form takes it raw or as %2F (braces stay out,
        # as in the default pattern).
        app.router.add_get(
            f"/webhook/{kind}/{{entity_id:[^{{}}]+}}", _get_handler(kind), allow_head=False
        )
    return app


def _json(status: int, body: dict[str, Any], **headers: str) -> web.Response:
    # web.json_response's answer (same headers) without its str round trip.
    return web.Response(body=orjson.dumps(body), status=status, headers=headers or None,
                        content_type="application/json", charset="utf-8")


def unavailable(request: web.Request, message: str) -> web.Response:
    """A 503 that makes Tradecloud retry later."""
    retry_after = str(request.app[RETRY_AFTER_KEY])
    return _json(503, {"error": "unavailable", "message": message}, **{"Retry-After": retry_after})


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every unforeseen fault into a 503 (a 500 would make Tradecloud drop the event)
    and count every answer by status."""
    metrics = request.app[METRICS_KEY]
    try:
        response = await _answer(request, handler)
    except web.HTTPException as e:
        metrics.count_response(e.status)
        raise
    metrics.count_response(response.status)
    return response


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """While a request is inside, its connection counts as busy (see limit_connections)."""
    busy = request.app[BUSY_KEY]
    busy.add(request.protocol)
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
    finally:
        busy.discard(request.protocol)


def limit_connections(server: web.Server, app: web.Application, max_connections: int) -> None:
    """Keep at most ``max_connections`` connections open (each costs a file descriptor; at
    the process limit accept() fails and every real webhook waits). Past the limit, the
    oldest connection with no request in a handler (idle keep-alive, or still sending its
    head) is closed to make room, as nginx reuses idle connections; if every one is busy,
    the new one gets a 503 and is closed. Both are counted in tcbridge_webhook_shed_total.

    A connection whose handler has just returned may lose its answer this way; the event
    is committed already, and the sender's retry is answered "duplicate"."""
    made = server.connection_made
    busy = app[BUSY_KEY]
    shed = app[METRICS_KEY].shed
    refusal = _refusal(app[RETRY_AFTER_KEY])

    def connection_made(handler: Any, transport: Any) -> None:
        made(handler, transport)
        live = [h for h in server.connections if h.transport is not None]
        if len(live) <= max_connections:
            return
        victim = next((h for h in live if h is not handler and h not in busy), None)
        if victim is not None:
            victim.force_close()
            shed.labels("idle_evicted").inc()
            return
        transport.write(refusal)
        handler.force_close()
        shed.labels("connection_limit").inc()

    server.connection_made = connection_made  # type: ignore[method-assign]


def _refusal(retry_after_s: int) -> bytes:
    body = b'{"error":"unavailable","message":"too many connections; please retry"}'
    head = (f"HTTP/1.1 503 Service Unavailable\r\nRetry-After: {retry_after_s}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


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
    server = runner.server
    if server is not None:
        # What still runs has had its time: cut it off now. runner.cleanup() alone would
        # give each request the runner's shutdown_timeout again, twice over.
        server.pre_shutdown()
        await server.shutdown(CUT_OFF_S)
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
        if settings.auth == "oauth2":
            refused = await _check_token(request)
            if refused is not None:
                return refused
        elif not auth.check_credentials(settings, request.headers.get("Authorization")):
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


async def _check_token(request: web.Request) -> web.Response | None:
    """None when the OAuth 2.0 access token is good; else the 401, or the 503 that makes
    Tradecloud retry when the provider's keys cannot be had. The token is never logged."""
    app = request.app
    try:
        await app[VERIFIER_KEY].verify(request.headers.get("Authorization"))
    except TokenRejected as e:
        log.warning("webhook.auth_failed", remote=request.remote, path=request.path,
                    auth="oauth2", reason=e.reason, error=str(e))
        app[METRICS_KEY].auth_failures.inc()
        app[METRICS_KEY].oauth2_rejections.labels(e.reason).inc()
        challenge = auth.challenge(app[SETTINGS_KEY])
        if e.reason != "missing":  # RFC 6750, 3.1
            challenge += ', error="invalid_token"'
        return _json(401, {"error": "unauthorized", "message": str(e)},
                     **{"WWW-Authenticate": challenge})
    except KeySetUnavailable as e:
        log.warning("webhook.oauth2_unavailable", path=request.path, error=str(e))
        app[METRICS_KEY].oauth2_unavailable.inc()
        # The details (the provider's URLs) go to the log only: anyone can make a token
        # that gets this far.
        message = "cannot check the token now: the identity provider's keys are unavailable"
        return _json(503, {"error": "unavailable", "message": message + "; please retry"},
                     **{"Retry-After": str(e.retry_after_s)})
    return None


def _post_handler(kind: Literal["order", "shipment"]) -> Handler:
    parse = PARSERS[kind]

    async def handle(request: web.Request) -> web.StreamResponse:
        # Reserved before the body is read (by its announced size), so bodies still arriving
        # count too; no more than max_body_bytes, so that a too large one still gets its 413.
        limit = request.app[SETTINGS_KEY].max_body_bytes
        size = limit if request.content_length is None else min(request.content_length, limit)
        budget = request.app[BUDGET_KEY]
        if not budget.take(size):
            request.app[METRICS_KEY].shed.labels("parse_budget").inc()
            return unavailable(request, "too many large bodies at once; please retry")
        try:
            return await _ingest(request, parse)
        finally:
            budget.give(size)

    return handle


async def _parse(body: bytes, parse: Callable[[object], Candidate]) -> Candidate:
    if len(body) <= PARSE_INLINE_BYTES:
        return parse(decode_body(body))
    # orjson holds the GIL while it parses, but the rest (normalising, the storability
    # probe) lets the loop run between; and the parse budget bounds how many run at once.
    return await asyncio.to_thread(lambda: parse(decode_body(body)))


async def _ingest(request: web.Request, parse: Callable[[object], Candidate]) -> web.Response:
    store = request.app[STORE_KEY]
    body = await _read_body(request)
    if isinstance(body, web.Response):
        return body
    if is_xml(body, request.headers.get("Content-Type", "")):
        return await _reject(request, body, XML_MESSAGE, status=415,
                             error="unsupported_media_type")
    try:
        candidate = await _parse(body, parse)
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
    timeout_s = request.app[SETTINGS_KEY].body_timeout_s
    try:
        if request.content.is_eof():
            # The whole body came with the head (a webhook's few KB nearly always do), so
            # reading cannot wait: no timer (asyncio.timeout cost about 11 us a request
            # here, bench/README.md, round 7). The limit below still applies.
            return await request.read()
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        # Slow, not wrong: a 503 makes a real sender retry; the connection is closed.
        request.app[METRICS_KEY].shed.labels("body_timeout").inc()
        log.warning("webhook.body_timeout", remote=request.remote, path=request.path,
                    timeout_s=timeout_s)
        response = unavailable(request, f"body not received within {timeout_s:g} s")
        response.force_close()
        return response
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS_KEY].max_body_bytes
        await _keep(request, b"", f"body larger than max_body_bytes ({limit})")
        request.app[METRICS_KEY].rejected.labels("webhook").inc()
        return _json(413, {"error": "too_large", "message": f"body exceeds {limit} bytes"})


XML_MESSAGE = ("tcbridge takes JSON webhooks, this body is XML (tXML): choose JSON as the "
               "webhook format in the Tradecloud portal")


def is_xml(body: bytes, content_type: str) -> bool:
    """A tXML body (Tradecloud can be set to send XML): by its media type or its first byte."""
    start = body[:64].lstrip(b"\xef\xbb\xbf \t\r\n")[:1]  # the head only: no copy of a body
    if start in (b"{", b"["):  # JSON under a wrong media type is still JSON: never a 415
        return False
    media = content_type.partition(";")[0].strip().lower()
    if media.endswith(("/xml", "+xml")):
        return True
    return start == b"<"


def decode_body(body: bytes) -> object:
    """Parse a webhook body: UTF-8 JSON (orjson: strict, and three times faster here)."""
    if not body:
        raise InvalidEvent("empty body; expected a JSON object")
    try:
        # A UTF-8 byte order mark is allowed before JSON (RFC 8259, 8.1); orjson refuses it.
        return orjson.loads(body.removeprefix(b"\xef\xbb\xbf"))
    except orjson.JSONDecodeError as e:
        raise InvalidEvent(f"malformed JSON: {str(e)[:200]}") from e


async def _reject(
    request: web.Request, body: bytes, reason: str, *, status: int = 400,
    error: str = "invalid_event",
) -> web.Response:
    rejected_id = await _keep(request, body, reason)
    request.app[METRICS_KEY].rejected.labels("webhook").inc()
    log.warning("webhook.rejected", path=request.path, reason=reason, rejected_id=rejected_id)
    return _json(status, {"error": error, "message": reason, "rejectedId": rejected_id})


async def _keep(request: web.Request, body: bytes, reason: str) -> int:
    """Keep the raw request; if even that cannot be stored, the 503 asks for a retry."""
    headers = {k: v for k, v in request.headers.items() if k.lower() in KEPT_HEADERS}
    rejected = Rejected(
        source="webhook", reason=reason, method=request.method, path=request.path,
        query=request.query_string, remote=request.remote, headers=headers, body=body,
    )
    return await request.app[STORE_KEY].reject(rejected)
