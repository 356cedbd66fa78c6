"""A python-handler target for the end-to-end tests: appends each envelope to a file."""

from __future__ import annotations

import json
import os
from typing import Any


def record(envelope: dict[str, Any]) -> None:
    """Append the event id to $TCB_E2E_RECORD (one line per delivery)."""
    with open(os.environ["TCB_E2E_RECORD"], "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": envelope["id"], "entityId": envelope["entityId"]}) + "\n")
