"""The sd_notify protocol, without a dependency: readiness, status and the watchdog.

systemd names a Unix datagram socket in ``$NOTIFY_SOCKET`` (a path, or an abstract
socket when it starts with ``@``); each message is one datagram of ``KEY=value`` lines.
Without ``$NOTIFY_SOCKET`` (not started by systemd) every method is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger(__name__)

# STATUS= is for humans (systemctl status); refreshing it with every ping is wasted work.
STATUS_EVERY_S = 10.0


class Notifier:
    """Sends sd_notify messages to systemd; never raises, never blocks the event loop."""

    def __init__(self, address: bytes | None, watchdog_interval_s: float | None = None) -> None:
        """Use ``address`` (a socket path, or ``\\0name`` for an abstract socket)."""
        self._address = address
        self._sock: socket.socket | None = None
        self._closed = False
        self._warned = False
        self.enabled = address is not None
        self.watchdog_interval_s = watchdog_interval_s if self.enabled else None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from ``environ``."""
        address = _parse_address(environ.get("NOTIFY_SOCKET", ""))
        interval_s = _watchdog_interval_s(environ) if address is not None else None
        return cls(address, interval_s)

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; returns whether it was sent."""
        if self._address is None or self._closed or not fields:
            return False
        try:
            self._socket().sendto(_encode(fields), self._address)
        except OSError as e:
            self._warn(e)
            return False
        return True

    def ready(self, status: str) -> None:
        """Tell systemd that start-up is complete (``Type=notify``)."""
        self.notify(READY="1", STATUS=status)

    def status(self, text: str) -> None:
        """Set the one-line status that ``systemctl status`` shows."""
        self.notify(STATUS=text)

    def stopping(self, status: str = "stopping") -> None:
        """Tell systemd that shutdown has begun."""
        self.notify(STOPPING="1", STATUS=status)

    def watchdog(self) -> None:
        """Ping the watchdog (``WatchdogSec=``)."""
        self.notify(WATCHDOG="1")

    async def watchdog_loop(
        self, stop: asyncio.Event, status: Callable[[], str] | None = None,
        *, healthy: Callable[[], bool] | None = None,
    ) -> None:
        """Ping every ``watchdog_interval_s`` until ``stop`` is set.

        The pings come from the event loop itself: a loop that is stuck stops them, and
        systemd kills and restarts the service. ``status()``, when given, refreshes
        ``STATUS=`` with a ping at most every :data:`STATUS_EVERY_S` seconds. While
        ``healthy()`` is false (the store's writer thread is gone) no ping is sent.
        """
        interval_s = self.watchdog_interval_s
        if interval_s is None:
            return
        loop = asyncio.get_running_loop()
        status_sent_at = -math.inf
        while not await _wait(stop, interval_s):
            if healthy is not None and not _call_healthy(healthy):
                log.error("systemd.watchdog_withheld", message="a part is dead: no ping")
                continue
            fields = {"WATCHDOG": "1"}
            if status is not None and loop.time() - status_sent_at >= STATUS_EVERY_S:
                text = _call_status(status)
                if text is not None:
                    fields["STATUS"] = text
                status_sent_at = loop.time()
            self.notify(**fields)

    def close(self) -> None:
        """Close the socket; later calls are no-ops."""
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # A full receive queue must fail the send, not stall the event loop.
            sock.setblocking(False)
            self._sock = sock
        return self._sock

    def _warn(self, error: OSError) -> None:
        # Once: a missing socket fails every ping, and the log must not fill up with them.
        if self._warned:
            log.debug("systemd.notify_failed", error=str(error))
            return
        self._warned = True
        log.warning("systemd.notify_failed", error=str(error), socket=self._describe())

    def _describe(self) -> str:
        address = self._address or b""
        if address.startswith(b"\0"):
            address = b"@" + address[1:]
        return os.fsdecode(address)


def _parse_address(value: str) -> bytes | None:
    """The socket address for ``$NOTIFY_SOCKET``; ``@name`` is the abstract ``\\0name``."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    return os.fsencode(value)


def _watchdog_interval_s(environ: Mapping[str, str]) -> float | None:
    """Half of ``WATCHDOG_USEC``, if the watchdog is meant for this process."""
    usec_text = environ.get("WATCHDOG_USEC")
    if usec_text is None:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text is not None and pid_text.strip() != str(os.getpid()):
        return None  # set for another process (e.g. inherited from a parent)
    try:
        usec = int(usec_text)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("systemd.bad_watchdog_usec", value=usec_text)
        return None
    return usec / 1_000_000 / 2


def _encode(fields: Mapping[str, str]) -> bytes:
    # A newline inside a value would start a new assignment: flatten it.
    lines = (f"{key}={' '.join(str(value).splitlines())}" for key, value in fields.items())
    return "\n".join(lines).encode("utf-8")


async def _wait(stop: asyncio.Event, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``stop``; returns whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout_s)
    return stop.is_set()


def _call_status(status: Callable[[], str]) -> str | None:
    # A faulty status callback must not stop the pings: systemd would kill a healthy daemon.
    try:
        return status()
    except Exception:
        log.exception("systemd.status_failed")
        return None


def _call_healthy(healthy: Callable[[], bool]) -> bool:
    try:
        return healthy()
    except Exception:
        log.exception("systemd.health_check_failed")
        return False
