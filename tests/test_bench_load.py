"""The benchmarks' open-loop client (bench/load.py fixed_rate) against small aiohttp apps on
127.0.0.1. No speed is asserted: these check that every request is sent, answered, timed
and matched with its event id, and that failures are counted as failures."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from bench.bodies import BodyMaker, IdScheme, make_templates, order_id, prefix_hash, write_templates
from bench.load import _wrk_argv, fixed_rate, wrk_path


class _App:
    """An aiohttp app in a thread of its own; ``answer`` decides each reply."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.bodies: list[bytes] = []
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(body)
        number = len(self.bodies)
        if self.answer == "silent" and number > 5:
            assert self._stop is not None
            await self._stop.wait()  # answers only when the app stops
        if self.answer == "flaky" and number % 4 == 0:
            return web.json_response({"error": "busy"}, status=503)
        response = web.json_response({"eventId": f"e{number}"})
        if self.answer == "close":
            response.force_close()  # Connection: close after every answer
        return response

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/webhook/order", self._handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> _App:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


class _LingeringCloser(_App):
    """A bare HTTP/1.1 server that answers each connection's first request with
    ``Connection: close`` and only closes it 0.3 s later, reading nothing more: a request
    written on it meanwhile is never seen."""

    LINGER_S = 0.3

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            self.bodies.append(await reader.readexactly(length))
            answer = b'{"eventId": "e%d"}' % len(self.bodies)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(answer), answer))
            await writer.drain()
            await asyncio.sleep(self.LINGER_S)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        await asyncio.sleep(self.LINGER_S + 0.2)  # every connection has closed by then


def test_a_connection_the_server_closes_is_not_used_again(templates: Path) -> None:
    with _LingeringCloser("close") as app:
        run = fixed_rate(f"http://127.0.0.1:{app.port}/webhook/order", templates, "abcd0003",
                         rate_per_s=200, duration_s=0.5)
    assert len(run.sent) == 100 == len(app.bodies)
    assert {s.status for s in run.sent} == {200}


@pytest.fixture
def templates(tmp_path: Path) -> Iterator[Path]:
    yield write_templates(tmp_path / "templates.txt", make_templates())


@pytest.mark.parametrize("answer", ["keep-alive", "close"])
def test_every_request_is_sent_once_answered_and_matched(templates: Path, answer: str) -> None:
    with _App(answer) as app:
        run = fixed_rate(f"http://127.0.0.1:{app.port}/webhook/order", templates, "abcd0001",
                         rate_per_s=200, duration_s=0.5)
    assert len(run.sent) == 100 == len(app.bodies)
    assert len({s.order_id for s in run.sent}) == 100  # every body unique
    for sent in run.sent:  # each body arrived once
        assert sum(sent.order_id.encode() in body for body in app.bodies) == 1
    assert {s.status for s in run.sent} == {200}
    assert sorted(s.event_id or "" for s in run.ok) == sorted(f"e{i}" for i in range(1, 101))
    assert all(s.ack_ms > 0 for s in run.sent)
    # Due every 5 ms: the schedule, not the answers, sets the send times.
    gaps = [b.sent_at - a.sent_at for a, b in zip(run.sent, run.sent[1:], strict=False)]
    assert min(gaps) == pytest.approx(0.005, abs=1e-6)


def test_a_refused_request_is_counted_and_has_no_event_id(templates: Path) -> None:
    with _App("flaky") as app:
        run = fixed_rate(f"http://127.0.0.1:{app.port}/webhook/order", templates, "abcd0002",
                         rate_per_s=200, duration_s=0.2)
    assert len(run.sent) == 40
    assert sorted(s.status for s in run.sent) == [200] * 30 + [503] * 10
    assert len(run.ok) == 30 and all(s.event_id for s in run.ok)
    assert all(s.event_id is None for s in run.sent if s.status == 503)


def test_requests_never_answered_count_as_failed_after_the_timeout(
    templates: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bench.load.RATE_TIMEOUT_S", 0.5)
    with _App("silent") as app:
        run = fixed_rate(f"http://127.0.0.1:{app.port}/webhook/order", templates, "abcd0003",
                         rate_per_s=100, duration_s=0.2)
    assert len(run.sent) == 20
    assert [s.status for s in run.sent].count(200) == 5
    assert [s.status for s in run.sent].count(0) == 15 and len(run.ok) == 5


@pytest.mark.parametrize("ids", ["sequential", "random"])
def test_wrk_script_makes_the_order_ids_python_makes(templates: Path, ids: IdScheme) -> None:
    wrk = wrk_path()
    if wrk is None:
        pytest.skip("wrk is not installed (.ci/run installs it)")
    with _App("keep-alive") as app:
        argv = _wrk_argv(wrk, f"http://127.0.0.1:{app.port}/webhook/order", templates,
                         "10ad0001", 2, 1, None, ids)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    sent = [json.loads(body)["orderEvent"]["orderId"] for body in app.bodies]
    assert len(sent) >= 10
    made = {order_id("10ad0001", 1, n, ids) for n in range(1, len(sent) + 65)}
    assert set(sent) <= made  # the same ids, whichever connection carried which
    assert len(set(sent)) == len(sent)
    assert (sorted(sent) == sent) == (ids == "sequential")


def test_random_order_ids_are_scattered_unique_and_differ_by_prefix() -> None:
    ids = [order_id("10ad0001", 3, n, "random") for n in range(1, 5001)]
    assert len(set(ids)) == len(ids)
    heads = [i[:8] for i in ids]
    rises = sum(a < b for a, b in itertools.pairwise(heads))
    assert 1500 < rises < 3500  # neither counting up nor down: about half the steps rise
    assert order_id("10ad0002", 3, 1, "random") != ids[0]
    assert order_id("10ad0001", 3, 7) == "10ad0001-0003-4000-8000-000000000007"
    assert prefix_hash("ab") == (ord("a") * 31 + ord("b"))


def test_body_maker_uses_the_scheme_it_is_given() -> None:
    maker = BodyMaker(make_templates(2), "10ad0001", 5, "random")
    order, body = maker.next()
    assert order == order_id("10ad0001", 5, 1, "random")
    assert json.loads(body)["orderEvent"]["orderId"] == order
