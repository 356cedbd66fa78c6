"""A python-handler target that, once it has delivered, breaks its own lane (fault injection
for the supervision test: a lane that dies of anything but a store error)."""

from __future__ import annotations

from typing import Any


async def deliver(envelope: dict[str, Any]) -> None:
    """Deliver, then make the lane's next claim raise a bug of ours."""
    from tcbridge import dispatch

    async def broken(self: dispatch.Lane) -> float | None:
        raise RuntimeError("injected lane bug")

    dispatch.Lane._fill = broken  # type: ignore[method-assign]
