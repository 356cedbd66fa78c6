"""The backfill benchmark's parts: the simulator process and the fetch-only baseline."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import SecretStr

from bench.common import PYTHON, Process
from bench.unpaced import unpace
from tcbridge.config import TradecloudSettings
from tcbridge.poller import next_position, page_cursor
from tcbridge.tradecloud import TradecloudClient

SIM_USER, SIM_PASSWORD = "bench@example.com", "bench-password"  # loopback only


class SimServer(Process):
    """bench/sim_server.py with ``orders`` orders; ``url`` once started."""

    def __init__(self, workdir: Path, orders: int) -> None:
        argv = [PYTHON, "-m", "bench.sim_server", "--orders", str(orders),
                "--user", SIM_USER, "--password", SIM_PASSWORD]
        super().__init__("simulator", argv, workdir / "simulator.log")
        self.url = ""
        self._log_from = 0

    def start(self) -> SimServer:
        # The log is appended to: only what this start writes counts.
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        super().start()
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            text = self.log_path.read_bytes()[self._log_from:].decode(errors="replace")
            for line in text.splitlines():
                if line.startswith("READY "):
                    self.url = line.split()[1]
                    return self.url
            time.sleep(0.1)
        raise TimeoutError(f"simulator not ready:\n{self.tail()}")

    def set_latency(self, latency_s: float) -> None:
        """Answer every API request ``latency_s`` later from now on (the simulator's fault)."""
        self._call("POST", "/_sim/faults", {"api_latency_s": latency_s})

    def reset_requests(self) -> None:
        self._call("POST", "/_bench/requests/reset", {})

    def requests(self) -> dict[str, Any]:
        """API requests since the last reset: count, peak in flight, shortest start gap."""
        return dict(self._call("GET", "/_bench/requests", None))

    def _call(self, method: str, path: str, body: object) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,  # noqa: S310
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
            return json.loads(response.read())


def tradecloud_section(url: str) -> dict[str, object]:
    """The [tradecloud] config section for the daemon."""
    return {"base_url": url, "username": SIM_USER, "password": SIM_PASSWORD,
            "api": "poll", "timeout_s": 60}


@dataclass(frozen=True, slots=True)
class Fetched:
    """What the bare fetch loop did: items, pages, seconds, and each round trip."""

    items: int
    pages: int
    seconds: float
    round_trips_s: list[float]

    @property
    def median_round_trip_s(self) -> float:
        return statistics.median(self.round_trips_s)


def fetch_only(url: str, start_from: str, page_size: int,
               max_pages: int | None = None) -> Fetched:
    """Fetch every page the poller would (or the first ``max_pages``), with the same client,
    unpaced, storing nothing, timing each request."""
    return asyncio.run(_fetch_only(url, start_from, page_size, max_pages))


async def _fetch_only(url: str, start_from: str, page_size: int,
                      max_pages: int | None) -> Fetched:
    unpace()
    settings = TradecloudSettings(base_url=url, username=SIM_USER,
                                  password=SecretStr(SIM_PASSWORD), api="poll", timeout_s=60)
    items = pages = 0
    round_trips: list[float] = []
    async with aiohttp.ClientSession() as session:
        client = TradecloudClient(session, settings)
        cursor, offset = start_from, 0
        started = time.perf_counter()
        while max_pages is None or pages < max_pages:
            sent = time.perf_counter()
            page = await client.poll("order", cursor, offset=offset, limit=page_size)
            round_trips.append(time.perf_counter() - sent)
            pages += 1
            items += len(page.items)
            stamps = [item.get("lastUpdatedAt") for item in page.items]
            if len(page.items) < page_size:
                page_cursor(page, stamps, api="poll")
                break
            position = next_position(stamps, cursor, offset, inclusive=False)
            cursor, offset = position.cursor, position.offset
        elapsed = time.perf_counter() - started
        await client.close()
    return Fetched(items, pages, elapsed, round_trips)
