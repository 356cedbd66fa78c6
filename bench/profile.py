"""Profile a running daemon with py-spy and summarise the collapsed stacks.

py-spy samples the process from outside (``--nonblocking``: it never pauses the daemon), so
the daemon runs unchanged. The summary lists, per thread, the functions with the most
samples on the CPU: "self" (the function itself was running) and "total" (it was on the
stack).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    """The py-spy binary next to this Python, or on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def record(pid: int, duration_s: float, out: Path, rate_hz: int = 200) -> Path | None:
    """Record ``duration_s`` of collapsed stacks of ``pid`` into ``out``; None without py-spy."""
    binary = py_spy()
    if binary is None:
        return None
    argv = [binary, "record", "--pid", str(pid), "--duration", str(max(1, round(duration_s))),
            "--rate", str(rate_hz), "--format", "raw", "--threads", "--nonblocking",
            "--output", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False,
                            timeout=duration_s + 60)
    if result.returncode != 0 or not out.exists():
        print(f"py-spy failed ({result.returncode}): {result.stderr.strip()[-500:]}",
              file=sys.stderr)
        return None
    return out


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = Path(path).name if "/tcbridge/" not in path else "tcbridge/" + path.split(
            "/tcbridge/", 1)[1]
    return f"{match.group('func')} ({path})"


def summarise(path: Path, top: int = 15) -> str:
    """A text summary of a raw py-spy file: per thread, top self and total functions."""
    per_thread: dict[str, tuple[Counter[str], Counter[str]]] = {}
    totals: Counter[str] = Counter()
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = _thread_name(frames[0])
        funcs = [_short(f) for f in frames[1:]]
        selfs, incl = per_thread.setdefault(thread, (Counter(), Counter()))
        totals[thread] += count
        if funcs:
            selfs[funcs[-1]] += count
            for func in set(funcs):
                incl[func] += count
    lines = []
    grand = sum(totals.values()) or 1
    for thread, samples in totals.most_common():
        selfs, incl = per_thread[thread]
        lines.append(f"thread {thread}: {samples} samples ({100 * samples / grand:.0f}% of all)")
        lines.append("  self%  total%  function")
        for func, count in selfs.most_common(top):
            self_pct, total_pct = 100 * count / samples, 100 * incl[func] / samples
            lines.append(f"  {self_pct:5.1f}  {total_pct:6.1f}  {func}")
        lines.append("  -- by total (on the stack) --")
        for func, count in incl.most_common(top):
            self_pct, total_pct = 100 * selfs[func] / samples, 100 * count / samples
            lines.append(f"  {self_pct:5.1f}  {total_pct:6.1f}  {func}")
    return "\n".join(lines)


def _thread_name(frame: str) -> str:
    # py-spy --threads: 'thread (12345): MainThread' (or without the name)
    text = frame.strip()
    match = re.fullmatch(r"thread \((\w+)\)(?::\s*(.*))?", text)
    if not match:
        return text
    return match.group(2) or match.group(1)


if __name__ == "__main__":
    print(summarise(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 15))
