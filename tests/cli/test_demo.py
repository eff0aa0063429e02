"""``tracker demo``: in-process (each store) and exactly as the README runs it (a subprocess, clean env)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.cli.conftest import Cli
from tracker import SessionManager
from tracker.canvas import load_canvas
from tracker.cli import ExitCode
from tracker.demo import sample_canvas


def test_the_sample_canvas_is_tens_of_nodes_some_failing_on_purpose() -> None:
    with sample_canvas() as path:
        canvas = load_canvas(path)
    texts = [n.text or "" for n in canvas.work_nodes]
    assert 30 <= len(texts) <= 60
    assert all("#sleep=" in t for t in texts)
    assert 3 <= sum("#fail=" in t for t in texts) <= 4
    assert canvas.edges


def test_demo_in_memory(cli: Cli, canvas_file: Callable[..., Path]) -> None:
    path = canvas_file("quick #sleep=0.1", "quick too #sleep=0.2", "broken #fail=on-purpose", "plain")
    result = cli("demo", "--canvas", str(path), "--concurrency", "2", env={"TRACKER_REDIS_URL": None})
    assert result.exit_code == ExitCode.OK, result.stdout + result.stderr
    assert "in-memory broker and store" in result.stdout
    assert "ended partial_failure: 3 completed, 1 failed of 4" in result.stdout
    assert "Slowest nodes (top" in result.stdout
    assert "NodeContentError: node n3: on-purpose" in result.stdout


def test_demo_on_redis_leaves_its_session_for_list(
    cli: Cli, canvas_file: Callable[..., Path], redis_url: str, store_manager: SessionManager
) -> None:
    # Its 4 steps are 0.5 s apart, so the writer thread writes its start and reports in between
    # (reports still waiting when the result is written are left out: the result supersedes them).
    path = canvas_file("one #sleep=2", "two")
    result = cli("demo", "--canvas", str(path))
    assert result.exit_code == ExitCode.OK, result.stdout + result.stderr
    assert f"Redis at {redis_url}" in result.stdout
    assert "ended completed: 2 completed, 0 failed of 2" in result.stdout
    listed = cli.json("list", "--json")
    assert [(s["status"], s["node_count"]) for s in listed] == [("completed", 2)]
    # and its sleeping node reported its progress as it ran (its steps, written behind)
    reports = [e for e in store_manager.sync.read_events(listed[0]["session_id"], limit=1000) if e.type == "progress"]
    assert reports and {e.node_id for e in reports} == {"n1"}


def test_demo_with_a_bad_canvas_exits_2(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.canvas"
    bad.write_text('{"nodes": [{"id": "x"}]}', encoding="utf-8")
    result = cli("demo", "--canvas", str(bad), env={"TRACKER_REDIS_URL": None})
    assert result.exit_code == ExitCode.USAGE
    assert "not JSON Canvas 1.0" in result.stderr


def test_the_readme_demo_command_on_a_clean_environment(tmp_path: Path) -> None:
    # Exactly what the README's quick start runs after installing: `tracker demo`, from anywhere,
    # with no TRACKER_* or CELERY_* settings (in-memory broker and store).
    executable = shutil.which("tracker", path=str(Path(sys.executable).parent))
    command = [executable, "demo"] if executable else [sys.executable, "-m", "tracker.cli", "demo"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACKER_", "CELERY_"))}
    started = time.monotonic()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    elapsed_s = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ended partial_failure: 38 completed, 4 failed of 42" in " ".join(done.stdout.split())
    assert "Failures (4)" in done.stdout
    assert "Failures by cause (4 node(s))" in done.stdout
    # fetch-02's work went on in a child session of 3 parts, which it waited for
    assert "Child sessions (1)" in done.stdout
    assert re.search(r"fetch-02 +│ completed +│ +3/3 +│", done.stdout), done.stdout
    assert "Traceback" not in done.stderr
    assert elapsed_s < 30
