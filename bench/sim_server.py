"""The Tradecloud simulator with N orders and no rate limit, for the backfill benchmark.

    python -m bench.sim_server --orders 100000 --user U --password P [--latency-s 0.15]

Prints ``READY <base url>`` once it serves, then runs until SIGTERM. ``--latency-s`` (or
``POST /_sim/faults {"api_latency_s": ...}`` at any time) answers every API request that
much later: a slow, distant Tradecloud. ``GET /_bench/requests`` says how many API requests
came, the most that were ever open at once and the shortest gap between two starts, as the
server saw them (``POST /_bench/requests/reset`` starts counting again). Two things differ
from ``tcbridge simulate``, both so that the simulator is not what the benchmark measures:

- the orders are made with the simulator's own data model (``Factory.order``, 2-8 lines,
  2-5 KB each) but stored directly, without a change log or webhook bodies;
- the poll query runs on a list sorted once (bisect to the cursor) instead of filtering and
  sorting all N orders for every page. The world does not change during the benchmark, so
  the answers are the same; any other query falls back to the simulator's own code.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import signal
import statistics
import sys
import time
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from tcbridge.simulator import Simulator, api, query
from tcbridge.simulator.model import format_ms, parse_instant_us
from tcbridge.simulator.query import Indexed, Page

CURSOR_KEYS = {False: "lastUpdatedAfter", True: "lastUpdatedSince"}


def fill_orders(sim: Simulator, count: int) -> None:
    """``count`` orders with strictly increasing stamps, 2-8 lines each."""
    world = sim.world
    for i in range(count):
        stamp = format_ms(world._clock.next_ms())  # the simulator's own clock
        order = world.factory.order(stamp, 2 + i % 7)
        world._orders[order["id"]] = world._index(order, stamp)
        # Shown to queries at once, uncopied: the world does not change here.
        world._show("order", world._orders[order["id"]])


def sorted_query() -> Any:
    """run_query on a list sorted once per world size (the world is static here)."""
    original = query.run_query
    cache: dict[int, tuple[list[Indexed], list[int]]] = {}

    def run(items: Iterable[Indexed], body: object, *, inclusive: bool,
            filter_paths: tuple[str, ...], cursor_key: str | None = None) -> Page:
        items = list(items)
        simple = _simple(body, cursor_key or CURSOR_KEYS[inclusive])
        if simple is None:
            return original(items, body, inclusive=inclusive, filter_paths=filter_paths,
                            cursor_key=cursor_key)
        cursor, offset, limit = simple
        if len(items) not in cache:
            ordered = sorted(items, key=lambda it: (it.instant_us, it.entity_id))
            cache.clear()
            cache[len(items)] = (ordered, [it.instant_us for it in ordered])
        ordered, instants = cache[len(items)]
        start = 0
        if cursor is not None:
            us = parse_instant_us(cursor)
            find = bisect.bisect_left if inclusive else bisect.bisect_right
            start = find(instants, us)
        page = ordered[start + offset:start + offset + limit]
        return Page([it.obj for it in page], len(ordered) - start,
                    page[-1].stamp if page else None)

    return run


def _simple(body: object, cursor_key: str) -> tuple[str | None, int, int] | None:
    """(cursor, offset, limit) of a plain cursor query, None for anything else."""
    if not isinstance(body, dict) or set(body) - {"filters", "offset", "limit"}:
        return None
    filters = body.get("filters") or {}
    if not isinstance(filters, dict) or set(filters) - {cursor_key}:
        return None
    cursor, offset, limit = filters.get(cursor_key), body.get("offset", 0), body.get("limit", 100)
    if cursor is not None and not isinstance(cursor, str):
        return None
    if type(offset) is not int or type(limit) is not int or offset < 0 or not 0 <= limit <= 100:
        return None
    return cursor, offset, limit


class RequestLog:
    """When each API request came, how long it took to answer, and how many were open at
    once (outermost middleware, so the injected latency counts as open)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.served_s: list[float] = []
        self.open = 0
        self.peak = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v2/"):
            return await handler(request)
        started = time.monotonic()
        self.starts.append(started)
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            response = await handler(request)
            if isinstance(response, web.Response):
                await response.prepare(request)  # the body is written: count it as served
                await response.write_eof()
            return response
        finally:
            self.open -= 1
            self.served_s.append(time.monotonic() - started)

    async def report(self, request: web.Request) -> web.Response:
        gaps = [b - a for a, b in itertools.pairwise(self.starts)]
        return web.json_response({
            "requests": len(self.starts), "peak_in_flight": self.peak,
            "min_gap_s": min(gaps, default=None),
            "median_gap_s": statistics.median(gaps) if gaps else None,
            "median_served_s": statistics.median(self.served_s) if self.served_s else None,
            "gaps_ms": [round(gap * 1e3, 1) for gap in gaps]})

    async def reset(self, request: web.Request) -> web.Response:
        self.starts, self.served_s, self.peak = [], [], self.open
        return web.json_response({"status": "ok"})

    def install(self, app: web.Application) -> None:
        app.middlewares.insert(0, self.middleware)
        app.router.add_get("/_bench/requests", self.report)
        app.router.add_post("/_bench/requests/reset", self.reset)


async def serve(args: argparse.Namespace) -> None:
    """Build the world, serve it, print READY, wait for SIGTERM."""
    sim = Simulator(username=args.user, password=args.password, rate_limit_per_s=None,
                    seed=args.seed)
    fill_orders(sim, args.orders)
    sim.faults.api_latency_s = args.latency_s
    api.run_query = sorted_query()
    RequestLog().install(sim.app)
    url = await sim.start("127.0.0.1", 0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--user", default="bench@example.com")
    parser.add_argument("--password", default="bench-password")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--latency-s", type=float, default=0.0,
                        help="answer every API request this much later")
    asyncio.run(serve(parser.parse_args()))
    sys.exit(0)


if __name__ == "__main__":
    main()
