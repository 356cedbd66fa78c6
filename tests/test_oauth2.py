"""OAuth 2.0 access tokens on the webhook: the verifier and its key-set cache (no server),
the fetch of the discovery document and key set (the simulator as provider), the answers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tcbridge.config import WebhookSettings
from tcbridge.errors import KeySetUnavailable, TokenRejected
from tcbridge.metrics import Metrics
from tcbridge.oauth2 import KeySet, ProviderKeys, TokenVerifier, build_verifier, parse_key_set
from tcbridge.simulator import Simulator
from tcbridge.simulator.oauth import SigningKey
from tcbridge.store import Store
from tcbridge.webhook import build_app
from tests.conftest import order_event_body

ISSUER = "https://login.example.com/tenant-1/v2.0"
AUDIENCE = "api://tcbridge"
CLIENT = "tradecloud-client-id"
SETTINGS = WebhookSettings(auth="oauth2", oauth2_issuer=ISSUER, oauth2_audience=AUDIENCE,
                           oauth2_required_claims={"appid": CLIENT})
RSA_KEY = SigningKey.generate("RS256", kid="rsa-1")
EC_KEY = SigningKey.generate("ES256", kid="ec-1")
OTHER_RSA = SigningKey.generate("RS256", kid="rsa-2")


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + 600,
            "appid": CLIENT, "sub": "sp-1"}
    return {k: v for k, v in (base | overrides).items() if v is not None}


def bearer(token: str) -> str:
    return f"Bearer {token}"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], body: dict[str, Any], secret: bytes | None) -> str:
    """A token built by hand: alg none (empty signature) or HMAC-SHA256 with ``secret``."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


class FakeProvider:
    """A key-set fetch that counts calls and fails on demand (no server)."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        self.calls = 0
        self.down = False

    async def __call__(self) -> object:
        self.calls += 1
        if self.down:
            raise KeySetUnavailable("provider down")
        return {"keys": [key.public_jwk() for key in self.keys]}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_verifier(provider: FakeProvider, clock: Clock | None = None,
                  settings: WebhookSettings = SETTINGS) -> TokenVerifier:
    keys = KeySet(provider, clock=clock or Clock(), min_kid_refresh_s=60, failed_retry_s=5,
                  max_age_s=3600)
    return TokenVerifier(settings, keys)


async def reason_of(verifier: TokenVerifier, header: str | None) -> str:
    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(header)
    assert "eyJ" not in str(caught.value)  # the message never repeats the token
    return caught.value.reason


# --- the checks --------------------------------------------------------------------------


@pytest.mark.parametrize("key", [RSA_KEY, EC_KEY], ids=["RS256", "ES256"])
async def test_valid_token_is_accepted(key: SigningKey) -> None:
    verifier = make_verifier(FakeProvider(RSA_KEY, EC_KEY))
    verified = await verifier.verify(bearer(key.sign(claims())))
    assert verified["appid"] == CLIENT and verified["aud"] == AUDIENCE


async def test_audience_list_and_claim_alternatives() -> None:
    settings = WebhookSettings(auth="oauth2", oauth2_issuer=ISSUER,
                               oauth2_audience=["api://other", AUDIENCE],
                               oauth2_required_claims={"azp": ["x", CLIENT]})
    verifier = make_verifier(FakeProvider(RSA_KEY), settings=settings)
    token = RSA_KEY.sign(claims(aud=[AUDIENCE, "api://third"], azp=CLIENT))
    assert (await verifier.verify(bearer(token)))["azp"] == CLIENT


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": int(time.time()) - 120}, "expired"),
        # a day ahead: computed at collection, it must still be ahead when a long suite runs it
        ({"nbf": int(time.time()) + 86_400}, "not_yet_valid"),
        ({"aud": "api://someone-else"}, "audience"),
        ({"iss": "https://login.example.com/tenant-2/v2.0"}, "issuer"),
        ({"appid": None}, "claim"),
        ({"appid": "another-client"}, "claim"),
        ({"exp": None}, "missing_claim"),
    ],
)
async def test_bad_claims_are_rejected(overrides: dict[str, Any], reason: str) -> None:
    verifier = make_verifier(FakeProvider(RSA_KEY))
    assert await reason_of(verifier, bearer(RSA_KEY.sign(claims(**overrides)))) == reason


async def test_leeway_accepts_a_token_just_expired() -> None:
    verifier = make_verifier(FakeProvider(RSA_KEY))
    token = RSA_KEY.sign(claims(exp=int(time.time()) - 20))  # within the default 60 s
    assert await verifier.verify(bearer(token))


async def test_alg_none_is_rejected() -> None:
    verifier = make_verifier(FakeProvider(RSA_KEY))
    token = unsigned({"alg": "none", "kid": "rsa-1"}, claims(), None)
    assert await reason_of(verifier, bearer(token)) == "malformed"  # no signature at all
    token = unsigned({"alg": "none", "kid": "rsa-1"}, claims(), b"x")
    assert await reason_of(verifier, bearer(token)) == "algorithm"


async def test_hs256_signed_with_the_public_key_is_rejected() -> None:
    provider = FakeProvider(RSA_KEY)
    verifier = make_verifier(provider)
    public_pem = RSA_KEY.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for secret in (public_pem, json.dumps(RSA_KEY.public_jwk()).encode()):
        token = unsigned({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}, claims(), secret)
        assert await reason_of(verifier, bearer(token)) == "algorithm"
    assert provider.calls == 0  # refused before any key was looked up


async def test_algorithm_must_match_the_key() -> None:
    verifier = make_verifier(FakeProvider(RSA_KEY, EC_KEY))
    # An ES256 token naming the RSA key's kid.
    token = EC_KEY.sign(claims(), headers={"kid": "rsa-1"})
    assert await reason_of(verifier, bearer(token)) == "algorithm"


async def test_signature_of_another_key_is_rejected() -> None:
    verifier = make_verifier(FakeProvider(RSA_KEY))
    forged = OTHER_RSA.sign(claims(), headers={"kid": "rsa-1"})
    assert await reason_of(verifier, bearer(forged)) == "signature"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("Bearer ", "missing"),
        ("Basic dGM6cHc=", "missing"),
        ("Bearer not-a-jwt", "malformed"),
        ("Bearer a.b", "malformed"),
        ("Bearer ünï.cödé.x", "malformed"),
        ("Bearer e30.e30.e30", "algorithm"),  # {} header: no alg
        ("Bearer !!!.e30.sig", "malformed"),
        ("Bearer " + unsigned({"alg": "RS256", "kid": 5}, claims(), b"x"), "malformed"),
        ("Bearer " + unsigned({"alg": "RS256", "crit": ["exp"]}, claims(), b"x"), "malformed"),
        ("Bearer " + unsigned({"alg": "RS256", "crit": "x"}, claims(), b"x"), "malformed"),
        ("Bearer " + b64(b"[1]") + ".e30.c2ln", "malformed"),
        ("Bearer " + b64(b'{"alg":"RS256"}') + "." + b64(b"[1]") + ".c2ln", "malformed"),
        ("Bearer " + b64(b'{"alg":"RS256"}') + "." + b64(b"\xff") + ".c2ln", "malformed"),
        ("Bearer " + unsigned({"alg": "RS256"}, claims(aud={"x": 1}), b"x"), "audience"),
        ("Bearer " + unsigned({"alg": "RS256"}, claims(aud=[["a"]]), b"x"), "audience"),
        ("Bearer " + unsigned({"alg": "RS256"}, claims(aud=5), b"x"), "audience"),
        ("Bearer " + unsigned({"alg": "RS256"}, claims(iss=[ISSUER]), b"x"), "issuer"),
    ],
)
async def test_missing_or_malformed_header(header: str | None, reason: str) -> None:
    provider = FakeProvider(RSA_KEY)
    assert await reason_of(make_verifier(provider), header) == reason
    assert provider.calls == 0


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
FIELDS = ("alg", "kid", "crit", "typ", "iss", "aud", "exp", "nbf", "iat", "appid")
PARTS = st.dictionaries(st.sampled_from(FIELDS), JSON | st.sampled_from(
    ["RS256", "ES256", "HS256", "none", ISSUER, AUDIENCE, "rsa-1"]), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=PARTS, body=PARTS, signature=st.binary(max_size=64))
def test_any_token_is_refused_cleanly(header: dict[str, Any], body: dict[str, Any],
                                      signature: bytes) -> None:
    """Whatever the header and claims, the outcome is a 401 reason, or a 503 when (and only
    when) the provider is down: never another exception, never accepted unsigned."""
    token = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}."
    token += b64(signature) or "AA"

    async def check() -> None:
        for down in (False, True):
            provider = FakeProvider(RSA_KEY)
            provider.down = down
            try:
                await make_verifier(provider).verify(bearer(token))
            except TokenRejected:
                continue
            except KeySetUnavailable:
                assert down
                continue
            raise AssertionError("a forged token was accepted")

    asyncio.run(check())


async def test_foreign_token_never_fetches_keys() -> None:
    provider = FakeProvider(RSA_KEY)
    verifier = make_verifier(provider)
    token = OTHER_RSA.sign(claims(iss="https://evil.example.com"))
    assert await reason_of(verifier, bearer(token)) == "issuer"
    token = OTHER_RSA.sign(claims(aud="api://elsewhere"))
    assert await reason_of(verifier, bearer(token)) == "audience"
    assert provider.calls == 0


async def test_token_without_kid_uses_the_only_key_of_its_algorithm() -> None:
    verifier = make_verifier(FakeProvider(RSA_KEY, EC_KEY))
    token = RSA_KEY.sign(claims(), headers={"kid": None})
    assert await verifier.verify(bearer(token))
    ambiguous = make_verifier(FakeProvider(RSA_KEY, OTHER_RSA))
    assert await reason_of(ambiguous, bearer(token)) == "unknown_key"


# --- the key-set cache ---------------------------------------------------------------------


async def test_key_set_is_fetched_once_and_cached() -> None:
    provider = FakeProvider(RSA_KEY)
    verifier = make_verifier(provider)
    for _ in range(3):
        await verifier.verify(bearer(RSA_KEY.sign(claims())))
    assert provider.calls == 1


async def test_concurrent_first_calls_share_one_fetch() -> None:
    provider = FakeProvider(RSA_KEY)
    verifier = make_verifier(provider)
    token = bearer(RSA_KEY.sign(claims()))
    await asyncio.gather(*(verifier.verify(token) for _ in range(10)))
    assert provider.calls == 1


async def test_unknown_kid_refreshes_once_and_finds_the_new_key() -> None:
    provider = FakeProvider(RSA_KEY)
    verifier = make_verifier(provider)
    await verifier.verify(bearer(RSA_KEY.sign(claims())))
    provider.keys = [OTHER_RSA, RSA_KEY]  # the provider rotated
    await verifier.verify(bearer(OTHER_RSA.sign(claims())))
    await verifier.verify(bearer(OTHER_RSA.sign(claims())))
    assert provider.calls == 2


async def test_unknown_kid_not_in_the_fresh_set_is_401() -> None:
    provider = FakeProvider(RSA_KEY)
    verifier = make_verifier(provider)
    await verifier.verify(bearer(RSA_KEY.sign(claims())))
    assert await reason_of(verifier, bearer(OTHER_RSA.sign(claims()))) == "unknown_key"
    assert provider.calls == 2


async def test_unknown_kid_refresh_is_rate_limited_to_once_a_minute() -> None:
    provider, clock = FakeProvider(RSA_KEY), Clock()
    verifier = make_verifier(provider, clock)
    await verifier.verify(bearer(RSA_KEY.sign(claims())))
    stranger = bearer(OTHER_RSA.sign(claims()))
    assert await reason_of(verifier, stranger) == "unknown_key"  # refresh no. 1
    clock.now += 30
    with pytest.raises(KeySetUnavailable) as caught:  # maybe a brand-new key: retry later
        await verifier.verify(stranger)
    assert caught.value.retry_after_s == 30
    assert provider.calls == 2
    clock.now += 31
    provider.keys.append(OTHER_RSA)
    assert await verifier.verify(stranger)
    assert provider.calls == 3


async def test_withdrawn_key_is_refused_without_a_fetch() -> None:
    provider = FakeProvider(RSA_KEY)
    verifier = make_verifier(provider)
    await verifier.verify(bearer(RSA_KEY.sign(claims())))
    provider.keys = [OTHER_RSA]  # rotated, old key no longer listed
    await verifier.verify(bearer(OTHER_RSA.sign(claims())))
    assert await reason_of(verifier, bearer(RSA_KEY.sign(claims()))) == "unknown_key"
    assert provider.calls == 2


async def test_provider_down_without_a_cached_set_is_unavailable_then_recovers() -> None:
    provider, clock = FakeProvider(RSA_KEY), Clock()
    provider.down = True
    verifier = make_verifier(provider, clock)
    token = bearer(RSA_KEY.sign(claims()))
    with pytest.raises(KeySetUnavailable) as caught:
        await verifier.verify(token)
    assert caught.value.retry_after_s == 5
    clock.now += 2
    with pytest.raises(KeySetUnavailable) as caught:  # no new fetch before the retry time
        await verifier.verify(token)
    assert caught.value.retry_after_s == 3
    assert provider.calls == 1
    provider.down = False
    clock.now += 3
    assert await verifier.verify(token)
    assert provider.calls == 2


async def test_provider_down_with_a_cached_set_keeps_accepting() -> None:
    provider, clock = FakeProvider(RSA_KEY), Clock()
    verifier = make_verifier(provider, clock)
    token = bearer(RSA_KEY.sign(claims()))
    await verifier.verify(token)
    provider.down = True
    clock.now += 7200  # the set is old: refetched in the background, the cached set in use
    assert await verifier.verify(token)
    assert verifier.keys.refreshing is not None
    await verifier.keys.refreshing  # it failed (logged), and the set stays
    assert provider.calls == 2
    assert await verifier.verify(token)
    await verifier.keys.refreshing
    assert provider.calls == 2  # no fetch again before the retry time
    clock.now += 5
    assert await verifier.verify(token)
    await verifier.keys.refreshing
    assert provider.calls == 3


async def test_hanging_provider_delays_no_call_when_a_set_is_cached() -> None:
    release = asyncio.Event()

    class Hanging(FakeProvider):
        async def __call__(self) -> object:
            if self.calls:
                await release.wait()
            return await super().__call__()

    provider, clock = Hanging(RSA_KEY), Clock()
    verifier = make_verifier(provider, clock)
    token = bearer(RSA_KEY.sign(claims()))
    await verifier.verify(token)
    clock.now += 3601
    for _ in range(3):  # each answered from the cache while the refetch hangs
        assert await asyncio.wait_for(verifier.verify(token), timeout=5)
    refreshing = verifier.keys.refreshing
    assert refreshing is not None and not refreshing.done()
    await verifier.close()
    assert refreshing.cancelled()


async def test_provider_down_with_a_cached_set_and_an_unknown_kid_is_unavailable() -> None:
    provider = FakeProvider(RSA_KEY)
    verifier = make_verifier(provider)
    await verifier.verify(bearer(RSA_KEY.sign(claims())))
    provider.down = True
    with pytest.raises(KeySetUnavailable):
        await verifier.verify(bearer(OTHER_RSA.sign(claims())))


async def test_old_set_is_refetched_so_withdrawn_keys_go_away() -> None:
    provider, clock = FakeProvider(RSA_KEY), Clock()
    verifier = make_verifier(provider, clock)
    await verifier.verify(bearer(RSA_KEY.sign(claims())))
    provider.keys = [OTHER_RSA]
    clock.now += 3601
    assert await verifier.verify(bearer(RSA_KEY.sign(claims())))  # from the cache, meanwhile
    assert verifier.keys.refreshing is not None
    await verifier.keys.refreshing
    assert await reason_of(verifier, bearer(RSA_KEY.sign(claims()))) == "unknown_key"
    assert await verifier.verify(bearer(OTHER_RSA.sign(claims())))
    assert provider.calls == 2


async def test_prefetch_loads_the_set_and_logs_a_failure() -> None:
    provider = FakeProvider(RSA_KEY)
    verifier = make_verifier(provider)
    verifier.prefetch()
    assert verifier.keys.refreshing is not None
    await verifier.keys.refreshing
    assert verifier.keys.kids == ("rsa-1",)
    await verifier.verify(bearer(RSA_KEY.sign(claims())))
    assert provider.calls == 1
    down = FakeProvider(RSA_KEY)
    down.down = True
    failing = make_verifier(down)
    with capture_logs() as logs:
        failing.prefetch()
        assert failing.keys.refreshing is not None
        await failing.keys.refreshing  # does not raise: calls get 503 until the provider is back
    assert failing.keys.kids == ()
    assert [line["event"] for line in logs] == ["oauth2.keys_unavailable"]
    with pytest.raises(KeySetUnavailable):
        await failing.verify(bearer(RSA_KEY.sign(claims())))
    assert down.calls == 1  # within the retry time: no second fetch


async def test_calls_during_the_startup_fetch_wait_for_it() -> None:
    release = asyncio.Event()

    class Slow(FakeProvider):
        async def __call__(self) -> object:
            await release.wait()
            return await super().__call__()

    provider = Slow(RSA_KEY)
    verifier = make_verifier(provider)
    verifier.prefetch()
    calls = [asyncio.create_task(verifier.verify(bearer(RSA_KEY.sign(claims()))))
             for _ in range(3)]
    await asyncio.sleep(0.01)
    assert not any(call.done() for call in calls)
    release.set()
    assert all(await asyncio.gather(*calls))
    assert provider.calls == 1


def test_parse_key_set_keeps_only_rs256_and_es256_signing_keys() -> None:
    rsa_jwk, ec_jwk = RSA_KEY.public_jwk(), EC_KEY.public_jwk()
    document = {"keys": [
        rsa_jwk, ec_jwk,
        {"kty": "oct", "k": b64(b"secret"), "kid": "hmac"},
        rsa_jwk | {"kid": "enc", "use": "enc"},
        rsa_jwk | {"kid": "ps", "alg": "PS256"},
        ec_jwk | {"kid": "p384", "crv": "P-384"},
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        "not a key",
    ]}
    keys = parse_key_set(document)
    assert [(k.kid, k.algorithm) for k in keys] == [("rsa-1", "RS256"), ("ec-1", "ES256")]
    for bad in ({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, {"keys": "x"}, [], None):
        with pytest.raises(KeySetUnavailable):
            parse_key_set(bad)


# --- fetching from a provider over HTTP (the simulator) ---------------------------------


@pytest.fixture
async def provider() -> AsyncIterator[tuple[Simulator, aiohttp.ClientSession]]:
    sim = Simulator()
    await sim.start()
    async with aiohttp.ClientSession() as session:
        yield sim, session
    await sim.stop()


def sim_settings(sim: Simulator, **overrides: Any) -> WebhookSettings:
    return WebhookSettings(**({"auth": "oauth2", "oauth2_issuer": sim.oauth.issuer,
                               "oauth2_audience": AUDIENCE} | overrides))


async def test_keys_are_found_through_discovery(
    provider: tuple[Simulator, aiohttp.ClientSession],
) -> None:
    sim, session = provider
    metrics = Metrics()
    verifier = build_verifier(sim_settings(sim), session, metrics)
    await verifier.verify(bearer(sim.oauth.mint(AUDIENCE)))
    assert sim.oauth.key_requests == 2  # discovery, then jwks_uri
    assert "tcbridge_oauth2_key_fetches_total{outcome=\"ok\"} 1.0" in metrics.render().decode()


async def test_jwks_url_overrides_discovery(
    provider: tuple[Simulator, aiohttp.ClientSession],
) -> None:
    sim, session = provider
    jwks = sim.oauth.issuer.removesuffix("/v2.0") + "/discovery/v2.0/keys"
    verifier = build_verifier(sim_settings(sim, oauth2_jwks_url=jwks), session)
    await verifier.verify(bearer(sim.oauth.mint(AUDIENCE)))
    assert sim.oauth.key_requests == 1


@pytest.mark.parametrize("where", ["discovery", "keys", "nowhere"])
async def test_fetch_failures_are_unavailable(
    provider: tuple[Simulator, aiohttp.ClientSession], where: str,
) -> None:
    sim, session = provider
    settings = sim_settings(sim)
    if where == "nowhere":
        settings = sim_settings(sim, oauth2_jwks_url=f"{sim.oauth.base_url}/no-such-path")
    sim.oauth.keys_down = where != "nowhere"
    metrics = Metrics()
    source = ProviderKeys(session, settings, metrics=metrics)
    with pytest.raises(KeySetUnavailable):
        await source()
    assert "tcbridge_oauth2_key_fetches_total{outcome=\"failed\"} 1.0" in metrics.render().decode()


async def test_fetch_of_a_dead_or_slow_or_odd_provider_is_unavailable(
    provider: tuple[Simulator, aiohttp.ClientSession],
) -> None:
    _, session = provider

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/html", _text("<html>"))
    app.router.add_get("/huge", _text("[" + "0," * 600_000 + "0]"))
    app.router.add_get("/t/.well-known/openid-configuration", _text(json.dumps({"issuer": "x"})))
    server = TestServer(app)
    await server.start_server()
    try:
        base = f"http://127.0.0.1:{server.port}"
        for settings in (
            WebhookSettings(auth="oauth2", oauth2_issuer=f"{base}/t", oauth2_audience="a"),
            *(WebhookSettings(auth="oauth2", oauth2_issuer=ISSUER, oauth2_audience="a",
                              oauth2_jwks_url=f"{base}/{path}")
              for path in ("slow", "html", "huge")),
            WebhookSettings(auth="oauth2", oauth2_issuer=ISSUER, oauth2_audience="a",
                            oauth2_jwks_url="http://127.0.0.1:9/closed"),
        ):
            with pytest.raises(KeySetUnavailable):
                await ProviderKeys(session, settings, timeout_s=0.3)()
    finally:
        await server.close()


def _text(body: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    return handle


# --- the webhook's answers ---------------------------------------------------------------


@pytest.fixture
async def hook(store: Store) -> AsyncIterator[tuple[TestClient[Any, Any], FakeProvider, Metrics]]:
    provider, metrics = FakeProvider(RSA_KEY), Metrics()
    app = build_app(SETTINGS, store, asyncio.Event(), asyncio.Event(), retry_after_s=7,
                    metrics=metrics, verifier=make_verifier(provider))
    client = TestClient(TestServer(app))
    await client.start_server()
    yield client, provider, metrics
    await client.close()


async def test_webhook_accepts_a_valid_token_and_stores(
    hook: tuple[TestClient[Any, Any], FakeProvider, Metrics], store: Store,
) -> None:
    client, _, _ = hook
    response = await client.post("/webhook/order", json=order_event_body("o-oauth"),
                                 headers={"Authorization": bearer(RSA_KEY.sign(claims()))})
    assert response.status == 200
    assert [e["entityId"] for e in await store.events()] == ["o-oauth"]


async def test_webhook_answers_401_for_a_bad_token_and_counts_the_reason(
    hook: tuple[TestClient[Any, Any], FakeProvider, Metrics], store: Store,
) -> None:
    client, _, metrics = hook
    token = RSA_KEY.sign(claims(exp=int(time.time()) - 3600))
    with capture_logs() as logs:
        response = await client.post("/webhook/order", json=order_event_body(),
                                     headers={"Authorization": bearer(token)})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].endswith('error="invalid_token"')
    response = await client.post("/webhook/order", json=order_event_body())
    assert response.status == 401
    assert "error=" not in response.headers["WWW-Authenticate"]
    text = metrics.render().decode()
    assert 'tcbridge_webhook_oauth2_rejections_total{reason="expired"} 1.0' in text
    assert 'tcbridge_webhook_oauth2_rejections_total{reason="missing"} 1.0' in text
    assert "tcbridge_webhook_auth_failures_total 2.0" in text
    counts = await store.counts()
    assert counts["events"] == 0 and counts["rejected"] == 0
    (failed,) = [line for line in logs if line["event"] == "webhook.auth_failed"]
    assert failed["reason"] == "expired"
    assert token not in repr(logs) and token.split(".")[1] not in repr(logs)


async def test_webhook_answers_503_with_retry_after_when_keys_are_unavailable(
    hook: tuple[TestClient[Any, Any], FakeProvider, Metrics], store: Store,
) -> None:
    client, provider, metrics = hook
    provider.down = True
    headers = {"Authorization": bearer(RSA_KEY.sign(claims()))}
    response = await client.post("/webhook/order", json=order_event_body(), headers=headers)
    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    assert "provider down" not in (await response.json())["message"]  # details: the log only
    assert "tcbridge_webhook_oauth2_unavailable_total 1.0" in metrics.render().decode()
    assert (await store.counts())["events"] == 0


def test_build_app_needs_a_verifier_for_oauth2(store: Store) -> None:
    with pytest.raises(ValueError, match="TokenVerifier"):
        build_app(SETTINGS, store, asyncio.Event(), asyncio.Event())
