"""A faithful local stand-in for the Tradecloud API (``tcbridge simulate``, end-to-end tests).

Depends only on aiohttp, structlog, PyJWT (with cryptography, for the identity provider) and the
standard library.
"""

from __future__ import annotations

from tcbridge.simulator.cli import add_arguments, run_from_args
from tcbridge.simulator.core import Simulator
from tcbridge.simulator.faults import Faults

__all__ = ["Faults", "Simulator", "add_arguments", "run_from_args"]
