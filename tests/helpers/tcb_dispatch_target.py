"""A python-handler target whose behaviour the dispatch tests steer per entity."""

from __future__ import annotations

import asyncio
from typing import Any

from tcbridge.errors import PermanentError

DELIVERED: list[tuple[str, str]] = []  # (entityId, event id), in delivery order
FAILURES: dict[str, int] = {}  # entityId -> transient failures still to give
PERMANENT: set[str] = set()  # entityIds that fail permanently
GATES: dict[str, asyncio.Event] = {}  # entityId -> wait for this before finishing
STARTED: list[str] = []  # event ids whose delivery started


def reset() -> None:
    """Forget everything (each test starts clean)."""
    DELIVERED.clear()
    FAILURES.clear()
    PERMANENT.clear()
    GATES.clear()
    STARTED.clear()


async def deliver(envelope: dict[str, Any]) -> None:
    """Record the envelope, failing or waiting as the test asked."""
    entity = envelope["entityId"]
    STARTED.append(envelope["id"])
    if entity in GATES:
        await GATES[entity].wait()
    if entity in PERMANENT:
        raise PermanentError(f"{entity} is unknown to the ERP")
    if FAILURES.get(entity, 0) > 0:
        FAILURES[entity] -= 1
        raise ConnectionError(f"ERP down for {entity}")
    DELIVERED.append((entity, envelope["id"]))
