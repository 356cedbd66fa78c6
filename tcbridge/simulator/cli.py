"""``tcbridge simulate``: options and the run loop, for the main CLI to wire in."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import structlog

from tcbridge.simulator.core import Simulator
from tcbridge.simulator.oauth import DEFAULT_SCOPE_SUFFIX

log = structlog.get_logger(__name__)


def webhook_auth(text: str) -> tuple[str, str]:
    """Parse ``bearer:TOKEN``, ``basic:USER:PASS`` or ``oauth2:CLIENT_ID:SECRET:SCOPE`` for
    --webhook-auth (oauth2: tokens from the simulator's own token endpoint)."""
    scheme, sep, secret = text.partition(":")
    scheme = scheme.lower()
    if scheme == "oauth2":
        if len(secret.split(":", 2)) != 3 or not all(secret.split(":", 2)):
            raise argparse.ArgumentTypeError("expected oauth2:CLIENT_ID:CLIENT_SECRET:SCOPE")
        scope = secret.split(":", 2)[2]
        if not scope.endswith(DEFAULT_SCOPE_SUFFIX) or scope == DEFAULT_SCOPE_SUFFIX:
            # The token endpoint refuses any other scope: the sender would retry for ever.
            raise argparse.ArgumentTypeError(
                f"SCOPE must be <resource>{DEFAULT_SCOPE_SUFFIX}, e.g. api://tcbridge/.default")
        return scheme, secret
    if not sep or not secret or scheme not in ("bearer", "basic"):
        raise argparse.ArgumentTypeError("expected bearer:TOKEN or basic:USER:PASS")
    if scheme == "basic" and ":" not in secret:
        raise argparse.ArgumentTypeError("expected basic:USER:PASS")
    return scheme, secret


def share(text: str) -> float:
    """Parse a share between 0 and 1 for the rate options."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("expected a number between 0 and 1")
    return value


def seconds(text: str) -> float:
    """Parse a non-negative number of seconds."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("expected a number >= 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser``."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, default=8765, help="port to listen on, 0 = any free (default 8765)")
    add("--username", default="integration@example.com", help="integration user e-mail")
    add("--password", default="secret", help="integration user password")
    add("--webhook-url", default=None,
        help="base URL of the bridge's webhook receiver; /order and /shipment are appended")
    add("--webhook-auth", type=webhook_auth, default=None,
        metavar="bearer:TOKEN|basic:USER:PASS|oauth2:CLIENT_ID:SECRET:SCOPE",
        help="how the webhook sender authenticates to the receiver")
    add("--webhook-mode", choices=["post", "get"], default="post",
        help="post: event in the body (current); get: id in the path (legacy)")
    add("--rate", type=float, default=1.0, help="random changes per second, 0 = none (default 1)")
    add("--initial-orders", type=int, default=10, help="orders to create at start (default 10)")
    add("--drop-rate", type=share, default=0.0, help="share of webhooks never sent (0..1)")
    add("--duplicate-rate", type=share, default=0.0, help="share of webhooks sent twice (0..1)")
    add("--reorder", action="store_true", help="deliver queued webhooks in random order")
    add("--delay-s", type=seconds, default=0.0, help="delay before each webhook delivery, seconds")
    add("--api-error-rate", type=share, default=0.0,
        help="share of API requests answered with 503 (0..1)")
    add("--api-latency-s", type=seconds, default=0.0, help="added latency per API request, seconds")
    add("--rate-limit", type=float, default=10.0,
        help="API requests per second before 429, 0 = unlimited (default 10)")
    add("--token-ttl-s", type=float, default=3600.0, help="access token lifetime (default 3600)")
    add("--refresh-ttl-s", type=float, default=86400.0,
        help="refresh token lifetime (default 86400)")
    add("--seed", type=int, default=0, help="seed of the random data and faults (default 0)")
    add("--single-delivery", action="store_true",
        help="the company's order webhook sends singleDeliveryOrderEvent bodies")
    add("--search-cursor-filter", choices=["lastUpdatedAfter", "lastUpdatedSince"],
        default="lastUpdatedAfter",
        help="the search API's cursor filter; lastUpdatedSince plays a pre-2024 server")
    add("--oauth-token-ttl-s", type=float, default=3600.0,
        help="lifetime of the identity provider's access tokens (default 3600)")
    add("--index-delay-s", type=seconds, default=0.0,
        help="changes show in poll/search results only this long after they are made")


def build_simulator(args: argparse.Namespace) -> Simulator:
    """A Simulator configured from parsed options."""
    sim = Simulator(
        username=args.username, password=args.password, access_token_ttl_s=args.token_ttl_s,
        refresh_token_ttl_s=args.refresh_ttl_s, rate_limit_per_s=args.rate_limit or None,
        seed=args.seed, webhook_url=args.webhook_url, webhook_auth=args.webhook_auth,
        webhook_mode=args.webhook_mode, single_delivery=args.single_delivery,
        search_cursor_filter=args.search_cursor_filter,
        oauth_token_ttl_s=args.oauth_token_ttl_s, index_delay_s=args.index_delay_s)
    sim.faults.update({
        "webhook_drop_rate": args.drop_rate, "webhook_duplicate_rate": args.duplicate_rate,
        "webhook_reorder": args.reorder, "webhook_delay_s": args.delay_s,
        "api_error_rate": args.api_error_rate, "api_latency_s": args.api_latency_s})
    return sim


async def run_from_args(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Serve the simulator and its change stream until ``stop`` is set; return 0."""
    sim = build_simulator(args)
    url = await sim.start(args.host, args.port)
    try:
        sim.add_orders(args.initial_orders)
        log.info("simulator.started", url=url, username=sim.username, rate=args.rate,
                 oauth2_issuer=sim.oauth.issuer,
                 webhook_url=args.webhook_url, initial_orders=args.initial_orders)
        stream = asyncio.create_task(sim.run_changes(args.rate)) if args.rate > 0 else None
        await stop.wait()
        if stream is not None:
            stream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream
    finally:
        await sim.stop()
    log.info("simulator.stopped", changes=len(sim.world.changes), requests=len(sim.requests))
    return 0
