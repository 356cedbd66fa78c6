"""Blocking disk work on its own bounded pool with a deadline: a hung write neither blocks
shutdown nor piles up threads; the file handler's durability order."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tcbridge import handlers
from tcbridge.aio import BlockingPool
from tcbridge.config import FileHandlerSettings
from tcbridge.errors import StoreUnavailable
from tcbridge.handlers import FileHandler, write_atomically
from tcbridge.store import Store


@pytest.fixture
def hang() -> Iterator[threading.Event]:
    """Set at the end of the test, so the hung threads finish and nothing leaks."""
    gate = threading.Event()
    yield gate
    gate.set()


def pool_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(name)]


async def test_a_hung_call_is_abandoned_at_close_and_named(hang: threading.Event) -> None:
    pool = BlockingPool("tcb-test-pool", 1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await pool.run("write 'a.json'", hang.wait)
    with pytest.raises(TimeoutError):  # queued behind the hung one: no second thread
        async with asyncio.timeout(0.05):
            await pool.run("write 'b.json'", lambda: None)
    assert len(pool_threads("tcb-test-pool")) == 1
    assert all(t.daemon for t in pool_threads("tcb-test-pool"))
    with capture_logs() as logs:
        left = await pool.close(0.05)
    assert len(left) == 1 and left[0].startswith("write 'a.json' (for ")
    (line,) = [e for e in logs if e["event"] == "blocking_work.abandoned"]
    assert line["calls"] == left
    with pytest.raises(RuntimeError, match="closed"):
        await pool.run("late", lambda: None)


async def test_results_and_errors_come_back() -> None:
    pool = BlockingPool("tcb-test-ok", 2)
    assert await pool.run("add", lambda: 1 + 1) == 2
    with pytest.raises(ZeroDivisionError):
        await pool.run("divide", lambda: 1 / 0)
    assert await pool.close(1.0) == []


def test_a_hung_file_write_does_not_block_the_loop_from_ending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hang: threading.Event
) -> None:
    """asyncio.run waits for the default executor at its end: a write hung there (a dead
    NFS mount) kept the daemon from exiting after its shutdown."""
    monkeypatch.setattr(handlers, "write_atomically", lambda *args: hang.wait())
    settings = FileHandlerSettings(name="drop", type="file", directory=tmp_path, timeout_s=0.05)
    outcomes = []

    async def deliver_then_stop() -> None:
        handler = FileHandler(settings)
        outcomes.append(await handler.deliver({"id": "e1"}, b"{}", 1))
        with capture_logs() as logs:
            await handler.close()
        outcomes.append([e["event"] for e in logs])

    runner = threading.Thread(target=asyncio.run, args=(deliver_then_stop(),), daemon=True)
    runner.start()
    runner.join(timeout=30)
    assert not runner.is_alive(), "the event loop could not finish: a hung write held it"
    timed_out, events = outcomes
    assert timed_out.status == "retry" and "timeout" in (timed_out.error or "")
    assert events == ["blocking_work.abandoned"]


async def test_store_close_abandons_a_hung_writer_after_its_deadline(
    store_factory: Callable[..., Store], hang: threading.Event
) -> None:
    store = store_factory()
    await store.open()
    stuck = asyncio.ensure_future(store.run(lambda conn: hang.wait()))  # a hung fsync
    await asyncio.sleep(0)
    with capture_logs() as logs:
        await asyncio.wait_for(store.close(timeout_s=0.1), timeout=30)
    (line,) = logs
    assert line.pop("queued") in (0, 1)  # the stop sentinel, unless the writer took it
    assert line == {"event": "store.close_abandoned", "log_level": "error", "timeout_s": 0.1,
                    "path": str(store.path)}
    stuck.cancel()
    with pytest.raises(StoreUnavailable):  # closed, even though its thread is not done
        await store.run(lambda conn: None)


def test_the_file_is_fsynced_then_renamed_then_the_directory_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: Path, dst: Path) -> None:
        calls.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(handlers.os, "fsync", fsync)
    monkeypatch.setattr(handlers.os, "replace", replace)
    write_atomically(tmp_path, "e1.json", b"{}")
    assert calls == ["fsync file", "rename", "fsync dir"]
    assert (tmp_path / "e1.json").read_bytes() == b"{}"
