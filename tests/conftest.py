"""Factory fixtures shared by the test modules."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tcbridge.config import StoreSettings
from tcbridge.store import PostgresStore, Store
from tests.backends import (
    BACKENDS,
    create_database,
    drop_database,
    run_sync,
    server_problem,
    store_rows,
    truncate,
)
from tests.support import free_port, write_config

_ids = itertools.count(1)


def basic_header(user: str, password: str) -> str:
    """An Authorization header for HTTP Basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def order_obj(
    order_id: str | None = None,
    stamp: str = "2024-05-01T10:00:00.000Z",
    lines: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """A whole order as the poll API or GET /v2/order/{id} returns it."""
    order_id = order_id or f"order-{next(_ids)}"
    lines = lines if lines is not None else [(f"{order_id}-l1", stamp)]
    return {
        "id": order_id,
        "version": 1,
        "lastUpdatedAt": stamp,
        "buyerOrder": {"companyId": "buyer-1", "purchaseOrderNumber": f"PO-{order_id}"},
        "status": {"processStatus": "Issued", "logisticsStatus": "Open"},
        "lines": [
            {"id": line_id, "buyerLine": {"position": str(i + 1)}, "lastUpdatedAt": line_stamp}
            for i, (line_id, line_stamp) in enumerate(lines)
        ],
    }


def order_event_body(
    order_id: str | None = None,
    stamp: str | None = "2024-05-01T10:00:00.000Z",
    event_name: str = "OrderLinesConfirmedBySupplier",
    key: str = "orderEvent",
    line_ids: tuple[str, ...] = ("l1",),
    message_id: str | None = None,
) -> dict[str, Any]:
    """A webhook POST body for /webhook/order."""
    order_id = order_id or f"order-{next(_ids)}"
    event: dict[str, Any] = {
        "orderId": order_id,
        "version": 2,
        "meta": {"messageId": message_id or f"msg-{next(_ids)}"},
        "lines": [{"id": line_id} for line_id in line_ids],
    }
    if stamp is not None:
        event["lastUpdatedAt"] = stamp
    return {"eventName": event_name, key: event}


def shipment_obj(
    shipment_id: str | None = None,
    stamp: str = "2024-05-01T10:00:00.000Z",
    lines: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """A whole shipment, shaped as in docs shipment/buyer/receive/README.md: a shipment
    line has no id; ``lines`` gives (despatchAdviceLinePosition, meta.lastUpdatedAt) of
    lines of despatch advice ``DA-1``, whose identity is ``DA-1/<position>``."""
    shipment_id = shipment_id or f"shipment-{next(_ids)}"
    lines = lines if lines is not None else [(f"{shipment_id}-l1", stamp)]
    return {
        "id": shipment_id,
        "supplierShipment": {"shipmentNumber": f"SH-{shipment_id}"},
        "status": {"processStatus": "Issued"},
        "meta": {"lastUpdatedAt": stamp, "createdDateTime": stamp},
        "lines": [
            {"purchaseOrderNumber": "PO-1", "purchaseOrderLinePosition": str(i + 1),
             "deliverySchedulePosition": "1",
             "supplierLine": {"despatchAdviceNumber": "DA-1", "despatchAdviceLinePosition": line_id,
                              "despatchQuantity": 1},
             "meta": {"lastUpdatedAt": line_stamp}}
            for i, (line_id, line_stamp) in enumerate(lines)
        ],
    }


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test (or module) marked ``backends`` runs once per store backend, unless it is
    also marked ``sqlite_only(reason)``; every other test gets the SQLite store."""
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is None or metafunc.definition.get_closest_marker("sqlite_only") is not None:
        return
    metafunc.parametrize("backend", marker.args or BACKENDS)


@pytest.fixture
def backend() -> str:
    """The store backend of the test (``backends``-marked tests are parametrised)."""
    return "sqlite"


@pytest.fixture(scope="session")
def pg_session_dsn() -> Iterator[str]:
    """One PostgreSQL database for the whole session (tables emptied before each test);
    the tests that need one are skipped, with the reason, when no server answers."""
    problem = server_problem()
    if problem is not None:
        pytest.skip(problem)
    dsn = run_sync(create_database())
    yield dsn
    run_sync(drop_database(dsn))


@pytest.fixture
async def pg_dsn(request: pytest.FixtureRequest) -> str:
    """The session's PostgreSQL database, emptied."""
    dsn: str = request.getfixturevalue("pg_session_dsn")
    await truncate(dsn)
    return dsn


@pytest.fixture
async def pg_fresh_dsn(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A PostgreSQL database of the test's own (no schema yet), dropped after it."""
    problem = server_problem()
    if problem is not None:
        pytest.skip(problem)
    dsn = await create_database()
    yield dsn
    await drop_database(dsn)


@pytest.fixture
def store_factory(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> Callable[..., Any]:
    """Build (unopened) stores of the test's backend: files under tmp_path, or the
    session's PostgreSQL database (emptied; every name is that one database)."""
    dsn = request.getfixturevalue("pg_dsn") if backend == "postgresql" else None

    def make(name: str = "tcbridge.db", **settings: Any) -> Any:
        if dsn is not None:
            return PostgresStore(dsn, StoreSettings(backend="postgresql", dsn=dsn, **settings))
        return Store(tmp_path / name, StoreSettings(**settings))

    return make


@pytest.fixture
async def store(store_factory: Callable[..., Store]) -> AsyncIterator[Store]:
    """An open store, of the test's backend, empty."""
    s = store_factory(busy_timeout_s=0.5)
    await s.open()
    yield s
    await s.close()


@dataclass
class Daemon:
    """The real tcbridge daemon as a subprocess, with its log as JSON lines in a file."""

    config_path: Path
    log_path: Path
    port: int
    admin_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    store: dict[str, Any] = field(default_factory=dict)  # its [store] section

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self, timeout_s: float = 20.0) -> None:
        """Start and wait for its "started" log line."""
        self.starts += 1
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tcbridge", "run", "--config", str(self.config_path),
                 "--log-format", "json"],
                stdout=log_file, stderr=subprocess.STDOUT, env=os.environ | DAEMON_ENV,
            )
        await self.wait_for_log("tcbridge.started", count=self.starts, timeout_s=timeout_s)

    def logs(self) -> list[dict[str, Any]]:
        """Every JSON log line so far."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    async def wait_for_log(self, event: str, *, count: int = 1, timeout_s: float = 20.0,
                           **fields: Any) -> list[dict[str, Any]]:
        """Wait until ``count`` log lines with this event (and fields) were written."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            found = [line for line in self.logs() if line.get("event") == event
                     and all(line.get(k) == v for k, v in fields.items())]
            if len(found) >= count:
                return found
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.tail()}")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no {count} x {event} {fields} in time:\n{self.tail()}")
            await asyncio.sleep(0.05)

    def cli(self, *args: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        """Run another tcbridge command on this daemon's config (blocking; short commands)."""
        result = subprocess.run(
            [sys.executable, "-m", "tcbridge", *args, "--config", str(self.config_path)],
            capture_output=True, text=True, timeout=60, env=os.environ | DAEMON_ENV,
            check=False,
        )
        if expect is not None:
            assert result.returncode == expect, result.stderr
        return result

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` read from the daemon's store beside it (SQLite file or PostgreSQL
        database; ``?`` placeholders on both)."""
        return store_rows(self.store, sql, *args)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def kill(self) -> None:
        """kill -9: no chance to clean up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self._reap()

    async def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, then wait; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await self._reap(timeout_s)

    async def _reap(self, timeout_s: float = 20.0) -> int:
        assert self.proc is not None
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.proc.poll() is None:
            if asyncio.get_running_loop().time() > deadline:
                self.proc.kill()
                raise AssertionError("daemon did not stop in time:\n" + self.tail())
            await asyncio.sleep(0.02)
        return int(self.proc.returncode)


HELPERS = Path(__file__).parent / "helpers"
DAEMON_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(HELPERS)}


@pytest.fixture
async def daemon_factory(
    tmp_path: Path, backend: str
) -> AsyncIterator[Callable[..., Daemon]]:
    """Build daemons on tmp_path; each gets a free port, its own store (a SQLite file, or a
    PostgreSQL database of its own, dropped after the test) and log file."""
    daemons: list[Daemon] = []
    databases: dict[str, str] = {}
    if backend == "postgresql" and (problem := server_problem()) is not None:
        pytest.skip(problem)

    def make(config: dict[str, Any], name: str = "tcbridge") -> Daemon:
        port = free_port()
        store: dict[str, Any] = {"path": str(tmp_path / f"{name}.db")}
        if backend == "postgresql":
            if name not in databases:
                databases[name] = run_sync(create_database())
            # with a password (the test server trusts any): the logs must never show it
            dsn = databases[name].replace("postgres@", f"postgres:{PG_PASSWORD}@", 1)
            store |= {"backend": "postgresql", "dsn": dsn}
        base: dict[str, Any] = {
            "mode": "webhook",
            "shutdown_timeout_s": 5,
            "store": store | {"busy_timeout_s": 0.5, "retry_after_s": 1},
            "webhook": {"host": "127.0.0.1", "port": port, "auth": "bearer",
                        "bearer_token": "hook-token-1-for-tests-0123456789ab"},
            "admin": {"host": "127.0.0.1", "port": free_port()},
            "log": {"level": "debug"},
        }
        for key, value in config.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = base[key] | value
            else:
                base[key] = value
        path = write_config(tmp_path / f"{name}.toml", base)
        daemon = Daemon(config_path=path, log_path=tmp_path / f"{name}.log", port=port,
                        admin_port=base["admin"]["port"], store=base["store"])
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
    for dsn in databases.values():
        await drop_database(dsn)


PG_PASSWORD = "pg-pass-Wq31"
SIM_USER, SIM_PASSWORD = "integration@example.com", "sim-password-1"


@pytest.fixture
async def simulator_factory() -> AsyncIterator[Callable[..., Any]]:
    """Start tcbridge's own Tradecloud simulator on a free loopback port."""
    from tcbridge.simulator import Simulator

    started: list[Simulator] = []

    async def make(**kwargs: Any) -> tuple[Simulator, str]:
        sim = Simulator(**({"username": SIM_USER, "password": SIM_PASSWORD} | kwargs))
        url = await sim.start()
        started.append(sim)
        return sim, url

    yield make
    for sim in started:
        await sim.stop()


def tradecloud_config(url: str, **overrides: Any) -> dict[str, Any]:
    """The [tradecloud] section for a daemon talking to a simulator."""
    return {"base_url": url, "username": SIM_USER, "password": SIM_PASSWORD,
            "retry_initial_s": 0.05, "retry_max_s": 0.5, "timeout_s": 5} | overrides


class Receiver:
    """An HTTP endpoint on loopback (a bridge's webhook for the simulator, an ERP's API for
    the http handler) that answers scripted statuses, then ``default``, and records calls."""

    def __init__(self) -> None:
        self.script: list[int | str] = []
        self.default = 200
        self.calls: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        self.url = ""
        app = web.Application()
        app.router.add_route("*", "/hook/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        self.release.set()
        await self._runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        text = await request.text()
        answer = self.script.pop(0) if self.script else self.default
        if answer == "hang":
            await self.release.wait()
            answer = 200
        self.calls.append({"method": request.method, "path": request.path,
                           "body": json.loads(text) if text else None,
                           "auth": request.headers.get("Authorization"),
                           "headers": dict(request.headers), "status": int(answer)})
        return web.Response(status=int(answer))

    def bodies(self, status: int | None = None) -> list[dict[str, Any]]:
        """Bodies of the calls (only those answered ``status``, if given)."""
        return [c["body"] for c in self.calls if status is None or c["status"] == status]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait (without blocking the loop) until ``condition()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
