"""Load generators: wrk with bench/post.lua, or an aiohttp client when wrk is absent.

``closed_loop`` keeps N connections busy for a duration (wrk -c N -d D); ``fixed_rate`` sends
at a fixed rate whatever the answers take (an open loop, for the end-to-end latency).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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

from bench.bodies import BodyMaker
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
                 force_python: bool = False) -> LoadResult:
    """``closed_loop`` that ends when ``stop`` is set (or after ``max_s``): wrk gets SIGINT,
    which makes it stop and print its summary as at the end of its duration."""
    wrk = wrk_path()
    if wrk and not force_python:
        proc = subprocess.Popen(_wrk_argv(wrk, url, templates_path, prefix, connections,
                                          max_s, token),
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
    return asyncio.run(_python_closed(url, templates, prefix, connections, max_s, token, stop))


def _wrk_argv(wrk: str, url: str, templates_path: Path, prefix: str, connections: int,
              duration_s: float, token: str | None) -> list[str]:
    return [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
            f"--timeout={WRK_TIMEOUT_S}s", "--latency", "-s", str(BENCH / "post.lua"), url,
            "--", str(templates_path), token or "", prefix]


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
                         stop: threading.Event | None = None) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    headers = _headers(token)
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=WRK_TIMEOUT_S)

    async def worker(number: int, session: aiohttp.ClientSession, end: float) -> None:
        nonlocal errors
        maker = BodyMaker(templates, prefix, number + 1)
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
    sent_at: float  # time.time() just before sending
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


async def _fixed_rate(url: str, templates: list[str], prefix: str, rate_per_s: float,
                      duration_s: float, token: str | None) -> RateRun:
    run = RateRun(rate_per_s, duration_s)
    headers = _headers(token)
    maker = BodyMaker(templates, prefix, 0xF)
    loop = asyncio.get_running_loop()

    async def one(session: aiohttp.ClientSession, sent: Sent, body: bytes) -> None:
        started = time.monotonic()
        try:
            async with session.post(url, data=body, headers=headers) as response:
                data = await response.read()
                sent.status = response.status
        except (aiohttp.ClientError, TimeoutError):
            return
        sent.ack_ms = (time.monotonic() - started) * 1e3
        if 200 <= sent.status < 300:
            with contextlib.suppress(ValueError):
                sent.event_id = json.loads(data).get("eventId")

    connector = aiohttp.TCPConnector(limit=256)
    timeout = aiohttp.ClientTimeout(total=30)
    tasks: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        count = int(rate_per_s * duration_s)
        start = loop.time()
        for i in range(count):
            due = start + i / rate_per_s
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                run.max_lag_ms = max(run.max_lag_ms, -delay * 1e3)
            order_id, body = maker.next()
            sent = Sent(order_id, time.time())
            run.sent.append(sent)
            tasks.append(asyncio.create_task(one(session, sent, body)))
        await asyncio.gather(*tasks)
    return run
