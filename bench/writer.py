"""``python -m bench.writer``: the store's writer alone, in process, as the store grows.

    python -m bench.writer                    # 200,000 events, order ids as the suite's bodies
    python -m bench.writer --ids random       # order ids scattered, as Tradecloud's UUIDs
    python -m bench.writer --events 1000000   # as many as the long run

A diagnostic, not a target: it shows what one event costs the SQLite writer thread (its
group commit, ``synchronous=FULL``, WAL, one outbox row per event) as the file fills, with
no HTTP, no parse and no other thread competing. The suite's bodies are parsed in chunks
between the timed stretches; 64 tasks then feed the real ``Store`` with ``ingest``. Per
tenth of the events it prints the writer thread's CPU per event (``/proc/self/task``), the
wall time per event (the writer's throughput), and the bytes the process wrote and read per
event (``/proc/self/io`` ``wchar``, ``rchar``: WAL frames, checkpoints, pages read back
through the OS cache). The suite's order ids grow one by one (``bench/bodies.py``), so the
indexes keyed by the entity take them at their right edge; ``--ids random`` gives every
event a scattered order id, as a real installation's UUIDs are (bench/README.md, round 8).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.bodies import ID_SCHEMES, BodyMaker, IdScheme, make_templates
from bench.common import parse_stat_cpu_ticks
from tcbridge.config import StoreSettings
from tcbridge.envelope import Candidate, parse_order_webhook
from tcbridge.store.sqlite import Store
from tcbridge.webhook import decode_body

TENTHS = 10
CHUNK = 5_000  # events parsed at a time between timed stretches (a few MB of candidates)
FEEDERS = 64  # tasks awaiting ingest at once, as wrk's 64 connections


@dataclass(frozen=True, slots=True)
class Tenth:
    """What a tenth of the events cost: per event, in microseconds and bytes."""

    cpu_us: float
    wall_us: float
    written_b: float
    read_b: float


def candidates(maker: BodyMaker, count: int) -> list[Candidate]:
    """The next ``count`` bodies of the load clients' ``maker``, parsed: each a new change."""
    return [parse_order_webhook(decode_body(maker.next()[1])) for _ in range(count)]


def io_bytes() -> tuple[int, int]:
    """(wchar, rchar) of this process so far: every byte through write(2) and read(2)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["wchar"]), int(fields["rchar"])


def thread_cpu_s(native_id: int) -> float:
    """CPU seconds (user + sys) one thread of this process has used."""
    stat = Path(f"/proc/self/task/{native_id}/stat").read_text()
    return parse_stat_cpu_ticks(stat) / os.sysconf("SC_CLK_TCK")


def writer_thread() -> int:
    """The native id of the store's writer thread (named by ``Store.open``)."""
    for thread in threading.enumerate():
        if thread.name == "tcbridge-store" and thread.native_id is not None:
            return thread.native_id
    raise RuntimeError("no writer thread: is the store open?")


async def feed(store: Store, batch: Sequence[Candidate]) -> None:
    """Ingest ``batch`` with FEEDERS tasks at once; every event must be new."""
    pending: Iterator[Candidate] = iter(batch)

    async def one_feeder() -> None:
        for candidate in pending:
            result = await store.ingest(candidate)
            if result.status != "stored":
                raise RuntimeError(f"event not stored: {result}")

    async with asyncio.TaskGroup() as group:
        for _ in range(FEEDERS):
            group.create_task(one_feeder())


def _parked(_envelope: Mapping[str, Any]) -> Sequence[str]:
    return ("parked",)  # one outbox row per event, as the long run's parked handler


async def measure(path: Path, events: int, ids: IdScheme) -> list[Tenth]:
    """Store ``events`` new events (rounded down to tenths) in a new file at ``path``; the
    cost of each tenth."""
    maker = BodyMaker(make_templates(), "writer00", 1, ids)
    tenth = max(1, events // TENTHS)
    out: list[Tenth] = []
    async with Store(path, StoreSettings(path=path), route=_parked) as store:
        writer = writer_thread()
        for first in range(0, tenth * TENTHS, tenth):
            cpu = wall = written = read = 0.0
            for start in range(first, first + tenth, CHUNK):
                batch = candidates(maker, min(CHUNK, first + tenth - start))
                cpu0, wall0, (w0, r0) = thread_cpu_s(writer), time.perf_counter(), io_bytes()
                await feed(store, batch)
                w1, r1 = io_bytes()
                cpu += thread_cpu_s(writer) - cpu0
                wall += time.perf_counter() - wall0
                written, read = written + w1 - w0, read + r1 - r0
            out.append(Tenth(cpu * 1e6 / tenth, wall * 1e6 / tenth, written / tenth,
                             read / tenth))
    return out


def report(tenths: Sequence[Tenth]) -> str:
    """A table of the tenths, and the last against the first."""
    lines = ["| tenth | writer CPU us / event | wall us / event | written B / event"
             " | read B / event |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {t.cpu_us:.0f} | {t.wall_us:.0f} | {t.written_b:,.0f} | {t.read_b:,.0f} |"
              for n, t in enumerate(tenths, 1)]
    first, last = tenths[0], tenths[-1]
    lines.append(f"\nlast tenth / first: rate {_ratio(first.wall_us, last.wall_us)}, CPU per "
                 f"event {_ratio(last.cpu_us, first.cpu_us)}, bytes written per event "
                 f"{_ratio(last.written_b, first.written_b)}")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"  # a tenth too short for the clock has 0 CPU


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.writer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--ids", choices=ID_SCHEMES, default="sequential",
                        help="order ids counting up (the suite's) or random (Tradecloud's)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the store file goes (a temporary directory by default)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        print(f"writer alone: {args.events:,} events, {args.ids} order ids, in {scratch}",
              flush=True)
        tenths = asyncio.run(measure(Path(scratch) / "writer.db", args.events, args.ids))
    print(report(tenths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

