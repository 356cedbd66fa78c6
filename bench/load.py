"""Load generators: wrk with bench/post.lua, or an aiohttp client when wrk is absent.

``closed_loop`` keeps N connections busy for a duration (wrk -c N -d D); ``fixed_rate`` sends
at a fixed rate whatever the answers take (an open loop, for the end-to-end latency), over
plain asyncio connections (wrk has no fixed rate, and wrk2 is not on these machines).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from yarl import URL

from bench.bodies import BodyMaker, IdScheme
from bench.common import BENCH, TOKEN, CpuCost, CpuMeter

WRK_TIMEOUT_S = 10


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What a closed-loop run measured."""

    tool: str
    requests: int
    duration_s: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    cpu: CpuCost | None = None  # the server's CPU over the run, per answered request

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def answered(self) -> int:
        """Requests that got an answer and were not counted as errors."""
        return max(0, self.requests - self.errors)

    def as_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "requests": self.requests, "duration_s": self.duration_s,
                "rps": round(self.rps, 1), "errors": self.errors, "p50_ms": self.p50_ms,
                "p90_ms": self.p90_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms,
                "cpu": None if self.cpu is None else self.cpu.as_dict()}


def metered(pid: int | None, run: Callable[[], LoadResult]) -> LoadResult:
    """``run()``, with the CPU that process ``pid`` used meanwhile per answered request."""
    if pid is None:
        return run()
    meter = CpuMeter(pid)
    result = run()
    return replace(result, cpu=meter.cost(result.answered))


def wrk_path() -> str | None:
    """The wrk binary, if installed."""
    return shutil.which("wrk")


def tool_name(force_python: bool = False) -> str:
    """Which load generator ``closed_loop`` will use."""
    return "wrk" if wrk_path() and not force_python else "aiohttp"


def closed_loop(url: str, templates_path: Path, prefix: str, *, connections: int,
                duration_s: float, token: str | None = TOKEN,
                force_python: bool = False) -> LoadResult:
    """Keep ``connections`` requests in flight for ``duration_s``, every body unique."""
    wrk = wrk_path()
    if wrk and not force_python:
        return _run_wrk(wrk, url, templates_path, prefix, connections, duration_s, token)
    templates = templates_path.read_text(encoding="utf-8").splitlines()
    return asyncio.run(_python_closed(url, templates, prefix, connections, duration_s, token))


def closed_until(url: str, templates_path: Path, prefix: str, *, connections: int,
                 stop: threading.Event, max_s: float, token: str | None = TOKEN,
                 force_python: bool = False, ids: IdScheme = "sequential") -> LoadResult:
    """``closed_loop`` that ends when ``stop`` is set (or after ``max_s``): wrk gets SIGINT,
    which makes it stop and print its summary as at the end of its duration."""
    wrk = wrk_path()
    if wrk and not force_python:
        proc = subprocess.Popen(_wrk_argv(wrk, url, templates_path, prefix, connections,
                                          max_s, token, ids),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and not stop.wait(0.1):
            pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        return _wrk_result(proc.returncode, stdout, stderr)
    templates = templates_path.read_text(encoding="utf-8").splitlines()
    return asyncio.run(_python_closed(url, templates, prefix, connections, max_s, token, stop,
                                      ids))


def _wrk_argv(wrk: str, url: str, templates_path: Path, prefix: str, connections: int,
              duration_s: float, token: str | None,
              ids: IdScheme = "sequential") -> list[str]:
    return [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
            f"--timeout={WRK_TIMEOUT_S}s", "--latency", "-s", str(BENCH / "post.lua"), url,
            "--", str(templates_path), token or "", prefix, ids]


def _run_wrk(wrk: str, url: str, templates_path: Path, prefix: str, connections: int,
             duration_s: float, token: str | None) -> LoadResult:
    argv = _wrk_argv(wrk, url, templates_path, prefix, connections, duration_s, token)
    out = subprocess.run(argv, capture_output=True, text=True, check=False,
                         timeout=max(1, round(duration_s)) + 60)
    return _wrk_result(out.returncode, out.stdout, out.stderr)


def _wrk_result(returncode: int, stdout: str, stderr: str) -> LoadResult:
    """The LoadResult of post.lua's BENCH_JSON line."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({returncode}):\n{stdout}\n{stderr}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    errors = sum(data["errors"].values())
    lat = data["latency_us"]
    return LoadResult("wrk", data["requests"], data["duration_us"] / 1e6, errors,
                      lat["p50"] / 1e3, lat["p90"] / 1e3, lat["p99"] / 1e3, lat["max"] / 1e3)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of unsorted values; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _headers(token: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


async def _python_closed(url: str, templates: list[str], prefix: str, connections: int,
                         duration_s: float, token: str | None,
                         stop: threading.Event | None = None,
                         ids: IdScheme = "sequential") -> LoadResult:
    latencies: list[float] = []
    errors = 0
    headers = _headers(token)
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=WRK_TIMEOUT_S)

    async def worker(number: int, session: aiohttp.ClientSession, end: float) -> None:
        nonlocal errors
        maker = BodyMaker(templates, prefix, number + 1, ids)
        while time.monotonic() < end and not (stop is not None and stop.is_set()):
            _, body = maker.next()
            started = time.monotonic()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok = 200 <= response.status < 300
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                latencies.append((time.monotonic() - started) * 1e3)
            else:
                errors += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        end = started + duration_s
        await asyncio.gather(*(worker(i, session, end) for i in range(connections)))
        elapsed = time.monotonic() - started
    return LoadResult("aiohttp", len(latencies) + errors, elapsed, errors,
                      percentile(latencies, 50), percentile(latencies, 90),
                      percentile(latencies, 99), max(latencies, default=0.0))


@dataclass(slots=True)
class Sent:
    """One request of a fixed-rate run."""

    order_id: str
    sent_at: float  # time.time() of when it was due (the schedule of the open loop)
    ack_ms: float = 0.0
    status: int = 0
    event_id: str | None = None


@dataclass(slots=True)
class RateRun:
    """What a fixed-rate run did."""

    rate_per_s: float
    duration_s: float
    sent: list[Sent] = field(default_factory=list)
    max_lag_ms: float = 0.0  # how far the sender fell behind its schedule

    @property
    def ok(self) -> list[Sent]:
        return [s for s in self.sent if 200 <= s.status < 300]


def fixed_rate(url: str, templates_path: Path, prefix: str, *, rate_per_s: float,
               duration_s: float, token: str | None = TOKEN) -> RateRun:
    """Send ``rate_per_s`` unique requests per second for ``duration_s`` (open loop)."""
    templates = templates_path.read_text(encoding="utf-8").splitlines()
    return asyncio.run(_fixed_rate(url, templates, prefix, rate_per_s, duration_s, token))


# The open-loop client is plain asyncio over keep-alive HTTP/1.1 connections, requests
# written as prepared bytes and answers read by Content-Length: about half the CPU per
# request of aiohttp's client (0.15 against 0.30 ms, the run's bookkeeping included), which
# on two cores is taken from the server it measures. Every server it talks to here is
# aiohttp, which always sends Content-Length (an answer without one is an error).
RATE_CONNECTIONS = 64  # opened before the first request; more (up to 256) when all are busy
RATE_MAX_CONNECTIONS = 256
RATE_TIMEOUT_S = 30.0  # an answer later than this after the last request counts as failed
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


class _RateConnection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer parsed by length."""

    def __init__(self, client: _RateClient) -> None:
        self._client = client
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.current: tuple[Sent, float] | None = None  # the request and its due time

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, sent: Sent, due: float, request: bytes) -> None:
        assert self.transport is not None
        self.current = (sent, due)
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = bytes(self._buffer[:head_end])
        length = _CONTENT_LENGTH.search(head)
        if length is None:
            raise RuntimeError(f"fixed_rate: an answer without Content-Length: {head[:200]!r}")
        end = head_end + 4 + int(length.group(1))
        if len(self._buffer) < end:
            return
        body = bytes(self._buffer[head_end + 4:end])
        del self._buffer[:end]
        current, self.current = self.current, None
        if current is not None:
            self._client.answered(current[0], current[1], int(head[9:12]), body)
        if _CONNECTION_CLOSE.search(head):
            # The server closes it after this answer: a request written on it now would be
            # lost unread, and counted as failed.
            self._client.retire(self)
            if self.transport is not None:
                self.transport.close()
        else:
            self._client.free(self)

    def connection_lost(self, exc: Exception | None) -> None:
        current, self.current = self.current, None
        self._client.lost(self, None if current is None else current[0])


class _RateClient:
    """The connections of one fixed-rate run and the requests waiting for one."""

    def __init__(self, host: str, port: int, path: str, token: str | None) -> None:
        self._host, self._port = host, port
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self._head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      f"Content-Type: application/json\r\n{auth}Content-Length: ").encode()
        self._idle: list[_RateConnection] = []
        self._all: set[_RateConnection] = set()
        self._waiting: collections.deque[tuple[Sent, float, bytes]] = collections.deque()
        self._opening = 0
        self._growing: set[asyncio.Task[None]] = set()  # referenced until done
        self.open_requests = 0
        self.done = asyncio.Event()

    async def open(self, count: int) -> None:
        await asyncio.gather(*(self._open() for _ in range(count)))

    async def _open(self) -> None:
        self._opening += 1
        try:
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: _RateConnection(self), self._host, self._port)
        finally:
            self._opening -= 1
        self._all.add(conn)
        self.free(conn)

    def request(self, sent: Sent, due: float, body: bytes) -> None:
        self.open_requests += 1
        self.done.clear()
        request = b"".join([self._head, str(len(body)).encode(), b"\r\n\r\n", body])
        if self._idle:
            self._idle.pop().send(sent, due, request)
            return
        self._waiting.append((sent, due, request))
        self._grow()

    def _grow(self) -> None:
        """One more connection for the requests waiting, while under the limit."""
        if len(self._all) + self._opening < RATE_MAX_CONNECTIONS:
            task = asyncio.get_running_loop().create_task(self._open_more())
            self._growing.add(task)
            task.add_done_callback(self._growing.discard)

    async def _open_more(self) -> None:
        # A server that refuses more connections leaves the requests waiting for the ones
        # open; those it never answers count as failed at the end.
        with contextlib.suppress(OSError):
            await self._open()

    def free(self, conn: _RateConnection) -> None:
        if self._waiting:
            conn.send(*self._waiting.popleft())
        else:
            self._idle.append(conn)

    def answered(self, sent: Sent, due: float, status: int, body: bytes) -> None:
        sent.status = status
        sent.ack_ms = (asyncio.get_running_loop().time() - due) * 1e3
        if 200 <= status < 300:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                sent.event_id = orjson.loads(body).get("eventId")
        self._settled()

    def retire(self, conn: _RateConnection) -> None:
        """Forget a connection that is closing (the server said so, or it is gone), once;
        a server closing connections must not strand the requests waiting for one."""
        if conn not in self._all:
            return
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        if self._waiting:
            self._grow()

    def lost(self, conn: _RateConnection, sent: Sent | None) -> None:
        """A connection closed (by the server, or at the end): its request failed."""
        self.retire(conn)
        if sent is not None:
            self._settled()

    def _settled(self) -> None:
        self.open_requests -= 1
        if self.open_requests == 0:
            self.done.set()

    def close(self) -> None:
        """Close every connection; a request still unanswered keeps status 0 (failed)."""
        for task in self._growing:
            task.cancel()
        for conn in list(self._all):
            conn.current = None
            if conn.transport is not None:
                conn.transport.close()


async def _fixed_rate(url: str, templates: list[str], prefix: str, rate_per_s: float,
                      duration_s: float, token: str | None) -> RateRun:
    """Each request's ``sent_at`` is when it was due (a request that waited for a free
    connection counts the wait), and its ``ack_ms`` runs from then to the answer."""
    run = RateRun(rate_per_s, duration_s)
    target = URL(url)
    client = _RateClient(target.host or "127.0.0.1", target.port or 80, target.raw_path_qs,
                         token)
    await client.open(RATE_CONNECTIONS)
    maker = BodyMaker(templates, prefix, 0xF)
    loop = asyncio.get_running_loop()
    count = int(rate_per_s * duration_s)
    start = loop.time()
    wall_offset = time.time() - start
    sent_count = 0
    while sent_count < count:
        now = loop.time()
        due_count = min(count, int((now - start) * rate_per_s) + 1)
        while sent_count < due_count:
            due = start + sent_count / rate_per_s
            run.max_lag_ms = max(run.max_lag_ms, (now - due) * 1e3)
            order_id, body = maker.next()
            sent = Sent(order_id, wall_offset + due)
            run.sent.append(sent)
            client.request(sent, due, body)
            sent_count += 1
        await asyncio.sleep(max(0.0, start + sent_count / rate_per_s - loop.time()))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(client.done.wait(), RATE_TIMEOUT_S)
    client.close()
    return run
