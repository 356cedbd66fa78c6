"""Helpers shared by the tests and the benchmarks (bench/ imports them too)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

# The machine's PostgreSQL 15 (trust auth); TCBRIDGE_TEST_PG_DSN points elsewhere.
PG_ADMIN_DSN = os.environ.get("TCBRIDGE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    """Enough TOML for test configs: strings, numbers, booleans, lists and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write a config dict (top-level keys, [sections] and [[handlers]]) as TOML."""
    lines = [f"{k} = {toml_value(v)}" for k, v in config.items() if not isinstance(v, dict | list)
             or (isinstance(v, list) and k != "handlers")]
    for section, values in config.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for handler in config.get("handlers", []):
        lines.append("[[handlers]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in handler.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.asynccontextmanager
async def pg_database(purpose: str) -> AsyncIterator[str]:
    """A new, empty PostgreSQL database for one test (its DSN), dropped afterwards; the
    test is skipped, with the reason, when no server answers."""
    import asyncpg
    import pytest

    try:
        admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as e:
        pytest.skip(f"no PostgreSQL at {PG_ADMIN_DSN}: {e}")
    name = f"tcb_{purpose}_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
