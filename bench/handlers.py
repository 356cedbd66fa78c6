"""Python handler targets for the benchmarks (``callable = "bench.handlers:..."``)."""

from __future__ import annotations

import asyncio
from typing import Any


async def park(envelope: dict[str, Any]) -> None:
    """Do nothing, and never finish: with ``concurrency = 1`` the lane holds one delivery and
    claims no more, so the outbox rows are written but the dispatcher does not compete with
    ingest for the CPU. Shutdown cancels it (the delivery stays pending)."""
    await asyncio.Event().wait()


async def noop(envelope: dict[str, Any]) -> None:
    """Do nothing and succeed at once: every delivery costs only the dispatcher's own work."""
