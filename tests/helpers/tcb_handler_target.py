"""Targets for the python handler tests, imported by name through ``sys.path``."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

from tcbridge.errors import PermanentError

CALLS: list[tuple[str, dict[str, Any]]] = []
RELEASE = threading.Event()
NOT_CALLABLE = 42


def record_sync(envelope: dict[str, Any]) -> None:
    """Record the call and the thread it ran in."""
    CALLS.append((threading.current_thread().name, envelope))


async def record_async(envelope: dict[str, Any]) -> None:
    """Record the call from the event loop."""
    await asyncio.sleep(0)
    CALLS.append(("async", envelope))


class AsyncCallable:
    """An object whose ``__call__`` is a coroutine function."""

    async def __call__(self, envelope: dict[str, Any]) -> None:
        CALLS.append(("async-object", envelope))


async_object = AsyncCallable()


def fail_sync(envelope: dict[str, Any]) -> None:
    """A transient failure."""
    raise ValueError(f"boom {envelope['id']}")


async def fail_async(envelope: dict[str, Any]) -> None:
    """A transient failure from a coroutine."""
    raise ConnectionError("erp down")


def fail_permanent(envelope: dict[str, Any]) -> None:
    """A failure retrying cannot fix."""
    raise PermanentError("unknown supplier")


def exit_sync(envelope: dict[str, Any]) -> None:
    """A handler calling sys.exit must not stop the daemon."""
    sys.exit(3)


def own_timeout(envelope: dict[str, Any]) -> None:
    """A TimeoutError of the handler's own, before the deadline."""
    raise TimeoutError("erp read timed out")


async def hang_async(envelope: dict[str, Any]) -> None:
    """Never returns on its own."""
    await asyncio.sleep(3600)


def block_sync(envelope: dict[str, Any]) -> None:
    """Blocks until the test releases it."""
    RELEASE.wait(30)
