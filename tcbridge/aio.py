"""Small asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")


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


@dataclass(slots=True)
class _Job:
    what: str
    function: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    context: contextvars.Context
    abandoned: bool = False  # the caller gave up before a thread took it: skip it


class BlockingPool:
    """A small, bounded pool of daemon threads for blocking disk work.

    Not ``asyncio.to_thread``: a thread cannot be stopped, and a write hung on a dead disk
    in the shared default executor keeps ``asyncio.run`` from returning at shutdown (it
    waits for that executor) and, piling up, starves every other user of it. Here at most
    ``workers`` threads ever exist, a caller's timeout only abandons the call, and
    :meth:`close` waits a bounded time, then names what it leaves behind; daemon threads do
    not keep the process alive."""

    def __init__(self, name: str, workers: int) -> None:
        self.name = name
        self._workers = max(1, workers)
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._busy: dict[int, tuple[str, float]] = {}  # thread id -> (what, since)
        self._lock = threading.Lock()
        self._closed = False
        self._progress = asyncio.Event()  # set on the loop each time a call ends

    async def run(self, what: str, function: Callable[[], T]) -> T:
        """Run ``function`` on a pool thread; ``what`` describes it if it is abandoned."""
        if self._closed:
            raise RuntimeError(f"{self.name}: closed")
        loop = asyncio.get_running_loop()
        job = _Job(what, function, loop, loop.create_future(), contextvars.copy_context())
        job.future.add_done_callback(lambda _: setattr(job, "abandoned", True))
        self._start_threads()
        self._queue.put(job)
        result: T = await job.future
        return result

    def busy(self) -> list[str]:
        """What the pool's threads are doing now, with for how long."""
        now = time.monotonic()
        with self._lock:
            return [f"{what} (for {now - since:.1f} s)" for what, since in self._busy.values()]

    async def close(self, timeout_s: float) -> list[str]:
        """Take no more work, wait up to ``timeout_s`` for the calls in progress; returns
        (and logs) those it abandons."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout_s
        while True:
            self._progress.clear()
            remaining_s = deadline - time.monotonic()
            if not self.busy() or remaining_s <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining_s)
        left = self.busy()
        if left:
            log.error("blocking_work.abandoned", pool=self.name, calls=left)
        return left

    def _start_threads(self) -> None:
        while len(self._threads) < self._workers:
            thread = threading.Thread(target=self._work, daemon=True,
                                      name=f"{self.name}-{len(self._threads)}")
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.abandoned:
                continue
            me = threading.get_ident()
            with self._lock:
                self._busy[me] = (job.what, time.monotonic())
            try:
                value, error = job.context.run(job.function), None
            except BaseException as e:  # handed to the awaiting task, which decides
                value, error = None, e
            finally:
                with self._lock:
                    self._busy.pop(me, None)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                # One wake-up of the loop per call, not two (each is a write to its pipe).
                job.loop.call_soon_threadsafe(_settle, job.future, value, error, self._progress)


def settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """Answer ``future`` with ``error`` or ``value``, unless it is answered (or cancelled:
    the caller gave up) already."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None,
            progress: asyncio.Event) -> None:
    progress.set()
    settle(future, value, error)  # the caller may have timed out meanwhile
