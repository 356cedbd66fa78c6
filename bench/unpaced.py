"""``tcbridge`` with the Tradecloud client's pacing switched off (for the backfill benchmark).

Tradecloud asks for at most 10 requests per second and the configuration refuses more
(``tradecloud.max_requests_per_s`` <= 10), so at the real pace a 1,000-page backfill takes
100 s however fast tcbridge is. Against the local simulator that pace is not what we want to
measure, so the benchmark runs the daemon (and its fetch-only baseline) with the pacer made
a no-op. Nothing else changes.

    python -m bench.unpaced run --config FILE
"""

from __future__ import annotations

import sys

from tcbridge.tradecloud import TradecloudClient


async def _no_pace(self: TradecloudClient) -> None:
    """Every request may start at once (one at a time still: the client's lock stays)."""


def unpace() -> None:
    """Switch the pacer off for every TradecloudClient in this process."""
    TradecloudClient._pace = _no_pace  # type: ignore[method-assign]


if __name__ == "__main__":
    unpace()
    from tcbridge.cli import main

    sys.exit(main())
