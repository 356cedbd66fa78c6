"""The admin listener: ``/healthz``, ``/readyz`` and ``/metrics``, on their own port.

Metrics and health stay off the public webhook port: the webhook faces Tradecloud,
this faces the people and the monitoring that run tcbridge.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from tcbridge.metrics import Metrics

Reasons = Callable[[], Awaitable[list[str]]]
Refresh = Callable[[], Awaitable[None]]
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The OpenAPI document of tcbridge's own endpoints (webhook and admin), shipped in the package.
OPENAPI = resources.files("tcbridge").joinpath("openapi.json").read_bytes()


def build_admin_app(
    metrics: Metrics, readiness: Reasons, refresh: Refresh,
    alive: Callable[[], bool] = lambda: True,
    about: Callable[[], dict[str, Any]] = dict,
) -> web.Application:
    """``readiness`` returns why the daemon is not ready (empty: ready); ``refresh`` updates
    the gauges read from the store before a scrape; ``alive`` is false once a part that
    cannot come back (the store's writer thread) is gone; ``about`` adds to /readyz's
    answer (this replica's name, whether it polls)."""

    async def healthz(request: web.Request) -> web.Response:
        # Answering at all proves the process and its event loop are alive.
        if not alive():
            return web.json_response({"status": "dead", "reason": "store writer stopped"},
                                      status=503)
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        reasons = await readiness()
        if reasons:
            return web.json_response({"status": "not ready", "reasons": reasons, **about()},
                                     status=503)
        return web.json_response({"status": "ready", "reasons": [], **about()})

    async def scrape(request: web.Request) -> web.Response:
        await refresh()
        return web.Response(body=metrics.render(),
                            headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=OPENAPI, content_type="application/json")

    app = web.Application()
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", scrape)
    return app
