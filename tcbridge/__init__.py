"""tcbridge: a durable, deduplicating bridge from Tradecloud to an ERP."""

from __future__ import annotations

__version__ = "0.1.0"
