"""The OpenAPI document of tcbridge's own endpoints: valid, installed, and what the webhook
listener really answers (schemathesis against a real server on a loopback port)."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tcbridge.config import StoreSettings, WebhookSettings
from tcbridge.store import Store
from tcbridge.webhook import build_app
from tests.conftest import order_event_body

DOCUMENT = resources.files("tcbridge").joinpath("openapi.json")
SPEC: dict[str, Any] = json.loads(DOCUMENT.read_text(encoding="utf-8"))
SCHEMA = schemathesis.openapi.from_dict(SPEC)
TOKEN = "hook-token-1-for-tests-0123456789ab"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
WEBHOOK_OPERATIONS = [
    ("POST", "/webhook/order"), ("POST", "/webhook/shipment"),
    ("GET", "/webhook/order"), ("GET", "/webhook/order/{orderId}"),
    ("GET", "/webhook/shipment"), ("GET", "/webhook/shipment/{shipmentId}"),
]
BASE = settings(
    deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.filter_too_much],
)


@dataclass
class Listener:
    """A webhook listener on a loopback port, its store and a requests session for it."""

    base_url: str
    store: Store
    session: requests.Session

    def call(
        self, case: schemathesis.Case[Any], **headers: str
    ) -> Awaitable[schemathesis.Response]:
        """Send a case from a worker thread (requests blocks; the server runs on this loop)."""
        return asyncio.to_thread(case.call, base_url=self.base_url, session=self.session,
                                 headers=headers)


Factory = Callable[..., Awaitable[Listener]]


@pytest.fixture
async def listener_factory(tmp_path: Path) -> AsyncIterator[Factory]:
    started: list[tuple[TestServer, Store, requests.Session]] = []

    async def make(**overrides: Any) -> Listener:
        store = Store(tmp_path / f"openapi-{len(started)}.db", StoreSettings(busy_timeout_s=0.05))
        await store.open()
        webhook = WebhookSettings(**({"auth": "bearer", "bearer_token": TOKEN} | overrides))
        server = TestServer(build_app(webhook, store, asyncio.Event(), asyncio.Event(),
                                      retry_after_s=3), host="127.0.0.1")
        await server.start_server()
        session = requests.Session()
        session.trust_env = False  # never send loopback traffic through a configured proxy
        started.append((server, store, session))
        return Listener(str(server.make_url("")).rstrip("/"), store, session)

    yield make
    for server, store, session in started:
        session.close()
        await server.close()
        await store.close()


@pytest.fixture
async def listener(listener_factory: Factory) -> Listener:
    return await listener_factory()


@pytest.fixture
def locked(listener: Listener) -> Iterator[None]:
    """Hold an exclusive lock on the store's file, so no commit can succeed."""
    blocker = sqlite3.connect(listener.store.path, isolation_level=None, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    yield
    blocker.execute("ROLLBACK")
    blocker.close()


def operation(method: str, path: str) -> Any:
    return SCHEMA[path][method]


# -- the document itself -------------------------------------------------------------------


def test_document_is_valid_openapi_3_0() -> None:
    validate(SPEC)
    assert SPEC["openapi"] == "3.0.3"
    assert set(SPEC["components"]["securitySchemes"]) == {"bearerAuth", "basicAuth",
                                                          "oauth2Bearer"}


def test_document_is_installed_as_package_data() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "openapi.json" in pyproject["tool"]["setuptools"]["package-data"]["tcbridge"]
    assert DOCUMENT.is_file()


def _shape(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


async def test_document_lists_exactly_the_webhook_routes(listener: Listener) -> None:
    app = build_app(WebhookSettings(auth="none", allow_unauthenticated=True), listener.store,
                    asyncio.Event(), asyncio.Event())
    routes = {(r.method, _shape(r.resource.canonical)) for r in app.router.routes()
              if r.resource is not None}
    documented = {(method.upper(), _shape(path)) for path, item in SPEC["paths"].items()
                  for method in item if method != "servers" and path.startswith("/webhook/")}
    assert documented == routes
    admin = {path for path, item in SPEC["paths"].items() if item["get"]["tags"] == ["admin"]}
    assert admin == {"/healthz", "/readyz", "/metrics"}


@pytest.mark.parametrize(("path", "schema"), [("/webhook/order", "OrderWebhook"),
                                              ("/webhook/shipment", "ShipmentWebhook")])
async def test_documented_examples_are_stored(listener: Listener, path: str, schema: str) -> None:
    example = SPEC["components"]["schemas"][schema]["example"]
    case = operation("POST", path).Case(body=example, media_type="application/json")
    response = await listener.call(case, **AUTH)
    case.validate_response(response, checks=CHECKS)
    assert response.status_code == 200 and response.json()["status"] == "stored"


# -- schemathesis: generated requests, every answer checked against the document ------------


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["positive", "negative"])
@pytest.mark.parametrize(("method", "path"), WEBHOOK_OPERATIONS,
                         ids=[f"{m} {p}" for m, p in WEBHOOK_OPERATIONS])
@settings(BASE, max_examples=15)
@given(data=st.data())
async def test_webhook_answers_conform(
    listener: Listener, method: str, path: str, mode: GenerationMode, data: st.DataObject
) -> None:
    case = data.draw(operation(method, path).as_strategy(generation_mode=mode))
    response = await listener.call(case, **AUTH)
    event(f"status {response.status_code}")
    case.validate_response(response, checks=CHECKS)
    assert response.status_code in (200, 202, 400)


@settings(BASE, max_examples=5)
@given(data=st.data())
@pytest.mark.parametrize(("method", "path"), WEBHOOK_OPERATIONS,
                         ids=[f"{m} {p}" for m, p in WEBHOOK_OPERATIONS])
async def test_unauthenticated_answers_conform(
    listener: Listener, method: str, path: str, data: st.DataObject
) -> None:
    case = data.draw(operation(method, path).as_strategy())
    case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    response = await listener.call(case, Authorization="Bearer not-the-token")
    case.validate_response(response, checks=CHECKS)
    assert response.status_code == 401


# -- the error answers that generated requests cannot provoke ---------------------------------


async def test_locked_store_503_conforms(listener: Listener, locked: None) -> None:
    case = operation("POST", "/webhook/order").Case(body=order_event_body(),
                                                    media_type="application/json")
    response = await listener.call(case, **AUTH)
    assert response.status_code == 503 and response.headers["retry-after"] == ["3"]
    case.validate_response(response, checks=[c for c in CHECKS if c is not not_a_server_error])


async def test_refused_address_403_conforms(listener_factory: Factory) -> None:
    listener = await listener_factory(allowed_ips=["192.0.2.1"])
    case = operation("GET", "/webhook/order/{orderId}").Case(path_parameters={"orderId": "o-1"})
    response = await listener.call(case, **AUTH)
    case.validate_response(response, checks=CHECKS)
    assert response.status_code == 403


async def test_too_large_413_conforms(listener_factory: Factory) -> None:
    listener = await listener_factory(max_body_bytes=1024)
    body = order_event_body() | {"padding": "x" * 2048}
    case = operation("POST", "/webhook/shipment").Case(body=body, media_type="application/json")
    response = await listener.call(case, **AUTH)
    case.validate_response(response, checks=CHECKS)
    assert response.status_code == 413


async def test_basic_auth_401_conforms(listener_factory: Factory) -> None:
    listener = await listener_factory(auth="basic", bearer_token=None, basic_username="tc",
                                      basic_password="pw")
    case = operation("POST", "/webhook/order").Case(body=order_event_body(),
                                                    media_type="application/json")
    response = await listener.call(case)
    case.validate_response(response, checks=CHECKS)
    assert response.status_code == 401
    assert response.headers["www-authenticate"][0].startswith("Basic")
