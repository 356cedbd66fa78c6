"""The baseline: a bare aiohttp app on the same machine that parses the JSON and answers 200.

No auth, no validation, no store: what this Python and aiohttp can do per request at best.

    python bench/baseline_app.py --port 8099
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    """Parse the body, answer 200 with a small JSON body like tcbridge's."""
    body = json.loads(await request.read())
    return web.json_response({"status": "ok", "keys": len(body)})


def build_app() -> web.Application:
    """The baseline app: POST /webhook/{kind}, and GET /readyz."""
    app = web.Application(client_max_size=10 * 1024 * 1024)
    app.router.add_post("/webhook/{kind}", handle)
    app.router.add_get("/readyz", lambda request: web.json_response({"ready": True}))
    return app


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(build_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
