"""Processes the benchmarks start: the tcbridge daemon, the baseline app, the simulator.

Everything runs on 127.0.0.1 on free ports. Every process started here is stopped here, by
its own pid (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.support import free_port, write_config

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
TOKEN = "bench-token-0123456789-0123456789abcdef"  # noqa: S105 - a loopback-only benchmark credential
ENV = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def admin_supported() -> bool:
    """True once tcbridge has the admin listener (its /readyz is then the readiness probe)."""
    from tcbridge.config import Settings

    return "admin" in Settings.model_fields


def rss_kb(pid: int) -> int | None:
    """VmRSS of a process in KiB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3 (state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class RssSampler:
    """Samples a process's RSS every ``interval_s`` in a thread: [(monotonic s, KiB)]."""

    pid: int
    interval_s: float = 0.5
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_kb(self.pid)
            if value is not None:
                self.samples.append((time.monotonic(), value))
            self._stop.wait(self.interval_s)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.samples


class Process:
    """A child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env or ENV
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # time.time() just before the process was created

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.started_at = time.time()
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=ROOT)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"{self.name} exited ({code}):\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_http(port: int, method: str, path: str, body: bytes | None, headers: dict[str, str],
              proc: Process, timeout_s: float = 30.0, interval_s: float = 0.002) -> float:
    """Poll until ``method path`` answers 2xx; returns time.time() of the first success."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc.check_alive()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if 200 <= response.status < 300:
                return time.time()
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(interval_s)
    raise TimeoutError(f"{proc.name}: {method} {path} on port {port} not ready:\n{proc.tail()}")


class Daemon(Process):
    """The real tcbridge daemon (``python -m tcbridge run``) on a TOML config."""

    def __init__(self, workdir: Path, name: str, config: dict[str, Any],
                 *, module: str = "tcbridge") -> None:
        self.port = free_port()
        self.workdir = workdir
        self.admin_port = free_port() if admin_supported() else None
        base: dict[str, Any] = {
            "mode": "webhook",
            "shutdown_timeout_s": 1,  # the parked handler never finishes: do not wait for it
            "store": {"path": str(workdir / f"{name}.db")},
            "webhook": {"host": "127.0.0.1", "port": self.port, "auth": "bearer",
                        "bearer_token": TOKEN},
            "log": {"level": "info", "format": "json"},
        }
        if self.admin_port is not None:
            base["admin"] = {"host": "127.0.0.1", "port": self.admin_port}
        for key, value in config.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = base[key] | value
            else:
                base[key] = value
        self.config = base
        self.db_path = Path(base["store"]["path"])
        self.config_path = write_config(workdir / f"{name}.toml", base)
        argv = [PYTHON, "-m", module, "run", "--config", str(self.config_path),
                "--log-format", "json"]
        super().__init__(name, argv, workdir / f"{name}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> Iterator[dict[str, Any]]:
        """Every JSON log line so far."""
        with self.log_path.open(errors="replace") as f:
            for line in f:
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        yield json.loads(line)

    def wait_log(self, event: str, timeout_s: float = 60.0, interval_s: float = 0.05,
                 **fields: Any) -> dict[str, Any]:
        """The first log line with this event name (and fields); waits for it."""
        deadline = time.monotonic() + timeout_s
        offset = 0
        while True:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            offset += len(complete)
            for raw in complete.splitlines():
                if b'"' + event.encode() + b'"' not in raw:
                    continue
                with contextlib.suppress(ValueError):
                    line = json.loads(raw)
                    if line.get("event") == event and all(
                            line.get(k) == v for k, v in fields.items()):
                        return line
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {event} log line:\n{self.tail()}")
            time.sleep(interval_s)

    def probe(self, timeout_s: float = 60.0, interval_s: float = 0.002) -> float:
        """Wait until an authenticated POST of a (new, valid) event is answered 2xx; returns
        time.time() of that answer. Works at every log level and without /readyz."""
        body, headers = probe_request()
        return wait_http(self.port, "POST", "/webhook/order", body, headers, self,
                         timeout_s=timeout_s, interval_s=interval_s)

    def ready(self, timeout_s: float = 60.0, interval_s: float = 0.002) -> float:
        """Wait for /readyz 200 on the admin listener; None-safe: without one, the probe."""
        if self.admin_port is None:
            return self.probe(timeout_s, interval_s)
        return wait_http(self.admin_port, "GET", "/readyz", None, {}, self,
                         timeout_s=timeout_s, interval_s=interval_s)

    def start_and_wait(self, timeout_s: float = 60.0) -> Daemon:
        """Start and wait until it accepts an authenticated POST."""
        self.start()
        self.probe(timeout_s)
        return self


def probe_request() -> tuple[bytes, dict[str, str]]:
    """A small valid order event for a new order, with the bench's bearer token."""
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    event = {"orderId": f"probe-{uuid.uuid4()}", "lastUpdatedAt": stamp, "lines": []}
    body = json.dumps({"eventName": "OrderIssuedByBuyer", "orderEvent": event}).encode()
    return body, {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def log_time(line: dict[str, Any]) -> float:
    """Epoch seconds of a structlog JSON line's ISO timestamp."""
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()


def baseline_app(workdir: Path) -> tuple[Process, int]:
    """The bare aiohttp app (not yet started) and its port."""
    port = free_port()
    argv = [PYTHON, str(BENCH / "baseline_app.py"), "--port", str(port)]
    return Process("baseline", argv, workdir / "baseline.log"), port


def db_query(path: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A read on the daemon's SQLite file from outside (WAL lets it run alongside)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def file_size(path: Path) -> int:
    """Size of the store: the file plus its WAL."""
    total = 0
    for p in (path, path.with_name(path.name + "-wal")):
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total
