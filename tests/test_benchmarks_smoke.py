"""The benchmarks run end to end at a small size and write every figure (no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.__main__ import BENCHMARKS
from benchmarks.report import median_interval

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_every_benchmark(tmp_path: Path) -> None:
    # Given: a clean output path
    out = tmp_path / "results.json"

    # When: the one documented command runs at its smallest size
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    for name in ("TRACKER_REDIS_URL", "TRACKER_KEY_PREFIX"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    # Then: it succeeded, printed the table and wrote every benchmark with numbers in it
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio" in done.stdout
    data = json.loads(out.read_text())
    assert data["quick"] is True
    assert data["machine"]["cores"] >= 1
    assert set(data["benchmarks"]) == set(BENCHMARKS)
    for name, bench in data["benchmarks"].items():
        rows = bench["rows"]
        assert rows, name
        measured = [row for row in rows if row["ours"] is not None]
        assert measured, name
        for row in measured:
            for field in ("ours", "baseline", "ratio"):
                value = row[field]
                assert value is None or (isinstance(value, int | float) and math.isfinite(value)), (name, row)
            assert row["passed"] in (True, False, None)
    _check_durability_rows(data["benchmarks"]["durable"])


#: Item 8's rows, by the start of their names: which of (ours, baseline, ratio) each must have.
DURABLE_ROWS = {
    "D: tracked, durable": ("ours", "baseline", "ratio"),
    "time added per task over U": ("ours", "baseline", "ratio"),
    "D vs C, per round": ("ours", "baseline", "ratio"),
    "C: untracked, Celery's Redis result backend": ("ours", "baseline", "ratio"),
    "W: tracked, write-behind": ("ours", "baseline", "ratio"),
    "D vs W": ("ours", "baseline", "ratio"),
    "CPU per task": ("ours", "baseline", "ratio"),
    "store script calls per task": ("ours", "baseline", "ratio"),
    "batches whose session had ended": ("ours", "baseline"),
}


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _check_durability_rows(bench: dict[str, Any]) -> None:
    """Item 8 (the cost of durability) has every row, each figure present and finite, its targets judged."""
    rows = bench["rows"]
    for start, fields in DURABLE_ROWS.items():
        matching = [row for row in rows if row["name"].startswith(start)]
        assert len(matching) == 1, (start, [row["name"] for row in rows])
        for field in fields:
            assert _finite(matching[0][field]), (start, field, matching[0])
    judged = {row["target"]: row["passed"] for row in rows if row["target"]}
    assert set(judged) == {"ratio <= 1.02", "ratio < 1"}
    assert all(passed in (True, False) for passed in judged.values())
    intervals = [row for row in rows if row["name"].startswith("its median's")]
    assert len(intervals) == 2 and all(_finite(row["ours"]) and _finite(row["baseline"]) for row in intervals)
    details = bench["details"]
    for name in ("D/U", "C/U", "W/U", "D/W", "D/C", "(D-U)/(C-U)", "cpu D/U"):
        summary = details["ratios"][name]
        assert all(_finite(summary[key]) for key in ("median", "low", "high")), (name, summary)
        assert len(summary["values"]) == details["rounds"]
    # Not a timing: D writes every outcome before its ack, so each session had ended at its last
    # ack; W (outcomes after the ack, within flush_interval_s) made fewer store calls than tasks.
    assert details["session_ended_at_last_ack_pct"]["D"] == 100
    assert details["store_script_calls_per_task"]["W"] < details["store_script_calls_per_task"]["D"]


def test_the_median_interval_covers_the_median_as_often_as_it_says() -> None:
    # Given: 4000 samples of 10 values from a skewed distribution whose median is known
    rng = random.Random(7)
    true_median = math.log(2)  # of an exponential distribution with rate 1
    samples = [[rng.expovariate(1.0) for _ in range(10)] for _ in range(4000)]

    # When: each sample gives its interval
    intervals = [median_interval(sample) for sample in samples]

    # Then: for 10 values it is the 2nd smallest to the 2nd largest, which holds the median
    # 1 - 2 * 11/1024 of the time, and it does, within the sampling error of 4000 tries
    coverage = intervals[0][2]
    assert coverage == 1 - 2 * 11 / 1024
    assert all(
        (low, high) == (sorted(s)[1], sorted(s)[8]) for s, (low, high, _) in zip(samples, intervals, strict=True)
    )
    hits = sum(low <= true_median <= high for low, high, _ in intervals) / len(intervals)
    assert abs(hits - coverage) < 0.01


def test_the_median_interval_at_other_sizes() -> None:
    # 100 values: the 40th to the 61st, the textbook 95 % interval; too few values: all of them
    assert median_interval([float(v) for v in range(100)])[:2] == (39.0, 60.0)
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0, 0.75)
    assert median_interval([2.0]) == (2.0, 2.0, 0.0)
