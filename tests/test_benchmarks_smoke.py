"""The benchmarks run end to end at a small size and write every figure (no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.__main__ import BENCHMARKS

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
