"""The daemon's side of the file handler's writer process (``python -m tcbridge.files``).

:class:`FolderWriter` hands the child the files of concurrent deliveries as one batch and
answers each delivery once its file is in place and durable; see :mod:`tcbridge.files`
for why a process and for the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from tcbridge.errors import describe
from tcbridge.files import BATCH_MAX, BATCH_MAX_BYTES, LENGTH_BYTES, decode_answer, encode_request

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 30.0  # the child's interpreter and imports, on a slow or busy machine
REAP_TIMEOUT_S = 1.0  # a killed (or failed) child is gone by then unless its I/O hangs


class WriteFailed(Exception):
    """A file is not in place: the reason is the message."""


@dataclass(slots=True)
class _File:
    name: str
    body: bytes
    future: asyncio.Future[None]


class FolderWriter:
    """Writes files into one folder through a child process, in batches: every file handed
    in while a batch is being written goes into the next one (group commit, as the store
    does for events). One batch is in the child at a time.

    A child that dies fails its batch (each delivery is retried) and the next batch starts
    a new one. A child that does not answer within ``hung_after_s`` (a hung disk or NFS
    server) is killed and its batch failed; while a killed child has not exited (a process
    in uninterruptible sleep dies only once its I/O returns), no new one is started, so
    hung processes never pile up."""

    def __init__(self, directory: Path, *, name: str, hung_after_s: float,
                 argv: Sequence[str] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self._argv = [*(argv or [sys.executable, "-m", "tcbridge.files"]), str(directory)]
        self._env = None if env is None else dict(env)  # None: the daemon's own
        self._hung_after_s = hung_after_s
        self._pending: list[_File] = []
        self._rounds: asyncio.Task[None] | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._killed: asyncio.subprocess.Process | None = None  # hung, killed, not yet gone
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The running child's pid (None before the first write or after a failure)."""
        return self._child.pid if self._child is not None else None

    async def write(self, name: str, body: bytes) -> None:
        """Return once ``name`` is in place and durable; WriteFailed says why it is not.
        Cancelling the call abandons the file if its batch has not been sent yet."""
        if self._closed:
            raise WriteFailed(f"the writer of {self.name!r} is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_File(name, body, future))
        if self._rounds is None:
            self._rounds = asyncio.create_task(self._run_rounds(), name=f"files-{self.name}")
        await future

    async def close(self, timeout_s: float) -> None:
        """Take no more files, give the batch in the child up to ``timeout_s``, then end
        the child (its input closed; killed if it does not go)."""
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        rounds = self._rounds
        if rounds is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(rounds), timeout_s)
            if not rounds.done():
                log.error("files.writer_abandoned", handler=self.name, pid=self.pid,
                          message="a batch was still being written at shutdown")
                rounds.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await rounds
        child, self._child = self._child, None
        if child is not None:
            await _end(child, max(0.1, deadline - loop.time()))
        if self._killed is not None:  # reaped, if its I/O lets it go in time
            await _exit_code(self._killed, max(REAP_TIMEOUT_S, deadline - loop.time()))

    async def _run_rounds(self) -> None:
        try:
            while self._pending:
                batch = self._take_batch()
                if batch:
                    await self._round(batch)
        except BaseException as e:  # cancelled at close: nobody is left waiting in silence
            for f in [*self._pending]:
                _settle(f, WriteFailed(f"the writer of {self.name!r} stopped: {describe(e)}"))
            self._pending.clear()
            raise
        finally:
            self._rounds = None

    def _take_batch(self) -> list[_File]:
        """The next batch off the pending files: up to BATCH_MAX files and BATCH_MAX_BYTES
        of bodies (at least one file); those given up meanwhile are dropped."""
        taken = size = 0
        for f in self._pending[:BATCH_MAX]:
            if taken and size + len(f.body) > BATCH_MAX_BYTES:
                break
            taken += 1
            size += len(f.body)
        batch = [f for f in self._pending[:taken] if not f.future.done()]
        del self._pending[:taken]
        return batch

    async def _round(self, batch: list[_File]) -> None:
        try:
            child = await self._running_child()
            batch = [f for f in batch if not f.future.done()]  # given up while it started
            errors = await self._exchange(child, batch) if batch else []
        except WriteFailed as e:
            for f in batch:
                _settle(f, e)
        except BaseException as e:
            for f in batch:
                _settle(f, WriteFailed(f"the writer of {self.name!r} stopped: {describe(e)}"))
            raise
        else:
            for f, error in zip(batch, errors, strict=True):
                _settle(f, None if error is None else WriteFailed(error))

    async def _exchange(self, child: asyncio.subprocess.Process,
                        batch: list[_File]) -> list[str | None]:
        """Send one batch and read its answer."""
        assert child.stdin is not None

        async def send_and_read() -> list[str | None]:
            assert child.stdin is not None
            child.stdin.write(encode_request([(f.name, f.body) for f in batch]))
            await child.stdin.drain()
            return await _read_answer(child, len(batch))

        return await self._talk(child, send_and_read(), self._hung_after_s, "answer")

    async def _talk(self, child: asyncio.subprocess.Process,
                    exchange: Coroutine[Any, Any, list[str | None]], within_s: float,
                    doing: str) -> list[str | None]:
        """Run ``exchange`` with the child; WriteFailed when the child cannot do it."""
        try:
            async with asyncio.timeout(within_s):
                return await exchange
        except TimeoutError:
            self._kill(child, f"did not {doing}")
            raise WriteFailed(f"the file writer (pid {child.pid}) did not {doing} within "
                              f"{within_s:g} s; it was stopped") from None
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            if self._child is child:
                self._child = None
            _close_input(child)
            code = await _exit_code(child)
            raise WriteFailed(f"the file writer (pid {child.pid}) ended (exit code {code})"
                              ) from e
        except ValueError as e:
            self._kill(child, "answered nonsense")
            raise WriteFailed(f"the file writer (pid {child.pid}) gave a wrong answer: {e}"
                              ) from e

    async def _running_child(self) -> asyncio.subprocess.Process:
        """The child, started (and ready: its first frame is an answer for no files) if
        there is none."""
        if self._child is not None and self._child.returncode is None:
            return self._child
        if self._killed is not None:
            if await _exit_code(self._killed) is None:
                raise WriteFailed(f"the file writer killed earlier (pid {self._killed.pid}) "
                                  "has not exited yet: the disk may hang")
            self._killed = None
        try:
            child = await asyncio.create_subprocess_exec(
                *self._argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=self._env)
        except OSError as e:
            raise WriteFailed(f"cannot start the file writer {self._argv[0]!r}: "
                              f"{describe(e)}") from e
        await self._talk(child, _read_answer(child, 0), START_TIMEOUT_S, "start")
        log.info("files.writer_started", handler=self.name, pid=child.pid)
        self._child = child
        return child

    def _kill(self, child: asyncio.subprocess.Process, why: str) -> None:
        log.error("files.writer_killed", handler=self.name, pid=child.pid, why=why)
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        _close_input(child)
        if self._child is child:
            self._child = None
        self._killed = child


async def _read_answer(child: asyncio.subprocess.Process, files: int) -> list[str | None]:
    assert child.stdout is not None
    length = await child.stdout.readexactly(LENGTH_BYTES)
    return decode_answer(await child.stdout.readexactly(int.from_bytes(length, "big")), files)


def _close_input(child: asyncio.subprocess.Process) -> None:
    """Close the pipe to the child: it ends the child's loop, and an exited child's
    transport closes only once its pipes are."""
    if child.stdin is not None:
        child.stdin.close()


async def _exit_code(child: asyncio.subprocess.Process,
                     within_s: float = REAP_TIMEOUT_S) -> int | None:
    """The child's exit code once it has exited and its pipes are closed (``wait`` waits
    for both), or None if that takes longer than ``within_s``."""
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(child.wait(), within_s)
    return None


async def _end(child: asyncio.subprocess.Process, timeout_s: float) -> None:
    """Close the child's input (it ends on its own); kill it if it is still there, and
    reap it (bounded: a process in uninterruptible sleep exits only once its I/O returns)."""
    _close_input(child)
    if await _exit_code(child, timeout_s) is not None:
        return
    log.error("files.writer_killed", pid=child.pid, why="did not end at shutdown")
    with contextlib.suppress(ProcessLookupError):
        child.kill()
    if await _exit_code(child) is None:
        log.error("files.writer_unreaped", pid=child.pid,
                  message=f"killed, but not gone after {REAP_TIMEOUT_S:g} s: its disk may hang")


def _settle(f: _File, error: BaseException | None) -> None:
    if f.future.done():  # its delivery gave up meanwhile
        return
    if error is None:
        f.future.set_result(None)
    else:
        f.future.set_exception(error)
