"""OAuth 2.0 access tokens on the webhook: check a JWT against the identity provider's keys.

With client credentials, Tradecloud gets an access token from the customer's identity
provider (Entra ID, Keycloak, ...) and sends it as ``Authorization: Bearer <JWT>``. The JOSE
work (signatures, ``exp``/``nbf``/``aud``/``iss``) is PyJWT's, with ``cryptography``; this module
chooses the key and the rules, caches the key set (:class:`KeySet`) and fetches it with
aiohttp on the event loop (PyJWT's ``PyJWKClient`` would block the loop with urllib).

Two outcomes matter to Tradecloud, which never retries a 4xx: a token that is bad, expired or
not for us raises :class:`TokenRejected` (a 401); a key set that cannot be had raises
:class:`KeySetUnavailable` (a 503 with ``Retry-After``, retried), never a 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import orjson
import structlog

from tcbridge.config import WebhookSettings
from tcbridge.errors import KeySetUnavailable, TokenRejected
from tcbridge.metrics import Metrics

log = structlog.get_logger(__name__)

# Asymmetric only: an HMAC algorithm would let anyone who has the (public) key sign.
ALGORITHMS = ("RS256", "ES256")
MIN_KID_REFRESH_S = 60.0  # a token naming an unknown kid refreshes the set at most this often
FAILED_FETCH_RETRY_S = 1.0  # after a failed fetch, the next one waits this long (503 meanwhile)
KEY_SET_MAX_AGE_S = 3600.0  # refetch a set this old, so keys the provider withdrew go away
FETCH_TIMEOUT_S = 10.0
MAX_DOCUMENT_BYTES = 1024 * 1024
REQUIRED = ("exp", "iss", "aud")
# JWS compact serialisation: three base64url parts, the signature not empty.
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")

KeyFetch = Callable[[], Awaitable[object]]
Claims = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Key:
    """One usable signing key of the provider's set."""

    kid: str | None
    jwk: jwt.PyJWK

    @property
    def algorithm(self) -> str:
        """The one algorithm this key verifies (RS256 for RSA, ES256 for P-256)."""
        return str(self.jwk.algorithm_name)


def bearer_token(authorization: str | None) -> str:
    """The JWT of a ``Bearer`` Authorization header; :class:`TokenRejected` if there is none."""
    scheme, _, value = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise TokenRejected("missing", "no Bearer token")
    token = value.strip()
    if not _COMPACT.fullmatch(token):
        raise TokenRejected("malformed", "the Bearer token is not a signed JWT")
    return token


def token_header(token: str) -> tuple[str, str | None]:
    """(alg, kid) from the token's header, without trusting it yet."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as e:  # not JSON, a kid that is no string, a bad crit, ...
        raise TokenRejected("malformed", f"unreadable JWT header: {e}") from e
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in ALGORITHMS:
        raise TokenRejected("algorithm", f"algorithm {str(alg)[:20]!r} is not accepted")
    if kid is not None and not isinstance(kid, str):
        raise TokenRejected("malformed", "kid is not a string")
    return str(alg), kid


def precheck(token: str, settings: WebhookSettings) -> None:
    """Refuse a token of another issuer or for another audience before looking for its key,
    so a foreign token never makes us fetch a key set (its claims are checked again, signed)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as e:
        raise TokenRejected("malformed", f"unreadable JWT claims: {e}") from e
    if claims.get("iss") != settings.oauth2_issuer:
        raise TokenRejected("issuer", f"issuer {str(claims.get('iss'))[:200]!r} is not trusted")
    audience = claims.get("aud")
    given = audience if isinstance(audience, list) else [audience]
    if not any(isinstance(a, str) and a in settings.oauth2_audiences for a in given):
        raise TokenRejected("audience", "the token is not for this webhook (aud)")


def check_signed(token: str, key: Key, alg: str, settings: WebhookSettings) -> Claims:
    """Verify signature, ``iss``, ``aud``, ``exp``, ``nbf`` and the required claims."""
    if alg != key.algorithm:
        raise TokenRejected("algorithm", f"{alg} does not match the key's {key.algorithm}")
    try:
        claims: Claims = jwt.decode(
            token, key.jwk, algorithms=[key.algorithm], audience=list(settings.oauth2_audiences),
            issuer=settings.oauth2_issuer, leeway=settings.oauth2_leeway_s,
            options={"require": list(REQUIRED)},
        )
    except jwt.PyJWTError as e:
        raise TokenRejected(_reason(e), f"invalid token: {e}") from e
    _check_required_claims(claims, settings.oauth2_required_claims)
    return claims


def _reason(error: jwt.PyJWTError) -> str:
    reasons: list[tuple[type[jwt.PyJWTError], str]] = [
        (jwt.ExpiredSignatureError, "expired"), (jwt.ImmatureSignatureError, "not_yet_valid"),
        (jwt.InvalidAudienceError, "audience"), (jwt.InvalidIssuerError, "issuer"),
        (jwt.MissingRequiredClaimError, "missing_claim"), (jwt.InvalidSignatureError, "signature"),
        (jwt.InvalidAlgorithmError, "algorithm"), (jwt.DecodeError, "malformed"),
    ]
    return next((reason for cls, reason in reasons if isinstance(error, cls)), "invalid")


def _check_required_claims(claims: Claims, required: Mapping[str, str | list[str]]) -> None:
    for name, wanted in required.items():
        accepted = [wanted] if isinstance(wanted, str) else wanted
        value = claims.get(name)
        values = value if isinstance(value, list) else [value]
        if not any(v in accepted for v in values if isinstance(v, str)):
            raise TokenRejected("claim", f"claim {name!r} missing or not an accepted value")


def parse_key_set(document: object) -> tuple[Key, ...]:
    """The RS256 and ES256 signing keys of a JWKS document; others (HMAC ``oct`` keys,
    encryption keys, other curves) are skipped. :class:`KeySetUnavailable` if none is left."""
    raw = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(raw, list):
        raise KeySetUnavailable("the key set is not a JWKS document (no 'keys' list)")
    keys = tuple(key for key in map(_parse_key, raw) if key is not None)
    if not keys:
        raise KeySetUnavailable("the key set has no RS256 or ES256 signing key")
    return keys


def _parse_key(data: object) -> Key | None:
    if not isinstance(data, dict) or data.get("use", "sig") != "sig":
        return None
    if data.get("kty") == "RSA":
        alg = "RS256"
    elif data.get("kty") == "EC" and data.get("crv") == "P-256":
        alg = "ES256"
    else:
        return None
    kid = data.get("kid")
    if data.get("alg", alg) != alg or not isinstance(kid, str | None):
        return None
    try:
        return Key(kid, jwt.PyJWK(data, algorithm=alg))
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
        log.warning("oauth2.key_skipped", kid=kid, kty=data.get("kty"))
        return None


class KeySet:
    """The provider's keys, cached: fetched when first needed, refetched when a token names
    an unknown kid (at most every ``min_kid_refresh_s``), and in the background when the set
    is old (calls meanwhile use the cached keys, so a hanging provider delays none of them);
    the last good set stays in use while the provider is down."""

    def __init__(
        self, fetch: KeyFetch, *, clock: Callable[[], float] = time.monotonic,
        min_kid_refresh_s: float = MIN_KID_REFRESH_S,
        failed_retry_s: float = FAILED_FETCH_RETRY_S, max_age_s: float = KEY_SET_MAX_AGE_S,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._min_kid_refresh_s = min_kid_refresh_s
        self._failed_retry_s = failed_retry_s
        self._max_age_s = max_age_s
        self._keys: tuple[Key, ...] | None = None
        self._retired: set[str] = set()  # kids the provider listed once and withdrew
        self._fetched_at: float | None = None
        self._kid_refresh_at: float | None = None
        self._failed_at: float | None = None
        self._loads = 0  # good fetches so far: tells a caller whether one happened meanwhile
        self._lock = asyncio.Lock()
        self.refreshing: asyncio.Task[None] | None = None  # the background refetch, if any

    @property
    def kids(self) -> tuple[str | None, ...]:
        """The kids of the cached set (empty before the first good fetch)."""
        return tuple(key.kid for key in self._keys or ())

    async def key(self, kid: str | None, alg: str) -> Key:
        """The key that signed a token; :class:`TokenRejected` if it is not the provider's,
        :class:`KeySetUnavailable` if that cannot be known now."""
        loads = self._loads
        found = self._lookup(kid, alg)
        if found is not None:
            now = self._clock()
            if self._stale(now) and self._failure_wait_s(now) <= 0:
                self._refresh_in_background()
            return found
        async with self._lock:  # one fetch at a time; waiters see its result
            return await self._resolve(kid, alg, loads)

    def load_soon(self) -> None:
        """Start fetching the set in the background (at startup), unless it is fresh."""
        self._refresh_in_background()

    async def close(self) -> None:
        """Stop a background refetch (at shutdown)."""
        if self.refreshing is not None:
            self.refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.refreshing

    async def _resolve(self, kid: str | None, alg: str, loads: int) -> Key:
        now = self._clock()
        if self._keys is None:
            await self._first_load(now)
        found = self._lookup(kid, alg)
        if found is not None:
            return found
        if kid is None or kid in self._retired:
            raise TokenRejected("unknown_key", "the token's key is not (or no longer) listed")
        if self._loads != loads:  # the set was fetched after this call began: it is not there
            raise TokenRejected("unknown_key", "the token's kid is not in the provider's keys")
        return await self._refresh_for_kid(kid, alg, now)

    async def _first_load(self, now: float) -> None:
        wait_s = self._failure_wait_s(now)
        if wait_s > 0:
            raise KeySetUnavailable("the identity provider's keys could not be fetched",
                                    retry_after_s=_ceil(wait_s))
        await self._refresh(now)

    def _refresh_in_background(self) -> None:
        if self.refreshing is None or self.refreshing.done():
            self.refreshing = asyncio.create_task(self._background_refresh(),
                                                  name="tcbridge-oauth2-keys")

    async def _background_refresh(self) -> None:
        async with self._lock:
            now = self._clock()
            if not self._stale(now) or self._failure_wait_s(now) > 0:
                return
            try:
                await self._refresh(now)
            except KeySetUnavailable as e:
                if self._keys is None:
                    log.warning("oauth2.keys_unavailable", error=str(e),
                                message="webhook calls get 503 until the keys can be fetched")
                else:
                    log.warning("oauth2.keys_kept", error=str(e),
                                message="refetch failed; the cached set stays in use")
            except Exception:  # a task nobody awaits must not hide a bug
                log.exception("oauth2.refresh_crashed")

    async def _refresh_for_kid(self, kid: str, alg: str, now: float) -> Key:
        wait_s = max(self._failure_wait_s(now), self._kid_wait_s(now))
        if wait_s > 0:
            # It may be a key the provider has just started to use: ask again later.
            raise KeySetUnavailable("unknown kid; the key set cannot be refetched yet",
                                    retry_after_s=_ceil(wait_s))
        await self._refresh(now)
        self._kid_refresh_at = now
        found = self._lookup(kid, alg)
        if found is None:
            raise TokenRejected("unknown_key", "the token's kid is not in the provider's keys")
        return found

    async def _refresh(self, now: float) -> None:
        try:
            keys = parse_key_set(await self._fetch())
        except KeySetUnavailable as e:
            self._failed_at = now
            e.retry_after_s = _ceil(self._failed_retry_s)
            raise
        old = {key.kid for key in self._keys or ()}
        new = {key.kid for key in keys}
        self._retired = (self._retired | {k for k in old - new if k is not None}) - new
        self._keys, self._fetched_at, self._failed_at = keys, now, None
        self._loads += 1
        log.info("oauth2.keys_loaded", kids=sorted(str(k) for k in new))

    def _lookup(self, kid: str | None, alg: str) -> Key | None:
        keys = self._keys or ()
        if kid is not None:
            return next((key for key in keys if key.kid == kid), None)
        # No kid: only unambiguous when one key of the token's algorithm is listed.
        matching = [key for key in keys if key.algorithm == alg]
        return matching[0] if len(matching) == 1 else None

    def _stale(self, now: float) -> bool:
        return self._fetched_at is None or now - self._fetched_at >= self._max_age_s

    def _failure_wait_s(self, now: float) -> float:
        if self._failed_at is None:
            return 0.0
        return self._failed_retry_s - (now - self._failed_at)

    def _kid_wait_s(self, now: float) -> float:
        if self._kid_refresh_at is None:
            return 0.0
        return self._min_kid_refresh_s - (now - self._kid_refresh_at)


def _ceil(seconds: float) -> int:
    return max(1, math.ceil(seconds))


class TokenVerifier:
    """Checks the Authorization header of a webhook call against the configured provider."""

    def __init__(self, settings: WebhookSettings, keys: KeySet) -> None:
        self.settings = settings
        self.keys = keys

    async def verify(self, authorization: str | None) -> Claims:
        """The verified claims; :class:`TokenRejected` or :class:`KeySetUnavailable`."""
        token = bearer_token(authorization)
        alg, kid = token_header(token)
        precheck(token, self.settings)
        key = await self.keys.key(kid, alg)
        # ~0.1 ms of CPU for RS256: fine on the event loop.
        return check_signed(token, key, alg, self.settings)

    async def close(self) -> None:
        """Stop background work (the webhook app's cleanup calls this)."""
        await self.keys.close()

    def prefetch(self) -> None:
        """Start loading the key set at startup, so a wrong issuer shows in the log at once
        and the first call need not wait; a failure is only logged (calls get 503 until
        the provider can be reached). Startup is not delayed by a slow provider."""
        self.keys.load_soon()


class ProviderKeys:
    """The IO part: fetch the key set over HTTP (discovery document, then ``jwks_uri``)."""

    def __init__(
        self, session: aiohttp.ClientSession, settings: WebhookSettings, *,
        metrics: Metrics | None = None, timeout_s: float = FETCH_TIMEOUT_S,
    ) -> None:
        self._session = session
        self._issuer = settings.oauth2_issuer or ""
        self._jwks_url = settings.oauth2_jwks_url
        self._discovered: str | None = None
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 5.0))

    @property
    def discovery_url(self) -> str:
        """``<issuer>/.well-known/openid-configuration`` (OpenID Connect Discovery 1.0, 4.)."""
        return self._issuer.rstrip("/") + "/.well-known/openid-configuration"

    async def __call__(self) -> object:
        """The JWKS document; :class:`KeySetUnavailable` when it cannot be had."""
        try:
            url = self._jwks_url or self._discovered or await self._discover()
            document = await self._get_json(url)
        except KeySetUnavailable as e:
            self._discovered = None  # the discovery document may have moved the key set
            self._count("failed")
            log.warning("oauth2.fetch_failed", error=str(e))
            raise
        self._count("ok")
        return document

    async def _discover(self) -> str:
        document = await self._get_json(self.discovery_url)
        if not isinstance(document, dict):
            raise KeySetUnavailable(f"{self.discovery_url}: not a discovery document")
        uri = document.get("jwks_uri")
        if not isinstance(uri, str) or not uri.startswith(("http://", "https://")):
            raise KeySetUnavailable(f"{self.discovery_url}: no jwks_uri")
        if document.get("issuer") != self._issuer:
            log.warning("oauth2.issuer_differs", configured=self._issuer,
                        discovered=str(document.get("issuer"))[:200])
        self._discovered = uri
        return uri

    async def _get_json(self, url: str) -> object:
        try:
            async with self._session.get(
                url, timeout=self._timeout, headers={"Accept": "application/json"}
            ) as response:
                if response.status != 200:
                    raise KeySetUnavailable(f"{url} answered {response.status}")
                body = await response.content.read(MAX_DOCUMENT_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise KeySetUnavailable(f"{url}: {type(e).__name__}: {e}"[:300]) from e
        if len(body) > MAX_DOCUMENT_BYTES:
            raise KeySetUnavailable(f"{url}: answer larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise KeySetUnavailable(f"{url}: not JSON") from e

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.oauth2_key_fetches.labels(outcome).inc()


def build_verifier(
    settings: WebhookSettings, session: aiohttp.ClientSession, metrics: Metrics | None = None
) -> TokenVerifier:
    """A verifier fetching over ``session`` (the daemon's shared ClientSession)."""
    return TokenVerifier(settings, KeySet(ProviderKeys(session, settings, metrics=metrics)))
