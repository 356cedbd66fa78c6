"""Helpers shared by the tests and the benchmarks (bench/ imports them too)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any


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


def writer_argv(prelude: str) -> list[str]:
    """The file handler's writer process (``python -m tcbridge.files``) with ``prelude``
    run first: the way a test puts a fault into the child (a failing fsync, a hang, an
    exit in the middle of a batch)."""
    code = (f"import sys\n{prelude}\n"
            "from tcbridge.files import main\nsys.exit(main(sys.argv[1:]))\n")
    return [sys.executable, "-c", code]
