"""Run the benchmark suite and print the table (``python -m bench --help``).

    python -m bench                  # the full suite, about 10 minutes
    python -m bench --smoke          # every benchmark for a second or two, tiny sizes
    python -m bench --only ingest,latency
    python -m bench --write-readme   # also put the figures into bench/README.md

No speed is ever asserted: the exit code is 0 unless a benchmark could not run (a process
died, a request failed, a body turned out not to be unique, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.bodies import make_templates, write_templates
from bench.common import BENCH, ROOT, CpuCost
from bench.load import tool_name
from bench.suite import (
    BENCHMARKS,
    FULL,
    PROFILES,
    SMOKE,
    Context,
    Row,
)

README = BENCH / "README.md"
START, END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = list(BENCHMARKS) if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = (args.workdir or ROOT / "var" / "bench" / stamp).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(workdir, write_templates(workdir / "templates.txt", make_templates()),
                  SMOKE if args.smoke else FULL, force_python=args.python_load,
                  profile=args.profile)
    tool = tool_name(args.python_load)
    print(f"tcbridge benchmarks ({'smoke' if args.smoke else 'full'}) in {workdir}")
    print(f"load generator: {_tool_text(tool, args.python_load)}")
    machine = describe_machine(workdir)
    print("machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()), flush=True)
    rows, failures, started = _run_all(ctx, names)
    elapsed = time.monotonic() - started
    table = format_table(rows)
    print("\n" + table)
    print(f"\n{len(rows)} rows in {elapsed:.0f} s; {len(failures)} benchmark(s) failed")
    for title, text in ctx.profiles.items():
        print(f"\nprofile of the daemon {title} (py-spy):\n{text}")
    results = {"when": stamp, "smoke": args.smoke, "load_tool": tool, "machine": machine,
               "elapsed_s": round(elapsed), "failures": failures,
               "rows": [_row_dict(r) for r in rows]}
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if args.write_readme and not args.smoke and not failures and not args.only:
        write_readme(table, machine, tool, stamp, elapsed, ctx.profiles)
        print(f"figures written to {README.relative_to(ROOT)}")
    if not args.keep:
        _clean(workdir)
    return 1 if failures else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, about a second per benchmark (what CI runs)")
    parser.add_argument("--only", help="comma-separated: " + ",".join(BENCHMARKS))
    parser.add_argument("--profile", action="store_true",
                        help="also profile the daemon with py-spy under the ingest load"
                             " (and under rows 3 and 4c's loads, when e2e or backfill runs)")
    parser.add_argument("--python-load", action="store_true",
                        help="use the aiohttp load client even if wrk is installed")
    parser.add_argument("--write-readme", action="store_true",
                        help="put the table into bench/README.md (full runs only)")
    parser.add_argument("--workdir", type=Path, help="default: var/bench/<time>")
    parser.add_argument("--keep", action="store_true",
                        help="keep the databases and drop folders (logs are always kept)")
    return parser


def _tool_text(tool: str, forced: bool) -> str:
    if tool == "wrk":
        wrk = shutil.which("wrk") or "wrk"
        version = subprocess.run([wrk, "--version"], capture_output=True, text=True,
                                 check=False).stdout.splitlines()
        return f"wrk ({version[0].split('[')[0].strip() if version else 'wrk'}) + bench/post.lua"
    why = "--python-load" if forced else "wrk is not installed"
    return f"aiohttp client (bench/load.py): {why}"


def _run_all(ctx: Context, names: list[str]) -> tuple[list[Row], list[str], float]:
    rows: list[Row] = []
    failures: list[str] = []
    started = time.monotonic()
    for name in names:
        t0 = time.monotonic()
        print(f"-- {name} ...", flush=True)
        try:
            result = BENCHMARKS[name](ctx)
        except Exception as e:  # report and go on: one broken benchmark must not hide the rest
            traceback.print_exc()
            failures.append(f"{name}: {type(e).__name__}: {e}"[:2000])
            continue
        for row in result if isinstance(result, list) else [result]:
            rows.append(row)
            print(f"   {row.name}: {row.measured} | {row.baseline}", flush=True)
        print(f"   ({time.monotonic() - t0:.0f} s)", flush=True)
    if ctx.profile:
        print("-- profile ...", flush=True)
        for name, (title, take) in PROFILES.items():
            if name != "ingest" and name not in names:
                continue
            try:
                ctx.profiles[title] = take(ctx)
            except Exception as e:
                traceback.print_exc()
                failures.append(f"profile {name}: {type(e).__name__}: {e}")
    return rows, failures, started


def _row_dict(row: Row) -> dict[str, Any]:
    return {"name": row.name, "measured": row.measured, "baseline": row.baseline,
            "ratio": row.ratio, "target": row.target, "met": row.met,
            "cpu_s_per_1000": _per_1000(row.cost),
            "baseline_cpu_s_per_1000": _per_1000(row.baseline_cost),
            "cpu": None if row.cost is None else row.cost.as_dict(),
            "baseline_cpu": None if row.baseline_cost is None else row.baseline_cost.as_dict(),
            "data": row.data}


def _per_1000(cost: CpuCost | None) -> float | None:
    value = None if cost is None else cost.per_1000_s
    return None if value is None else round(value, 4)


def cost_cell(row: Row) -> str:
    """The CPU column: tcbridge's CPU s per 1,000 events, the baseline's in brackets."""
    if row.cost is None and row.baseline_cost is None:
        return "-"
    mine = "-" if row.cost is None else row.cost.text()
    if row.baseline_cost is None:
        return mine
    return f"{mine} (bare {row.baseline_cost.text()})"


def format_table(rows: list[Row], markdown: bool = False) -> str:
    """name, measured, baseline, ratio, target, met?, CPU as aligned text or Markdown."""
    head = ["benchmark", "measured", "baseline (same run)", "ratio", "target", "met?",
            "CPU s / 1k events"]
    body = [[r.name, r.measured, r.baseline, "-" if r.ratio is None else f"{r.ratio:.2f}",
             r.target, {True: "yes", False: "NO", None: "-"}[r.met], cost_cell(r)]
            for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |"
                  for line in body]
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
           for line in [head, ["-" * w for w in widths], *body]]
    return "\n".join(out)


def describe_machine(workdir: Path) -> dict[str, str]:
    """nproc, CPU model, memory, the disk under the store, kernel and versions."""
    cpu = "unknown"
    with _suppress():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with _suppress():
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": str(os.cpu_count()), "cpu": cpu, "memory": f"{mem_kb / 1024 / 1024:.0f} GiB",
        "disk": _disk(workdir), "fsync": _fsync_ms(workdir),
        "kernel": platform.release(), "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version, "aiohttp": aiohttp.__version__,
        "load": Path("/proc/loadavg").read_text().split()[0] + " (1-min load at start)",
    }


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _disk(path: Path) -> str:
    """Device, filesystem and whether it is rotational, of the file system holding ``path``."""
    best = ("?", "?", "?")
    with _suppress():
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            if str(path).startswith(mount.rstrip("/") + "/") and len(mount) >= len(best[1]):
                best = (device, mount, fstype)
    device, _, fstype = best
    kind = ""
    with _suppress():
        name = re.sub(r"\d+$", "", Path(device).name)
        rotational = (Path("/sys/block") / name / "queue" / "rotational").read_text().strip()
        kind = ", SSD/virtual" if rotational == "0" else ", rotational"
    if kind == "" and device.startswith("/dev/"):
        kind = ", rotational flag unknown"
    return f"{device} {fstype}{kind}"


def _fsync_ms(directory: Path) -> str:
    """Median time of write(4 KiB) + fsync, 100 times, in the store's directory."""
    path = directory / "fsync.probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(100):
            os.write(fd, b"\0" * 4096)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    times.sort()
    return f"{times[50] * 1e3:.2f} ms median (4 KiB write + fsync)"


def write_readme(table: str, machine: dict[str, str], tool: str, stamp: str, elapsed: float,
                 profiles: dict[str, str]) -> None:
    """Replace the figures section of bench/README.md."""
    rows_md = table_to_markdown(table)
    lines = [START, "", f"Measured {stamp} by `make bench` ({elapsed / 60:.1f} min), "
             f"load from **{'wrk' if tool == 'wrk' else 'the aiohttp client (no wrk)'}**.", "",
             "Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()) + ".", "",
             rows_md, ""]
    for title, text in profiles.items():
        lines += [f"Top of the py-spy profile of the daemon {title}:", "", "```",
                  *text.splitlines()[:40], "```", ""]
    lines.append(END)
    text = README.read_text(encoding="utf-8")
    if START in text and END in text:
        text = text.split(START)[0] + "\n".join(lines) + text.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    README.write_text(text, encoding="utf-8")


def table_to_markdown(table: str) -> str:
    """The aligned text table as Markdown (columns are split on two or more spaces)."""
    lines = [ln for ln in table.splitlines() if ln.strip() and not set(ln) <= {"-", " "}]
    cells = [re.split(r"\s{2,}", ln.strip()) for ln in lines]
    out = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    out += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return "\n".join(out)


def _clean(workdir: Path) -> None:
    """Remove the big files (stores, drop folder, daemon logs over 10 MB: one line per
    request); keep the rest of the logs, the configs, the profile and results.json."""
    for pattern in ("*.db", "*.db-wal", "*.db-shm"):
        for path in workdir.glob(pattern):
            path.unlink(missing_ok=True)
    for path in workdir.glob("*.log"):
        if path.stat().st_size > 10_000_000:
            path.unlink()
    shutil.rmtree(workdir / "drop", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
