"""The one place that builds, runs and stops everything, in order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from tcbridge import __version__
from tcbridge.config import Settings
from tcbridge.dispatch import Dispatcher, Lane, make_route
from tcbridge.fetcher import Fetcher
from tcbridge.handlers import build_handler
from tcbridge.poller import Poller
from tcbridge.store import Store
from tcbridge.tradecloud import TradecloudClient
from tcbridge.webhook import build_app

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1


@dataclass(slots=True)
class Parts:
    """Everything :func:`serve` builds, so shutdown can stop it in order."""

    store: Store
    session: aiohttp.ClientSession | None = None
    client: TradecloudClient | None = None
    runner: web.AppRunner | None = None
    dispatcher: Dispatcher | None = None
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    dispatch_wake: asyncio.Event = field(default_factory=asyncio.Event)
    fetch_wake: asyncio.Event = field(default_factory=asyncio.Event)
    bound: list[tuple[str, int]] = field(default_factory=list)


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    """Run the daemon until ``stop`` is set or a part crashes; returns the exit code."""
    route = make_route(settings.handlers)
    parts = Parts(store=Store(settings.store.path, settings.store, route=route))
    try:
        await startup(settings, parts, stop)
        return await main_loop(parts, stop)
    finally:
        await shutdown(settings, parts)


async def startup(settings: Settings, parts: Parts, stop: asyncio.Event) -> None:
    """Open the store, then the HTTP client, the listener and the background loops."""
    await parts.store.open()
    parts.session = aiohttp.ClientSession(
        headers={"User-Agent": f"tcbridge/{__version__}"}, raise_for_status=False
    )
    parts.client = TradecloudClient(parts.session, settings.tradecloud)
    await _start_dispatcher(settings, parts, stop)
    if settings.webhook_enabled:
        await _start_listener(settings, parts)
    fetcher = Fetcher(settings.fetch, parts.client, parts.store, parts.fetch_wake,
                      parts.dispatch_wake)
    _spawn(parts, "fetcher", fetcher.run(stop))
    if settings.poll_enabled:
        poller = Poller(settings.poll, parts.client, parts.store, parts.dispatch_wake,
                        api=settings.tradecloud.api)
        _spawn(parts, "poller", poller.run(stop))
    log.info("tcbridge.started", version=__version__, mode=settings.mode,
             store=str(settings.store.path), listening=parts.bound)


async def _start_dispatcher(settings: Settings, parts: Parts, stop: asyncio.Event) -> None:
    assert parts.session is not None
    lanes = [Lane(h, build_handler(h, parts.session), parts.store) for h in settings.handlers]
    parts.dispatcher = Dispatcher(lanes, parts.store, parts.dispatch_wake)
    await parts.dispatcher.start()
    _spawn(parts, "dispatcher", parts.dispatcher.run(stop))
    if not lanes:
        log.warning("dispatch.no_handlers",
                    message="no [[handlers]] configured: events are stored, not delivered")


async def _start_listener(settings: Settings, parts: Parts) -> None:
    hook = settings.webhook
    if hook.auth == "none":
        log.warning("webhook.auth_disabled",
                    message="webhook.auth = 'none': anyone who can reach the port can post")
    app = build_app(hook, parts.store, parts.dispatch_wake, parts.fetch_wake,
                    retry_after_s=settings.store.retry_after_s)
    parts.runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                 shutdown_timeout=settings.shutdown_timeout_s)
    await parts.runner.setup()
    site = web.TCPSite(parts.runner, hook.host, hook.port, ssl_context=_tls(settings),
                       reuse_address=True)
    await site.start()
    for sock in parts.runner.addresses:
        parts.bound.append((str(sock[0]), int(sock[1])))


def _tls(settings: Settings) -> ssl.SSLContext | None:
    hook = settings.webhook
    if hook.tls_cert is None or hook.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(hook.tls_cert, hook.tls_key)
    return context


def _spawn(parts: Parts, name: str, coro: Coroutine[Any, Any, None]) -> None:
    parts.tasks[name] = asyncio.create_task(coro, name=f"tcbridge-{name}")


async def main_loop(parts: Parts, stop: asyncio.Event) -> int:
    """Wait for ``stop``; a background loop that ends early is a crash and stops the daemon."""
    stopper = asyncio.create_task(stop.wait(), name="tcbridge-stop")
    try:
        done, _ = await asyncio.wait(
            [stopper, *parts.tasks.values()], return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        stopper.cancel()
    for name, task in parts.tasks.items():
        if task in done and not stop.is_set():
            error = task.exception() if not task.cancelled() else None
            log.error("tcbridge.part_crashed", part=name, error=repr(error), exc_info=error)
            stop.set()
            return EXIT_FAILED
    return EXIT_OK


async def shutdown(settings: Settings, parts: Parts) -> None:
    """Stop accepting webhooks, stop the loops, close the client, close the store."""
    log.info("tcbridge.stopping")
    if parts.runner is not None:
        await parts.runner.cleanup()  # waits for requests in flight, up to the timeout
    if parts.dispatcher is not None:
        cut = await parts.dispatcher.drain(settings.shutdown_timeout_s)
        if cut:
            log.warning("dispatch.cut_off", deliveries=cut, message="left pending for next start")
    await _stop_tasks(parts.tasks.values(), settings.shutdown_timeout_s)
    if parts.dispatcher is not None:
        await parts.dispatcher.close()
    if parts.client is not None:
        await parts.client.close()
    if parts.session is not None:
        await parts.session.close()
    await parts.store.close()
    log.info("tcbridge.stopped")


async def _stop_tasks(tasks: Any, timeout_s: float) -> None:
    pending = [task for task in tasks if not task.done()]
    if pending:
        _, late = await asyncio.wait(pending, timeout=timeout_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("tcbridge.part_failed", task=task.get_name(), error=repr(task.exception()))


def run(settings: Settings) -> int:
    """Run the daemon in a fresh event loop with signal handling; returns the exit code."""
    return asyncio.run(_run_with_signals(settings))


async def _run_with_signals(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, _on_sigint, stop)
    try:
        return await serve(settings, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def _on_sigint(stop: asyncio.Event) -> None:
    if stop.is_set():  # a second Ctrl-C: the operator does not want to wait
        log.warning("tcbridge.forced_exit")
        os._exit(130)
    stop.set()
