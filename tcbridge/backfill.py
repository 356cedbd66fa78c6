"""A one-off catch-up from a timestamp: the poller's paging and dedup on its own cursor.

Safe while the daemon runs (the store is shared through SQLite's locking and dedup
happens in the same transactions), and it never touches the main cursor: its progress
lives under ``backfill:<kind>``.
"""

from __future__ import annotations

import asyncio
from typing import TextIO

import aiohttp

from tcbridge import __version__
from tcbridge.config import PollKind, Settings
from tcbridge.dispatch import make_route
from tcbridge.poller import CycleStats, Poller
from tcbridge.store import make_store
from tcbridge.tradecloud import TradecloudClient

CURSOR_PREFIX = "backfill:"
BAR_WIDTH = 30


class Progress:
    """A progress bar on a terminal, a line per page elsewhere; the API's total sizes it."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()

    def update(self, kind: str, stats: CycleStats, total: int | None) -> None:
        """Show how far a kind has come."""
        size = max(total or 0, stats.items)
        share = stats.items / size if size else 1.0
        filled = int(share * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        text = f"{kind:<9} [{bar}] {stats.items}/{size} {share:4.0%}  new {stats.stored}"
        if self._tty:
            self._stream.write("\r" + text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def finish(self) -> None:
        """End the bar's line."""
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


async def backfill(
    settings: Settings, since: str, kinds: list[PollKind], *, progress_stream: TextIO
) -> dict[str, CycleStats]:
    """Fetch every kind from ``since`` to now; returns what each kind did."""
    progress = Progress(progress_stream)
    totals: dict[str, CycleStats] = {}
    route = make_route(settings.handlers)
    async with (
        make_store(settings.store, route=route) as store,
        aiohttp.ClientSession(headers={"User-Agent": f"tcbridge/{__version__}"}) as session,
    ):
        client = TradecloudClient(session, settings.tradecloud)
        poller = Poller(settings.poll, client, store, asyncio.Event(),
                        api=settings.tradecloud.api, cursor_prefix=CURSOR_PREFIX,
                        progress=progress.update,
                        inclusive=settings.tradecloud.cursor_inclusive)
        try:
            for kind in kinds:
                await store.set_cursor(CURSOR_PREFIX + kind, since)
                totals[kind] = await poller.run_once(kind)
                progress.finish()
        finally:
            await client.close()
    return totals
