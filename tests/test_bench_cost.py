"""The pure parts of the benchmarks' cost and long-run figures (bench/common.py, bench/long.py).

No speed is asserted: these check the arithmetic and the /proc parsing the figures rest on.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.common import CpuCost, CpuMeter, cpu_s, lowest_cost, parse_stat_cpu_ticks
from bench.long import Sample, crossing, first_and_last, rows, window
from bench.run import _row_dict, cost_cell
from bench.suite import Row

# proc(5): pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
#          utime stime cutime cstime ...
STAT = "4242 (tc (bridge) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 150 25 7 3 20 0 3 0"


def test_stat_fields_14_to_17_are_summed_after_the_last_parenthesis() -> None:
    assert parse_stat_cpu_ticks(STAT) == 150 + 25 + 7 + 3


def test_cpu_of_a_busy_child_is_counted_and_a_gone_process_is_none() -> None:
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nend = time.process_time() + 0.3\n"
                              "while time.process_time() < end: pass\n"
                              "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        meter = CpuMeter(os.getpid())  # this process and its live descendants
        used = 0.0
        while used < 0.25 and child.poll() is None:
            used = cpu_s(child.pid) or 0.0
        assert used >= 0.25
        assert meter.used_s() >= 0.2  # the child's CPU is part of its parent's tree
        assert (cpu_s(child.pid, tree=False) or 0.0) >= 0.25
    finally:
        child.communicate(b"")
    assert cpu_s(child.pid) is None


def test_cost_per_1000_events_and_without_events() -> None:
    cost = CpuCost(2.5, 5000)
    assert cost.per_1000_s == pytest.approx(0.5)
    assert cost.text() == "0.500"
    assert cost.as_dict() == {"cpu_s": 2.5, "events": 5000, "cpu_s_per_1000": 0.5}
    empty = CpuCost(1.0, 0)
    assert empty.per_1000_s is None and empty.text() == "-"


def test_lowest_cost_skips_unknown_rounds() -> None:
    assert lowest_cost([None, CpuCost(1, 0), CpuCost(3, 1000), CpuCost(2, 1000)]) == \
        CpuCost(2, 1000)
    assert lowest_cost([None, CpuCost(1, 0)]) is None


def test_cost_column_and_results_json() -> None:
    row = Row("1 ingest", "m", "b", 0.5, "t", False, cost=CpuCost(4, 10_000),
              baseline_cost=CpuCost(1, 10_000))
    assert cost_cell(row) == "0.400 (bare 0.100)"
    assert _row_dict(row)["cpu_s_per_1000"] == 0.4
    assert _row_dict(row)["baseline_cpu_s_per_1000"] == 0.1
    assert cost_cell(Row("x", "m", "b", None, "t", None, cost=CpuCost(1, 2000))) == "0.500"
    plain = Row("x", "m", "b", None, "t", None)
    assert cost_cell(plain) == "-" and _row_dict(plain)["cpu_s_per_1000"] is None


# -- the long run: windows between event counts ----------------------------------------------

# 1,000 events/s for 8 s, then 500/s for 4 s; RSS grows in the last seconds; CPU 0.5 s/s.
SAMPLES = [Sample(float(t), 1000 * t, 100_000, 0.5 * t) for t in range(9)] + [
    Sample(8.0 + t, 8000 + 500 * t, 100_000 + 10_000 * t, 4.0 + 0.5 * t) for t in range(1, 5)]


def test_crossing_interpolates_between_samples_and_clamps() -> None:
    assert crossing(SAMPLES, 1500) == pytest.approx((1.5, 0.75))
    assert crossing(SAMPLES, 8250) == pytest.approx((8.5, 4.25))
    assert crossing(SAMPLES, 0) == (0.0, 0.0)
    assert crossing(SAMPLES, 99_999) == (12.0, 6.0)
    with pytest.raises(ValueError):
        crossing([], 1)


def test_first_and_last_tenth_rate_rss_and_cpu() -> None:
    first, last = first_and_last(SAMPLES, 10_000)
    assert (first.first, first.last, last.first, last.last) == (0, 1000, 9000, 10_000)
    assert first.rate_per_s == pytest.approx(1000)
    assert last.rate_per_s == pytest.approx(500)
    assert first.rss_median_kb == 100_000
    assert last.rss_median_kb == 130_000  # samples at 10, 11, 12 s
    assert first.cost.per_1000_s == pytest.approx(0.5)
    assert last.cost.per_1000_s == pytest.approx(1.0)


def test_a_window_shorter_than_the_interval_takes_the_nearest_rss() -> None:
    short = window(SAMPLES, 8100, 8200)  # between the samples at 8 s and 9 s
    assert short.rss_median_kb == 100_000
    assert short.rate_per_s == pytest.approx(500)


def test_rows_report_the_ratios_and_flag_a_slow_end() -> None:
    first, last = first_and_last(SAMPLES, 10_000)
    table = rows(first, last, window(SAMPLES, 0, 10_000), 5000.0, 2500.0)

    def named(start: str) -> Row:
        return next(r for r in table if r.name.startswith(start))

    rate = named("long: ingest rate, last 10 %")
    assert rate.ratio == pytest.approx(0.5) and rate.met is False
    rss = named("long: RSS median, last 10 %")
    assert rss.ratio == pytest.approx(1.3) and rss.met is False
    assert named("cost: store bytes per event").ratio == pytest.approx(2.0)
    assert named("long: whole run").cost == CpuCost(pytest.approx(6.0), 10_000)
