"""Delivery handlers against real files, real processes, a real HTTP server and a real module."""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import os
import re
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tcbridge import handlers
from tcbridge.config import (
    CommandHandlerSettings,
    FileHandlerSettings,
    HttpHandlerSettings,
    PythonHandlerSettings,
)
from tcbridge.errors import ConfigError
from tcbridge.filters import skip_reason
from tcbridge.handlers import (
    FileHandler,
    Outcome,
    OutcomeStatus,
    build_handler,
    parse_retry_after,
)
from tests.support import writer_argv
from tests.test_files import FAILING_DIRECTORY_FSYNC, record_batches

HELPERS = Path(__file__).parent / "helpers"
EVENT_ID = "0123456789abcdef0123456789abcdef"


def make_envelope(**overrides: Any) -> dict[str, Any]:
    """A stored event as the dispatcher hands it over."""
    envelope: dict[str, Any] = {
        "id": EVENT_ID,
        "kind": "order",
        "entityId": "ORD-1",
        "lastUpdatedAt": "2024-05-01T10:00:00.000Z",
        "eventName": "OrderConfirmedByBuyer",
        "source": "webhook",
        "receivedAt": "2024-05-01T10:00:01.000Z",
        "changedLineIds": ["L1"],
        "late": False,
        "payload": {"order": {"id": "ORD-1", "note": "naïve ✓"}},
    }
    envelope.update(overrides)
    return envelope


def encode(envelope: dict[str, Any]) -> bytes:
    return json.dumps(envelope, ensure_ascii=False).encode()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # A session-wide header proves the handler uses this one shared session.
    async with aiohttp.ClientSession(headers={"X-Shared-Session": "yes"}) as s:
        yield s


async def deliver(
    settings: Any,
    session: aiohttp.ClientSession,
    envelope: dict[str, Any] | None = None,
    attempt: int = 1,
) -> Outcome:
    envelope = envelope or make_envelope()
    handler = build_handler(settings, session)
    try:
        return await handler.deliver(envelope, encode(envelope), attempt)
    finally:
        await handler.close()


# --- matches ----------------------------------------------------------------------------------

FILTER_MATRIX = [
    # (settings filters, envelope changes, expected)
    ({}, {}, True),
    ({}, {"eventName": None, "source": "poll"}, True),
    ({"kinds": ["shipment"]}, {}, False),
    ({"kinds": ["shipment", "order"]}, {}, True),
    ({"kinds": ["order"]}, {"kind": "order_documents"}, False),
    ({"sources": ["poll"]}, {}, False),
    ({"sources": ["webhook", "poll"]}, {"source": "poll"}, True),
    ({"sources": ["webhook"]}, {"source": "webhook_get"}, False),
    ({"event_names": ["OrderConfirmed*"]}, {}, True),
    ({"event_names": ["Order*Buyer"]}, {}, True),
    ({"event_names": ["Order?onfirmedByBuyer"]}, {}, True),
    ({"event_names": ["orderconfirmed*"]}, {}, False),  # case-sensitive
    ({"event_names": ["Shipment*", "OrderConfirmedByBuyer"]}, {}, True),
    ({"event_names": ["Shipment*"]}, {}, False),
    ({"event_names": []}, {}, False),
    ({"event_names": ["*"]}, {"eventName": None}, True),
    ({"event_names": ["*"], "snapshots": False}, {"eventName": None}, False),
    ({"event_names": ["*"], "snapshots": False}, {}, True),
    ({"event_names": ["Shipment*"], "snapshots": True}, {"eventName": None}, True),
    ({"snapshots": False}, {"eventName": None}, True),  # no event_names: everything passes
    ({"kinds": ["shipment"], "event_names": ["*"]}, {"eventName": None}, False),
    ({"sources": ["poll"], "event_names": ["*"]}, {"eventName": None}, False),
]


@pytest.mark.parametrize(("filters", "changes", "expected"), FILTER_MATRIX)
def test_matches_filter_matrix(
    tmp_path: Path, filters: dict[str, Any], changes: dict[str, Any], expected: bool
) -> None:
    settings = FileHandlerSettings(name="f", type="file", directory=tmp_path, **filters)
    assert (skip_reason(settings, make_envelope(**changes)) is None) is expected


# --- file -------------------------------------------------------------------------------------


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def test_file_writes_exactly_the_body_atomically(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    drop = tmp_path / "new" / "drop"  # does not exist yet
    envelope = make_envelope()
    handler = build_handler(FileHandlerSettings(name="f", type="file", directory=drop), session)
    outcome = await handler.deliver(envelope, encode(envelope), 1)
    assert outcome == Outcome("done")
    assert all_files(tmp_path) == [drop / f"{EVENT_ID}.json"]
    assert (drop / f"{EVENT_ID}.json").read_bytes() == encode(envelope)


async def test_file_replaces_an_existing_file(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    settings = FileHandlerSettings(name="f", type="file", directory=tmp_path)
    await deliver(settings, session, make_envelope(late=False))
    outcome = await deliver(settings, session, make_envelope(late=True))
    assert outcome.status == "done"
    assert json.loads((tmp_path / f"{EVENT_ID}.json").read_bytes())["late"] is True
    assert [p.name for p in tmp_path.iterdir()] == [f"{EVENT_ID}.json"]


async def test_file_template_substitutes_every_field(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    template = "{kind}-{entityId}-{eventName}-{lastUpdatedAt}-{id}.json"
    settings = FileHandlerSettings(name="f", type="file", directory=tmp_path, filename=template)
    await deliver(settings, session, make_envelope())
    await deliver(settings, session, make_envelope(eventName=None, lastUpdatedAt=None, id="s1"))
    assert {p.name for p in tmp_path.iterdir()} == {
        f"order-ORD-1-OrderConfirmedByBuyer-2024-05-01T10_00_00.000Z-{EVENT_ID}.json",
        "order-ORD-1-snapshot-none-s1.json",
    }


@pytest.mark.parametrize(
    "entity_id",
    ["../../etc", "..", ".", "/etc/passwd", "a/../../b", ".hidden", "", "x\\..\\y", "a\0b"],
)
async def test_file_unsafe_values_cannot_escape_the_directory(
    tmp_path: Path, session: aiohttp.ClientSession, entity_id: str
) -> None:
    drop = tmp_path / "a" / "drop"
    settings = FileHandlerSettings(name="f", type="file", directory=drop, filename="{entityId}")
    outcome = await deliver(settings, session, make_envelope(entityId=entity_id))
    assert outcome.status == "done"
    [written] = all_files(tmp_path)
    assert written.parent == drop
    assert not written.name.startswith(".")
    assert re.fullmatch(r"[A-Za-z0-9._-]+", written.name)


@pytest.mark.parametrize(
    "template",
    [
        "{nope}.json",
        "{id",
        "{id}}.json{",
        "{}.json",
        "{0}.json",
        "{id.real}.json",
        "{id[0]}.json",
        "{id!r}.json",
        "{id:>40}.json",
        "sub/{id}.json",
        "..\\{id}.json",
        ".{id}.json",
        "",
    ],
)
def test_file_bad_template_is_a_config_error(
    tmp_path: Path, session: aiohttp.ClientSession, template: str
) -> None:
    settings = FileHandlerSettings(name="f", type="file", directory=tmp_path, filename=template)
    with pytest.raises(ConfigError, match=r"handlers\.f\.filename"):
        build_handler(settings, session)


async def test_file_mode_follows_the_umask(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    old = os.umask(0o022)
    try:
        await deliver(FileHandlerSettings(name="f", type="file", directory=tmp_path), session)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / f"{EVENT_ID}.json").stat().st_mode) == 0o644


async def test_file_os_error_is_retried(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("x")
    settings = FileHandlerSettings(name="f", type="file", directory=not_a_dir / "drop")
    outcome = await deliver(settings, session)
    assert outcome.status == "retry"
    assert outcome.error is not None
    assert f"cannot write '{EVENT_ID}.json'" in outcome.error
    assert "NotADirectoryError" in outcome.error or "FileExistsError" in outcome.error


async def test_file_write_failure_leaves_no_temp_file(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    # The target name is a non-empty directory, so os.replace fails after the temp file exists.
    (tmp_path / f"{EVENT_ID}.json").mkdir()
    (tmp_path / f"{EVENT_ID}.json" / "keep").write_text("x")
    outcome = await deliver(FileHandlerSettings(name="f", type="file", directory=tmp_path), session)
    assert outcome.status == "retry"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{EVENT_ID}.json"]


async def test_file_timeout_is_retried(tmp_path: Path) -> None:
    slow_fsync = ("import os, time\nreal = os.fsync\n"  # a stalled disk or NFS server
                  "os.fsync = lambda fd: (time.sleep(3), real(fd))[1]\n")
    settings = FileHandlerSettings(name="f", type="file", directory=tmp_path, timeout_s=1.0)
    handler = FileHandler(settings, writer_argv(slow_fsync))
    started = time.monotonic()
    envelope = make_envelope()
    outcome = await handler.deliver(envelope, encode(envelope), 1)
    assert outcome == Outcome("retry", error="timeout after 1 s")
    assert time.monotonic() - started < 2.5
    await handler.close()  # gives the write still running a moment (tests/test_blocking.py)


# --- command ----------------------------------------------------------------------------------


def script(tmp_path: Path, code: str, name: str = "handler.py") -> list[str]:
    path = tmp_path / name
    path.write_text("import os, sys, time, json, signal, subprocess\n" + code)
    return [sys.executable, str(path)]


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], timeout_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


SPAWN_AND_HANG = """
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open("pids.tmp", "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.rename("pids.tmp", "pids")
time.sleep(600)
"""


async def test_command_gets_body_env_and_cwd(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    command = script(
        tmp_path,
        """
data = sys.stdin.buffer.read()
open("stdin.bin", "wb").write(data)
keys = ["ERP_DB", "HOME_MARK", "TCBRIDGE_EVENT_ID", "TCBRIDGE_KIND", "TCBRIDGE_ENTITY_ID",
        "TCBRIDGE_EVENT_NAME", "TCBRIDGE_ATTEMPT"]
json.dump({k: os.environ.get(k) for k in keys}, open("env.json", "w"))
print("to stdout", flush=True)
sys.stderr.buffer.write(b"to stderr \\xff")
""",
    )
    work = tmp_path / "work"
    work.mkdir()
    settings = CommandHandlerSettings(
        name="c", type="command", command=command, cwd=work, env={"ERP_DB": "test"},
        inherit_env=["HOME_MARK"],
    )
    os.environ["HOME_MARK"] = "inherited"
    try:
        envelope = make_envelope(eventName=None, source="poll")
        outcome = await deliver(settings, session, envelope, attempt=3)
    finally:
        del os.environ["HOME_MARK"]
    assert outcome == Outcome("done", output="to stdout\nto stderr \ufffd")
    assert (work / "stdin.bin").read_bytes() == encode(envelope)
    assert json.loads((work / "env.json").read_text()) == {
        "ERP_DB": "test",
        "HOME_MARK": "inherited",
        "TCBRIDGE_EVENT_ID": EVENT_ID,
        "TCBRIDGE_KIND": "order",
        "TCBRIDGE_ENTITY_ID": "ORD-1",
        "TCBRIDGE_EVENT_NAME": "",
        "TCBRIDGE_ATTEMPT": "3",
    }


@pytest.mark.parametrize(
    ("code", "permanent", "status", "error"),
    [
        (75, [], "retry", "exit code 75"),
        (1, [], "retry", "exit code 1"),
        (1, [3, 4], "retry", "exit code 1"),
        (3, [3, 4], "dead", "exit code 3 (permanent)"),
        (75, [75], "dead", "exit code 75 (permanent)"),
    ],
)
async def test_command_exit_codes(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    code: int,
    permanent: list[int],
    status: OutcomeStatus,
    error: str,
) -> None:
    command = script(tmp_path, f"print('failing'); sys.exit({code})")
    settings = CommandHandlerSettings(
        name="c", type="command", command=command, permanent_exit_codes=permanent
    )
    expected = Outcome(status, error=error, output="failing\n")
    assert await deliver(settings, session) == expected


async def test_command_killed_by_signal_is_retried(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    command = script(tmp_path, "os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)")
    outcome = await deliver(
        CommandHandlerSettings(name="c", type="command", command=command), session
    )
    assert outcome == Outcome("retry", error="killed by signal SIGTERM", output="")


async def test_command_keeps_only_the_output_tail_without_deadlock(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    command = script(
        tmp_path,
        """
for _ in range(64):
    sys.stdout.write("o" * 16384)
    sys.stderr.write("e" * 16384)
sys.stdout.write("END")
""",
    )
    settings = CommandHandlerSettings(name="c", type="command", command=command, timeout_s=20)
    outcome = await deliver(settings, session)
    assert outcome.status == "done"
    assert outcome.output is not None
    assert len(outcome.output.encode()) == handlers.OUTPUT_TAIL_BYTES
    assert outcome.output.endswith("END")


async def test_command_that_ignores_a_big_stdin_still_succeeds(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    command = script(tmp_path, "sys.exit(0)")
    envelope = make_envelope(payload={"blob": "x" * 2_000_000})
    handler = build_handler(
        CommandHandlerSettings(name="c", type="command", command=command), session
    )
    assert await handler.deliver(envelope, encode(envelope), 1) == Outcome("done", output="")


async def test_command_missing_program_is_retried(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    missing = str(tmp_path / "not-installed-yet")
    outcome = await deliver(
        CommandHandlerSettings(name="c", type="command", command=[missing]), session
    )
    assert outcome.status == "retry"
    assert outcome.error is not None
    assert outcome.error.startswith(f"cannot start {missing!r}: FileNotFoundError")


async def test_command_not_executable_is_retried(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    program = tmp_path / "no-exec-bit"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o644)
    settings = CommandHandlerSettings(name="c", type="command", command=[str(program)])
    outcome = await deliver(settings, session)
    assert outcome.status == "retry"
    assert outcome.error is not None
    assert "PermissionError" in outcome.error


async def test_command_timeout_kills_the_whole_process_group(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    command = script(tmp_path, SPAWN_AND_HANG)
    settings = CommandHandlerSettings(
        name="c", type="command", command=command, cwd=tmp_path, timeout_s=1.5
    )
    outcome = await deliver(settings, session)
    assert outcome == Outcome("retry", error="timeout after 1.5 s", output="")
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert wait_gone(pids) == []


async def test_command_cancellation_kills_the_group_and_propagates(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    command = script(tmp_path, SPAWN_AND_HANG)
    settings = CommandHandlerSettings(
        name="c", type="command", command=command, cwd=tmp_path, timeout_s=60
    )
    task = asyncio.create_task(deliver(settings, session))
    for _ in range(200):
        if (tmp_path / "pids").exists():
            break
        await asyncio.sleep(0.05)
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert all(alive(p) for p in pids)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert wait_gone(pids) == []


# --- http -------------------------------------------------------------------------------------


class Recorder:
    """The requests the test endpoint received."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []

    async def status(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        headers = {}
        if "retry_after" in request.query:
            headers["Retry-After"] = request.query["retry_after"]
        return web.Response(
            status=int(request.match_info["code"]), text="from erp", headers=headers
        )

    async def echo_auth(self, request: web.Request) -> web.Response:
        return web.Response(status=500, text=f"bad {request.headers.get('Authorization')}")

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response()

    async def redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/status/200")


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def server(recorder: Recorder) -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_post("/status/{code}", recorder.status)
    app.router.add_post("/echo-auth", recorder.echo_auth)
    app.router.add_post("/slow", recorder.slow)
    app.router.add_post("/redirect", recorder.redirect)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    try:
        yield test_server
    finally:
        await test_server.close()


def http(server: TestServer, path: str, **kwargs: Any) -> HttpHandlerSettings:
    return HttpHandlerSettings(name="h", type="http", url=str(server.make_url(path)), **kwargs)


async def test_http_posts_the_body_with_idempotency_key(
    server: TestServer, recorder: Recorder, session: aiohttp.ClientSession
) -> None:
    envelope = make_envelope()
    settings = http(server, "/status/200", headers={"X-Erp": "1"})
    assert await deliver(settings, session, envelope) == Outcome("done")
    [(headers, body)] = recorder.requests
    assert body == encode(envelope)
    assert headers["Content-Type"] == "application/json"
    assert headers["Idempotency-Key"] == EVENT_ID
    assert headers["X-Erp"] == "1"
    assert headers["X-Shared-Session"] == "yes"
    assert "Authorization" not in headers


async def test_http_bearer_auth(
    server: TestServer, recorder: Recorder, session: aiohttp.ClientSession
) -> None:
    settings = http(server, "/status/201", auth="bearer", bearer_token="tok-123")
    assert (await deliver(settings, session)).status == "done"
    assert recorder.requests[0][0]["Authorization"] == "Bearer tok-123"


async def test_http_basic_auth(
    server: TestServer, recorder: Recorder, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("pw-456\n")
    settings = http(
        server, "/status/204", auth="basic", basic_username="erp", basic_password_file=secret
    )
    assert (await deliver(settings, session)).status == "done"
    expected = "Basic " + base64.b64encode(b"erp:pw-456").decode()
    assert recorder.requests[0][0]["Authorization"] == expected


@pytest.mark.parametrize(
    ("path", "status", "retry_after_s"),
    [
        ("/status/200", "done", None),
        ("/status/299", "done", None),
        ("/status/408", "retry", None),
        ("/status/429", "retry", None),
        ("/status/429?retry_after=7", "retry", 7.0),
        ("/status/503?retry_after=2", "retry", 2.0),
        ("/status/503?retry_after=soon", "retry", None),
        ("/status/500?retry_after=9", "retry", None),
        ("/status/502", "retry", None),
        ("/status/400", "dead", None),
        ("/status/401", "dead", None),
        ("/status/404", "dead", None),
        ("/status/422", "dead", None),
    ],
)
async def test_http_status_decides_the_outcome(
    server: TestServer,
    session: aiohttp.ClientSession,
    path: str,
    status: str,
    retry_after_s: float | None,
) -> None:
    outcome = await deliver(http(server, path), session)
    assert (outcome.status, outcome.retry_after_s) == (status, retry_after_s)
    if status != "done":
        code = path.split("/")[2][:3]
        assert outcome.error is not None
        assert outcome.error.startswith(f"HTTP {code} ")
        assert outcome.error.endswith(": from erp")


async def test_http_retry_after_as_http_date(
    server: TestServer, session: aiohttp.ClientSession
) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    url = server.make_url("/status/503").with_query(retry_after=when)
    settings = HttpHandlerSettings(name="h", type="http", url=str(url))
    outcome = await deliver(settings, session)
    assert outcome.status == "retry"
    assert outcome.retry_after_s is not None
    assert 25 <= outcome.retry_after_s <= 30


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("120", 120.0),
        (" 5 ", 5.0),
        ("-3", None),
        ("1.5", 1.5),
        ("tomorrow", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


async def test_http_redirect_is_dead_and_not_followed(
    server: TestServer, recorder: Recorder, session: aiohttp.ClientSession
) -> None:
    outcome = await deliver(http(server, "/redirect"), session)
    assert outcome.status == "dead"
    assert outcome.error is not None
    assert outcome.error.startswith("HTTP 302")
    assert outcome.error.endswith("(redirect to /status/200)")
    assert recorder.requests == []


async def test_http_timeout_is_retried(server: TestServer, session: aiohttp.ClientSession) -> None:
    outcome = await deliver(http(server, "/slow", timeout_s=0.2), session)
    assert outcome == Outcome("retry", error="timeout after 0.2 s")


async def test_http_unexpected_client_failure_is_retried(
    server: TestServer, recorder: Recorder, session: aiohttp.ClientSession
) -> None:
    settings = http(server, "/status/200", headers={"X-Bad": "a\nb"})
    outcome = await deliver(settings, session)
    assert outcome.status == "retry"
    assert outcome.error is not None
    assert outcome.error.startswith("ValueError: ")
    assert recorder.requests == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_http_connection_refused_is_retried_without_secrets(
    session: aiohttp.ClientSession,
) -> None:
    url = f"http://erp:url-secret@127.0.0.1:{free_port()}/in?key=q-secret"
    settings = HttpHandlerSettings(name="h", type="http", url=url)
    outcome = await deliver(settings, session)
    assert outcome.status == "retry"
    assert outcome.error is not None
    assert outcome.error.startswith("ClientConnectorError")
    assert "secret" not in outcome.error


@pytest.mark.parametrize(
    "auth",
    [
        {"auth": "bearer", "bearer_token": "tok-secret"},
        {"auth": "basic", "basic_username": "erp", "basic_password": "pw-secret"},
    ],
)
async def test_http_secrets_are_redacted_from_errors(
    server: TestServer, session: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    outcome = await deliver(http(server, "/echo-auth", **auth), session)
    assert outcome.status == "retry"
    assert outcome.error is not None
    assert outcome.error.startswith("HTTP 500 Internal Server Error: bad ")
    assert "secret" not in outcome.error
    assert outcome.error.endswith(f"bad {auth['auth'].title()} ***")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "ftp://erp.local/in"}, "must be an absolute http"),
        ({"url": "/relative/path"}, "must be an absolute http"),
        ({"url": "http://[::1"}, "not a URL"),
        (
            {
                "url": "http://erp/",
                "auth": "bearer",
                "bearer_token": "t",
                "headers": {"authorization": "Basic x"},
            },
            "send your own Authorization header",
        ),
        (
            {"url": "http://u:p@erp/", "auth": "bearer", "bearer_token": "t"},
            "credentials in the url and in auth",
        ),
        (
            {"url": "http://erp/", "auth": "basic", "basic_username": "a:b", "basic_password": "p"},
            "must not contain ':'",
        ),
    ],
)
def test_http_bad_settings_are_config_errors(
    session: aiohttp.ClientSession, kwargs: dict[str, Any], message: str
) -> None:
    settings = HttpHandlerSettings(name="h", type="http", **kwargs)
    with pytest.raises(ConfigError, match=message):
        build_handler(settings, session)


# --- python -----------------------------------------------------------------------------------


@pytest.fixture
def target(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(HELPERS))
    tcb_handler_target = importlib.import_module("tcb_handler_target")
    tcb_handler_target.CALLS.clear()
    tcb_handler_target.RELEASE.clear()
    yield tcb_handler_target
    tcb_handler_target.RELEASE.set()


def python(name: str, **kwargs: Any) -> PythonHandlerSettings:
    return PythonHandlerSettings(
        name="p", type="python", callable=f"tcb_handler_target:{name}", **kwargs
    )


@pytest.mark.parametrize(
    ("function", "caller"),
    [
        ("record_sync", "tcbridge-python-handler"),
        ("record_async", "async"),
        ("async_object", "async-object"),
    ],
)
async def test_python_call_gets_a_copy_of_the_envelope(
    target: ModuleType, session: aiohttp.ClientSession, function: str, caller: str
) -> None:
    envelope = make_envelope()
    handler = build_handler(python(function), session)
    assert await handler.deliver(envelope, encode(envelope), 1) == Outcome("done")
    [(called_by, argument)] = target.CALLS
    assert called_by == caller
    assert argument == envelope
    assert argument is not envelope


@pytest.mark.parametrize(
    ("function", "outcome"),
    [
        ("fail_sync", Outcome("retry", error=f"ValueError: boom {EVENT_ID}")),
        ("fail_async", Outcome("retry", error="ConnectionError: erp down")),
        ("fail_permanent", Outcome("dead", error="PermanentError: unknown supplier")),
        ("exit_sync", Outcome("retry", error="SystemExit: 3")),
        ("own_timeout", Outcome("retry", error="TimeoutError: erp read timed out")),
    ],
)
async def test_python_exceptions_become_outcomes(
    target: ModuleType, session: aiohttp.ClientSession, function: str, outcome: Outcome
) -> None:
    assert await deliver(python(function), session) == outcome


@pytest.mark.parametrize("function", ["hang_async", "block_sync"])
async def test_python_timeout_is_retried(
    target: ModuleType, session: aiohttp.ClientSession, function: str
) -> None:
    started = time.monotonic()
    outcome = await deliver(python(function, timeout_s=0.2), session)
    assert outcome == Outcome("retry", error="timeout after 0.2 s")
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tcb_no_such_module:run", "cannot import 'tcb_no_such_module': ModuleNotFoundError"),
        ("tcb_broken_import:run", "RuntimeError: broken at import"),
        ("tcb_handler_target:missing", "has no attribute 'missing'"),
        ("tcb_handler_target:NOT_CALLABLE", "is not callable"),
    ],
)
def test_python_bad_callable_is_a_config_error(
    target: ModuleType, session: aiohttp.ClientSession, spec: str, message: str
) -> None:
    settings = PythonHandlerSettings(name="p", type="python", callable=spec)
    with pytest.raises(ConfigError, match=message):
        build_handler(settings, session)


# -- one writer process, one batch for concurrent deliveries ----------------------------------


async def test_concurrent_file_deliveries_share_one_batch_of_the_writer(
    tmp_path: Path,
) -> None:
    batches = tmp_path / "batches"
    settings = FileHandlerSettings(name="drop", type="file", directory=tmp_path / "drop",
                                   concurrency=8, filename="{id}.json")
    handler = FileHandler(settings, writer_argv(record_batches(batches)))
    outcomes = await asyncio.gather(*(handler.deliver({"id": f"e{i}"}, f"{i}".encode(), 1)
                                      for i in range(8)))
    await handler.close()
    assert [o.status for o in outcomes] == ["done"] * 8
    assert batches.read_text().split() == ["8"]
    assert {p.name: p.read_text() for p in (tmp_path / "drop").iterdir()} == {
        f"e{i}.json": str(i) for i in range(8)}


async def test_the_writer_process_gets_none_of_the_daemons_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TCBRIDGE_TRADECLOUD__PASSWORD", "s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "also-secret")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "lib"))
    seen = tmp_path / "environ.json"
    settings = FileHandlerSettings(name="drop", type="file", directory=tmp_path / "drop")
    handler = FileHandler(settings, writer_argv(
        f"import json, os\nopen({str(seen)!r}, 'w').write(json.dumps(dict(os.environ)))"))
    outcome = await handler.deliver({"id": "e1"}, b"{}", 1)
    await handler.close()
    assert outcome.status == "done"
    environ = json.loads(seen.read_text())
    assert "s3cret" not in environ.values() and "also-secret" not in environ.values()
    assert environ["PYTHONPATH"] == str(tmp_path / "lib")  # where tcbridge may be found
    assert environ["PATH"] == os.environ["PATH"]


async def test_a_writer_that_fails_is_a_retry_with_its_reason(tmp_path: Path) -> None:
    settings = FileHandlerSettings(name="drop", type="file", directory=tmp_path)
    handler = FileHandler(settings, writer_argv(FAILING_DIRECTORY_FSYNC))
    outcome = await handler.deliver({"id": "e1"}, b"{}", 1)
    await handler.close()
    assert outcome.status == "retry"
    assert outcome.error == (f"cannot fsync the folder {str(tmp_path)!r}: "
                             "OSError: [Errno 5] Input/output error")
