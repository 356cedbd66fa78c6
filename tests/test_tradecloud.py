"""Unit tests of the Tradecloud client against aioresponses, with fake time."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from email.utils import formatdate
from types import SimpleNamespace
from typing import Any

import aiohttp
import aioresponses.core as aioresponses_core
import pytest
from aioresponses import aioresponses
from aioresponses.core import RequestCall
from pydantic import SecretStr
from structlog.testing import capture_logs
from yarl import URL

from tcbridge.config import PollKind, TradecloudSettings
from tcbridge.envelope import parse_snapshot
from tcbridge.errors import ApiAuthError, ApiPermanentError, ApiTransientError, InvalidEvent
from tcbridge.tradecloud import PollPage, TradecloudClient

BASE = "https://tc.example"
USER = "bridge@example.com"
PASSWORD = "pa55-w0rd-do-not-leak"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
WALL_START = 1_700_000_000.0
PACING_S = 0.1 + 1e-9  # the longest wait that is pacing, not backoff, at 10 requests/s
LOGIN = "/v2/authentication/login"
REFRESH = "/v2/authentication/refresh"
LOGOUT = "/v2/authentication/logout"
ORDER_POLL = "/v2/order-search/poll"


class FakeTime:
    """A monotonic and a wall clock that only move when the client sleeps or a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.wall = WALL_START
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def wall_clock(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds

    def longest_sleep(self) -> float:
        return max(self.sleeps, default=0.0)

    async def sleep(self, delay_s: float) -> None:
        self.sleeps.append(delay_s)
        self.advance(delay_s)


class TopRandom(random.Random):
    """Always picks the top of the jitter range, so backoff ceilings are visible."""

    def uniform(self, a: float, b: float) -> float:
        return b


def jwt(exp: float | None, name: str) -> str:
    """An unsigned JWT-shaped token; ``name`` makes each token distinct."""

    def part(value: dict[str, Any]) -> str:
        raw = base64.urlsafe_b64encode(json.dumps(value).encode()).decode()
        return raw.rstrip("=")

    claims: dict[str, Any] = {"sub": name}
    if exp is not None:
        claims["exp"] = int(exp)
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def token_headers(access: str, refresh: str) -> dict[str, str]:
    return {"Set-Authorization": access, "Set-Refresh-Token": refresh}


def calls(mock: aioresponses, method: str, path: str) -> list[RequestCall]:
    return mock.requests.get((method, URL(BASE + path)), [])


def header(call: RequestCall, name: str) -> str | None:
    value = call.kwargs["headers"].get(name)
    return None if value is None else str(value)


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class _CompatResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required ``stream_writer`` argument."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


@pytest.fixture
def mock(monkeypatch: pytest.MonkeyPatch) -> Iterator[aioresponses]:
    monkeypatch.setattr(aioresponses_core, "ClientResponse", _CompatResponse)
    with aioresponses() as m:
        yield m


MakeClient = Callable[..., TradecloudClient]


@pytest.fixture
def make_client(session: aiohttp.ClientSession, fake_time: FakeTime) -> MakeClient:
    def make(**overrides: Any) -> TradecloudClient:
        rng = overrides.pop("rng", TopRandom())
        values: dict[str, Any] = {
            "base_url": BASE + "/v2/",
            "username": USER,
            "password": SecretStr(PASSWORD),
            "max_retries": 4,
            "retry_initial_s": 1.0,
            "retry_max_s": 8.0,
        }
        values.update(overrides)
        return TradecloudClient(
            session,
            TradecloudSettings(**values),
            sleep=fake_time.sleep,
            clock=fake_time.clock,
            rng=rng,
            wall_clock=fake_time.wall_clock,
        )

    return make


@pytest.fixture
def client(make_client: MakeClient) -> TradecloudClient:
    return make_client()


def page_body(*items: Any, **extra: Any) -> dict[str, Any]:
    return {"data": list(items), "total": len(items), **extra}


# -- poll / search ----------------------------------------------------------------------


# The search rows used to expect Basic auth and lastUpdatedSince: the wrong shape since
# 2024 (docs security/authentication.md; "Rename lastUpdatedSince filter to lastUpdatedAfter").
@pytest.mark.parametrize(
    ("kind", "path"),
    [("order", "/v2/order-search/poll"), ("shipment", "/v2/shipment/poll")],
)
async def test_poll_url_body_and_basic_auth(
    make_client: MakeClient,
    mock: aioresponses,
    kind: PollKind,
    path: str,
) -> None:
    client = make_client(api="poll")
    item = {"id": "o1", "lastUpdatedAt": "2024-05-01T10:00:00.000Z"}
    mock.post(BASE + path, payload=page_body(item, lastUpdatedAt="2024-05-01T10:00:00.000Z"))
    filters = {"status": {"processStatus": ["Issued"]}, "buyerOrder": {"companyId": "c1"}}

    page = await client.poll(kind, "2024-01-01T00:00:00.000Z", offset=0, limit=100, filters=filters)

    layout = "delivery-schedule" if kind == "order" else None
    assert page == PollPage(items=[item], total=1, last_updated_at="2024-05-01T10:00:00.000Z",
                            layout=layout)
    (call,) = calls(mock, "POST", path)
    assert call.kwargs["json"] == {
        "filters": {**filters, "lastUpdatedAfter": "2024-01-01T00:00:00.000Z"},
        "offset": 0,
        "limit": 100,
    }
    assert header(call, "Authorization") == BASIC
    assert call.kwargs["timeout"] == aiohttp.ClientTimeout(total=30.0, connect=10.0)
    assert call.kwargs["allow_redirects"] is False


@pytest.mark.parametrize(
    ("kind", "path", "setting", "cursor_key"),
    [
        ("order", "/v2/order-search/search", None, "lastUpdatedAfter"),
        ("shipment", "/v2/shipment/search", None, "lastUpdatedAfter"),
        ("order", "/v2/order-search/search", "lastUpdatedSince", "lastUpdatedSince"),
        ("shipment", "/v2/shipment/search", "lastUpdatedAfter", "lastUpdatedAfter"),
    ],
)
async def test_search_sends_the_cursor_filter_with_a_login_token(
    make_client: MakeClient, mock: aioresponses, kind: PollKind, path: str,
    setting: str | None, cursor_key: str,
) -> None:
    overrides = {} if setting is None else {"search_cursor_filter": setting}
    client = make_client(api="search", **overrides)
    access = jwt(WALL_START + 3600, "a1")
    mock.get(BASE + LOGIN, headers=token_headers(access, "r1"))
    mock.post(BASE + path, payload=page_body())

    await client.poll(kind, "2024-01-01T00:00:00.000Z", offset=0, limit=100,
                      filters={"status": {"processStatus": ["Issued"]}})

    (call,) = calls(mock, "POST", path)
    assert call.kwargs["json"]["filters"] == {
        "status": {"processStatus": ["Issued"]}, cursor_key: "2024-01-01T00:00:00.000Z"}
    assert header(call, "Authorization") == f"Bearer {access}"
    assert header(calls(mock, "GET", LOGIN)[0], "Authorization") == BASIC


async def test_search_logs_in_again_once_when_the_token_is_refused(
    make_client: MakeClient, mock: aioresponses
) -> None:
    client = make_client(api="search")
    a1, a2 = jwt(WALL_START + 3600, "a1"), jwt(WALL_START + 3600, "a2")
    mock.get(BASE + LOGIN, headers=token_headers(a1, "r1"))
    mock.get(BASE + LOGIN, headers=token_headers(a2, "r2"))
    mock.post(BASE + "/v2/order-search/search", status=401)
    mock.post(BASE + "/v2/order-search/search", payload=page_body())

    await client.poll("order", "2024-01-01T00:00:00.000Z", offset=0, limit=100)

    first, second = calls(mock, "POST", "/v2/order-search/search")
    assert header(first, "Authorization") == f"Bearer {a1}"
    assert header(second, "Authorization") == f"Bearer {a2}"


async def test_single_delivery_polls_its_own_route(
    make_client: MakeClient, mock: aioresponses
) -> None:
    client = make_client(api="poll", single_delivery=True)
    path = "/v2/order-search/poll/single-delivery"
    mock.post(BASE + path, payload=page_body())
    mock.post(BASE + "/v2/shipment/poll", payload=page_body())

    page = await client.poll("order", "2024-01-01T00:00:00.000Z", offset=0, limit=100)
    shipments = await client.poll("shipment", "2024-01-01T00:00:00.000Z", offset=0, limit=100)

    assert page.layout == "single-delivery" and shipments.layout is None
    (call,) = calls(mock, "POST", path)
    assert header(call, "Authorization") == BASIC
    assert call.kwargs["json"]["filters"] == {"lastUpdatedAfter": "2024-01-01T00:00:00.000Z"}


async def test_poll_cursor_wins_over_filter_and_caller_filters_untouched(
    client: TradecloudClient, mock: aioresponses
) -> None:
    mock.post(BASE + ORDER_POLL, payload=page_body())
    filters = {"lastUpdatedAfter": "1999-01-01T00:00:00.000Z", "x": 1}

    await client.poll("order", "2024-02-02T00:00:00.000Z", offset=0, limit=10, filters=filters)

    (call,) = calls(mock, "POST", ORDER_POLL)
    assert call.kwargs["json"]["filters"] == {
        "lastUpdatedAfter": "2024-02-02T00:00:00.000Z",
        "x": 1,
    }
    assert filters == {"lastUpdatedAfter": "1999-01-01T00:00:00.000Z", "x": 1}


async def test_poll_passes_paging_through(client: TradecloudClient, mock: aioresponses) -> None:
    mock.post(BASE + ORDER_POLL, payload=page_body())

    await client.poll("order", "c", offset=200, limit=50)

    (call,) = calls(mock, "POST", ORDER_POLL)
    assert call.kwargs["json"] == {"filters": {"lastUpdatedAfter": "c"}, "offset": 200, "limit": 50}


async def test_poll_missing_fields_become_none_and_non_objects_are_kept(
    client: TradecloudClient, mock: aioresponses
) -> None:
    # Non-objects stay in the page: they count towards a full page and the poller rejects
    # them (dropping them made a full page look short, and the run after it was skipped).
    mock.post(BASE + ORDER_POLL, payload={"data": [{"id": "a"}, 7, "x", {"id": "b"}]})

    page = await client.poll("order", "c", offset=0, limit=100)

    assert page == PollPage(items=[{"id": "a"}, 7, "x", {"id": "b"}], total=None,
                            last_updated_at=None, layout="delivery-schedule")


@pytest.mark.parametrize("depth", [2_000, 20_000])
async def test_poll_answer_nested_too_deeply_is_an_api_error(
    client: TradecloudClient, mock: aioresponses, depth: int
) -> None:
    # RecursionError escaped the poller: the daemon exited 1 and restarted onto the same
    # page for ever. Now it is an API error (the poller counts it and backs off).
    body = b'{"data": [' + b"[" * depth + b"]" * depth + b"]}"
    mock.post(BASE + ORDER_POLL, body=body)

    with pytest.raises(ApiPermanentError, match="nested too deeply"):
        await client.poll("order", "c", offset=0, limit=100)


async def test_poll_item_that_orjson_refuses_keeps_the_rest_of_the_page(
    client: TradecloudClient, mock: aioresponses
) -> None:
    body = (b'{"data": [{"id": "a", "lastUpdatedAt": "2024-05-01T00:00:00.000Z"},'
            b' {"id": "b", "lastUpdatedAt": "2024-05-01T00:00:01.000Z", "note": "\\ud800"},'
            b' {"id": "c", "lastUpdatedAt": "2024-05-01T00:00:02.000Z", "qty": NaN}],'
            b' "total": 3}')
    mock.post(BASE + ORDER_POLL, body=body)

    page = await client.poll("order", "c", offset=0, limit=100)

    assert [item["id"] for item in page.items] == ["a", "b", "c"]
    assert parse_snapshot("order", page.items[0], "poll").entity_id == "a"
    for item in page.items[1:]:  # one parser everywhere: what orjson cannot write is refused
        with pytest.raises(InvalidEvent, match="cannot be stored as JSON"):
            parse_snapshot("order", item, "poll")


async def test_object_nested_too_deeply_is_an_api_error(
    client: TradecloudClient, mock: aioresponses
) -> None:
    mock.get(BASE + LOGIN, headers=token_headers(jwt(WALL_START + 3600, "a"), "r"))
    mock.get(BASE + "/v2/order/o1", body=b"[" * 20_000 + b"]" * 20_000)

    with pytest.raises(ApiPermanentError, match="nested too deeply"):
        await client.get_object("order", "o1")


@pytest.mark.parametrize(
    "body",
    [b"<html>oops</html>", b"[1, 2]", b'{"data": {"id": 1}}', b'{"total": 3}', b"\xff\xfe"],
)
async def test_poll_unreadable_answer_is_permanent(
    client: TradecloudClient, mock: aioresponses, fake_time: FakeTime, body: bytes
) -> None:
    mock.post(BASE + ORDER_POLL, body=body)

    with pytest.raises(ApiPermanentError):
        await client.poll("order", "c", offset=0, limit=100)

    assert len(calls(mock, "POST", ORDER_POLL)) == 1
    assert fake_time.sleeps == []


@pytest.mark.parametrize("status", [401, 403])
async def test_poll_auth_refused_fails_at_once(
    client: TradecloudClient, mock: aioresponses, status: int
) -> None:
    mock.post(BASE + ORDER_POLL, status=status)

    with pytest.raises(ApiAuthError) as info:
        await client.poll("order", "c", offset=0, limit=100)

    assert info.value.status == status
    assert len(calls(mock, "POST", ORDER_POLL)) == 1


# -- token flow -------------------------------------------------------------------------


async def test_object_uses_login_tokens_as_bearer(
    client: TradecloudClient, mock: aioresponses
) -> None:
    access = jwt(WALL_START + 3600, "a1")
    mock.get(BASE + LOGIN, headers=token_headers(access, "r1"))
    path = "/v2/order/PO%201%2F2"
    mock.get(BASE + path, payload={"id": "PO 1/2"}, repeat=True)

    first = await client.get_object("order", "PO 1/2")
    second = await client.get_object("order", "PO 1/2")

    assert first == second == {"id": "PO 1/2"}
    (login,) = calls(mock, "GET", LOGIN)
    assert header(login, "Authorization") == BASIC
    assert [header(c, "Authorization") for c in calls(mock, "GET", path)] == [
        f"Bearer {access}",
        f"Bearer {access}",
    ]


async def test_shipment_object_path(client: TradecloudClient, mock: aioresponses) -> None:
    mock.get(BASE + LOGIN, headers=token_headers(jwt(WALL_START + 3600, "a1"), "r1"))
    mock.get(BASE + "/v2/shipment/s-9", payload={"id": "s-9"})

    assert await client.get_object("shipment", "s-9") == {"id": "s-9"}


async def test_login_without_token_header_is_permanent(
    client: TradecloudClient, mock: aioresponses
) -> None:
    mock.get(BASE + LOGIN, status=200)

    with pytest.raises(ApiPermanentError, match="Set-Authorization"):
        await client.get_object("order", "o1")


async def test_login_refused_is_auth_error(client: TradecloudClient, mock: aioresponses) -> None:
    mock.get(BASE + LOGIN, status=401)

    with pytest.raises(ApiAuthError):
        await client.get_object("order", "o1")


async def test_refresh_shortly_before_jwt_exp_and_refresh_token_is_single_use(
    client: TradecloudClient, mock: aioresponses, fake_time: FakeTime
) -> None:
    a1, a2, a3 = (jwt(WALL_START + 3600 * n, f"a{n}") for n in (1, 2, 3))
    mock.get(BASE + LOGIN, headers=token_headers(a1, "r1"))
    mock.get(BASE + REFRESH, headers=token_headers(a2, "r2"))
    mock.get(BASE + REFRESH, headers=token_headers(a3, "r3"))
    mock.get(BASE + "/v2/order/o1", payload={"id": "o1"}, repeat=True)

    await client.get_object("order", "o1")
    fake_time.advance(3600 - 31)  # still more than the 30 s margin left
    await client.get_object("order", "o1")
    assert calls(mock, "GET", REFRESH) == []
    fake_time.advance(2)  # inside the margin: refresh first
    await client.get_object("order", "o1")
    fake_time.advance(3600)
    await client.get_object("order", "o1")

    refreshes = calls(mock, "GET", REFRESH)
    assert [header(c, "Refresh-Token") for c in refreshes] == ["r1", "r2"]
    assert all(header(c, "Authorization") is None for c in refreshes)
    assert len(calls(mock, "GET", LOGIN)) == 1
    bearers = [header(c, "Authorization") for c in calls(mock, "GET", "/v2/order/o1")]
    assert bearers == [f"Bearer {a1}", f"Bearer {a1}", f"Bearer {a2}", f"Bearer {a3}"]


async def test_unreadable_exp_assumes_ten_minutes(
    client: TradecloudClient, mock: aioresponses, fake_time: FakeTime
) -> None:
    mock.get(BASE + LOGIN, headers=token_headers("opaque-token", "r1"))
    mock.get(BASE + REFRESH, headers=token_headers("opaque-token-2", "r2"))
    mock.get(BASE + "/v2/order/o1", payload={}, repeat=True)

    await client.get_object("order", "o1")
    fake_time.advance(600 - 31)
    await client.get_object("order", "o1")
    assert calls(mock, "GET", REFRESH) == []
    fake_time.advance(2)
    await client.get_object("order", "o1")

    assert len(calls(mock, "GET", REFRESH)) == 1


@pytest.mark.parametrize(
    "failure",
    [{"status": 401}, {"status": 403}, {"status": 503}, {"exception": TimeoutError()}],
)
async def test_failed_refresh_is_not_retried_but_logs_in_again(
    client: TradecloudClient, mock: aioresponses, fake_time: FakeTime, failure: dict[str, Any]
) -> None:
    a1, a2 = jwt(WALL_START + 600, "a1"), jwt(WALL_START + 7200, "a2")
    mock.get(BASE + LOGIN, headers=token_headers(a1, "r1"))
    mock.get(BASE + REFRESH, **failure)
    mock.get(BASE + LOGIN, headers=token_headers(a2, "r2"))
    mock.get(BASE + "/v2/order/o1", payload={}, repeat=True)

    await client.get_object("order", "o1")
    fake_time.advance(600)
    await client.get_object("order", "o1")

    assert len(calls(mock, "GET", REFRESH)) == 1  # a single-use token is sent once
    assert len(calls(mock, "GET", LOGIN)) == 2
    assert header(calls(mock, "GET", "/v2/order/o1")[-1], "Authorization") == f"Bearer {a2}"


async def test_used_refresh_token_is_never_sent_again(
    make_client: MakeClient, mock: aioresponses, fake_time: FakeTime
) -> None:
    client = make_client(max_retries=0)
    mock.get(BASE + LOGIN, headers=token_headers(jwt(WALL_START + 600, "a1"), "r1"))
    mock.get(BASE + REFRESH, status=503)
    mock.get(BASE + LOGIN, status=503)  # the fallback login fails too
    mock.get(BASE + "/v2/order/o1", payload={})
    await client.get_object("order", "o1")
    fake_time.advance(600)

    with pytest.raises(ApiTransientError):
        await client.get_object("order", "o1")
    with pytest.raises(ApiTransientError):  # no more mocks: the next try is a login, not r1
        await client.get_object("order", "o1")
    await client.close()  # r1 is spent: no logout with it

    assert len(calls(mock, "GET", REFRESH)) == 1
    assert len(calls(mock, "GET", LOGIN)) == 3
    assert calls(mock, "POST", LOGOUT) == []


async def test_object_401_logs_in_again_and_retries_once(
    client: TradecloudClient, mock: aioresponses
) -> None:
    a1, a2 = jwt(WALL_START + 3600, "a1"), jwt(WALL_START + 3600, "a2")
    mock.get(BASE + LOGIN, headers=token_headers(a1, "r1"))
    mock.get(BASE + LOGIN, headers=token_headers(a2, "r2"))
    mock.get(BASE + "/v2/order/o1", status=401)
    mock.get(BASE + "/v2/order/o1", payload={"id": "o1"})

    assert await client.get_object("order", "o1") == {"id": "o1"}

    bearers = [header(c, "Authorization") for c in calls(mock, "GET", "/v2/order/o1")]
    assert bearers == [f"Bearer {a1}", f"Bearer {a2}"]


async def test_object_second_401_is_auth_error(
    client: TradecloudClient, mock: aioresponses
) -> None:
    mock.get(BASE + LOGIN, headers=token_headers(jwt(WALL_START + 3600, "a"), "r"), repeat=True)
    mock.get(BASE + "/v2/order/o1", status=401, repeat=True)

    with pytest.raises(ApiAuthError) as info:
        await client.get_object("order", "o1")

    assert info.value.status == 401
    assert len(calls(mock, "GET", "/v2/order/o1")) == 2
    assert len(calls(mock, "GET", LOGIN)) == 2


async def test_concurrent_object_calls_share_one_login(
    client: TradecloudClient, mock: aioresponses
) -> None:
    async def slow_login(url: URL, **kwargs: Any) -> None:
        for _ in range(5):
            await asyncio.sleep(0)  # yield so the other callers reach the token check

    mock.get(
        BASE + LOGIN,
        headers=token_headers(jwt(WALL_START + 3600, "a"), "r"),
        callback=slow_login,
        repeat=True,
    )
    mock.get(BASE + "/v2/order/o1", payload={}, repeat=True)

    await asyncio.gather(*(client.get_object("order", "o1") for _ in range(3)))

    assert len(calls(mock, "GET", LOGIN)) == 1
    assert len(calls(mock, "GET", "/v2/order/o1")) == 3


async def test_object_404_is_permanent_without_retry(
    client: TradecloudClient, mock: aioresponses, fake_time: FakeTime
) -> None:
    mock.get(BASE + LOGIN, headers=token_headers(jwt(WALL_START + 3600, "a"), "r"))
    mock.get(BASE + "/v2/order/gone", status=404)

    with pytest.raises(ApiPermanentError) as info:
        await client.get_object("order", "gone")

    assert info.value.status == 404
    assert len(calls(mock, "GET", "/v2/order/gone")) == 1
    assert fake_time.longest_sleep() <= PACING_S


# -- retries --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "expected_s"),
    [
        ("7", 7.0),
        (formatdate(WALL_START + 3, usegmt=True), 3.0),
        (formatdate(WALL_START + 3600, usegmt=True), 8.0),  # capped at retry_max_s
        ("999", 8.0),
        ("soon", 1.0),  # unreadable: plain backoff
    ],
)
async def test_429_honours_retry_after(
    client: TradecloudClient,
    mock: aioresponses,
    fake_time: FakeTime,
    retry_after: str,
    expected_s: float,
) -> None:
    mock.post(BASE + ORDER_POLL, status=429, headers={"Retry-After": retry_after})
    mock.post(BASE + ORDER_POLL, payload=page_body({"id": "a"}))

    page = await client.poll("order", "c", offset=0, limit=100)

    assert page.items == [{"id": "a"}]
    assert fake_time.sleeps == [expected_s]


async def test_5xx_backoff_grows_and_is_capped_then_succeeds(
    make_client: MakeClient, mock: aioresponses, fake_time: FakeTime
) -> None:
    client = make_client(max_retries=5)
    for status in (500, 502, 503, 504, 599):
        mock.post(BASE + ORDER_POLL, status=status)
    mock.post(BASE + ORDER_POLL, payload=page_body())

    with capture_logs() as logs:
        await client.poll("order", "c", offset=0, limit=100)

    assert fake_time.sleeps == [1.0, 2.0, 4.0, 8.0, 8.0]
    retries = [e for e in logs if e["event"] == "tradecloud.retry"]
    assert [(e["status"], e["attempt"], e["delay_s"]) for e in retries] == [
        (500, 1, 1.0),
        (502, 2, 2.0),
        (503, 3, 4.0),
        (504, 4, 8.0),
        (599, 5, 8.0),
    ]


async def test_jitter_stays_under_the_ceiling(
    make_client: MakeClient, mock: aioresponses, fake_time: FakeTime
) -> None:
    client = make_client(rng=random.Random(7), max_retries=6, retry_max_s=10.0)
    mock.post(BASE + ORDER_POLL, status=503, repeat=True)

    with capture_logs() as logs, pytest.raises(ApiTransientError):
        await client.poll("order", "c", offset=0, limit=100)

    delays = [e["delay_s"] for e in logs if e["event"] == "tradecloud.retry"]
    ceilings = [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert len(delays) == len(ceilings)
    assert all(0.0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # random, not a fixed ladder


async def test_retries_exhausted_raise_transient(
    make_client: MakeClient, mock: aioresponses, fake_time: FakeTime
) -> None:
    client = make_client(max_retries=2)
    mock.post(BASE + ORDER_POLL, status=503, repeat=True)

    with pytest.raises(ApiTransientError) as info:
        await client.poll("order", "c", offset=0, limit=100)

    assert info.value.status == 503
    assert info.value.retry_after_s is None
    assert len(calls(mock, "POST", ORDER_POLL)) == 3
    assert fake_time.sleeps == [1.0, 2.0]


async def test_exhausted_429_reports_retry_after(
    make_client: MakeClient, mock: aioresponses
) -> None:
    client = make_client(max_retries=0)
    mock.post(BASE + ORDER_POLL, status=429, headers={"Retry-After": "3"})

    with pytest.raises(ApiTransientError) as info:
        await client.poll("order", "c", offset=0, limit=100)

    assert (info.value.status, info.value.retry_after_s) == (429, 3.0)


async def test_timeouts_and_connection_errors_are_retried(
    client: TradecloudClient, mock: aioresponses, fake_time: FakeTime
) -> None:
    mock.post(BASE + ORDER_POLL, exception=TimeoutError())
    mock.post(BASE + ORDER_POLL, exception=aiohttp.ServerTimeoutError("read"))
    mock.post(BASE + ORDER_POLL, exception=aiohttp.ServerDisconnectedError())
    mock.post(BASE + ORDER_POLL, exception=aiohttp.ClientConnectionError("reset"))
    mock.post(BASE + ORDER_POLL, payload=page_body({"id": "a"}))

    page = await client.poll("order", "c", offset=0, limit=100)

    assert page.items == [{"id": "a"}]
    assert fake_time.sleeps == [1.0, 2.0, 4.0, 8.0]


async def test_connection_errors_exhausted_raise_transient_without_status(
    make_client: MakeClient, mock: aioresponses
) -> None:
    client = make_client(max_retries=1)
    mock.post(BASE + ORDER_POLL, exception=aiohttp.ClientConnectionError("down"), repeat=True)

    with pytest.raises(ApiTransientError, match="ClientConnectionError") as info:
        await client.poll("order", "c", offset=0, limit=100)

    assert info.value.status is None
    assert len(calls(mock, "POST", ORDER_POLL)) == 2


async def test_other_client_errors_are_permanent(
    client: TradecloudClient, mock: aioresponses
) -> None:
    mock.post(BASE + ORDER_POLL, exception=aiohttp.InvalidURL("bad"))

    with pytest.raises(ApiPermanentError):
        await client.poll("order", "c", offset=0, limit=100)

    assert len(calls(mock, "POST", ORDER_POLL)) == 1


# -- pacing ---------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "spacing_s"), [(10.0, 0.1), (2.0, 0.5)])
async def test_request_starts_are_spaced(
    make_client: MakeClient,
    mock: aioresponses,
    fake_time: FakeTime,
    rate: float,
    spacing_s: float,
) -> None:
    client = make_client(max_requests_per_s=rate)
    starts: list[float] = []
    mock.post(
        BASE + ORDER_POLL,
        payload=page_body(),
        callback=lambda url, **kwargs: starts.append(fake_time.now),
        repeat=True,
    )

    for _ in range(4):
        await client.poll("order", "c", offset=0, limit=100)

    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 3
    assert all(gap >= spacing_s - 1e-9 for gap in gaps)


@pytest.mark.parametrize(("round_trip_s", "waits_s"), [(0.15, []), (0.04, [0.06, 0.06])])
async def test_pacing_spaces_starts_so_a_slow_answer_adds_no_wait(
    make_client: MakeClient, mock: aioresponses, fake_time: FakeTime,
    round_trip_s: float, waits_s: list[float],
) -> None:
    # The spacing runs from one request's start to the next: a round trip (and whatever
    # the caller does after it) counts towards it. The first request never waits.
    client = make_client(max_requests_per_s=10.0)
    mock.post(BASE + ORDER_POLL, payload=page_body(),
              callback=lambda url, **kwargs: fake_time.advance(round_trip_s), repeat=True)

    for _ in range(3):
        await client.poll("order", "c", offset=0, limit=100)

    assert fake_time.sleeps == pytest.approx(waits_s)


async def test_one_request_in_flight_at_a_time(
    client: TradecloudClient, mock: aioresponses
) -> None:
    in_flight = 0
    peak = 0

    async def slow(url: URL, **kwargs: Any) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        for _ in range(5):
            await asyncio.sleep(0)  # yield so other callers could overlap if allowed
        in_flight -= 1

    mock.post(BASE + ORDER_POLL, payload=page_body(), callback=slow, repeat=True)

    await asyncio.gather(*(client.poll("order", "c", offset=0, limit=100) for _ in range(4)))

    assert peak == 1
    assert len(calls(mock, "POST", ORDER_POLL)) == 4


# -- secrets --------------------------------------------------------------------------


async def test_secrets_never_in_errors_or_logs(
    make_client: MakeClient, mock: aioresponses, fake_time: FakeTime
) -> None:
    client = make_client(max_retries=1)
    access, refresh = jwt(WALL_START + 60, "secret-access"), "secret-refresh-token"
    mock.post(BASE + ORDER_POLL, status=401)
    mock.post(BASE + ORDER_POLL, status=500, repeat=True)
    mock.get(BASE + LOGIN, headers=token_headers(access, refresh), repeat=True)
    mock.get(BASE + REFRESH, exception=aiohttp.ClientConnectionError("down"))
    mock.get(BASE + "/v2/order/o1", status=401, repeat=True)
    mock.get(BASE + "/v2/order/gone", status=404)
    mock.post(BASE + LOGOUT, status=500)
    errors: list[Exception] = []

    async def expect_failure(call: Awaitable[Any]) -> None:
        with pytest.raises(Exception) as info:
            await call
        errors.append(info.value)

    with capture_logs() as logs:
        await expect_failure(client.poll("order", "c", offset=0, limit=100))  # 401
        await expect_failure(client.poll("order", "c", offset=0, limit=100))  # 500, 500
        await expect_failure(client.get_object("order", "o1"))  # login, 401, login, 401
        fake_time.advance(60)
        await expect_failure(client.get_object("order", "gone"))  # refresh fails, login, 404
        await client.close()  # logout answers 500

    kinds = [type(e) for e in errors]
    assert kinds == [ApiAuthError, ApiTransientError, ApiAuthError, ApiPermanentError]
    events = {e["event"] for e in logs}
    assert {"tradecloud.retry", "tradecloud.refresh_failed", "tradecloud.logout_failed"} <= events
    text = repr(logs) + "".join(f"{e}{e!r}{e.args}{e.__cause__!r}" for e in errors)
    for secret in (PASSWORD, BASIC, BASIC.removeprefix("Basic "), access, refresh):
        assert secret not in text


# -- close ----------------------------------------------------------------------------


async def test_close_logs_out_with_refresh_token(
    client: TradecloudClient, mock: aioresponses
) -> None:
    mock.get(BASE + LOGIN, headers=token_headers(jwt(WALL_START + 3600, "a"), "r1"))
    mock.get(BASE + "/v2/order/o1", payload={})
    mock.post(BASE + LOGOUT, status=200)
    await client.get_object("order", "o1")

    await client.close()
    await client.close()  # nothing left to log out

    (logout,) = calls(mock, "POST", LOGOUT)
    assert header(logout, "Refresh-Token") == "r1"
    assert header(logout, "Authorization") is None


async def test_close_without_login_sends_nothing(
    client: TradecloudClient, mock: aioresponses
) -> None:
    await client.close()

    assert mock.requests == {}


@pytest.mark.parametrize(
    "failure", [{"status": 500}, {"exception": aiohttp.ClientConnectionError("down")}]
)
async def test_close_never_raises(
    client: TradecloudClient, mock: aioresponses, fake_time: FakeTime, failure: dict[str, Any]
) -> None:
    mock.get(BASE + LOGIN, headers=token_headers(jwt(WALL_START + 3600, "a"), "r1"))
    mock.get(BASE + "/v2/order/o1", payload={})
    mock.post(BASE + LOGOUT, **failure)
    await client.get_object("order", "o1")

    with capture_logs() as logs:
        await client.close()

    assert [e["event"] for e in logs] == ["tradecloud.logout_failed"]
    assert len(calls(mock, "POST", LOGOUT)) == 1
    assert fake_time.longest_sleep() <= PACING_S  # no backoff on the way out


# --- document metadata (object storage) --------------------------------------------------------

DOC_ID = "67aa8ece-5d41-496f-a94c-483e360b833b"
DOC_METADATA = f"/v2/object-storage/document/{DOC_ID}/metadata"


async def test_document_metadata_uses_the_bearer_token(
    client: TradecloudClient, mock: aioresponses
) -> None:
    access = jwt(WALL_START + 3600, "a1")
    mock.get(BASE + LOGIN, headers=token_headers(access, "r1"))
    answer = {"id": DOC_ID, "filename": "test.pdf", "contentType": "application/octet-stream",
              "downloadUrl": "https://docs.s3.example/x?X-Amz-Expires=59"}
    mock.get(BASE + DOC_METADATA, payload=answer)

    assert await client.document_metadata(DOC_ID) == answer
    (call,) = calls(mock, "GET", DOC_METADATA)
    assert header(call, "Authorization") == f"Bearer {access}"


async def test_document_metadata_logs_in_again_once_on_401(
    client: TradecloudClient, mock: aioresponses
) -> None:
    mock.get(BASE + LOGIN, headers=token_headers(jwt(WALL_START + 3600, "a1"), "r1"))
    mock.get(BASE + LOGIN, headers=token_headers(jwt(WALL_START + 3600, "a2"), "r2"))
    mock.get(BASE + DOC_METADATA, status=401)
    mock.get(BASE + DOC_METADATA, payload={"downloadUrl": "https://s3.example/x"})

    assert (await client.document_metadata(DOC_ID))["downloadUrl"] == "https://s3.example/x"
    assert len(calls(mock, "GET", LOGIN)) == 2


@pytest.mark.parametrize(("status", "payload", "error", "match"), [
    (404, {"message": "not found"}, ApiPermanentError, "HTTP 404"),
    (403, {"message": "forbidden"}, ApiAuthError, "HTTP 403"),
    (200, {"id": DOC_ID}, ApiPermanentError, "no usable downloadUrl"),
    (200, {"downloadUrl": "ftp://x"}, ApiPermanentError, "no usable downloadUrl"),
])
async def test_document_metadata_failures(
    client: TradecloudClient, mock: aioresponses, status: int, payload: Any,
    error: type[Exception], match: str,
) -> None:
    mock.get(BASE + LOGIN, headers=token_headers(jwt(WALL_START + 3600, "a1"), "r1"))
    mock.get(BASE + DOC_METADATA, status=status, payload=payload)

    with pytest.raises(error, match=match) as caught:
        await client.document_metadata(DOC_ID)
    assert getattr(caught.value, "status", None) == status
