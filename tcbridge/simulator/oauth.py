"""The simulated identity provider, shaped like Microsoft Entra ID (v2.0 endpoints): OAuth 2.0
client credentials, a discovery document and a JWKS, key rotation and an outage switch; and the
client side Tradecloud uses to authenticate its webhook calls with such tokens.

Routes (``{tenant}`` is ``sim-tenant`` unless configured):
``GET /{tenant}/v2.0/.well-known/openid-configuration``, ``GET /{tenant}/discovery/v2.0/keys``,
``POST /{tenant}/oauth2/v2.0/token`` (form: grant_type=client_credentials, client_id,
client_secret or Basic auth, scope ``<resource>/.default``; the token's ``aud`` is the
resource), and the controls ``GET|POST /_sim/oauth`` (``down``: every endpoint answers 503;
``keysDown``: only discovery and keys do), ``POST /_sim/oauth/rotate`` (``keepOld``, ``alg``)
and ``POST /_sim/oauth/mint`` (any token, expired or foreign, for tests).
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import structlog
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tcbridge.simulator.api import http_error, json_object

log = structlog.get_logger(__name__)

TENANT = "sim-tenant"
ALGORITHMS = ("RS256", "ES256")
DEFAULT_SCOPE_SUFFIX = "/.default"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def issuer_for(base_url: str, tenant: str = TENANT) -> str:
    """The issuer a simulator at ``base_url`` puts in its tokens (Entra ID's v2.0 form)."""
    return f"{base_url.rstrip('/')}/{tenant}/v2.0"


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One key pair of the provider."""

    kid: str
    alg: str
    private: PrivateKey

    @classmethod
    def generate(cls, alg: str = "RS256", kid: str | None = None) -> SigningKey:
        """A fresh RSA-2048 (RS256) or P-256 (ES256) key."""
        if alg not in ALGORITHMS:
            raise ValueError(f"alg must be one of {', '.join(ALGORITHMS)}")
        private: PrivateKey = (rsa.generate_private_key(public_exponent=65537, key_size=2048)
                               if alg == "RS256" else ec.generate_private_key(ec.SECP256R1()))
        return cls(kid or secrets.token_urlsafe(12), alg, private)

    def public_jwk(self) -> dict[str, Any]:
        """The public key as a JWK, as Entra ID lists it: kty, use, kid, no ``alg``."""
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "use": "sig", "kid": self.kid}

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        """A JWT of ``claims`` signed with this key (``kid`` in the header unless None)."""
        header = {"kid": self.kid, "typ": "JWT"} | (headers or {})
        return jwt.encode(claims, self.private, algorithm=self.alg,
                          headers={k: v for k, v in header.items() if v is not None})


@dataclass(slots=True)
class OAuthProvider:
    """The provider's state: registered clients, keys (the first one signs), faults."""

    clock: Callable[[], float] = time.time
    token_ttl_s: float = 3600.0
    tenant: str = TENANT
    clients: dict[str, str] = field(default_factory=dict)  # client id -> secret
    base_url: str = ""
    down: bool = False
    keys_down: bool = False
    key_requests: int = 0  # discovery + JWKS requests answered, for tests
    token_requests: int = 0
    _keys: list[SigningKey] = field(default_factory=list)

    @property
    def issuer(self) -> str:
        """The ``iss`` of every token."""
        return issuer_for(self.base_url, self.tenant)

    @property
    def token_url(self) -> str:
        """Where clients get tokens."""
        return f"{self.base_url}/{self.tenant}/oauth2/v2.0/token"

    @property
    def keys(self) -> list[SigningKey]:
        """The listed keys, the signing one first (one RS256 key is made when first needed)."""
        if not self._keys:
            self._keys.append(SigningKey.generate("RS256"))
        return self._keys

    def rotate(self, *, keep_old: bool = True, alg: str = "RS256") -> SigningKey:
        """Sign with a new key from now on; the old ones stay listed only with ``keep_old``."""
        key = SigningKey.generate(alg)
        self._keys[:] = [key, *(self.keys if keep_old else [])]
        log.info("simulator.oauth_rotated", kid=key.kid, listed=[k.kid for k in self._keys])
        return key

    def mint(self, audience: str | list[str], client_id: str = "tradecloud", *,
             ttl_s: float | None = None, not_before_s: float = 0.0,
             claims: dict[str, Any] | None = None, issuer: str | None = None) -> str:
        """A token as the token endpoint issues it (Entra ID v2.0 claims), with overrides."""
        now = int(self.clock())
        lifetime = int(self.token_ttl_s if ttl_s is None else ttl_s)
        body = {
            "iss": issuer or self.issuer, "aud": audience, "iat": now,
            "nbf": now + int(not_before_s), "exp": now + lifetime, "sub": client_id,
            "azp": client_id, "appid": client_id, "tid": self.tenant, "ver": "2.0",
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, client_id)), "jti": secrets.token_hex(8),
        }
        return self.keys[0].sign(body | (claims or {}))

    def routes(self) -> list[web.RouteDef]:
        """The provider's routes and its controls."""
        base = f"/{self.tenant}"
        return [
            web.get(f"{base}/v2.0/.well-known/openid-configuration", self._discovery),
            web.get(f"{base}/discovery/v2.0/keys", self._jwks),
            web.post(f"{base}/oauth2/v2.0/token", self._token),
            web.get("/_sim/oauth", self._state),
            web.post("/_sim/oauth", self._set_state),
            web.post("/_sim/oauth/rotate", self._rotate),
            web.post("/_sim/oauth/mint", self._mint),
        ]

    async def _discovery(self, request: web.Request) -> web.Response:
        if self.down or self.keys_down:
            return _unavailable()
        self.key_requests += 1
        return web.json_response({
            "issuer": self.issuer, "token_endpoint": self.token_url,
            "jwks_uri": f"{self.base_url}/{self.tenant}/discovery/v2.0/keys",
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_post",
                                                      "client_secret_basic"],
            "response_types_supported": ["code", "id_token", "token id_token"],
            "subject_types_supported": ["pairwise"],
        })

    async def _jwks(self, request: web.Request) -> web.Response:
        if self.down or self.keys_down:
            return _unavailable()
        self.key_requests += 1
        return web.json_response({"keys": [key.public_jwk() for key in self.keys]})

    async def _token(self, request: web.Request) -> web.Response:
        if self.down:
            return _unavailable()
        self.token_requests += 1
        form = await request.post()
        client_id, secret = _client_credentials(request, form)
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "only client_credentials")
        if not client_id or not secret or self.clients.get(client_id) != secret:
            return _oauth_error(401, "invalid_client", "unknown client or wrong secret")
        scope = str(form.get("scope", ""))
        if not scope.endswith(DEFAULT_SCOPE_SUFFIX) or len(scope) == len(DEFAULT_SCOPE_SUFFIX):
            return _oauth_error(400, "invalid_scope", "scope must be <resource>/.default")
        audience = scope.removesuffix(DEFAULT_SCOPE_SUFFIX)
        ttl = int(self.token_ttl_s)
        return web.json_response({"token_type": "Bearer", "expires_in": ttl,
                                  "ext_expires_in": ttl,
                                  "access_token": self.mint(audience, client_id)})

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self._as_dict())

    async def _set_state(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        for key, attr in (("down", "down"), ("keysDown", "keys_down")):
            if key in body:
                if not isinstance(body[key], bool):
                    raise http_error(web.HTTPBadRequest, f"{key} must be a boolean")
                setattr(self, attr, body[key])
        return web.json_response(self._as_dict())

    async def _rotate(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        keep_old, alg = body.get("keepOld", True), body.get("alg", "RS256")
        if not isinstance(keep_old, bool) or alg not in ALGORITHMS:
            raise http_error(web.HTTPBadRequest, "keepOld must be a boolean, alg RS256 or ES256")
        key = self.rotate(keep_old=keep_old, alg=alg)
        return web.json_response({"kid": key.kid} | self._as_dict())

    async def _mint(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        audience, claims = body.get("audience"), body.get("claims", {})
        ttl_s, nbf_s = body.get("ttlS"), body.get("notBeforeS", 0)
        if not isinstance(audience, str | list) or not isinstance(claims, dict) or not all(
                isinstance(v, int | float | None) for v in (ttl_s, nbf_s)):
            raise http_error(web.HTTPBadRequest,
                             "audience (string or list), claims (object), ttlS, notBeforeS")
        token = self.mint(audience, str(body.get("clientId", "tradecloud")), ttl_s=ttl_s,
                          not_before_s=nbf_s or 0, claims=claims, issuer=body.get("issuer"))
        return web.json_response({"access_token": token})

    def _as_dict(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "tokenUrl": self.token_url, "down": self.down,
                "keysDown": self.keys_down, "signingKid": self.keys[0].kid,
                "kids": [key.kid for key in self.keys], "keyRequests": self.key_requests,
                "tokenRequests": self.token_requests}


def _unavailable() -> web.Response:
    return web.json_response({"error": "temporarily_unavailable"}, status=503,
                             headers={"Retry-After": "1"})


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _client_credentials(request: web.Request, form: Any) -> tuple[str, str]:
    """client_secret_basic (RFC 6749 2.3.1) or client_secret_post."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(
                ":")
        except (binascii.Error, UnicodeDecodeError):
            return "", ""
        return user, password
    return str(form.get("client_id", "")), str(form.get("client_secret", ""))


class TokenError(Exception):
    """The token endpoint could not be reached or refused the client."""


@dataclass(slots=True)
class TokenClient:
    """Tradecloud's side: client credentials for an access token, cached until near expiry."""

    client_id: str
    client_secret: str
    scope: str
    token_url: Callable[[], str]
    clock: Callable[[], float] = time.time
    _token: str | None = None
    _expires_at: float = 0.0

    @classmethod
    def parse(cls, text: str, token_url: Callable[[], str], clock: Callable[[], float] = time.time
              ) -> TokenClient:
        """From ``CLIENT_ID:CLIENT_SECRET:SCOPE`` (the scope may contain colons)."""
        client_id, _, rest = text.partition(":")
        secret, _, scope = rest.partition(":")
        if not (client_id and secret and scope):
            raise ValueError("expected oauth2:CLIENT_ID:CLIENT_SECRET:SCOPE")
        return cls(client_id, secret, scope, token_url, clock)

    async def bearer(self, session: aiohttp.ClientSession) -> str:
        """A valid access token; :class:`TokenError` if none can be had."""
        if self._token is None or self.clock() >= self._expires_at:
            await self._fetch(session)
        assert self._token is not None
        return self._token

    async def _fetch(self, session: aiohttp.ClientSession) -> None:
        form = {"grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": self.client_secret, "scope": self.scope}
        try:
            async with session.post(self.token_url(), data=form) as response:
                answer = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise TokenError(f"token endpoint unreachable: {e!r}") from e
        if status != 200 or not isinstance(answer, dict) or "access_token" not in answer:
            raise TokenError(f"token endpoint answered {status}: {str(answer)[:200]}")
        lifetime = float(answer.get("expires_in", 0))
        self._token = str(answer["access_token"])
        # Renew before the end, as clients do, so a token never expires on the way.
        self._expires_at = self.clock() + lifetime - min(60.0, lifetime / 10)
