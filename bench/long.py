"""``make bench-long``: a million webhooks through the real daemon; do rate and RSS stay flat?

    python -m bench.long                  # 1,000,000 events, 6-18 minutes here
    python -m bench.long --events 100000  # the same, smaller
    python -m bench.long --smoke          # a few seconds (make bench-smoke runs it)

The daemon runs as in the suite's row 1 (bearer auth, ``synchronous=FULL``, JSON logs at
info, the parked handler so every event writes its outbox row), and wrk (or the aiohttp
client) keeps 64 connections of the suite's bodies busy until the store holds N new events.
Every second the run samples the events stored (``max(seq)`` of the events table, read from
outside: O(1), unlike ``/metrics``, whose backlog gauge counts every pending delivery on the
daemon's writer thread), the daemon's VmRSS and its CPU seconds. It then compares the first
10 % of the events with the last 10 %: ingest rate (events / the time they took), RSS
median, CPU per 1,000 events. Nothing asserts a speed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.bodies import ID_SCHEMES, IdScheme, make_templates, sizes, write_templates
from bench.common import ROOT, CpuCost, CpuMeter, Daemon, db_query, file_size, rss_kb
from bench.load import LoadResult, closed_until, tool_name
from bench.run import _clean, _row_dict, describe_machine, format_table
from bench.suite import PARKED, Row

FULL_EVENTS = 1_000_000
SMOKE_EVENTS = 1_000
SHARE = 0.10  # the first and the last 10 % of the events are compared
FLAT_RATE = 0.90  # last / first rate at least this
FLAT_RSS = 1.10  # last / first RSS median at most this


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the daemon, ``at_s`` seconds after the load started."""

    at_s: float
    events: int  # stored since the load started
    rss_kb: int
    cpu_s: float  # the daemon's CPU seconds since the load started


@dataclass(frozen=True, slots=True)
class Window:
    """The stretch of the run in which the store went from ``first`` to ``last`` events."""

    first: int
    last: int
    start_s: float
    end_s: float
    cpu_s: float
    rss_median_kb: int

    @property
    def rate_per_s(self) -> float:
        span_s = self.end_s - self.start_s
        return (self.last - self.first) / span_s if span_s > 0 else 0.0

    @property
    def cost(self) -> CpuCost:
        return CpuCost(self.cpu_s, self.last - self.first)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"rate_per_s": round(self.rate_per_s, 1),
                               "cpu": self.cost.as_dict()}


def crossing(samples: list[Sample], events: float) -> tuple[float, float]:
    """(seconds, CPU seconds) when the count reached ``events``: linear between the two
    samples around it; the first or last sample outside the sampled range."""
    if not samples:
        raise ValueError("no samples")
    if events <= samples[0].events:
        return samples[0].at_s, samples[0].cpu_s
    for before, after in itertools.pairwise(samples):
        if before.events < events <= after.events:
            share = (events - before.events) / (after.events - before.events)
            return (before.at_s + share * (after.at_s - before.at_s),
                    before.cpu_s + share * (after.cpu_s - before.cpu_s))
    return samples[-1].at_s, samples[-1].cpu_s


def window(samples: list[Sample], first: int, last: int) -> Window:
    """The window between two event counts; RSS is the median of the samples taken in it
    (or the one nearest to its middle when it is shorter than the sampling interval)."""
    start_s, start_cpu = crossing(samples, first)
    end_s, end_cpu = crossing(samples, last)
    inside = [s.rss_kb for s in samples if start_s <= s.at_s <= end_s]
    if not inside:
        middle = (start_s + end_s) / 2
        inside = [min(samples, key=lambda s: abs(s.at_s - middle)).rss_kb]
    return Window(first, last, start_s, end_s, end_cpu - start_cpu,
                  int(statistics.median(inside)))


def first_and_last(samples: list[Sample], total: int,
                   share: float = SHARE) -> tuple[Window, Window]:
    """The first and the last ``share`` of ``total`` events."""
    size = max(1, round(total * share))
    return window(samples, 0, size), window(samples, total - size, total)


def rows(first: Window, last: Window, whole: Window, per_event: float,
         mean_body: float) -> list[Row]:
    """The table: rate, RSS and CPU at the start and at the end of the run."""
    rate_ratio = last.rate_per_s / first.rate_per_s if first.rate_per_s else None
    rss_ratio = last.rss_median_kb / first.rss_median_kb if first.rss_median_kb else None
    span = f"10 % ({first.last - first.first:,} events)"
    return [
        Row(f"long: ingest rate, first {span}", f"{first.rate_per_s:,.0f} events/s", "-",
            None, "report", None, first.as_dict(), cost=first.cost),
        Row(f"long: ingest rate, last {span}", f"{last.rate_per_s:,.0f} events/s",
            f"{first.rate_per_s:,.0f} events/s first", rate_ratio, f">= {FLAT_RATE:.2f} x",
            rate_ratio is not None and rate_ratio >= FLAT_RATE, last.as_dict(), cost=last.cost),
        Row("long: RSS median, first 10 %", f"{first.rss_median_kb / 1024:.0f} MB", "-",
            None, "report", None, {}),
        Row("long: RSS median, last 10 %", f"{last.rss_median_kb / 1024:.0f} MB",
            f"{first.rss_median_kb / 1024:.0f} MB first", rss_ratio, f"<= {FLAT_RSS:.2f} x",
            rss_ratio is not None and rss_ratio <= FLAT_RSS, {}),
        Row(f"long: whole run, {whole.last:,} events",
            f"{whole.rate_per_s:,.0f} events/s in {whole.end_s - whole.start_s:,.0f} s", "-",
            None, "report", None, whole.as_dict(), cost=whole.cost),
        Row("cost: store bytes per event (long)", f"{per_event:,.0f} B",
            f"{mean_body:,.0f} B mean body", per_event / mean_body, "report", None, {}),
    ]


# -- the run -------------------------------------------------------------------------------


def _stored(daemon: Daemon) -> int:
    """Events in the store: the newest seq (the events table's integer primary key)."""
    value = db_query(daemon.db_path, "SELECT max(seq) FROM events")[0][0]
    return int(value or 0)


def _sample_until(daemon: Daemon, target: int, interval_s: float, load: threading.Thread,
                  stop: threading.Event) -> tuple[list[Sample], int]:
    """Sample every ``interval_s`` until ``target`` new events are stored (then set ``stop``)
    or the load ends by itself. Returns the samples taken under load and the final count
    (a little over ``target``: the requests in flight when the load stopped)."""
    base = _stored(daemon)
    meter = CpuMeter(daemon.pid)
    started = time.monotonic()
    samples = [Sample(0.0, 0, rss_kb(daemon.pid) or 0, 0.0)]
    next_at = started
    while load.is_alive() and not stop.is_set():
        next_at += interval_s
        time.sleep(max(0.0, next_at - time.monotonic()))
        daemon.check_alive()
        events = _stored(daemon) - base
        samples.append(Sample(time.monotonic() - started, events, rss_kb(daemon.pid) or 0,
                              meter.used_s()))
        if events >= target:
            stop.set()
        if len(samples) % max(1, round(30 / interval_s)) == 0:
            print(f"   {samples[-1].at_s:5.0f} s  {events:>9,} events  "
                  f"{samples[-1].rss_kb / 1024:.0f} MB", flush=True)
    load.join()
    return samples, _stored(daemon) - base


def run_long(workdir: Path, events: int, *, connections: int, interval_s: float,
             max_s: float, force_python: bool,
             ids: IdScheme = "sequential") -> tuple[list[Row], dict[str, Any]]:
    """Push ``events`` webhooks through a fresh daemon and compare its start and end."""
    templates_path = write_templates(workdir / "templates.txt", make_templates())
    daemon = Daemon(workdir, "long", {"handlers": [PARKED]})
    stop = threading.Event()
    outcome: dict[str, LoadResult | BaseException] = {}

    def load() -> None:
        try:
            outcome["load"] = closed_until(
                daemon.url + "/webhook/order", templates_path, "10ad0001",
                connections=connections, stop=stop, max_s=max_s, force_python=force_python,
                ids=ids)
        except BaseException as e:  # reported by the main thread
            outcome["load"] = e

    with daemon.start_and_wait():
        thread = threading.Thread(target=load, name="long-load")
        thread.start()
        try:
            samples, stored = _sample_until(daemon, events, interval_s, thread, stop)
        finally:
            stop.set()
            thread.join()
        result = outcome["load"]
        if isinstance(result, BaseException):
            raise RuntimeError(f"the load failed: {result}") from result
        duplicates = db_query(daemon.db_path, "SELECT count(*) FROM sightings")[0][0]
        store_bytes = file_size(daemon.db_path)
    if result.errors or duplicates:
        raise RuntimeError(f"{result.errors} failed requests, {duplicates} duplicates")
    # Compare the windows up to the target: after it the load is being stopped.
    total = min(events, samples[-1].events)
    if total < events:
        print(f"   only {total:,} of {events:,} events in {max_s:.0f} s (--max-s)")
    first, last = first_and_last(samples, total)
    whole = window(samples, 0, total)
    _, mean_body, _ = sizes(templates_path.read_text(encoding="utf-8").splitlines())
    data = {"target_events": events, "events": total, "stored": stored,
            "load": result.as_dict(),
            "duplicates": duplicates, "db_bytes": store_bytes, "interval_s": interval_s,
            "samples": [asdict(s) for s in samples]}
    return rows(first, last, whole, store_bytes / max(stored, 1), mean_body), data


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    events = SMOKE_EVENTS if args.smoke and args.events is None else (args.events or FULL_EVENTS)
    interval_s = args.interval_s or (0.2 if events < 50_000 else 1.0)
    max_s = args.max_s or max(60.0, events / 100)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = (args.workdir or ROOT / "var" / "bench" / f"{stamp}-long").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tool = tool_name(args.python_load)
    print(f"tcbridge long run: {events:,} events, {args.connections} connections, {args.ids} "
          f"order ids, load from {tool}, sampled every {interval_s:g} s, in {workdir}",
          flush=True)
    machine = describe_machine(workdir)
    started = time.monotonic()
    table_rows, data = run_long(workdir, events, connections=args.connections,
                                interval_s=interval_s, max_s=max_s,
                                force_python=args.python_load, ids=args.ids)
    elapsed = time.monotonic() - started
    print("\n" + format_table(table_rows))
    print(f"\n{data['stored']:,} events stored in {elapsed:.0f} s (with start and checks)")
    results = {"when": stamp, "benchmark": "long", "smoke": args.smoke, "load_tool": tool,
               "ids": args.ids,
               "machine": machine, "elapsed_s": round(elapsed),
               "rows": [_row_dict(r) for r in table_rows], "data": data}
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if not args.keep:
        _clean(workdir)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.long", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, help=f"default {FULL_EVENTS:,} "
                        f"({SMOKE_EVENTS:,} with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, tiny size")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--interval-s", type=float,
                        help="sampling interval (default 1 s; 0.2 s under 50,000 events)")
    parser.add_argument("--max-s", type=float,
                        help="give up the load after this long (default events / 100 s)")
    parser.add_argument("--python-load", action="store_true",
                        help="use the aiohttp load client even if wrk is installed")
    parser.add_argument("--ids", choices=ID_SCHEMES, default="sequential",
                        help="order ids: counting up (the suite's) or random, as Tradecloud's"
                        " UUIDs (bench/README.md, round 8)")
    parser.add_argument("--workdir", type=Path, help="default: var/bench/<time>-long")
    parser.add_argument("--keep", action="store_true",
                        help="keep the store (about 5 GB for a million events)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
