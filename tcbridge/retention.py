"""Retention: payloads and old rows are purged in small batches, so the file stays bounded.

Payloads of events whose deliveries are all done go after ``retention_days``; the rows
themselves (their dedup keys) stay until ``dedup_retention_days``, so a late duplicate
is still recognised. Freed pages are reused by SQLite, so the file stops growing under a
constant load.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import structlog

from tcbridge.config import StoreSettings
from tcbridge.errors import StoreError
from tcbridge.store import Retention, StoreBackend

log = structlog.get_logger(__name__)

PAUSE_BETWEEN_BATCHES_S = 0.05  # let webhook commits in between batches


def policy(settings: StoreSettings) -> Retention:
    """The retention policy of the ``[store]`` section."""
    return Retention(payload_days=settings.retention_days,
                     dedup_days=settings.dedup_retention_days, batch=settings.purge_batch)


async def purge_all(
    store: StoreBackend, retention: Retention, pause_s: float = 0.0
) -> dict[str, int]:
    """Run batches until there is nothing left to purge; returns the totals."""
    totals: Counter[str] = Counter()
    while True:
        done = await store.purge(retention)
        totals.update(done)
        if not any(done.values()):
            return dict(totals)
        if pause_s:
            await asyncio.sleep(pause_s)


async def run(store: StoreBackend, settings: StoreSettings, stop: asyncio.Event) -> None:
    """Purge every ``purge_interval_s`` until ``stop`` is set; errors are logged, not fatal."""
    retention = policy(settings)
    while not stop.is_set():
        try:
            totals = await purge_all(store, retention, PAUSE_BETWEEN_BATCHES_S)
            if any(totals.values()):
                log.info("retention.purged", **totals)
        except StoreError as e:
            log.warning("retention.failed", error=str(e))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=settings.purge_interval_s)
