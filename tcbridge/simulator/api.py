"""The simulated Tradecloud REST API under /v2: authentication, poll, search, get by id."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from tcbridge.simulator.model import single_delivery_order
from tcbridge.simulator.query import (
    ORDER_FILTERS,
    POLL_CURSOR,
    SHIPMENT_FILTERS,
    QueryError,
    run_query,
)
from tcbridge.simulator.world import Kind

if TYPE_CHECKING:
    from tcbridge.simulator.core import Simulator


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """An error answer with a small JSON body."""
    return web.json_response({"status": status, "message": message}, status=status,
                             headers=headers)


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body (none: empty); 400 otherwise."""
    try:
        body = json.loads(await request.text() or "{}")
    except ValueError as e:
        raise http_error(web.HTTPBadRequest, f"invalid JSON: {e}") from e
    if not isinstance(body, dict):
        raise http_error(web.HTTPBadRequest, "body must be a JSON object")
    return body


def http_error(cls: type[web.HTTPException], message: str) -> web.HTTPException:
    """An aiohttp HTTP exception with a JSON body, to raise from a handler."""
    return cls(text=json.dumps({"status": cls.status_code, "message": message}),
               content_type="application/json")


def basic_credentials(request: web.Request) -> tuple[str, str] | None:
    """(user, password) from a Basic Authorization header, or None."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def bearer_token(request: web.Request) -> str | None:
    """The token of a Bearer Authorization header, or None."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


def api_middleware(sim: Simulator) -> Middleware:
    """Log every /v2 request and apply latency, the rate limit and injected errors."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v2/"):
            return await handler(request)
        entry = await _request_entry(request)
        sim.requests.append(entry)
        try:
            response = await _answer(sim, request, handler)
        except web.HTTPException as e:
            entry["status"] = e.status
            raise
        entry["status"] = response.status
        return response

    return middleware


async def _request_entry(request: web.Request) -> dict[str, Any]:
    text = await request.text() if request.can_read_body else ""
    body: Any = None
    if text:
        try:
            body = json.loads(text)
        except ValueError:
            body = text
    scheme = request.headers.get("Authorization", "").partition(" ")[0].lower() or None
    return {"method": request.method, "path": request.path, "query": dict(request.query),
            "body": body, "auth": scheme, "status": None}


async def _answer(sim: Simulator, request: web.Request, handler: Handler) -> web.StreamResponse:
    if sim.faults.api_latency_s > 0:
        await asyncio.sleep(sim.faults.api_latency_s)
    if sim.rate_limiter is not None and not sim.rate_limiter.admit():
        return json_error(429, "too many requests", {"Retry-After": "1"})
    status = sim.faults.take_api_error(sim.fault_rng)
    if status is not None:
        retry = {"Retry-After": "1"} if status in (429, 503) else None
        return json_error(status, "injected fault", retry)
    return await handler(request)


class Api:
    """Handlers of the /v2 routes."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim

    def routes(self) -> list[web.RouteDef]:
        """The /v2 route table."""
        return [
            web.get("/v2/authentication/login", self.login),
            web.get("/v2/authentication/refresh", self.refresh),
            web.post("/v2/authentication/logout", self.logout),
            web.post("/v2/order-search/poll", self._search("order", search=False)),
            web.post("/v2/order-search/poll/single-delivery",
                     self._search("order", search=False, single_delivery=True)),
            web.post("/v2/order-search/search", self._search("order", search=True)),
            web.post("/v2/shipment/poll", self._search("shipment", search=False)),
            web.post("/v2/shipment/search", self._search("shipment", search=True)),
            web.get("/v2/order/{id}", self.get_order),
            web.get("/v2/shipment/{id}", self.get_shipment),
        ]

    async def login(self, request: web.Request) -> web.Response:
        """GET /v2/authentication/login with Basic auth: tokens in response headers."""
        if not self._basic_ok(request):
            return json_error(401, "invalid credentials")
        return self._token_pair(self._sim.tokens.issue(self._sim.username))

    async def refresh(self, request: web.Request) -> web.Response:
        """GET /v2/authentication/refresh: spend a refresh token for a new pair."""
        token = request.headers.get("Refresh-Token", "")
        pair = self._sim.tokens.refresh(token, self._sim.username) if token else None
        if pair is None:
            return json_error(401, "invalid refresh token")
        return self._token_pair(pair)

    async def logout(self, request: web.Request) -> web.Response:
        """POST /v2/authentication/logout: revoke the refresh token's session."""
        if not self._sim.tokens.logout(request.headers.get("Refresh-Token", "")):
            return json_error(401, "invalid refresh token")
        return web.json_response({"status": "ok"})

    async def get_order(self, request: web.Request) -> web.Response:
        """GET /v2/order/{id}: the whole order (Bearer only)."""
        return self._get_one(request, self._sim.world.order(request.match_info["id"]))

    async def get_shipment(self, request: web.Request) -> web.Response:
        """GET /v2/shipment/{id}: the whole shipment (Bearer only)."""
        return self._get_one(request, self._sim.world.shipment(request.match_info["id"]))

    def _get_one(self, request: web.Request, obj: dict[str, Any] | None) -> web.Response:
        if not self._bearer_ok(request):
            return json_error(401, "a valid Bearer token is required")
        if obj is None:
            return json_error(404, "not found")
        return web.json_response(obj)

    def _search(self, kind: Kind, *, search: bool, single_delivery: bool = False) -> Handler:
        """A poll route (Basic or Bearer, lastUpdatedAfter, a top-level lastUpdatedAt) or a
        search route (Bearer only: docs security/authentication.md; the simulator's
        ``search_cursor_filter``, lastUpdatedAfter since January 2024)."""
        paths = ORDER_FILTERS if kind == "order" else SHIPMENT_FILTERS
        cursor_key = self._sim.search_cursor_filter if search else POLL_CURSOR

        async def handler(request: web.Request) -> web.StreamResponse:
            basic_ok = not search and self._basic_ok(request)
            if not (basic_ok or self._bearer_ok(request)):
                if search and basic_credentials(request) is not None:
                    return json_error(401, "the search API takes a login token (Bearer), "
                                           "not Basic auth")
                return json_error(401, "invalid credentials")
            try:
                body = json.loads(await request.text() or "{}")
                if self._sim.before_query is not None:
                    self._sim.before_query(request.path, body)
                page = run_query(self._sim.world.indexed(kind), body,
                                 inclusive=cursor_key != POLL_CURSOR, filter_paths=paths,
                                 cursor_key=cursor_key)
            except (ValueError, QueryError) as e:
                return json_error(400, str(e))
            data = [single_delivery_order(o) for o in page.data] if single_delivery else page.data
            answer: dict[str, Any] = {"data": data, "total": page.total}
            if not search and page.last_updated_at is not None:
                answer["lastUpdatedAt"] = page.last_updated_at
            return web.json_response(answer)

        return handler

    def _token_pair(self, pair: tuple[str, str]) -> web.Response:
        headers = {"Set-Authorization": pair[0], "Set-Refresh-Token": pair[1]}
        return web.json_response({"status": "ok"}, headers=headers)

    def _basic_ok(self, request: web.Request) -> bool:
        return basic_credentials(request) == (self._sim.username, self._sim.password)

    def _bearer_ok(self, request: web.Request) -> bool:
        token = bearer_token(request)
        return token is not None and self._sim.tokens.access_valid(token)
