"""Blocking disk work with a deadline: a hung file write or store writer does not keep the
daemon from ending."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tcbridge.config import FileHandlerSettings
from tcbridge.errors import StoreUnavailable
from tcbridge.handlers import FileHandler
from tcbridge.store import Store
from tests.support import writer_argv
from tests.test_files import HANG


@pytest.fixture
def hang() -> Iterator[threading.Event]:
    """Set at the end of the test, so the hung threads finish and nothing leaks."""
    gate = threading.Event()
    yield gate
    gate.set()


def test_a_hung_file_write_does_not_block_the_loop_from_ending(tmp_path: Path) -> None:
    """asyncio.run waits for the default executor at its end: a write hung there (a dead
    NFS mount) kept the daemon from exiting after its shutdown."""
    settings = FileHandlerSettings(name="drop", type="file", directory=tmp_path, timeout_s=1.0)
    outcomes = []

    async def deliver_then_stop() -> None:
        handler = FileHandler(settings, writer_argv(HANG))
        outcomes.append(await handler.deliver({"id": "hang1"}, b"{}", 1))
        with capture_logs() as logs:
            await handler.close()
        outcomes.append([e["event"] for e in logs])

    runner = threading.Thread(target=asyncio.run, args=(deliver_then_stop(),), daemon=True)
    runner.start()
    runner.join(timeout=30)
    assert not runner.is_alive(), "the event loop could not finish: a hung write held it"
    timed_out, events = outcomes
    assert timed_out.status == "retry" and "timeout" in (timed_out.error or "")
    assert "files.writer_killed" in events


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
