"""The one place that builds, runs and stops everything, in order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import signal
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from tcbridge import __version__, retention
from tcbridge.admin import build_admin_app
from tcbridge.config import Settings, secret_values, service_manager_environ
from tcbridge.dispatch import Dispatcher, Lane, make_route
from tcbridge.documents import with_documents
from tcbridge.errors import StoreError
from tcbridge.fetcher import Fetcher
from tcbridge.handlers import build_handler
from tcbridge.leader import Coordinator
from tcbridge.metrics import Metrics
from tcbridge.oauth2 import TokenVerifier, build_verifier
from tcbridge.poller import Poller
from tcbridge.store import StoreBackend, make_store
from tcbridge.store.coordination import default_node_id
from tcbridge.supervisor import EXIT_FAILED, EXIT_OK, Supervisor
from tcbridge.systemd import Notifier
from tcbridge.tradecloud import TradecloudClient
from tcbridge.webhook import build_app, drain, limit_connections

log = structlog.get_logger(__name__)

__all__ = ["EXIT_FAILED", "EXIT_OK", "Parts", "readiness", "run", "serve"]

READY_PING_TIMEOUT_S = 2.0
# File descriptors kept for everything but webhook connections: the store, the client's
# connection pool, handler pipes and sockets, the admin listener.
RESERVED_FDS = 256
STALE_POLL_INTERVALS = 3
# Background loops (poller, fetcher, retention) hold nothing that a cancel can lose (each
# page commits with its cursor), so stopping does not wait out their HTTP retries.
LOOP_STOP_GRACE_S = 0.25
LOGOUT_TIMEOUT_S = 2.0
STORE_RETRY_S = 1.0
STORE_CLOSE_MIN_S = 2.0  # queued commits get this long even when the deadline has passed


@dataclass(slots=True)
class Parts:
    """Everything :func:`serve` builds, so shutdown can stop it in order."""

    store: StoreBackend
    supervisor: Supervisor
    metrics: Metrics = field(default_factory=Metrics)
    session: aiohttp.ClientSession | None = None
    client: TradecloudClient | None = None
    runner: web.AppRunner | None = None
    webhook_app: web.Application | None = None
    admin: web.AppRunner | None = None
    dispatcher: Dispatcher | None = None
    poller: Poller | None = None
    coordinator: Coordinator | None = None  # replicas on one PostgreSQL store
    node_id: str = field(default_factory=default_node_id)
    dispatch_wake: asyncio.Event = field(default_factory=asyncio.Event)
    fetch_wake: asyncio.Event = field(default_factory=asyncio.Event)
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    bound: list[tuple[str, int]] = field(default_factory=list)
    admin_bound: list[tuple[str, int]] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)
    notifier: Notifier = field(default_factory=lambda: Notifier(None))


def replica_id(settings: Settings) -> str:
    """This daemon's default name (``[node] id`` unset) in a shared store's claims and
    heartbeats: its host and listening port (stable across restarts, distinct for two
    daemons on one host)."""
    port = settings.webhook.port if settings.webhook_enabled else settings.admin.port
    return f"{socket.gethostname()}:{port}"


async def serve(
    settings: Settings, stop: asyncio.Event, *, notifier: Notifier | None = None
) -> int:
    """Run the daemon until ``stop`` is set or a part crashes; returns the exit code."""
    metrics = Metrics()
    route = make_route(settings.handlers, on_skip=metrics.count_skip)
    node_id = settings.node.id or replica_id(settings)
    parts = Parts(store=make_store(settings.store, route=route, replica_id=node_id,
                                   lease_s=settings.delivery.lease_s),
                  supervisor=Supervisor(stop), metrics=metrics, node_id=node_id)
    if notifier is not None:
        parts.notifier = notifier
    try:
        await startup(settings, parts, stop)
        parts.notifier.ready(status_line(settings, parts))
        await stop.wait()  # a signal, or the supervisor after a part failed
    finally:
        stop.set()  # a failed start-up must not wait for loops that were already started
        await shutdown(settings, parts)
        parts.notifier.close()
    # Read after shutdown: a part that fails while draining also makes the exit non-zero.
    return parts.supervisor.exit_code


async def startup(settings: Settings, parts: Parts, stop: asyncio.Event) -> None:
    """Open the store, then the HTTP client, the loops, the listeners."""
    # A store that cannot be written yet (a full disk) answers 503 until it can.
    await parts.store.open(keep_trying=True)
    parts.metrics.watch_store(lambda: {
        "errors": parts.store.health().errors,
        "rejected_truncated": parts.store.rejected_truncated,
        "rejected_dropped": parts.store.rejected_dropped})
    _spawn(parts, "store", _watch_store(parts.store, stop))
    parts.session = aiohttp.ClientSession(
        headers={"User-Agent": f"tcbridge/{__version__}"}, raise_for_status=False
    )
    parts.client = TradecloudClient(parts.session, settings.tradecloud)
    await _start_dispatcher(settings, parts, stop)
    fetcher = Fetcher(settings.fetch, parts.client, parts.store, parts.fetch_wake,
                      parts.dispatch_wake, metrics=parts.metrics)
    _spawn(parts, "fetcher", fetcher.run(stop))
    _spawn(parts, "retention", retention.run(parts.store, settings.store, stop))
    _start_coordinator(settings, parts, stop)
    if settings.poll_enabled:
        parts.poller = Poller(settings.poll, parts.client, parts.store, parts.dispatch_wake,
                              api=settings.tradecloud.api, hybrid=settings.mode == "hybrid",
                              metrics=parts.metrics,
                              inclusive=settings.tradecloud.cursor_inclusive,
                              gate=parts.coordinator)
        _spawn(parts, "poller", parts.poller.run(stop))
    if settings.admin.enabled:
        await _start_admin(settings, parts)
    if settings.webhook_enabled:
        await _start_listener(settings, parts)
    if parts.notifier.watchdog_interval_s is not None:
        _spawn(parts, "watchdog", parts.notifier.watchdog_loop(
            stop, lambda: status_line(settings, parts),
            healthy=lambda: parts.store.writer_alive))
    log.info("tcbridge.started", version=__version__, mode=settings.mode,
             store=settings.store.location, listening=parts.bound, admin=parts.admin_bound,
             base_url=settings.tradecloud.base_url if settings.poll_enabled else None,
             gc_thresholds=list(gc.get_threshold()), gc_frozen=gc.get_freeze_count())


def _start_coordinator(settings: Settings, parts: Parts, stop: asyncio.Event) -> None:
    """On PostgreSQL, replicas share the store: this one polls a kind only while it holds
    the kind's lock, and writes a heartbeat row (``tcbridge status`` lists them)."""
    if settings.store.backend != "postgresql":
        return  # one SQLite file, one daemon: its poller always polls
    assert settings.store.dsn is not None  # the settings' validator made sure
    node = settings.node
    parts.coordinator = Coordinator(
        settings.store.dsn.get_secret_value(), node_id=parts.node_id,
        kinds=settings.poll.kinds if settings.poll_enabled else [],
        lock_check_s=node.lock_check_s, heartbeat_s=node.heartbeat_s)
    _spawn(parts, "coordinator", parts.coordinator.run(stop))


def poller_role(settings: Settings, parts: Parts) -> str:
    """``active`` (this replica polls), ``standby`` (another one does) or ``disabled``."""
    if not settings.poll_enabled:
        return "disabled"
    return "active" if parts.coordinator is None else parts.coordinator.role


def polled_kinds(settings: Settings, parts: Parts) -> list[str]:
    """The kinds this process polls now (each kind has one poller among the replicas)."""
    if not settings.poll_enabled:
        return []
    if parts.coordinator is None:
        return list(settings.poll.kinds)
    return parts.coordinator.polling


async def _watch_store(store: StoreBackend, stop: asyncio.Event) -> None:
    """Raises (a part crashed: the daemon exits non-zero) when the writer thread dies."""
    assert store.failed is not None
    stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    failed: asyncio.Future[Any] = store.failed
    try:
        await asyncio.wait([failed, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if store.failed.done():
        raise StoreError(store.failed.result())


async def _start_dispatcher(settings: Settings, parts: Parts, stop: asyncio.Event) -> None:
    assert parts.session is not None
    secrets = secret_values(settings)
    lanes = [Lane(h, with_documents(h, build_handler(h, parts.session, secrets=secrets),
                                    parts.session, parts.client, settings.store.path,
                                    parts.metrics.count_documents),
                  parts.store, metrics=parts.metrics, lease_s=settings.delivery.lease_s)
             for h in settings.handlers]
    parts.dispatcher = Dispatcher(lanes, parts.store, parts.dispatch_wake)
    _spawn(parts, "dispatcher", _dispatch(parts.dispatcher, stop))
    if not lanes:
        log.warning("dispatch.no_handlers",
                    message="no [[handlers]] configured: events are stored, not delivered")


async def _dispatch(dispatcher: Dispatcher, stop: asyncio.Event) -> None:
    """Release what a crash left running, then deliver. While the store cannot be written
    (a full disk at start) keep trying: the listener answers 503 meanwhile."""
    while True:
        try:
            await dispatcher.start()
            break
        except StoreError as e:
            log.warning("dispatch.start_deferred", error=str(e))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=STORE_RETRY_S)
            if stop.is_set():
                return
    await dispatcher.run(stop)


async def _start_listener(settings: Settings, parts: Parts) -> None:
    hook = settings.webhook
    if hook.auth == "none":
        log.warning("webhook.auth_disabled",
                    message="webhook.auth = 'none': anyone who can reach the port can post")
    app = build_app(hook, parts.store, parts.dispatch_wake, parts.fetch_wake,
                    retry_after_s=settings.store.retry_after_s, metrics=parts.metrics,
                    draining=parts.draining, verifier=await _oauth2_verifier(settings, parts))
    parts.webhook_app = app
    max_connections = _connection_limit(hook.max_connections)
    parts.runner = await _listen(
        app, hook.host, hook.port, settings.shutdown_timeout_s, _tls(settings),
        keepalive_timeout_s=hook.idle_timeout_s,
        prepare=lambda runner: limit_connections(_server(runner), app, max_connections),
    )
    parts.bound.extend(_addresses(parts.runner))


async def _oauth2_verifier(settings: Settings, parts: Parts) -> TokenVerifier | None:
    """With auth = 'oauth2', a verifier on the shared session, its key set being loaded."""
    if settings.webhook.auth != "oauth2":
        return None
    assert parts.session is not None
    verifier = build_verifier(settings.webhook, parts.session, parts.metrics)
    verifier.prefetch()
    return verifier


async def _start_admin(settings: Settings, parts: Parts) -> None:
    app = build_admin_app(parts.metrics, lambda: readiness(settings, parts),
                          lambda: _refresh_gauges(parts),
                          alive=lambda: parts.store.writer_alive or parts.draining.is_set(),
                          about=lambda: {"poller": poller_role(settings, parts),
                                         "polls": polled_kinds(settings, parts),
                                         "node": parts.node_id})
    parts.admin = await _listen(app, settings.admin.host, settings.admin.port, 1.0, None)
    parts.admin_bound.extend(_addresses(parts.admin))


async def _listen(
    app: web.Application, host: str, port: int, shutdown_timeout_s: float,
    tls: ssl.SSLContext | None, *, keepalive_timeout_s: float = 15.0,
    prepare: Callable[[web.AppRunner], None] | None = None,
) -> web.AppRunner:
    # aiohttp's own keep-alive default is an hour, and it runs from the connection's
    # opening until a whole request head has arrived: idle and slow clients held a file
    # descriptor each for that long.
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=shutdown_timeout_s,
                           keepalive_timeout=keepalive_timeout_s)
    await runner.setup()
    if prepare is not None:
        prepare(runner)
    try:
        await web.TCPSite(runner, host, port, ssl_context=tls, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def _server(runner: web.AppRunner) -> web.Server:
    server = runner.server
    assert server is not None  # set up
    return server


def _connection_limit(configured: int) -> int:
    """``max_connections``, within what the process may open: the soft RLIMIT_NOFILE is
    raised to the hard one first (systemd's default soft limit is 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    allowed = max(1, soft - RESERVED_FDS) if soft != resource.RLIM_INFINITY else configured
    if configured > allowed:
        log.warning("webhook.max_connections_lowered", configured=configured, used=allowed,
                    open_files_limit=soft,
                    message="raise LimitNOFILE= (the unit sets 65536) to allow more")
        return allowed
    return configured


def _addresses(runner: web.AppRunner) -> list[tuple[str, int]]:
    return [(str(sock[0]), int(sock[1])) for sock in runner.addresses]


def _tls(settings: Settings) -> ssl.SSLContext | None:
    hook = settings.webhook
    if hook.tls_cert is None or hook.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(hook.tls_cert, hook.tls_key)
    return context


async def readiness(settings: Settings, parts: Parts) -> list[str]:
    """Why the daemon is not ready: a failed part, draining, the store not writable (or its
    last commit failed), the poller's credentials refused, polls too old."""
    reasons = parts.supervisor.reasons()
    if parts.draining.is_set():
        reasons.append("shutting down")
    try:
        await asyncio.wait_for(parts.store.ping(), timeout=READY_PING_TIMEOUT_S)
    except (TimeoutError, StoreError) as e:
        reasons.append(f"store not writable: {e or 'no answer'}")
    else:
        error = parts.store.health().last_error
        if error is not None:
            reasons.append(f"last store commit failed: {error}")
    reasons += [f"{name} is down" for name, task in parts.supervisor.tasks.items()
                if task.done() and not parts.draining.is_set()]
    if parts.poller is not None and parts.poller.auth_refused is not None:
        reasons.append(f"tradecloud refuses the credentials: {parts.poller.auth_refused}")
    if parts.poller is not None:
        now = asyncio.get_running_loop().time()
        limit_s = STALE_POLL_INTERVALS * parts.poller.base_interval_s
        for kind in settings.poll.kinds:
            taken = _taken_at(parts, kind)
            if taken is None:
                continue  # a standby replica: another one polls this kind
            last = parts.poller.last_success.get(kind)
            since = max(taken, parts.started_at if last is None else last)
            if now - since > limit_s:
                reasons.append(f"no successful {kind} poll for {now - since:.0f} s")
    return reasons


def _taken_at(parts: Parts, kind: str) -> float | None:
    """Since when this process polls ``kind`` (loop time; None: it does not)."""
    if parts.coordinator is None:
        return parts.started_at
    return parts.coordinator.active_since(kind)


async def _refresh_gauges(parts: Parts) -> None:
    with contextlib.suppress(StoreError):
        parts.metrics.set_backlog(await parts.store.backlog())
        parts.metrics.set_fetches(await parts.store.fetch_counts())


def _spawn(parts: Parts, name: str, coro: Coroutine[Any, Any, None]) -> None:
    parts.supervisor.spawn(name, coro)


async def shutdown(settings: Settings, parts: Parts) -> None:
    """Stop accepting webhooks (new requests get 503), finish those in flight, stop the
    loops, drain running deliveries, close the client and the store: all within one
    ``shutdown_timeout_s`` (systemd's TimeoutStopSec is set above it)."""
    log.info("tcbridge.stopping")
    parts.notifier.stopping()
    parts.draining.set()
    deadline = asyncio.get_running_loop().time() + settings.shutdown_timeout_s
    if parts.runner is not None and parts.webhook_app is not None:
        cut = await drain(parts.runner, parts.webhook_app, _left(deadline))
        if cut:
            log.warning("webhook.cut_off", requests=cut)
    if parts.dispatcher is not None:
        cut = await parts.dispatcher.drain(_left(deadline))
        if cut:
            log.warning("dispatch.cut_off", deliveries=cut, message="left pending for next start")
    await _stop_tasks(parts.supervisor.tasks.values(), min(LOOP_STOP_GRACE_S, _left(deadline)))
    if parts.dispatcher is not None:
        await parts.dispatcher.close()
    if parts.admin is not None:
        await parts.admin.cleanup()
    if parts.client is not None:
        with contextlib.suppress(TimeoutError):  # a logout must not hold up the stop
            await asyncio.wait_for(parts.client.close(), timeout=LOGOUT_TIMEOUT_S)
    if parts.session is not None:
        await parts.session.close()
    await parts.store.close(max(_left(deadline), STORE_CLOSE_MIN_S))
    log.info("tcbridge.stopped")


def _left(deadline: float) -> float:
    """Seconds left until ``deadline``; at least a moment, so each phase can end cleanly."""
    return max(0.1, deadline - asyncio.get_running_loop().time())


def status_line(settings: Settings, parts: Parts) -> str:
    """A short summary for systemd's STATUS= (cheap: in-memory counters only)."""
    stored = sum(sample.value for metric in parts.metrics.events.collect()
                 for sample in metric.samples if sample.name.endswith("_total"))
    where = ", ".join(f"{host}:{port}" for host, port in parts.bound) or "no listener"
    return f"{settings.mode}; {where}; {int(stored)} events stored since start"


async def _stop_tasks(tasks: Iterable[asyncio.Task[None]], timeout_s: float) -> None:
    tasks = list(tasks)
    pending = [task for task in tasks if not task.done()]
    if pending:
        _, late = await asyncio.wait(pending, timeout=timeout_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)


def run(settings: Settings) -> int:
    """Run the daemon in a fresh event loop with signal handling; returns the exit code."""
    tune_gc()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_run_with_signals(settings))


# Python's cyclic garbage collector runs a young collection every 700 container objects
# allocated (net), and about every 100th of them is a full one over every object the
# process holds. Parsing a poll page of 100 orders allocates about 5,000 dicts and lists
# (the simulator's orders), a webhook body a few dozen, nearly all freed by reference
# counting, not by the collector; with the default thresholds orjson.loads of the pages
# took 77 us an order in process, 16 with the collector off (bench/README.md, round 6).
# So: a young collection every 50,000 (a few MB of young objects at most), a full one
# about every 200th, and the objects of the start (modules, configuration) frozen out of
# every full collection. Cycles are still collected, just less often.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Set the collector's thresholds for this daemon and freeze what the start made."""
    gc.collect()  # first, so garbage of the start is freed, not frozen for good
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (the `fast` extra): measured in bench/README.md."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _run_with_signals(settings: Settings) -> int:
    notifier = Notifier.from_environ(service_manager_environ())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, _on_sigint, stop)
    try:
        return await serve(settings, stop, notifier=notifier)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def _on_sigint(stop: asyncio.Event) -> None:
    if stop.is_set():  # a second Ctrl-C: the operator does not want to wait
        log.warning("tcbridge.forced_exit")
        os._exit(130)
    stop.set()
