"""Realistic webhook bodies from the simulator's data model, as templates with placeholders.

Each template is one order-event POST body (2-5 KB) in which the order id, the
``lastUpdatedAt`` stamp (everywhere it occurs) and the message id are replaced by
``@@ORDER@@``, ``@@STAMP@@`` and ``@@MSG@@``. The wrk script (``post.lua``) and the Python
load clients fill them per request, so every body is a distinct change of a distinct order.
"""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from tcbridge.simulator import Simulator

ORDER, STAMP, MSG = "@@ORDER@@", "@@STAMP@@", "@@MSG@@"
PLACEHOLDERS = (ORDER, STAMP, MSG)
MIN_BYTES, MAX_BYTES = 2000, 5000
UPDATE_EVENTS = (
    "OrderLinesConfirmedBySupplier", "OrderChangesProposedBySupplier",
    "OrderLinesUpdatedByBuyer", "OrderLinesShippedByBuyer",
)


def make_templates(count: int = 32, seed: int = 6) -> list[str]:
    """``count`` order-event bodies between 2 and 5 KB: issued orders and line updates."""
    sim = Simulator(rate_limit_per_s=None, seed=seed)
    templates: list[str] = []
    for i in itertools.count():
        if len(templates) >= count:
            break
        order = sim.add_orders(1, lines=4 + i % 6)[0]
        if i % 2:
            sim.update_order(order["id"], event_name=UPDATE_EVENTS[i % len(UPDATE_EVENTS)],
                             line_count=3 + i % 5)
        body = sim.changes()[-1].webhook_body
        text = _templatise(body)
        filled = fill(text, "x" * 36, "2024-05-01T10:00:00.000Z", "y" * 36)
        if MIN_BYTES <= len(filled) <= MAX_BYTES:
            templates.append(text)
    return templates


def _templatise(body: dict[str, object]) -> str:
    event = body["orderEvent"]
    assert isinstance(event, dict)
    text = json.dumps(body)
    text = text.replace(json.dumps(event["orderId"]), json.dumps(ORDER))
    meta = body["meta"]  # the message meta sits at the top of the body (docs order/buyer/receive)
    assert isinstance(meta, dict)
    text = text.replace(json.dumps(meta["messageId"]), json.dumps(MSG))
    return text.replace(json.dumps(event["lastUpdatedAt"]), json.dumps(STAMP))


def fill(template: str, order_id: str, stamp: str, message_id: str) -> str:
    """A template with its placeholders filled."""
    return template.replace(ORDER, order_id).replace(STAMP, stamp).replace(MSG, message_id)


def write_templates(path: Path, templates: list[str]) -> Path:
    """One template per line (the format post.lua reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(templates) + "\n", encoding="utf-8")
    return path


def stamp_of(epoch_ms: int) -> str:
    """Tradecloud's timestamp format for epoch milliseconds."""
    moment = datetime.fromtimestamp(epoch_ms // 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


IdScheme = Literal["sequential", "random"]
ID_SCHEMES: tuple[IdScheme, ...] = ("sequential", "random")
_SCATTER = 2_654_435_761  # Knuth's multiplicative hash: consecutive n far apart in 32 bits


def order_id(prefix: str, worker: int, n: int, ids: IdScheme = "sequential") -> str:
    """The order id of request ``n`` of ``worker``, as post.lua makes it. "sequential" ids
    count up, so the store's indexes keyed by the entity take each new one at their right
    edge; "random" ones begin with 8 scattered hex digits, so each lands anywhere, as
    Tradecloud's UUIDs do (bench/README.md, round 8). Both are unique by (prefix, worker, n)."""
    if ids == "random":
        head = f"{(n * _SCATTER + worker * 40_503 + prefix_hash(prefix)) % 2**32:08x}"
        return f"{head}-{worker:04x}-4000-8000-{n:012d}"
    return f"{prefix}-{worker:04x}-4000-8000-{n:012d}"


def prefix_hash(prefix: str) -> int:
    """A 32-bit hash of the run's prefix (h * 31 + byte, as post.lua computes it), so two
    runs' random ids differ as their sequential ones do."""
    h = 0
    for byte in prefix.encode():
        h = (h * 31 + byte) % 2**32
    return h


class BodyMaker:
    """Unique bodies for the Python load clients, in the same scheme as post.lua."""

    def __init__(self, templates: list[str], prefix: str, worker: int = 0,
                 ids: IdScheme = "sequential") -> None:
        self._templates = templates
        self._prefix = prefix
        self._worker = worker
        self._ids = ids
        self._counter = 0
        self._base_ms = int(time.time() * 1000) - 86_400_000

    def next(self) -> tuple[str, bytes]:
        """(order id, body) of the next request."""
        self._counter += 1
        n = self._counter
        order = order_id(self._prefix, self._worker, n, self._ids)
        stamp = stamp_of(self._base_ms + n * 16 + self._worker % 16)
        message_id = f"{self._prefix}-{self._worker:04x}-4000-9000-{n:012d}"
        template = self._templates[n % len(self._templates)]
        return order, fill(template, order, stamp, message_id).encode()


def sizes(templates: list[str]) -> tuple[int, float, int]:
    """(min, mean, max) body size in bytes once filled."""
    lengths = [len(fill(t, "x" * 36, "2024-05-01T10:00:00.000Z", "y" * 36)) for t in templates]
    return min(lengths), sum(lengths) / len(lengths), max(lengths)
