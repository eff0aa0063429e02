"""run, watch, cancel and resume against batches running in a real Celery worker (threads pool, Redis)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.cli.conftest import TEST_APP, Cli, wait_for
from tracker import SessionManager
from tracker.cli import ExitCode


@pytest.fixture
def worker_cli(cli_env: dict[str, str | None], tracked: SessionManager, thread_worker: None) -> Cli:
    """``tracker --app <test app>`` sharing the process-wide manager the worker records into."""
    return Cli(cli_env, fresh=False)


def test_run_then_watch_follows_the_worker_to_completed(worker_cli: Cli, canvas_file: Callable[..., Path]) -> None:
    # Given a canvas of 8 nodes that take 0.3 s each
    path = canvas_file(*[f"Node {i} says hello #sleep=0.3" for i in range(8)])
    # When it is run (without waiting) and then watched
    sent = worker_cli("--app", TEST_APP, "run", str(path))
    assert sent.exit_code == ExitCode.OK, sent.stderr
    sid = sent.stdout.strip()
    assert "Follow it with: tracker watch" in sent.stderr
    watched = worker_cli("watch", sid)
    # Then watch ends when the session ends, with exit 0 and the summary
    assert watched.exit_code == ExitCode.OK, watched.stderr
    assert f"Session {sid} ended completed: 8 completed, 0 failed of 8" in watched.stdout
    assert "Slowest nodes (top 5)" in watched.stdout


def test_watch_starts_while_the_batch_runs(
    worker_cli: Cli, tracked: SessionManager, canvas_file: Callable[..., Path]
) -> None:
    path = canvas_file(*[f"slow node {i} #sleep=0.4" for i in range(6)], "this one breaks #fail=on-purpose")
    sid = worker_cli("--app", TEST_APP, "run", str(path)).stdout.strip()
    wait_for(lambda: tracked.sync.get_session_status(sid)["status"] == "running", 30, "the batch to start")
    watched = worker_cli("watch", sid)
    assert watched.exit_code == ExitCode.SESSION_FAILED
    assert "node n7 failed" in watched.stdout
    assert "ended partial_failure: 6 completed, 1 failed of 7" in watched.stdout
    assert "NodeContentError: node n7: on-purpose" in watched.stdout


def test_run_wait_exits_1_for_a_partial_failure(worker_cli: Cli, canvas_file: Callable[..., Path]) -> None:
    path = canvas_file("fine #sleep=0.1", "broken #fail=bad-input", "fine too")
    result = worker_cli("--app", TEST_APP, "run", str(path), "--wait")
    assert result.exit_code == ExitCode.SESSION_FAILED
    sid = result.stdout.strip()  # stdout carries the id only; the progress goes to stderr
    assert len(sid) == 36
    assert f"Session {sid} ended partial_failure" in result.stderr
    assert "NodeContentError: node n2: bad-input" in result.stderr


def test_cancel_a_running_batch_then_resume_it_to_completion(
    worker_cli: Cli,
    tracked: SessionManager,
    canvas_file: Callable[..., Path],
    redis_client: redis.Redis,
    worker_app_queue: str,
) -> None:
    # Given a batch of 12 slow nodes on a worker of 4 threads
    path = canvas_file(*[f"step {i} #sleep=0.5" for i in range(12)])
    sid = worker_cli("--app", TEST_APP, "run", str(path)).stdout.strip()
    wait_for(lambda: tracked.sync.get_session_status(sid)["completed_nodes"] >= 1, 30, "a first node")
    # When it is cancelled
    cancelled = worker_cli("--app", TEST_APP, "cancel", sid)
    assert cancelled.exit_code == ExitCode.OK, cancelled.stderr
    status = worker_cli("status", sid)
    assert status.exit_code == ExitCode.SESSION_FAILED
    assert "cancelled" in status.stdout
    # (The revoked originals still queued must reach the worker and be dropped before the resume:
    # one dropped after it would mark its re-sent node cancelled again. Reported to the glue's owner.)
    wait_for(lambda: redis_client.llen(worker_app_queue) == 0, 30, "the revoked originals to be dropped")
    wait_for(lambda: tracked.sync.get_session_status(sid)["running_nodes"] == 0, 30, "running nodes to finish")
    time.sleep(0.3)
    # Then resume --wait runs what was left and ends completed
    resumed = worker_cli("--app", TEST_APP, "resume", sid, "--wait")
    assert resumed.exit_code == ExitCode.OK, resumed.stdout + resumed.stderr
    assert f"Session {sid} ended completed: 12 completed, 0 failed of 12" in resumed.stdout
