"""The backfill benchmark's parts: the simulator process and the fetch-only baseline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

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

    def wait_ready(self, timeout_s: float = 300.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("READY "):
                    self.url = line.split()[1]
                    return self.url
            time.sleep(0.1)
        raise TimeoutError(f"simulator not ready:\n{self.tail()}")


def tradecloud_section(url: str) -> dict[str, object]:
    """The [tradecloud] config section for the daemon."""
    return {"base_url": url, "username": SIM_USER, "password": SIM_PASSWORD,
            "api": "poll", "timeout_s": 60}


def fetch_only(url: str, start_from: str, page_size: int) -> tuple[int, int, float]:
    """Fetch every page the poller would, with the same client, storing nothing.

    Returns (items, pages, seconds)."""
    return asyncio.run(_fetch_only(url, start_from, page_size))


async def _fetch_only(url: str, start_from: str, page_size: int) -> tuple[int, int, float]:
    unpace()
    settings = TradecloudSettings(base_url=url, username=SIM_USER,
                                  password=SecretStr(SIM_PASSWORD), api="poll", timeout_s=60)
    items = pages = 0
    async with aiohttp.ClientSession() as session:
        client = TradecloudClient(session, settings)
        cursor, offset = start_from, 0
        started = time.perf_counter()
        while True:
            page = await client.poll("order", cursor, offset=offset, limit=page_size)
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
    return items, pages, elapsed
