"""bench/writer.py: the writer-alone diagnostic stores what it says and reports it rightly.

No speed is asserted: these check the ids it makes, that every event it feeds is stored in
a real file, and the arithmetic of its report.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from bench.bodies import BodyMaker, make_templates, order_id
from bench.writer import Tenth, candidates, io_bytes, main, measure, report


def test_ids_are_the_load_clients_ids() -> None:
    sequential = candidates(BodyMaker(make_templates(2), "writer00", 1), 2)
    assert [c.entity_id for c in sequential] == [
        order_id("writer00", 1, n, "sequential") for n in (1, 2)]
    scattered = candidates(BodyMaker(make_templates(2), "writer00", 1, "random"), 9)
    assert scattered[-1].entity_id == order_id("writer00", 1, 9, "random")


def test_candidates_are_distinct_new_changes() -> None:
    maker = BodyMaker(make_templates(4), "writer00", 1)
    candidates(maker, 99)
    made = candidates(maker, 8)
    assert len(made) == 8
    assert len({c.event_id for c in made}) == 8
    assert len({c.entity_id for c in made}) == 8
    assert made[0].entity_id.endswith("000000000100")


def test_io_bytes_count_a_write() -> None:
    before = io_bytes()
    with open("/dev/null", "wb", buffering=0) as sink:
        sink.write(b"x" * 10_000)
    after = io_bytes()
    assert after[0] - before[0] >= 10_000


async def test_every_event_fed_is_stored_with_its_outbox_row(tmp_path: Path) -> None:
    path = tmp_path / "writer.db"
    tenths = await measure(path, 300, "random")
    assert len(tenths) == 10
    assert all(t.wall_us > 0 and t.written_b > 0 for t in tenths)
    with sqlite3.connect(path) as conn:
        events = conn.execute("SELECT count(*), count(DISTINCT entity_id) FROM events").fetchone()
        outbox = conn.execute("SELECT count(*) FROM deliveries WHERE handler = 'parked'"
                              " AND status = 'pending'").fetchone()
    assert events == (300, 300)
    assert outbox == (300,)


def test_report_gives_each_tenth_and_last_against_first() -> None:
    text = report([Tenth(50, 100, 20_000, 5_000), Tenth(75, 125, 25_000, 9_000)])
    assert "| 1 | 50 | 100 | 20,000 | 5,000 |" in text
    assert "| 2 | 75 | 125 | 25,000 | 9,000 |" in text
    assert "rate 0.80, CPU per event 1.50, bytes written per event 1.25" in text


def test_main_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--events", "100", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "100 events, sequential order ids" in out
    assert len(re.findall(r"^\| \d+ \|", out, flags=re.MULTILINE)) == 10
    assert list(tmp_path.iterdir()) == []  # its scratch directory is gone


def test_report_of_tenths_without_cpu_ticks_gives_no_ratio() -> None:
    text = report([Tenth(0, 100, 20_000, 5_000), Tenth(0, 125, 25_000, 9_000)])
    assert "rate 0.80, CPU per event -, bytes written per event 1.25" in text
