"""End to end: the real daemon with auth = "oauth2", the simulator as the identity provider
and as Tradecloud's webhook sender (client credentials), over loopback."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tcbridge.simulator import Simulator
from tcbridge.simulator.oauth import issuer_for
from tests.conftest import Daemon, order_event_body, until
from tests.support import free_port

AUDIENCE = "api://tcbridge"
CLIENT_ID, CLIENT_SECRET = "tradecloud-webhooks", "tc-client-secret-1"


@dataclass
class Setup:
    sim: Simulator
    daemon: Daemon
    sim_url: str

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.daemon.config_path.parent / "tcbridge.db", timeout=5) as conn:
            return conn.execute(sql).fetchall()

    async def post(self, token: str, entity_id: str) -> aiohttp.ClientResponse:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{self.daemon.url}/webhook/order",
                                    json=order_event_body(entity_id),
                                    headers={"Authorization": f"Bearer {token}"}) as response:
                await response.read()
                return response

    async def control(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{self.sim_url}/_sim/oauth{path}", json=body) as response:
                assert response.status == 200
                answer: dict[str, Any] = await response.json()
                return answer


@pytest.fixture
async def setup(daemon_factory: Callable[..., Daemon]) -> AsyncIterator[Setup]:
    sim_port = free_port()  # the daemon's config names the issuer before the simulator starts
    sim_url = f"http://127.0.0.1:{sim_port}"
    daemon = daemon_factory({"webhook": {
        "auth": "oauth2", "oauth2_issuer": issuer_for(sim_url), "oauth2_audience": AUDIENCE,
        "oauth2_required_claims": {"appid": CLIENT_ID}}})
    sim = Simulator(webhook_url=f"{daemon.url}/webhook",
                    webhook_auth=("oauth2", f"{CLIENT_ID}:{CLIENT_SECRET}:{AUDIENCE}/.default"),
                    webhook_backoff_initial_s=0.05, webhook_backoff_max_s=0.3)
    await sim.start(port=sim_port)
    yield Setup(sim, daemon, sim_url)
    await sim.stop()


async def metrics_text(daemon: Daemon) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{daemon.admin_url}/metrics") as response:
            return await response.text()


async def test_tokens_checked_end_to_end_and_key_rotation_without_restart(setup: Setup) -> None:
    sim, daemon = setup.sim, setup.daemon
    await daemon.start()
    sim.add_orders(2)
    await sim.flush_webhooks(timeout_s=20)
    assert [r["status"] for r in sim.webhook_results] == [200, 200]
    assert sim.oauth.token_requests == 1  # the sender's token is cached

    expired = (await setup.control("/mint", {"audience": AUDIENCE, "clientId": CLIENT_ID,
                                             "ttlS": -300}))["access_token"]
    foreign = sim.oauth.mint("api://another-app", CLIENT_ID)
    other_client = sim.oauth.mint(AUDIENCE, "someone-else")
    for token, name in ((expired, "o-expired"), (foreign, "o-foreign"),
                        (other_client, "o-other")):
        response = await setup.post(token, name)
        assert response.status == 401
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]

    old_key_token = sim.oauth.mint(AUDIENCE, CLIENT_ID)
    rotated = await setup.control("/rotate", {"keepOld": False})
    assert rotated["kids"] == [rotated["kid"]]
    assert (await setup.post(sim.oauth.mint(AUDIENCE, CLIENT_ID), "o-rotated")).status == 200
    assert (await setup.post(old_key_token, "o-old-key")).status == 401  # withdrawn key

    # A second new key within the minute: the set was just refreshed, so "retry later".
    await setup.control("/rotate", {"keepOld": True, "alg": "ES256"})
    response = await setup.post(sim.oauth.mint(AUDIENCE, CLIENT_ID), "o-too-soon")
    assert response.status == 503 and int(response.headers["Retry-After"]) >= 1

    names = {row[0] for row in setup.rows("SELECT entity_id FROM events")}
    assert len(names) == 3 and "o-rotated" in names
    assert not names & {"o-expired", "o-foreign", "o-other", "o-old-key", "o-too-soon"}
    assert setup.rows("SELECT count(*) FROM rejected") == [(0,)]
    text = await metrics_text(daemon)
    for reason in ("expired", "audience", "claim", "unknown_key"):
        assert f'tcbridge_webhook_oauth2_rejections_total{{reason="{reason}"}} 1.0' in text
    assert "tcbridge_webhook_oauth2_unavailable_total 1.0" in text
    reasons = {line["reason"] for line in daemon.logs() if line["event"] == "webhook.auth_failed"}
    assert reasons == {"expired", "audience", "claim", "unknown_key"}
    log_text = daemon.log_path.read_text()
    assert expired.split(".")[1] not in log_text and old_key_token.split(".")[2] not in log_text
    assert await daemon.stop() == 0


async def test_provider_down_at_start_answers_503_until_it_is_back(setup: Setup) -> None:
    sim, daemon = setup.sim, setup.daemon
    sim.oauth.keys_down = True  # discovery and keys unreachable; the token endpoint works
    await daemon.start()
    await daemon.wait_for_log("oauth2.keys_unavailable")
    sim.add_orders(1)
    await until(lambda: any(r["status"] == 503 for r in sim.webhook_results))
    assert setup.rows("SELECT count(*) FROM events") == [(0,)]
    sim.oauth.keys_down = False
    await sim.flush_webhooks(timeout_s=30)  # Tradecloud's retries
    statuses = [r["status"] for r in sim.webhook_results]
    assert statuses[-1] == 200 and set(statuses[:-1]) == {503}
    assert setup.rows("SELECT count(*) FROM events") == [(1,)]

    # The provider goes down entirely: the cached key set keeps the webhook working.
    sim.oauth.down = True
    sim.add_orders(1)  # the sender's cached token is still valid
    await sim.flush_webhooks(timeout_s=20)
    assert sim.webhook_results[-1]["status"] == 200
    assert (await setup.post(sim.oauth.mint(AUDIENCE, CLIENT_ID), "o-during-outage")).status == 200
    assert setup.rows("SELECT count(*) FROM events") == [(3,)]
    assert "tcbridge_oauth2_key_fetches_total{outcome=\"failed\"}" in await metrics_text(daemon)
    assert await daemon.stop() == 0
