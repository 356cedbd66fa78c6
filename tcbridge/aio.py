"""Small asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def wait_any(
    stop: asyncio.Event, wake: asyncio.Event, delay_s: float | None,
    *, also: Iterable[asyncio.Future[Any]] = (),
) -> None:
    """Wait until ``stop`` or ``wake`` is set, ``delay_s`` seconds pass, or one of ``also``
    (tasks to watch, left running) is done."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait([*waiters, *also], timeout=delay_s,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """Answer ``future`` with ``error`` or ``value``, unless it is answered (or cancelled:
    the caller gave up) already."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
