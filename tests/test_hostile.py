"""Hostile input to the webhook listener (issue 11), in process over real HTTP: nesting,
ids, headers, forwarded addresses."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from tcbridge import cli, webhook
from tcbridge.config import (
    FileHandlerSettings,
    PythonHandlerSettings,
    WebhookSettings,
    load_settings,
    secret_values,
)
from tcbridge.envelope import MAX_ENVELOPE_DEPTH
from tcbridge.errors import ApiPermanentError, ConfigError
from tcbridge.handlers import (
    MAX_FILENAME_BYTES,
    FileHandler,
    _Tail,
    build_handler,
    render_filename,
)
from tcbridge.store import Store
from tcbridge.tradecloud import object_path
from tcbridge.webhook import BUDGET_KEY, IN_FLIGHT_KEY, build_app, drain
from tests.conftest import order_event_body, until
from tests.support import write_config

TOKEN_VALUE = "hook-token-1-for-tests-0123456789ab"
TOKEN = {"Authorization": f"Bearer {TOKEN_VALUE}"}
Client = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def client_factory(store: Store) -> AsyncIterator[Client]:
    clients: list[TestClient[Any, Any]] = []

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        settings = WebhookSettings(**({"auth": "bearer", "bearer_token": TOKEN_VALUE}
                                      | overrides))
        app = build_app(settings, store, asyncio.Event(), asyncio.Event(), retry_after_s=7)
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def rejected_reasons(store: Store) -> list[str]:
    with sqlite3.connect(store.path) as conn:
        return [row[0] for row in conn.execute("SELECT reason FROM rejected ORDER BY id")]


def nested_body(depth: int) -> bytes:
    """An order event whose ``orderEvent`` object is ``depth`` levels deep in all."""
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    event = orjson.dumps(order_event_body("deep-1")["orderEvent"])[:-1]
    return b'{"eventName":"X","orderEvent":' + event + b',"x":' + inner.encode() + b"}}"


@pytest.mark.parametrize("depth", [MAX_ENVELOPE_DEPTH, 990, 1020])
async def test_json_too_deep_to_store_is_400_and_kept(
    client_factory: Client, store: Store, depth: int
) -> None:
    # 990 and 1020 parse (orjson reads 1024 levels) but could never be stored: that was a
    # 503 for ever, which Tradecloud retries for ever.
    client = await client_factory()
    response = await client.post("/webhook/order", data=nested_body(depth), headers=TOKEN)
    assert response.status == 400, await response.text()
    assert "nested deeper" in (await response.json())["message"]
    assert len(rejected_reasons(store)) == 1
    assert (await store.counts())["events"] == 0


async def test_json_as_deep_as_can_be_stored_is_stored(
    client_factory: Client, store: Store
) -> None:
    client = await client_factory()
    response = await client.post(
        "/webhook/order", data=nested_body(MAX_ENVELOPE_DEPTH - 1), headers=TOKEN
    )
    assert response.status == 200, await response.text()
    assert (await store.counts())["events"] == 1


@pytest.mark.parametrize("bad_id", [".", "..", "o\x1b[31m1", "o\n1", "o\x7f", "o\x9b1"])
async def test_ids_that_are_dots_or_hold_control_characters_are_refused(
    client_factory: Client, store: Store, bad_id: str
) -> None:
    client = await client_factory()
    posted = await client.post("/webhook/order", json=order_event_body(bad_id), headers=TOKEN)
    assert posted.status == 400
    fetched = await client.get("/webhook/order", params={"orderId": bad_id}, headers=TOKEN)
    assert fetched.status == 400
    assert len(rejected_reasons(store)) == 2
    assert (await store.counts())["events"] == 0


async def test_event_name_with_escape_sequence_is_refused(
    client_factory: Client, store: Store
) -> None:
    client = await client_factory()
    body = order_event_body("o-esc", event_name="Confirmed\x1b]0;owned\x07")
    assert (await client.post("/webhook/order", json=body, headers=TOKEN)).status == 400


def test_client_never_sends_a_dot_segment_and_quotes_every_reserved_character() -> None:
    # Why: URL normalisation turns /v2/order/.. into /v2/ (where the bearer token would go).
    assert URL("https://api.example" + "/v2/order/..").path == "/v2/"
    for dots in (".", ".."):
        with pytest.raises(ApiPermanentError):
            object_path("order", dots)
    assert object_path("order", "a/b?c#d %") == "/v2/order/a%2Fb%3Fc%23d%20%25"
    assert object_path("shipment", "...") == "/v2/shipment/..."


async def test_non_utf8_authorization_is_401_not_503(client_factory: Client) -> None:
    client = await client_factory()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"POST /webhook/order HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"401", status_line


async def test_spoofed_forwarded_for_before_the_proxy_header_is_refused(
    client_factory: Client, store: Store
) -> None:
    # The test client connects from 127.0.0.1, our "proxy". A client that sends its own
    # X-Forwarded-For naming Tradecloud's address, with the proxy's header appended after
    # it, must be judged by the proxy's hop.
    client = await client_factory(allowed_ips=["35.204.224.107"], trusted_proxies=["127.0.0.1"])
    body = order_event_body("o-xff")

    def headers(*hops: str) -> list[tuple[str, str]]:
        return [*TOKEN.items(), *(("X-Forwarded-For", hop) for hop in hops)]

    spoofed = await client.post("/webhook/order", json=body, headers=headers(
        "35.204.224.107", "6.6.6.6"))
    assert spoofed.status == 403
    one_header = await client.post("/webhook/order", json=body, headers=headers(
        "35.204.224.107, 6.6.6.6"))
    assert one_header.status == 403
    genuine = await client.post("/webhook/order", json=body, headers=headers(
        "6.6.6.6, 35.204.224.107"))
    assert genuine.status == 200



def test_every_secret_of_the_settings_is_known_for_redaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TCBRIDGE_TRADECLOUD__PASSWORD", "pw-from-env")
    (tmp_path / "token").write_text("x" * 40)
    path = write_config(tmp_path / "t.toml", {
        "mode": "webhook",
        "webhook": {"auth": "bearer", "bearer_token_file": str(tmp_path / "token")},
        "handlers": [{"name": "h", "type": "http", "url": "http://erp/", "auth": "basic",
                      "basic_username": "u", "basic_password": "erp-pw"}],
    })
    assert secret_values(load_settings(path)) == ("x" * 40, "pw-from-env", "erp-pw")


def test_output_tail_redacts_a_secret_cut_by_its_start() -> None:
    secret = "s-" + "9" * 30
    tail = _Tail(limit=16, secrets=[secret])
    tail.feed(b"....." + secret.encode())
    tail.feed(b"tail-end")  # the secret now starts before the last 16 bytes
    assert tail.text() == ".....***tail-end"
    assert "9" not in tail.text()


def test_output_tail_shows_no_piece_of_a_secret_cut_by_the_kept_bytes() -> None:
    # A program that prints its connection URL on every retry: each redaction shortens the
    # text, so the shown tail reaches back to the first kept bytes, where a secret was cut.
    secret = "Zq7-" + "k" * 36
    tail = _Tail(limit=256, secrets=[secret])
    for i in range(50):
        tail.feed(f"try {i}: https://erp:{secret}@erp.internal/\n".encode())
    for offset in range(1, 9):  # cut the feed at every place within the secret once
        tail.feed(b"x" * offset)
        shown = tail.text()
        assert "k" * 4 not in shown and "Zq7" not in shown, shown
        assert shown.endswith("x" * offset) and "try 49: https://erp:***@" in shown


# --- names from payloads; crash leftovers --------------------------------------------------


def envelope_with(entity_id: str, event_id: str = "e" * 32) -> dict[str, Any]:
    return {"id": event_id, "kind": "order_documents", "entityId": entity_id,
            "lastUpdatedAt": "2024-05-01T10:00:00.000Z", "eventName": "OrderDocumentsAdded",
            "source": "webhook"}


async def test_file_names_from_200_character_ids_fit_the_file_system(tmp_path: Path) -> None:
    # The README's template with the longest id the ingest accepts: 253 characters, too long
    # for the temp file (NAME_MAX 255), so the delivery used to fail for ever.
    settings = FileHandlerSettings(name="f", type="file", directory=tmp_path,
                                   filename="{kind}-{entityId}-{id}.json")
    handler = FileHandler(settings)
    first, second = "P" * 200, "P" * 199 + "Q"
    for entity_id in (first, second):
        envelope = envelope_with(entity_id)
        outcome = await handler.deliver(envelope, orjson.dumps(envelope), 1)
        assert outcome.status == "done", outcome.error
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2  # the digest tells ids with the same prefix apart
    assert all(len(n.encode()) <= MAX_FILENAME_BYTES and n.endswith("e" * 32 + ".json")
               for n in names)
    assert render_filename(settings.filename, envelope_with(first)) in names  # stable
    short = render_filename(settings.filename, envelope_with("ORD-1"))
    assert short == f"order_documents-ORD-1-{'e' * 32}.json"  # short names are unchanged


def test_a_template_that_cannot_fit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="over 237 bytes"):
        FileHandler(FileHandlerSettings(name="f", type="file", directory=tmp_path,
                                        filename="x" * 230 + "-{id}.json"))


def test_stale_temp_files_of_ours_are_removed_at_start(tmp_path: Path) -> None:
    ours = [tmp_path / ".o1.json.0123456789ab.tmp", tmp_path / ".order-x.json.abcdef012345.tmp"]
    theirs = [tmp_path / "o1.json", tmp_path / ".importer.tmp", tmp_path / "x.0123456789ab.tmp",
              tmp_path / ".o2.json.0123456789ab.tmp.keep"]
    for path in ours + theirs:
        path.write_text("{}")
    FileHandler(FileHandlerSettings(name="f", type="file", directory=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in theirs)
    FileHandler(FileHandlerSettings(name="g", type="file", directory=tmp_path / "missing"))


def test_table_output_escapes_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"id": "e1", "error": "HTTP 500: \x1b]0;owned\x07\x1b[2J\r\nfake line\x9b"}]
    cli._table(rows, ["id", "error"])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\x9b" not in out
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x0d\\x0afake line\\x9b" in out
    assert out.count("\n") == 2


# --- memory: bytes being parsed at once ------------------------------------------------------


async def test_bodies_past_the_parse_budget_get_503_and_small_ones_are_still_answered(
    client_factory: Client, store: Store
) -> None:
    client = await client_factory(max_body_bytes=100_000, max_parse_bytes=150_000)
    budget = client.server.app[BUDGET_KEY]
    # A big body on its way holds 100,000 bytes of the budget while it arrives.
    _, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"POST /webhook/order HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TOKEN_VALUE}\r\n".encode()
                 + b"Content-Length: 100000\r\n\r\n{")
    await writer.drain()
    await until(lambda: budget.used_bytes == 100_000, timeout_s=10)

    big = order_event_body("o-big")
    big["orderEvent"]["padding"] = "x" * 60_000
    refused = await client.post("/webhook/order", json=big, headers=TOKEN)
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "7"
    small = await client.post("/webhook/order", json=order_event_body("o-small"), headers=TOKEN)
    assert small.status == 200

    writer.close()
    await until(lambda: budget.used_bytes == 0, timeout_s=10)
    retried = await client.post("/webhook/order", json=big, headers=TOKEN)
    assert retried.status == 200
    assert (await store.counts())["events"] == 2


async def test_a_large_body_is_parsed_off_the_event_loop(
    client_factory: Client, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    real = webhook.decode_body

    def decode(body: bytes) -> object:
        threads.append(threading.current_thread().name)
        return real(body)

    monkeypatch.setattr(webhook, "decode_body", decode)
    client = await client_factory()
    body = order_event_body("o-large")
    body["orderEvent"]["lines"] = [{"id": f"l{i}", "note": "n" * 100} for i in range(5000)]
    assert (await client.post("/webhook/order", json=body, headers=TOKEN)).status == 200
    assert (await client.post("/webhook/order", json=order_event_body("o-tiny"),
                              headers=TOKEN)).status == 200
    assert threads[0] != threading.main_thread().name
    assert threads[1] == threading.main_thread().name


async def test_python_handler_errors_are_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tcb_leaky_target.py").write_text(
        "def fail(envelope):\n"
        "    raise RuntimeError('cannot connect to postgres://erp:erp-db-pw-42@db/erp')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = PythonHandlerSettings(name="p", type="python", callable="tcb_leaky_target:fail")
    async with aiohttp.ClientSession() as session:
        handler = build_handler(settings, session, secrets=["erp-db-pw-42"])
        envelope = envelope_with("o-1")
        outcome = await handler.deliver(envelope, orjson.dumps(envelope), 1)
    assert outcome.status == "retry"
    assert outcome.error == "RuntimeError: cannot connect to postgres://erp:***@db/erp"


async def test_a_stop_cuts_off_a_stalled_body_once_the_drain_time_is_up(store: Store) -> None:
    # drain() waits shutdown_timeout_s for requests in flight; aiohttp's own cleanup must
    # not then wait that long again (twice, per request): under systemd the stop ran past
    # TimeoutStopSec and ended in SIGKILL.
    settings = WebhookSettings(auth="bearer", bearer_token=TOKEN_VALUE, body_timeout_s=3600)
    app = build_app(settings, store, asyncio.Event(), asyncio.Event(), retry_after_s=7)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=3600)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    _, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
    writer.write(b"POST /webhook/order HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TOKEN_VALUE}\r\n".encode()
                 + b"Content-Length: 1000\r\n\r\n{")
    await until(lambda: app[IN_FLIGHT_KEY].count == 1)
    try:
        assert await asyncio.wait_for(drain(runner, app, timeout_s=0.1), timeout=60) == 1
    finally:
        writer.close()
