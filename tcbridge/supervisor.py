"""Supervision of the daemon's long-lived tasks, and the daemon's readiness reasons.

Every loop the daemon needs (dispatcher and its lanes, poller, fetch worker, retention,
watchdog) is started through :meth:`Supervisor.spawn`. One that raises, is cancelled, or
returns before the daemon was told to stop is a failure: the supervisor logs why, sets
``stop`` so the daemon drains and stops in order, and the exit code is non-zero, so
systemd (``Restart=on-failure``) starts it again. Everything of value is in the store, so a
restart loses nothing; restarting one task in place would hide a bug behind a daemon that
looks alive. Meanwhile (during the drain) ``/readyz`` gives the reason.

Other parts report what supervision cannot see, on the event loop's thread:

- :meth:`Supervisor.failed` for a fatal condition (e.g. the store's writer thread died;
  from another thread: ``loop.call_soon_threadsafe(supervisor.failed, reason)``);
- :meth:`Supervisor.degraded` for a reason not to be ready that may clear by itself.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from typing import Any

import structlog

from tcbridge.errors import describe

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1


class Supervisor:
    """Watches named tasks; any failure stops the daemon with a non-zero exit code."""

    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.failures: list[str] = []
        self._degraded: dict[str, str] = {}

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start ``coro`` as the long-lived task ``name``, watched from now on."""
        task = asyncio.create_task(coro, name=f"tcbridge-{name}")
        self.tasks[name] = task
        task.add_done_callback(functools.partial(self._ended, name))
        return task

    def _ended(self, name: str, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            if not self._stop.is_set():  # shutdown cancels what is late, nobody else should
                self.failed(f"{name} was cancelled")
            return
        error = task.exception()
        if error is not None:
            log.error("tcbridge.part_crashed", part=name, error=repr(error), exc_info=error)
            self.failed(f"{name} died: {describe(error)}")
        elif not self._stop.is_set():
            self.failed(f"{name} stopped before the daemon did")

    def failed(self, reason: str) -> None:
        """Something the daemon cannot run without has failed: stop, and exit non-zero."""
        log.error("tcbridge.failed", reason=reason)
        self.failures.append(reason)
        self._stop.set()

    def degraded(self, key: str, reason: str | None) -> None:
        """Set (or with None clear) a reason, under ``key``, not to be ready."""
        if reason is None:
            self._degraded.pop(key, None)
        else:
            self._degraded[key] = reason

    def reasons(self) -> list[str]:
        """Why the daemon is not ready, as far as supervision knows."""
        return [f"failed: {reason}" for reason in self.failures] + list(self._degraded.values())

    @property
    def exit_code(self) -> int:
        """0 unless something failed."""
        return EXIT_FAILED if self.failures else EXIT_OK
