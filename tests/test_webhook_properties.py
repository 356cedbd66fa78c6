"""Property-based tests of the webhook listener: bad input over real HTTP, a real store.

Whatever arrives (random bytes, random JSON, near-valid events, odd headers, paths and
queries), the listener answers without a 5xx, keeps every 400 in the ``rejected`` table
byte for byte, stores nothing that the envelope parser would refuse, and stores every
valid event exactly once. The envelope parser is the oracle for "valid".
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import string
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from yarl import URL

from tcbridge.config import StoreSettings, WebhookSettings
from tcbridge.envelope import (
    MAX_ID_LENGTH,
    Candidate,
    parse_order_webhook,
    parse_shipment_webhook,
    plain_text,
    sibling_version_key,
)
from tcbridge.envelope import event_id as make_event_id
from tcbridge.errors import InvalidEvent
from tcbridge.store import Store
from tcbridge.webhook import build_app, decode_body, is_xml
from tests.conftest import order_event_body, shipment_obj

TOKEN = "hook-token-1-for-tests-0123456789ab"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RETRY_AFTER_S = 7
MAX_BODY_BYTES = 64 * 1024
PARSERS: dict[str, Callable[[object], Candidate]] = {
    "order": parse_order_webhook, "shipment": parse_shipment_webhook,
}
# Re-wrapping a stored payload for the parser: any key of the kind gives the same event id.
WRAP_KEY = {"order": "orderEvent", "order_documents": "orderDocumentsEvent",
            "shipment": "shipment"}
ORDER_KEYS = ("orderEvent", "singleDeliveryOrderEvent", "simpleOrderEvent", "orderDocumentsEvent")
SHIPMENT_KEYS = ("shipment", "shipmentEvent")

# Deterministic in CI; the example counts add up to about 400 for the whole file.
BASE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)


@dataclass
class Bridge:
    """A webhook app on a loopback port with its own store, shared by a test's examples."""

    client: TestClient[Any, Any]
    store: Store
    path: Path
    seen_seq: int = 0

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path)

    async def send(
        self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request to an already percent-encoded target; (status, headers, body)."""
        url = self.client.make_url("/").join(URL(target, encoded=True))
        async with self.client.session.request(
            method, url, data=body, headers=AUTH if headers is None else headers,
            skip_auto_headers=("Content-Type",),
        ) as response:
            return response.status, dict(response.headers), await response.read()


@pytest.fixture
async def bridge(tmp_path: Path) -> AsyncIterator[Bridge]:
    store = Store(tmp_path / "props.db", StoreSettings(busy_timeout_s=0.05))
    await store.open()
    settings_ = WebhookSettings(auth="bearer", bearer_token=SecretStr(TOKEN),
                                max_body_bytes=MAX_BODY_BYTES)
    app = build_app(settings_, store, asyncio.Event(), asyncio.Event(),
                    retry_after_s=RETRY_AFTER_S)
    client = TestClient(TestServer(app))
    await client.start_server()
    yield Bridge(client=client, store=store, path=store.path)
    await client.close()
    await store.close()


# -- the oracle and the checks shared by the properties -------------------------------------


def expected(kind: str, body: bytes) -> Candidate | None:
    """What the parser makes of a body: the candidate it would store, or None for a 400."""
    if not body:
        return None
    try:
        return PARSERS[kind](decode_body(body))
    except InvalidEvent:
        return None


def check_400(bridge: Bridge, status: int, answer: bytes, *, method: str, path: str,
              body: bytes, expect: int = 400) -> None:
    """A 400 (415 for XML) has a JSON error and a new ``rejected`` row holding the raw body."""
    assert status == expect
    doc = json.loads(answer)
    error = "unsupported_media_type" if expect == 415 else "invalid_event"
    assert doc["error"] == error and isinstance(doc["message"], str) and doc["message"]
    with bridge.db() as conn:
        row = conn.execute("SELECT method, path, body, headers FROM rejected WHERE id = ?",
                           (doc["rejectedId"],)).fetchone()
    assert row is not None
    assert (row[0], row[1], bytes(row[2])) == (method, path, body)
    assert TOKEN not in row[3]


def check_new_events(bridge: Bridge) -> int:
    """Every events row added since the last check re-parses to its own id; returns how many."""
    with bridge.db() as conn:
        rows = conn.execute("SELECT seq, id, kind, entity_id, envelope FROM events WHERE seq > ?"
                            " ORDER BY seq", (bridge.seen_seq,)).fetchall()
    for seq, event_id, kind, entity_id, envelope in rows:
        env = json.loads(envelope)
        body = {"eventName": env["eventName"], WRAP_KEY[kind]: env["payload"]}
        if env["meta"] is not None:
            body["meta"] = env["meta"]
        candidate = PARSERS["shipment" if kind == "shipment" else "order"](body)
        assert event_id in own_ids(candidate)
        assert (candidate.kind, candidate.entity_id) == (kind, entity_id)
        bridge.seen_seq = seq
    return len(rows)


def own_ids(candidate: Candidate) -> tuple[str, str]:
    """The ids an event can get: its own, or its sibling id when another message with the
    same timestamp came first (an earlier example may have used the same entity)."""
    sibling = make_event_id(candidate.kind, candidate.entity_id, sibling_version_key(candidate))
    return candidate.event_id, sibling


def event_rows(bridge: Bridge, event_id: str) -> int:
    with bridge.db() as conn:
        return int(conn.execute("SELECT count(*) FROM events WHERE id = ?",
                                (event_id,)).fetchone()[0])


async def post_and_check(bridge: Bridge, kind: str, body: bytes) -> int:
    """POST a body and check the properties that hold for any body; returns the status."""
    status, _, answer = await bridge.send("POST", f"/webhook/{kind}", body)
    if len(body) > MAX_BODY_BYTES:
        assert status == 413
        assert json.loads(answer)["error"] == "too_large"
        with bridge.db() as conn:
            reason, kept = conn.execute(
                "SELECT reason, body FROM rejected ORDER BY id DESC LIMIT 1").fetchone()
        assert "max_body_bytes" in reason and kept == b""
        return status
    candidate = expected(kind, body)
    if candidate is None:
        check_400(bridge, status, answer, method="POST", path=f"/webhook/{kind}", body=body,
                  expect=415 if is_xml(body, "") else 400)
        assert check_new_events(bridge) == 0
        return status
    assert status == 200, answer
    doc = json.loads(answer)
    assert doc["status"] in ("stored", "duplicate") and doc["eventId"] in own_ids(candidate)
    assert check_new_events(bridge) == (1 if doc["status"] == "stored" else 0)
    again, _, second = await bridge.send("POST", f"/webhook/{kind}", body)
    assert again == 200
    assert json.loads(second) == {"status": "duplicate", "eventId": doc["eventId"]}
    assert event_rows(bridge, doc["eventId"]) == 1
    return status


# -- strategies -------------------------------------------------------------------------------

KINDS = st.sampled_from(["order", "shipment"])
# Hypothesis' text() leaves out lone surrogates; the tests at the end cover them.
IDS = st.one_of(
    st.text(min_size=1, max_size=40),
    st.text(alphabet=" \t\n\u00a0\u2003", max_size=5),
    st.text(min_size=MAX_ID_LENGTH - 2, max_size=MAX_ID_LENGTH + 2),
    st.text(alphabet="x", min_size=1000, max_size=5000),
    st.sampled_from(["o-1", "0f6e6d3c-1f4b-4d6e-9a53-5d0c8a1b2c3d", "\u00e9\u00e8\U0001f600"]),
)
# The whole range: with an offset, years 1 and 9999 overflow into an invalid instant (400).
DATETIMES = st.datetimes()
OFFSETS = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes)))
STAMPS = st.one_of(
    st.builds(lambda d, tz: d.replace(tzinfo=tz).isoformat(), DATETIMES, OFFSETS),
    st.builds(lambda d: d.isoformat(timespec="milliseconds") + "Z", DATETIMES),
    st.builds(lambda d: d.isoformat(), DATETIMES),  # no zone: refused
    st.builds(lambda d: f" {d.isoformat()}Z\t", DATETIMES),
    st.sampled_from(["", "Z", "2024-13-01T00:00:00Z", "2024-02-30T00:00:00Z",
                     "99999-01-01T00:00:00Z", "2024-05-01T10:00:00.1234567Z",
                     "2024-05-01 10:00:00+02:00", "2024-05-01T10:00:00z", "1714557600",
                     "2024-05-01T24:00:00Z", "2024-05-01T10:00:60Z", "\u0662\u0660\u0662\u0664"]),
    st.text(max_size=30),
    st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.lists(st.integers()),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=20))
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=25,
)
WRONG_TYPES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                        st.dictionaries(st.text(max_size=5), SCALARS, max_size=3))


DEEP = "\x00deep:"  # a placeholder for deep nesting, spliced in as JSON text by encode()


def encode(value: Any, *, ensure_ascii: bool = False) -> bytes:
    """JSON bytes, with each DEEP placeholder replaced by arrays and objects nested that deep
    (built as text: Hypothesis cannot print a deeply nested example)."""
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    for match in re.finditer(r'"\\u0000deep:(\d+)"', text):
        depth = int(match[1])
        inner = '{"k": [' * (depth // 2) + '"deep"' + "]}" * (depth // 2)
        text = text.replace(match[0], inner, 1)
    return text.encode()


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid order or shipment webhook body, then a few mutations of it."""
    kind = draw(KINDS)
    if kind == "order":
        key = draw(st.sampled_from(ORDER_KEYS))
        body = order_event_body(draw(IDS), key=key, event_name="OrderLinesConfirmedBySupplier",
                                message_id=draw(st.sampled_from(["m-1", "m-2"])))
        event = body[key]
    else:
        key = draw(st.sampled_from(SHIPMENT_KEYS))
        event = shipment_obj(draw(IDS))
        body = {"eventName": "ShipmentIssuedBySupplier", key: event}
    holder = event["meta"] if kind == "shipment" else event
    for _ in range(draw(st.integers(0, 4))):
        mutate = draw(st.sampled_from(MUTATIONS))
        mutate(draw, kind, body, event, holder)
    return kind, body


def _drop_key(draw: st.DrawFn, kind: str, body: dict[str, Any], event: dict[str, Any],
              holder: dict[str, Any]) -> None:
    target = draw(st.sampled_from([body, event, holder]))
    if target:
        target.pop(draw(st.sampled_from(sorted(target))))


def _extra_key(draw: st.DrawFn, kind: str, body: dict[str, Any], event: dict[str, Any],
               holder: dict[str, Any]) -> None:
    target = draw(st.sampled_from([body, event]))
    target[draw(st.text(max_size=12))] = draw(JSON)


def _wrong_type(draw: st.DrawFn, kind: str, body: dict[str, Any], event: dict[str, Any],
                holder: dict[str, Any]) -> None:
    field = draw(st.sampled_from(["eventName", "event", "id", "orderId", "shipmentId",
                                  "lastUpdatedAt", "meta", "lines", "messageId"]))
    value = draw(WRONG_TYPES)
    if field == "eventName":
        body["eventName"] = value
    elif field == "event":
        key = next(k for k in body if k != "eventName") if len(body) > 1 else "orderEvent"
        body[key] = value
    elif field == "messageId":
        event["meta"] = {"messageId": value}
    else:
        event[field] = value


def _stamp(draw: st.DrawFn, kind: str, body: dict[str, Any], event: dict[str, Any],
           holder: dict[str, Any]) -> None:
    target = draw(st.sampled_from(["holder", "line", "created", "drop"]))
    if target == "holder":
        holder["lastUpdatedAt"] = draw(STAMPS)
    elif target == "created":
        event["meta"] = {"createdDateTime": draw(STAMPS)}
        event.pop("lastUpdatedAt", None)
    elif target == "drop":
        holder.pop("lastUpdatedAt", None)
    else:
        stamp = draw(STAMPS)
        line = {"id": draw(IDS), "lastUpdatedAt": stamp, "meta": {"lastUpdatedAt": stamp}}
        event["lines"] = [line]


def _id(draw: st.DrawFn, kind: str, body: dict[str, Any], event: dict[str, Any],
        holder: dict[str, Any]) -> None:
    event[draw(st.sampled_from(["id", "orderId", "shipmentId"]))] = draw(IDS)


def _several_keys(draw: st.DrawFn, kind: str, body: dict[str, Any], event: dict[str, Any],
                  holder: dict[str, Any]) -> None:
    keys = ORDER_KEYS + SHIPMENT_KEYS
    for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3)):
        body[key] = dict(event)


def _deep(draw: st.DrawFn, kind: str, body: dict[str, Any], event: dict[str, Any],
          holder: dict[str, Any]) -> None:
    depth = draw(st.sampled_from([50, 500, 900, 960, 980, 990, 1000, 3000, 20_000]))
    draw(st.sampled_from([event, body]))["nested"] = f"{DEEP}{depth}"


def _event_name(draw: st.DrawFn, kind: str, body: dict[str, Any], event: dict[str, Any],
                holder: dict[str, Any]) -> None:
    body["eventName"] = draw(st.one_of(
        st.text(max_size=20), st.text(min_size=MAX_ID_LENGTH - 1, max_size=MAX_ID_LENGTH + 1)))


MUTATIONS = (_drop_key, _extra_key, _wrong_type, _stamp, _id, _several_keys, _deep, _event_name)


# -- properties -------------------------------------------------------------------------------


@settings(BASE, max_examples=60)
@given(kind=KINDS, body=st.binary(max_size=512) | st.sampled_from(
    [b"", b"null", b"{}", b"[]", b'"x"', b"\xef\xbb\xbf{}", b"NaN", b"1e999", b"{" * 5000]))
async def test_arbitrary_bytes_are_a_400_and_kept(bridge: Bridge, kind: str, body: bytes) -> None:
    assert await post_and_check(bridge, kind, body) == (415 if is_xml(body, "") else 400)


@settings(BASE, max_examples=60)
@given(kind=KINDS, value=JSON, ensure_ascii=st.booleans())
async def test_arbitrary_json_values(bridge: Bridge, kind: str, value: Any,
                                     ensure_ascii: bool) -> None:
    body = json.dumps(value, ensure_ascii=ensure_ascii).encode()
    assert await post_and_check(bridge, kind, body) in (200, 400)


@settings(BASE, max_examples=150)
@given(case=near_valid())
async def test_near_valid_events(bridge: Bridge, case: tuple[str, dict[str, Any]]) -> None:
    kind, value = case
    body = encode(value)
    status = await post_and_check(bridge, kind, body)
    event(f"status {status}")
    too_large = len(body) > MAX_BODY_BYTES
    assert status == (413 if too_large else 200 if expected(kind, body) else 400)


HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("\t\u00e9"),
    max_size=40)
AUTH_VARIANTS = st.one_of(
    st.sampled_from([(f"Bearer {TOKEN}", True), (f"bearer {TOKEN}", True),
                     (f"  BEARER  {TOKEN}  ", True), (f"Bearer {TOKEN}x", False),
                     (f"Basic {TOKEN}", False), ("Bearer", False), ("Bearer ", False),
                     (TOKEN, False), ("", False), (f"Bearer\t{TOKEN}", False)]),
    st.builds(lambda text: (text, False), HEADER_TEXT),
)


@settings(BASE, max_examples=50)
@given(auth=AUTH_VARIANTS | st.none(), content_type=st.none() | HEADER_TEXT,
       extra=st.dictionaries(st.sampled_from(["X-Forwarded-For", "User-Agent", "Accept",
                                              "X-Custom", "Content-Encoding-Hint"]),
                             HEADER_TEXT, max_size=3))
async def test_random_headers(
    bridge: Bridge, auth: tuple[str, bool] | None, content_type: str | None,
    extra: dict[str, str],
) -> None:
    headers = dict(extra)
    if auth is not None:
        headers["Authorization"] = auth[0]
    if content_type is not None:
        headers["Content-Type"] = content_type
    body = json.dumps(order_event_body()).encode()
    status, answer_headers, answer = await bridge.send("POST", "/webhook/order", body, headers)
    if auth is not None and auth[1]:
        assert status == 200
        return
    assert status == 401
    assert answer_headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(answer)["error"] == "unauthorized"


def _encode(text: str) -> str:
    return quote(text, safe="")


@settings(BASE, max_examples=60)
@given(kind=KINDS, entity=IDS, in_path=st.booleans(), query=st.dictionaries(
    st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=3))
async def test_legacy_get_queues_or_rejects(
    bridge: Bridge, kind: str, entity: str, in_path: bool, query: dict[str, str]
) -> None:
    param = "orderId" if kind == "order" else "shipmentId"
    query = {k: v for k, v in query.items() if k != param}
    if not in_path:
        query[param] = entity
    qs = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in query.items())
    path = f"/webhook/{kind}/{_encode(entity)}" if in_path else f"/webhook/{kind}"
    status, _, answer = await bridge.send("GET", f"{path}?{qs}")
    # No segment, one that URLs normalise away, or braces, which aiohttp's {entity_id}
    # pattern [^{}/]+ refuses (%2F stays encoded while routing, so "/" is fine).
    if in_path and (entity in ("", ".", "..") or {"{", "}"} & set(entity)):
        assert status == 404
        return
    if not plain_text(entity):  # blank, too long, control characters
        check_400(bridge, status, answer, method="GET", path=URL(path, encoded=True).path,
                  body=b"")
        return
    assert status == 202, answer
    doc = json.loads(answer)
    assert doc["status"] == "queued"
    with bridge.db() as conn:
        row = conn.execute("SELECT kind, entity_id, status FROM fetch_requests WHERE id = ?",
                           (doc["fetchId"],)).fetchone()
    assert row == (kind, entity, "pending")


SEGMENT = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "-._~", max_size=10),
    st.text(max_size=10).map(_encode),
    st.sampled_from(["", "order", "shipment", "..", ".", "%2F", "%00", "%ZZ", "%", "order%2Fx"]),
)


@settings(BASE, max_examples=60)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
       segments=st.lists(SEGMENT, min_size=1, max_size=3),
       query=st.text(alphabet=string.printable.strip() + "é", max_size=30).map(
           lambda q: quote(q, safe="=&%+")),
       body=st.binary(max_size=64))
async def test_random_paths_and_queries(
    bridge: Bridge, method: str, segments: list[str], query: str, body: bytes
) -> None:
    target = "/webhook/" + "/".join(segments) + (f"?{query}" if query else "")
    status, _, answer = await bridge.send(method, target, body)
    assert status < 500, answer
    assert status in (200, 202, 400, 404, 405)
    if status == 400 and method != "HEAD":
        doc = json.loads(answer)
        assert doc["error"] == "invalid_event" and doc["rejectedId"] >= 1
    if status in (200, 202):
        assert method in ("GET", "POST")
    check_new_events(bridge)
    # The server still answers a valid request after whatever came before.
    ok, _, _ = await bridge.send("GET", "/webhook/order/still-alive")
    assert ok == 202


@settings(BASE, max_examples=15)
@given(kind=KINDS, value=st.one_of(JSON, near_valid().map(lambda case: case[1])))
async def test_locked_store_is_503_then_the_retry_succeeds(
    bridge: Bridge, kind: str, value: Any
) -> None:
    body = encode(value)
    blocker = sqlite3.connect(bridge.path, isolation_level=None, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        status, headers, answer = await bridge.send("POST", f"/webhook/{kind}", body)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert status == 503
    assert headers["Retry-After"] == str(RETRY_AFTER_S)
    assert json.loads(answer)["error"] == "unavailable"
    assert await post_and_check(bridge, kind, body) in (200, 400)


# -- edges the strategies leave out ----------------------------------------------------------


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-01:00"])
async def test_extreme_timestamp_is_a_400(bridge: Bridge, stamp: str) -> None:
    body = json.dumps(order_event_body("o-extreme", stamp=stamp)).encode()
    status, _, _ = await bridge.send("POST", "/webhook/order", body)
    assert status == 400


@pytest.mark.parametrize(
    "body",
    [
        rb'{"eventName": "E", "orderEvent": {"lastUpdatedAt": "2024-05-01T10:00:00Z",'
        rb' "orderId": "o-\ud800"}}',
        rb'{"eventName": "\udfff", "orderEvent": {"lastUpdatedAt": "2024-05-01T10:00:00Z",'
        rb' "orderId": "o-1"}}',
        rb'{"eventName": "E", "orderEvent": {"lastUpdatedAt": "2024-05-01T10:00:00Z",'
        rb' "orderId": "o-note", "note": "\udfff"}}',
    ],
)
async def test_lone_surrogate_is_a_400(bridge: Bridge, body: bytes) -> None:
    """Valid JSON syntax, but no valid Unicode: refused (and kept), never a 503."""
    status, _, answer = await bridge.send("POST", "/webhook/order", body)
    check_400(bridge, status, answer, method="POST", path="/webhook/order", body=body)
