"""structlog, configured once: JSON lines when not on a TTY (journald), console on a TTY.

Logging never changes an answer: a sink that fails (stdout a broken pipe, a full disk
under a redirect) drops the line instead of raising into the request or delivery that
logged it. And a flood of one warning (a client posting with a wrong password) is cut to
the first few lines per interval plus a count, so journald's rate limit does not hide the
real logs.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import orjson
import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
THROTTLED_LEVELS = frozenset({"warning", "error", "critical", "exception"})


def _orjson_text(value: object, **_: object) -> str:
    return orjson.dumps(value, default=repr).decode()


class SafeStream:
    """A text stream that never raises on write or flush: failed lines are counted.

    A broken pipe will not heal, so the descriptor is pointed at /dev/null: later lines
    cost nothing, and the interpreter's final flush does not fail (exit status 120)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.dropped = 0
        self.detached = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError) as e:
            self._failed(e)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError) as e:
            self._failed(e)

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False

    def _failed(self, error: BaseException) -> None:
        with self._lock:
            self.dropped += 1
            if isinstance(error, BrokenPipeError) and not self.detached:
                self.detached = True
                _to_devnull(self._stream)


def _to_devnull(stream: TextIO) -> None:
    try:
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):
        return
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


@dataclass(slots=True)
class _Window:
    start: float
    count: int = 1
    suppressed: int = 0


class Throttle:
    """A structlog processor: per event name, the first ``burst`` warnings (or worse) of
    each ``interval_s`` pass, the others are dropped and counted; the first line of the
    next interval carries ``suppressed`` (how many were dropped) and ``suppressed_s``."""

    def __init__(self, burst: int, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._burst = burst
        self._interval_s = interval_s
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()  # the store's writer thread logs too

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if event_dict.get("level", method_name) not in THROTTLED_LEVELS:
            return event_dict
        key = str(event_dict.get("event"))
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window.start >= self._interval_s:
                self._windows[key] = _Window(now)
                if window is not None and window.suppressed:
                    event_dict["suppressed"] = window.suppressed
                    event_dict["suppressed_s"] = round(now - window.start, 1)
                return event_dict
            if window.count < self._burst:
                window.count += 1
                return event_dict
            window.suppressed += 1
        raise structlog.DropEvent


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
    *,
    repeat_burst: int = 10,
    repeat_interval_s: float = 60.0,
) -> SafeStream:
    """Configure structlog and route stdlib logging (aiohttp's) through the same output;
    returns the (never failing) sink."""
    sink = SafeStream(stream or sys.stdout)
    tty = sink.isatty()
    use_json = fmt == "json" or (fmt == "auto" and not tty)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=_orjson_text)
        if use_json else structlog.dev.ConsoleRenderer(colors=tty)  # no escapes in a pipe
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            Throttle(repeat_burst, repeat_interval_s),
            structlog.processors.StackInfoRenderer(),
            # The console renderer formats exceptions itself, prettier.
            *([structlog.processors.format_exc_info] if use_json else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        # One write per line (PrintLogger writes the newline apart: two syscalls per line
        # with PYTHONUNBUFFERED, as the benchmarks and many units run it).
        logger_factory=structlog.WriteLoggerFactory(sink),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sink)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(LEVELS[level], logging.INFO))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return sink
