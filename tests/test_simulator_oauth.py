"""The simulator as an OAuth 2.0 identity provider, and its webhook sender as an OAuth client."""

from __future__ import annotations

import argparse
import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest

from tcbridge.simulator import Simulator, add_arguments
from tcbridge.simulator.cli import build_simulator
from tcbridge.simulator.oauth import SigningKey, TokenClient, TokenError
from tests.conftest import Receiver, until

SCOPE = "https://your-webhook-endpoint/.default"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    s = Simulator()
    s.oauth.clients["tc"] = "tc-secret"
    await s.start()
    yield s
    await s.stop()


async def call(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, **kwargs) as response:
            return response.status, await response.json(content_type=None)


def token_form(**overrides: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "client_id": "tc", "client_secret": "tc-secret",
            "scope": SCOPE} | overrides


async def keys_of(sim: Simulator) -> dict[str, Any]:
    status, discovery = await call("GET", f"{sim.oauth.issuer}/.well-known/openid-configuration")
    assert status == 200 and discovery["issuer"] == sim.oauth.issuer
    assert discovery["token_endpoint"] == sim.oauth.token_url
    status, jwks = await call("GET", discovery["jwks_uri"])
    assert status == 200
    return {key["kid"]: key for key in jwks["keys"]}


async def test_client_credentials_token_is_signed_by_a_listed_key(sim: Simulator) -> None:
    status, answer = await call("POST", sim.oauth.token_url, data=token_form())
    assert status == 200 and answer["token_type"] == "Bearer" and answer["expires_in"] == 3600
    token = answer["access_token"]
    keys = await keys_of(sim)
    kid = jwt.get_unverified_header(token)["kid"]
    assert set(keys[kid]) >= {"kty", "use", "kid", "n", "e"} and "alg" not in keys[kid]
    claims = jwt.decode(token, jwt.PyJWK(keys[kid]), algorithms=["RS256"],
                        audience="https://your-webhook-endpoint", issuer=sim.oauth.issuer)
    assert claims["azp"] == claims["appid"] == "tc" and claims["ver"] == "2.0"
    assert claims["exp"] - claims["iat"] == 3600


async def test_client_secret_basic_is_accepted(sim: Simulator) -> None:
    basic = "Basic " + base64.b64encode(b"tc:tc-secret").decode()
    form = {"grant_type": "client_credentials", "scope": SCOPE}
    status, _ = await call("POST", sim.oauth.token_url, data=form,
                           headers={"Authorization": basic})
    assert status == 200


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        (token_form(client_secret="wrong"), 401, "invalid_client"),
        (token_form(client_id="nobody"), 401, "invalid_client"),
        (token_form(grant_type="password"), 400, "unsupported_grant_type"),
        (token_form(scope="https://your-webhook-endpoint"), 400, "invalid_scope"),
        (token_form(scope="/.default"), 400, "invalid_scope"),
    ],
)
async def test_token_endpoint_refusals(
    sim: Simulator, form: dict[str, str], status: int, error: str
) -> None:
    answer = await call("POST", sim.oauth.token_url, data=form)
    assert (answer[0], answer[1]["error"]) == (status, error)


async def test_rotation_keeps_or_withdraws_the_old_key(sim: Simulator) -> None:
    first = sim.oauth.keys[0].kid
    base = sim.oauth.base_url
    status, kept = await call("POST", f"{base}/_sim/oauth/rotate", json={"alg": "ES256"})
    assert status == 200 and kept["kids"] == [kept["kid"], first]
    assert (await keys_of(sim))[kept["kid"]]["crv"] == "P-256"
    token = sim.oauth.mint("aud-1")
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": kept["kid"], "typ": "JWT"}
    status, dropped = await call("POST", f"{base}/_sim/oauth/rotate", json={"keepOld": False})
    assert dropped["kids"] == [dropped["kid"]]
    assert list(await keys_of(sim)) == [dropped["kid"]]
    status, _ = await call("POST", f"{base}/_sim/oauth/rotate", json={"alg": "HS256"})
    assert status == 400


async def test_outages(sim: Simulator) -> None:
    base = sim.oauth.base_url
    discovery = f"{sim.oauth.issuer}/.well-known/openid-configuration"
    status, state = await call("POST", f"{base}/_sim/oauth", json={"keysDown": True})
    assert status == 200 and state["keysDown"] is True
    assert (await call("GET", discovery))[0] == 503
    assert (await call("POST", sim.oauth.token_url, data=token_form()))[0] == 200
    await call("POST", f"{base}/_sim/oauth", json={"keysDown": False, "down": True})
    assert (await call("POST", sim.oauth.token_url, data=token_form()))[0] == 503
    assert (await call("GET", discovery))[0] == 503
    assert (await call("POST", f"{base}/_sim/oauth", json={"down": "yes"}))[0] == 400
    await call("POST", f"{base}/_sim/oauth", json={"down": False})
    status, state = await call("GET", f"{base}/_sim/oauth")
    assert state["down"] is False and (await call("GET", discovery))[0] == 200


async def test_mint_makes_any_token(sim: Simulator) -> None:
    url = f"{sim.oauth.base_url}/_sim/oauth/mint"
    status, answer = await call("POST", url, json={
        "audience": ["a", "b"], "clientId": "x", "ttlS": -60, "notBeforeS": 30,
        "claims": {"roles": ["Webhook.Send"]}, "issuer": "https://elsewhere"})
    assert status == 200
    claims = jwt.decode(answer["access_token"], options={"verify_signature": False})
    assert claims["aud"] == ["a", "b"] and claims["appid"] == "x"
    assert claims["exp"] < claims["iat"] < claims["nbf"] and claims["iss"] == "https://elsewhere"
    for bad in ({}, {"audience": 1}, {"audience": "a", "ttlS": "long"}, {"audience": "a",
                                                                         "claims": []}):
        assert (await call("POST", url, json=bad))[0] == 400
    assert (await call("POST", url, data=b"[1]"))[0] == 400


def test_signing_key_rejects_other_algorithms() -> None:
    with pytest.raises(ValueError):
        SigningKey.generate("HS256")


# --- the sender as an OAuth client ---------------------------------------------------------


async def test_sender_authenticates_with_a_cached_access_token(receiver: Receiver) -> None:
    sim = Simulator(webhook_url=receiver.url, webhook_auth=("oauth2", f"tc:s3:{SCOPE}"))
    await sim.start()
    try:
        sim.add_orders(3)
        await sim.flush_webhooks()
    finally:
        await sim.stop()
    tokens = {call["auth"] for call in receiver.calls}
    assert len(receiver.calls) == 3 and len(tokens) == 1
    (header,) = tokens
    claims = jwt.decode(header.removeprefix("Bearer "), options={"verify_signature": False})
    assert claims["aud"] == "https://your-webhook-endpoint" and claims["azp"] == "tc"
    assert sim.oauth.token_requests == 1


async def test_sender_retries_while_the_token_endpoint_is_down(receiver: Receiver) -> None:
    sim = Simulator(webhook_url=receiver.url, webhook_auth=("oauth2", f"tc:s3:{SCOPE}"),
                    webhook_backoff_initial_s=0.01, webhook_backoff_max_s=0.05)
    sim.oauth.down = True
    await sim.start()
    try:
        sim.add_orders(1)
        await until(lambda: len(sim.webhook_results) >= 2)
        assert {r["status"] for r in sim.webhook_results} == {None} and not receiver.calls
        sim.oauth.down = False
        await sim.flush_webhooks()
    finally:
        await sim.stop()
    assert sim.webhook_results[-1]["status"] == 200 and len(receiver.calls) == 1


async def test_token_client_renews_before_expiry(sim: Simulator) -> None:
    now = [1000.0]
    sim.oauth.token_ttl_s = 100
    client = TokenClient.parse(f"tc:tc-secret:{SCOPE}", lambda: sim.oauth.token_url,
                               lambda: now[0])
    async with aiohttp.ClientSession() as session:
        first = await client.bearer(session)
        now[0] += 80
        assert await client.bearer(session) == first
        now[0] += 11  # within the last tenth of its lifetime
        assert await client.bearer(session) != first
        assert sim.oauth.token_requests == 2
        wrong = TokenClient.parse(f"tc:nope:{SCOPE}", lambda: sim.oauth.token_url)
        with pytest.raises(TokenError, match="401"):
            await wrong.bearer(session)
        dead = TokenClient.parse(f"tc:nope:{SCOPE}", lambda: "http://127.0.0.1:9/token")
        with pytest.raises(TokenError, match="unreachable"):
            await dead.bearer(session)
    with pytest.raises(ValueError):
        TokenClient.parse("tc:only-secret", lambda: "")


# --- command line ---------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_oauth2_options() -> None:
    args = parse(["--webhook-url", "http://127.0.0.1:9/hook", "--webhook-auth",
                  f"oauth2:tc:s3:{SCOPE}", "--oauth-token-ttl-s", "120"])
    assert args.webhook_auth == ("oauth2", f"tc:s3:{SCOPE}")
    sim = build_simulator(args)
    assert sim.oauth.token_ttl_s == 120 and sim.oauth.clients == {"tc": "s3"}
    for bad in ("oauth2:tc", "oauth2:tc:s3", "oauth2::s3:scope", "oauth2:tc::scope"):
        with pytest.raises(SystemExit):
            parse(["--webhook-auth", bad])
