"""The Tradecloud API client: a thin class over one injected ``aiohttp.ClientSession``.

Tradecloud asks integrations to send requests one at a time, at most 10 per second, and
to back off on 429, 5xx and timeouts; every HTTP exchange here goes through one lock and
one pacer so that holds for the whole process. Poll calls use Basic auth; search calls and
single objects need the token flow (login -> Bearer, refresh before expiry, log in again
on 401).

Nothing that is logged or raised here contains the password, a token or an auth header.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import structlog

from tcbridge.config import PollKind, TradecloudSettings
from tcbridge.envelope import Layout
from tcbridge.errors import ApiAuthError, ApiPermanentError, ApiTransientError
from tcbridge.timefmt import retry_after_s

log = structlog.get_logger(__name__)

LOGIN_PATH = "/v2/authentication/login"
REFRESH_PATH = "/v2/authentication/refresh"
LOGOUT_PATH = "/v2/authentication/logout"
POLL_PATHS: dict[str, dict[str, str]] = {
    "poll": {"order": "/v2/order-search/poll", "shipment": "/v2/shipment/poll"},
    "search": {"order": "/v2/order-search/search", "shipment": "/v2/shipment/search"},
}
# Companies whose order webhook sends singleDeliveryOrderEvent (docs api/delivery-schedule.md:
# pollOrdersSingleDeliveryRoute), so that polled orders have the same line layout.
SINGLE_DELIVERY_POLL_PATH = "/v2/order-search/poll/single-delivery"
OBJECT_PATHS = {"order": "/v2/order/", "shipment": "/v2/shipment/"}
DOCUMENT_METADATA_PATH = "/v2/object-storage/document/{object_id}/metadata"
DEFAULT_TOKEN_LIFETIME_S = 600.0  # the older docs' access-token lifetime: the safe guess
REFRESH_MARGIN_S = 30.0
_TRANSIENT_ERRORS = (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


@dataclass(frozen=True, slots=True)
class PollPage:
    """One page of a poll/search answer."""

    items: list[Any]  # objects, and any non-object entry (the poller rejects those)
    total: int | None
    last_updated_at: str | None
    layout: Layout | None = None  # of orders: which line layout the endpoint gives


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class _Failure:
    """A transient failure of one attempt."""

    reason: str
    status: int | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class _Tokens:
    access: str = field(repr=False)
    refresh: str | None = field(repr=False)
    renew_at: float  # on the monotonic clock


class TradecloudClient:
    """Poll/search and fetch single objects, paced, retried and authenticated."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: TradecloudSettings,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._settings = settings
        self._sleep = sleep
        self._clock = clock
        self._wall_clock = wall_clock  # JWT exp and Retry-After dates are wall-clock times
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter only
        self._timeout = aiohttp.ClientTimeout(
            total=settings.timeout_s, connect=settings.connect_timeout_s
        )
        self._spacing_s = 1.0 / settings.max_requests_per_s
        self._last_start = -math.inf
        self._http_lock = asyncio.Lock()
        self._auth_lock = asyncio.Lock()
        self._tokens: _Tokens | None = None

    async def poll(
        self,
        kind: PollKind,
        cursor: str,
        *,
        offset: int,
        limit: int,
        filters: Mapping[str, Any] | None = None,
    ) -> PollPage:
        """Fetch one page of objects updated after ``cursor`` (oldest first).

        The poll endpoints take Basic auth on every request; the search endpoints only
        a login token (docs security/authentication.md)."""
        settings = self._settings
        path = POLL_PATHS[settings.api][kind]
        layout: Layout | None = None
        if kind == "order":
            layout = "single-delivery" if settings.single_delivery else "delivery-schedule"
            if settings.single_delivery:
                path = SINGLE_DELIVERY_POLL_PATH
        body = {
            "filters": {**(filters or {}), settings.cursor_filter: cursor},
            "offset": offset,
            "limit": limit,
        }
        if settings.api == "search":
            response = await self._bearer_call("POST", path, body)
        else:
            response = await self._call("POST", path, {"Authorization": self._basic()}, body)
        _check(response, path)
        return replace(_parse_page(_json_object(response, path), path), layout=layout)

    async def get_object(self, kind: PollKind, entity_id: str) -> dict[str, Any]:
        """Fetch one whole order or shipment."""
        path = object_path(kind, entity_id)
        response = await self._bearer_call("GET", path)
        _check(response, path)
        return _json_object(response, path)

    async def _bearer_call(self, method: str, path: str, body: Any = None) -> _Response:
        """A call with the login token; on 401 one fresh login and one more try."""
        token = await self._bearer()
        response = await self._call(method, path, {"Authorization": f"Bearer {token}"}, body)
        if response.status == 401:
            # The token may have been revoked or the server restarted: one fresh login.
            log.info("tradecloud.token_refused", path=path)
            token = await self._bearer(rejected=token)
            response = await self._call(method, path, {"Authorization": f"Bearer {token}"}, body)
        return response

    async def document_metadata(self, object_id: str) -> dict[str, Any]:
        """``{id, filename, contentType, downloadUrl}`` of a document in Tradecloud's object
        storage; ``downloadUrl`` is presigned and expires within a minute (docs
        ``order/buyer/receive/download-document.md``). Bearer token flow, like single objects.
        """
        path = DOCUMENT_METADATA_PATH.format(object_id=quote(object_id, safe=""))
        token = await self._bearer()
        response = await self._call("GET", path, {"Authorization": f"Bearer {token}"})
        if response.status == 401:
            token = await self._bearer(rejected=token)
            response = await self._call("GET", path, {"Authorization": f"Bearer {token}"})
        _check(response, path)
        metadata = _json_object(response, path)
        url = metadata.get("downloadUrl")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise ApiPermanentError(f"tradecloud {path}: answer has no usable downloadUrl",
                                    status=response.status)
        return metadata

    async def close(self) -> None:
        """Log out if we hold a refresh token; never raises. The session stays the caller's."""
        async with self._auth_lock:
            tokens, self._tokens = self._tokens, None
        if tokens is None or tokens.refresh is None:
            return
        try:
            # One attempt only: shutting down must not wait for backoff.
            response = await self._send("POST", LOGOUT_PATH, {"Refresh-Token": tokens.refresh})
        except Exception as e:
            log.warning("tradecloud.logout_failed", error=type(e).__name__)
            return
        if 200 <= response.status < 300:
            log.info("tradecloud.logged_out")
        else:
            log.warning("tradecloud.logout_failed", status=response.status)

    # -- authentication -------------------------------------------------------------

    def _basic(self) -> str:
        password = self._settings.password
        secret = password.get_secret_value() if password is not None else ""
        # Built by hand: aiohttp.BasicAuth is deprecated and encodes latin-1, not UTF-8.
        raw = f"{self._settings.username}:{secret}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    async def _bearer(self, rejected: str | None = None) -> str:
        """A usable access token; ``rejected`` is one the server just refused."""
        async with self._auth_lock:
            tokens = self._tokens
            if tokens is None or tokens.access == rejected:
                tokens = await self._login()
            elif self._clock() >= tokens.renew_at:
                tokens = await self._renew(tokens)
            self._tokens = tokens
            return tokens.access

    async def _login(self) -> _Tokens:
        response = await self._call("GET", LOGIN_PATH, {"Authorization": self._basic()})
        _check(response, LOGIN_PATH)
        tokens = self._read_tokens(response, LOGIN_PATH)
        log.info("tradecloud.logged_in", renew_in_s=round(tokens.renew_at - self._clock()))
        return tokens

    async def _renew(self, tokens: _Tokens) -> _Tokens:
        if tokens.refresh is None:
            return await self._login()
        # A refresh token is single-use: forget it before sending, send it once (no retry),
        # and fall back to a fresh login (which is retried) if that one try fails.
        self._tokens = replace(tokens, refresh=None)
        outcome = await self._attempt("GET", REFRESH_PATH, {"Refresh-Token": tokens.refresh}, None)
        if isinstance(outcome, _Failure):
            log.info("tradecloud.refresh_failed", error=outcome.reason)
            return await self._login()
        if outcome.status in (401, 403):
            log.info("tradecloud.refresh_refused", status=outcome.status)
            return await self._login()
        _check(outcome, REFRESH_PATH)
        renewed = self._read_tokens(outcome, REFRESH_PATH)
        log.info("tradecloud.token_refreshed", renew_in_s=round(renewed.renew_at - self._clock()))
        return renewed

    def _read_tokens(self, response: _Response, path: str) -> _Tokens:
        access = response.headers.get("Set-Authorization", "").strip()
        access = access.removeprefix("Bearer ").strip()
        if not access:
            raise ApiPermanentError(
                f"tradecloud {path}: answer has no Set-Authorization header",
                status=response.status,
            )
        refresh = response.headers.get("Set-Refresh-Token", "").strip() or None
        lifetime_s = _token_lifetime_s(access, self._wall_clock())
        return _Tokens(access, refresh, self._clock() + lifetime_s - REFRESH_MARGIN_S)

    # -- transport --------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, headers: Mapping[str, str], body: Any = None
    ) -> _Response:
        """Send with retries on transient failures; return the first other response."""
        retries = 0
        while True:
            outcome = await self._attempt(method, path, headers, body)
            if isinstance(outcome, _Response):
                return outcome
            if retries >= self._settings.max_retries:
                raise ApiTransientError(
                    f"tradecloud {method} {self._settings.base_url}{path}: {outcome.reason}"
                    f" after {retries + 1} attempts",
                    status=outcome.status,
                    retry_after_s=outcome.retry_after_s,
                )
            retries += 1
            delay_s = outcome.retry_after_s
            if delay_s is None:
                delay_s = self._backoff_s(retries)
            log.warning(
                "tradecloud.retry",
                url=self._settings.base_url + path,
                status=outcome.status,
                error=outcome.reason,
                attempt=retries,
                delay_s=round(delay_s, 3),
            )
            await self._sleep(delay_s)

    async def _attempt(
        self, method: str, path: str, headers: Mapping[str, str], body: Any
    ) -> _Response | _Failure:
        try:
            response = await self._send(method, path, headers, body)
        except _TRANSIENT_ERRORS as e:
            return _Failure(_reason(e))
        except aiohttp.ClientError as e:
            raise ApiPermanentError(
                f"tradecloud {method} {self._settings.base_url}{path}: {_reason(e)}") from e
        if response.status == 429 or response.status >= 500:
            retry_after_s = _retry_after_s(
                response.headers.get("Retry-After"), self._wall_clock(), self._settings.retry_max_s
            )
            return _Failure(f"HTTP {response.status}", response.status, retry_after_s)
        return response

    async def _send(
        self, method: str, path: str, headers: Mapping[str, str], body: Any = None
    ) -> _Response:
        """One HTTP exchange, alone on the wire and paced."""
        async with self._http_lock:
            await self._pace()
            async with self._session.request(
                method,
                self._settings.base_url + path,
                headers={"Accept": "application/json", **headers},
                json=body,
                timeout=self._timeout,
                # Never follow a redirect: it would carry our credentials elsewhere.
                allow_redirects=False,
            ) as response:
                return _Response(response.status, response.headers, await response.read())

    async def _pace(self) -> None:
        wait_s = self._last_start + self._spacing_s - self._clock()
        if wait_s > 0:
            await self._sleep(wait_s)
        self._last_start = self._clock()

    def _backoff_s(self, retry: int) -> float:
        """Full jitter: uniform between 0 and an exponentially growing, capped ceiling."""
        settings = self._settings
        ceiling_s = min(settings.retry_max_s, settings.retry_initial_s * 2.0 ** min(retry - 1, 64))
        return self._rng.uniform(0.0, ceiling_s)


def _reason(error: BaseException) -> str:
    """An exception as the operator needs it: its type and what it says (aiohttp's
    connection errors name host and port; a timeout says nothing, so say so)."""
    text = str(error).strip()
    if isinstance(error, TimeoutError) and not text:
        text = "no answer in time"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def object_path(kind: PollKind, entity_id: str) -> str:
    """``/v2/<kind>/<id>`` with the id as one path segment: every reserved character
    percent-encoded ("/" too). "." and ".." cannot be one: URL normalisation (yarl, and any
    proxy) resolves them, so GET /v2/order/.. would be GET /v2/ with our token."""
    if entity_id in (".", ".."):
        raise ApiPermanentError(f"tradecloud: {entity_id!r} cannot be sent as an id in a path")
    return OBJECT_PATHS[kind] + quote(entity_id, safe="")


def _check(response: _Response, path: str) -> None:
    status = response.status
    if 200 <= status < 300:
        return
    if status in (401, 403):
        raise ApiAuthError(f"tradecloud {path}: credentials refused (HTTP {status})", status=status)
    raise ApiPermanentError(f"tradecloud {path}: HTTP {status}", status=status)


class _Unencodable:
    """A NaN or Infinity in an answer: Python's parser accepts it, orjson (the store's and
    the dispatcher's parser) cannot write it, so the item holding it is rejected at ingest."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _json_object(response: _Response, path: str) -> dict[str, Any]:
    value = _loads(response.body, path, response.status)
    if not isinstance(value, dict):
        raise ApiPermanentError(
            f"tradecloud {path}: answer is not a JSON object", status=response.status
        )
    return value


def _loads(body: bytes, path: str, status: int) -> Any:
    """orjson first, the parser of the store and the dispatcher; an answer it refuses is
    read again by Python's parser, which keeps the rest of a page when one item holds a
    lone surrogate or a NaN (that item is then rejected at ingest, see envelope.py)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body, parse_constant=_Unencodable)
    except ValueError as e:  # includes UnicodeDecodeError
        raise ApiPermanentError(f"tradecloud {path}: answer is not JSON", status=status) from e
    except RecursionError as e:
        # A crash here would restart the daemon onto the same page for ever.
        raise ApiPermanentError(
            f"tradecloud {path}: answer is nested too deeply", status=status
        ) from e


def _parse_page(value: dict[str, Any], path: str) -> PollPage:
    data = value.get("data")
    if not isinstance(data, list):
        raise ApiPermanentError(f"tradecloud {path}: answer has no 'data' list")
    # Entries that are not objects stay in the page: they count towards a full page (or the
    # rest of a same-timestamp run is skipped) and the poller keeps them in ``rejected``.
    odd = sum(1 for item in data if not isinstance(item, dict))
    if odd:
        log.warning("tradecloud.non_object_items", path=path, count=odd)
    total = value.get("total")
    last = value.get("lastUpdatedAt")
    return PollPage(
        items=data,
        total=total if isinstance(total, int) and not isinstance(total, bool) else None,
        last_updated_at=last if isinstance(last, str) else None,
    )


def _token_lifetime_s(token: str, now_s: float) -> float:
    """Seconds until the JWT's ``exp``; unsigned read, the server checks the signature."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims["exp"]
    except (IndexError, ValueError, KeyError, TypeError):
        return DEFAULT_TOKEN_LIFETIME_S
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return DEFAULT_TOKEN_LIFETIME_S
    return float(exp) - now_s


def _retry_after_s(value: str | None, now_s: float, cap_s: float) -> float | None:
    """``Retry-After`` as seconds from now (delta or HTTP date), within [0, cap_s]."""
    seconds = retry_after_s(value, now_s)
    return None if seconds is None else min(seconds, cap_s)
