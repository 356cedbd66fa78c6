"""systemd: sd_notify over a real Unix datagram socket, the unit file and its example config."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tcbridge import systemd
from tcbridge.cli import main
from tcbridge.config import Settings, load_settings
from tcbridge.errors import ConfigError
from tcbridge.systemd import Notifier

UNIT_DIR = Path(__file__).parent.parent / "systemd"
UNIT = UNIT_DIR / "tcbridge.service"
EXAMPLE_CONFIG = UNIT_DIR / "tcbridge.toml"
CREDENTIALS_DIR = "/run/credentials/tcbridge.service"
MAX_EXPOSURE = 2.0

MakeNotifier = Callable[[Mapping[str, str]], Notifier]


class Listener:
    """The systemd side of sd_notify: a bound datagram socket that collects messages."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket
        sock.setblocking(False)

    def environ(self, **extra: str) -> dict[str, str]:
        """An environment naming this socket, as systemd sets it."""
        return {"NOTIFY_SOCKET": self.notify_socket, **extra}

    def messages(self) -> list[bytes]:
        """Every datagram that is waiting, in order."""
        out: list[bytes] = []
        while True:
            try:
                out.append(self.sock.recv(65536))
            except BlockingIOError:
                return out

    async def receive(self, count: int, timeout_s: float = 10.0) -> list[tuple[float, bytes]]:
        """The next ``count`` datagrams, each with the loop time it arrived at."""
        loop = asyncio.get_running_loop()
        out: list[tuple[float, bytes]] = []
        async with asyncio.timeout(timeout_s):
            while len(out) < count:
                data = await loop.sock_recv(self.sock, 65536)
                out.append((loop.time(), data))
        return out


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    """A notify socket bound to a path under tmp_path."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield Listener(sock, str(path))


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    """A notify socket in the abstract namespace (``@name``), like systemd's own."""
    name = f"tcbridge-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield Listener(sock, "@" + name)


@pytest.fixture
def make() -> Iterator[MakeNotifier]:
    """Build notifiers from an environment; each is closed after the test."""
    made: list[Notifier] = []

    def make_notifier(environ: Mapping[str, str]) -> Notifier:
        made.append(Notifier.from_environ(environ))
        return made[-1]

    yield make_notifier
    for notifier in made:
        notifier.close()


async def run_watchdog(
    notifier: Notifier, listener: Listener, pings: int,
    status: Callable[[], str] | None = None,
) -> tuple[float, list[tuple[float, bytes]]]:
    """Run watchdog_loop until ``pings`` arrived, then stop it; start time and arrivals."""
    stop = asyncio.Event()
    started = asyncio.get_running_loop().time()
    task = asyncio.create_task(notifier.watchdog_loop(stop, status))
    try:
        arrivals = await listener.receive(pings)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=1)
    return started, arrivals


# --- messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (lambda n: n.ready("listening on 0.0.0.0:8080"),
         b"READY=1\nSTATUS=listening on 0.0.0.0:8080"),
        (lambda n: n.status("polling"), b"STATUS=polling"),
        (lambda n: n.stopping(), b"STOPPING=1\nSTATUS=stopping"),
        (lambda n: n.stopping("draining 3 deliveries"),
         b"STOPPING=1\nSTATUS=draining 3 deliveries"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.notify(RELOADING="1", STATUS="x"), b"RELOADING=1\nSTATUS=x"),
    ],
)
def test_messages_arrive_byte_exact(
    make: MakeNotifier, listener: Listener, send: Callable[[Notifier], object], expected: bytes
) -> None:
    send(make(listener.environ()))
    assert listener.messages() == [expected]


def test_abstract_socket(make: MakeNotifier, abstract_listener: Listener) -> None:
    notifier = make(abstract_listener.environ())
    assert notifier.enabled
    assert notifier.notify(READY="1", STATUS="ready") is True
    assert abstract_listener.messages() == [b"READY=1\nSTATUS=ready"]


def test_utf8_and_newlines_in_values(make: MakeNotifier, listener: Listener) -> None:
    notifier = make(listener.environ())
    # A newline would let the value inject another assignment (READY=1 here).
    assert notifier.notify(STATUS="état\nREADY=1") is True
    assert listener.messages() == ["STATUS=état READY=1".encode()]


def test_nothing_to_send(make: MakeNotifier, listener: Listener) -> None:
    notifier = make(listener.environ())
    assert notifier.notify() is False
    assert listener.messages() == []


def test_closed_notifier_sends_nothing(make: MakeNotifier, listener: Listener) -> None:
    notifier = make(listener.environ())
    assert notifier.notify(STATUS="one") is True
    notifier.close()
    assert notifier.notify(STATUS="two") is False
    notifier.close()  # twice is harmless
    assert listener.messages() == [b"STATUS=one"]


# --- disabled, and failures -------------------------------------------------------------------


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "30000000"}])
async def test_disabled_without_notify_socket(make: MakeNotifier, environ: dict[str, str]) -> None:
    notifier = make(environ)
    assert notifier.enabled is False
    assert notifier.watchdog_interval_s is None
    assert notifier.notify(READY="1") is False
    notifier.ready("ready")
    notifier.status("status")
    notifier.stopping()
    notifier.watchdog()
    await asyncio.wait_for(notifier.watchdog_loop(asyncio.Event()), timeout=1)


def test_missing_socket_returns_false_and_warns_once(make: MakeNotifier, tmp_path: Path) -> None:
    notifier = make({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    with capture_logs() as logs:
        assert notifier.notify(READY="1") is False
        assert notifier.notify(WATCHDOG="1") is False
        notifier.watchdog()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["systemd.notify_failed"]
    assert warnings[0]["socket"] == str(tmp_path / "gone.sock")


def test_missing_abstract_socket_returns_false(make: MakeNotifier) -> None:
    name = f"@tcbridge-test-{uuid.uuid4().hex}"
    notifier = make({"NOTIFY_SOCKET": name})
    with capture_logs() as logs:
        assert notifier.notify(READY="1") is False
    assert [(e["event"], e["socket"]) for e in logs] == [("systemd.notify_failed", name)]


def test_socket_removed_after_start(make: MakeNotifier, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = make({"NOTIFY_SOCKET": str(path)})
        assert notifier.notify(READY="1") is True
    path.unlink()
    assert notifier.notify(WATCHDOG="1") is False


def test_full_queue_fails_fast_instead_of_blocking(make: MakeNotifier, listener: Listener) -> None:
    # Nobody reads: a blocking send would hang here once the queue is full.
    notifier = make(listener.environ())
    with capture_logs() as logs:
        results = [notifier.notify(WATCHDOG="1") for _ in range(2000)]
    assert results[0] is True
    assert results[-1] is False
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["systemd.notify_failed"]


# --- watchdog ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "interval_s"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "100000"}, 0.05),
    ],
)
def test_watchdog_interval(
    make: MakeNotifier, listener: Listener, extra: dict[str, str], interval_s: float | None
) -> None:
    notifier = make(listener.environ(**extra))
    assert notifier.enabled
    assert notifier.watchdog_interval_s == interval_s


@pytest.mark.parametrize("value", ["", "abc", "0", "-5"])
def test_invalid_watchdog_usec_disables_watchdog(
    make: MakeNotifier, listener: Listener, value: str
) -> None:
    with capture_logs() as logs:
        notifier = make(listener.environ(WATCHDOG_USEC=value))
    assert notifier.watchdog_interval_s is None
    assert [e["event"] for e in logs] == ["systemd.bad_watchdog_usec"]


async def test_watchdog_of_another_pid_sends_no_pings(
    make: MakeNotifier, listener: Listener
) -> None:
    other = str(os.getpid() + 1)
    notifier = make(listener.environ(WATCHDOG_USEC="100000", WATCHDOG_PID=other))
    await asyncio.wait_for(notifier.watchdog_loop(asyncio.Event()), timeout=1)
    notifier.ready("ready")  # the rest of the protocol still works
    assert listener.messages() == [b"READY=1\nSTATUS=ready"]


async def test_watchdog_loop_pings_at_the_interval(make: MakeNotifier, listener: Listener) -> None:
    notifier = make(listener.environ(WATCHDOG_USEC="100000"))  # a ping every 0.05 s
    started, arrivals = await run_watchdog(notifier, listener, pings=5)
    assert [data for _, data in arrivals] == [b"WATCHDOG=1"] * 5
    times = [started] + [at for at, _ in arrivals]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.04  # never faster than the interval (first one included)


async def test_watchdog_loop_stops_on_the_event(make: MakeNotifier, listener: Listener) -> None:
    notifier = make(listener.environ(WATCHDOG_USEC="100000"))
    await run_watchdog(notifier, listener, pings=2)  # returns once the loop has ended
    listener.messages()  # a ping sent just before the stop
    await asyncio.sleep(0.15)  # three intervals
    assert listener.messages() == []


async def test_watchdog_loop_wakes_early_on_stop(make: MakeNotifier, listener: Listener) -> None:
    notifier = make(listener.environ(WATCHDOG_USEC="60000000"))  # a ping every 30 s
    stop = asyncio.Event()
    task = asyncio.create_task(notifier.watchdog_loop(stop))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, timeout=1)
    assert listener.messages() == []


async def test_watchdog_loop_returns_when_stop_already_set(
    make: MakeNotifier, listener: Listener
) -> None:
    notifier = make(listener.environ(WATCHDOG_USEC="100000"))
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(notifier.watchdog_loop(stop), timeout=1)
    assert listener.messages() == []


async def test_watchdog_loop_refreshes_status_at_most_every_status_interval(
    make: MakeNotifier, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(systemd, "STATUS_EVERY_S", 0.12)  # at most every ~3 pings
    notifier = make(listener.environ(WATCHDOG_USEC="100000"))
    calls: list[float] = []

    def status() -> str:
        calls.append(asyncio.get_running_loop().time())
        return f"events stored: {len(calls)}"

    _, arrivals = await run_watchdog(notifier, listener, pings=8, status=status)
    messages = [data for _, data in arrivals]
    assert messages[0] == b"WATCHDOG=1\nSTATUS=events stored: 1"
    with_status = [m for m in messages if b"STATUS=" in m]
    assert with_status[1] == b"WATCHDOG=1\nSTATUS=events stored: 2"
    assert set(messages) - set(with_status) == {b"WATCHDOG=1"}  # not with every ping
    assert min(b - a for a, b in itertools.pairwise(calls)) >= 0.12


async def test_failing_status_callback_does_not_stop_pings(
    make: MakeNotifier, listener: Listener
) -> None:
    notifier = make(listener.environ(WATCHDOG_USEC="100000"))

    def status() -> str:
        raise RuntimeError("boom")

    with capture_logs() as logs:
        _, arrivals = await run_watchdog(notifier, listener, pings=3, status=status)
    assert [data for _, data in arrivals] == [b"WATCHDOG=1"] * 3
    assert "systemd.status_failed" in [e["event"] for e in logs]


# --- the unit file ----------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit file (a key may repeat)."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    """A systemd time span of the simple forms used in the unit ("45s", "45", "1min")."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", value)
    assert match is not None, value
    return float(match[1]) * (60 if match[2] == "min" else 1)


def test_unit_stop_timeout_exceeds_shutdown_timeout() -> None:
    unit = unit_settings()
    # systemd must not SIGKILL a daemon that is still draining within its own limit.
    assert seconds(unit["TimeoutStopSec"][-1]) > Settings.model_fields[
        "shutdown_timeout_s"].default
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert seconds(unit["WatchdogSec"][-1]) == 30


def test_example_config_uses_the_unit_credentials() -> None:
    names = [value.partition(":")[0] for value in unit_settings()["LoadCredential"]]
    text = EXAMPLE_CONFIG.read_text()
    used = re.findall(rf'"{re.escape(CREDENTIALS_DIR)}/([^"]+)"', text)
    assert sorted(used) == sorted(names) == ["tradecloud-password", "webhook-token"]


def systemd_analyze() -> str:
    """The path of systemd-analyze, or skip: CI installs Debian's systemd package."""
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return path


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    # verify checks that ExecStart's program exists and is executable, and the unit names
    # /opt/tcbridge (the install path, see systemd/README.md), which a test machine lacks.
    # So verify a copy whose ExecStart points at this interpreter; every other line is the
    # shipped one, and the copy keeps the name, on which %d and credentials depend.
    original = UNIT.read_text()
    copy = original.replace("/opt/tcbridge/.venv/bin/tcbridge", sys.executable)
    assert len(set(copy.splitlines()) ^ set(original.splitlines())) == 2  # one line swapped
    (tmp_path / UNIT.name).write_text(copy)
    result = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / UNIT.name)],
                            capture_output=True, text=True, timeout=60, check=False)
    # verify exits 0 even for unknown keys or bad values ("ignoring"): any output is a fault.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_exposure_score() -> None:
    analyze = systemd_analyze()
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for tcbridge\.service: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


# --- the example configuration ----------------------------------------------------------------


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand-ins for the credential files, through the environment overrides."""
    (tmp_path / "tradecloud-password").write_text("s3cret\n")
    (tmp_path / "webhook-token").write_text("tok-7c1e-0123456789abcdef0123456789")
    monkeypatch.setenv("TCBRIDGE_TRADECLOUD__PASSWORD_FILE", str(tmp_path / "tradecloud-password"))
    monkeypatch.setenv("TCBRIDGE_WEBHOOK__BEARER_TOKEN_FILE", str(tmp_path / "webhook-token"))
    return tmp_path


def test_example_config_passes_check_config(
    credentials: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", "--config", str(EXAMPLE_CONFIG)]) == 0
    assert "ok (mode hybrid, 1 handler(s))" in capsys.readouterr().out


def test_example_config_lives_in_the_state_directory(credentials: Path) -> None:
    settings = load_settings(EXAMPLE_CONFIG)
    assert settings.store.path == Path("/var/lib/tcbridge/tcbridge.db")
    assert [str(getattr(h, "directory", "")) for h in settings.handlers] == [
        "/var/lib/tcbridge/outbox"]
    assert settings.tradecloud.password is not None
    assert settings.tradecloud.password.get_secret_value() == "s3cret"
    assert settings.webhook.bearer_token is not None
    assert settings.webhook.bearer_token.get_secret_value() == "tok-7c1e-0123456789abcdef0123456789"
    assert settings.shutdown_timeout_s < seconds(unit_settings()["TimeoutStopSec"][-1])


def test_example_config_without_credentials_names_the_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check-config", "--config", str(EXAMPLE_CONFIG)]) == 2
    err = capsys.readouterr().err
    assert f"{CREDENTIALS_DIR}/tradecloud-password" in err
    assert "tradecloud: cannot read secret file" in err


# --- the install steps, as the unit's user -----------------------------------------------------

README = Path(__file__).parent.parent / "README.md"
SYSTEMD_README = UNIT.parent / "README.md"
CONFIG_TARGET = "/etc/tcbridge/tcbridge.toml"


def install_modes(text: str) -> dict[str, list[int]]:
    """target -> modes of every ``install -m MODE ... TARGET`` in the text."""
    out: dict[str, list[int]] = {}
    for match in re.finditer(r"install (?:-d )?-m (0?\d{3,4}) (?:\S+ )?(/\S+?)[`\s]", text):
        out.setdefault(match[2], []).append(int(match[1], 8))
    return out


@pytest.mark.parametrize("document", [README, SYSTEMD_README], ids=["README", "systemd"])
def test_install_steps_leave_the_config_readable_by_the_dynamic_user(document: Path) -> None:
    text = document.read_text()
    modes = install_modes(text)
    assert modes.get(CONFIG_TARGET), f"{document.name} does not install {CONFIG_TARGET}"
    # DynamicUser= is neither the owner (root) nor in the group: "other" must read it.
    assert all(mode & 0o004 for mode in modes[CONFIG_TARGET]), modes[CONFIG_TARGET]
    assert all(mode & 0o001 for mode in modes.get("/etc/tcbridge", [0o755]))
    steps = text[text.index(CONFIG_TARGET) - 400:]
    assert "sudo install" in steps and "check-config" in steps


def read_as(uid: int, path: Path, environ: dict[str, str]) -> int:
    """load_settings(path) in a child running as ``uid``: 0 ok, 2 ConfigError, 3 other."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            os.environ.update(environ)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            load_settings(path)
            code = 0
        except ConfigError:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize(("mode", "expected"), [(0o644, 0), (0o640, 2)])
def test_the_unit_user_can_read_a_config_installed_as_documented(
    mode: int, expected: int
) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root, to read the files as another uid as DynamicUser= would")
    nobody = 65534
    with tempfile.TemporaryDirectory() as top:
        etc, creds = Path(top) / "etc", Path(top) / "credentials"
        os.chmod(top, 0o755)
        etc.mkdir(mode=0o755)
        creds.mkdir(mode=0o700)
        config = etc / "tcbridge.toml"
        shutil.copy(EXAMPLE_CONFIG, config)
        os.chmod(config, mode)  # root-owned, as `sudo install -m MODE` leaves it
        for name, value in (("tradecloud-password", "s3cret"), ("webhook-token", "t" * 40)):
            (creds / name).write_text(value)
            os.chmod(creds / name, 0o400)
            os.chown(creds / name, nobody, nobody)  # systemd hands them to the service user
        os.chown(creds, nobody, nobody)
        environ = {"TCBRIDGE_TRADECLOUD__PASSWORD_FILE": str(creds / "tradecloud-password"),
                   "TCBRIDGE_WEBHOOK__BEARER_TOKEN_FILE": str(creds / "webhook-token")}
        assert read_as(nobody, config, environ) == expected
