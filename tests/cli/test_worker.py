"""run, watch, cancel and resume against batches running in a real Celery worker (threads pool, Redis)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery, group

from tests.cli.apps import other_broker, worker_app
from tests.cli.conftest import TEST_APP, Cli, wait_for
from tests.servers import redis_process
from tracker import SessionManager
from tracker.celery import dispatch, install, uninstall
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
    # The revoked originals still queued reach the worker and are dropped before the resume (a late
    # revoke of a replaced task changes nothing, tests/contract; this test is about the resume).
    wait_for(lambda: redis_client.llen(worker_app_queue) == 0, 30, "the revoked originals to be dropped")
    wait_for(lambda: tracked.sync.get_session_status(sid)["running_nodes"] == 0, 30, "running nodes to finish")
    time.sleep(0.3)
    # Then resume --wait runs what was left and ends completed
    resumed = worker_cli("--app", TEST_APP, "resume", sid, "--wait")
    assert resumed.exit_code == ExitCode.OK, resumed.stdout + resumed.stderr
    assert f"Session {sid} ended completed: 12 completed, 0 failed of 12" in resumed.stdout


def test_resume_wait_reports_the_new_run_only(
    worker_cli: Cli, tracked: SessionManager, canvas_file: Callable[..., Path]
) -> None:
    # Given a batch whose node n2 failed in its first run (its task fails once, then succeeds)
    path = canvas_file("steady", f"flaky #flaky-{uuid.uuid4().hex}", "steady too")
    first = worker_cli("--app", TEST_APP, "run", str(path), "--task", "tests.fail_once", "--wait")
    assert first.exit_code == ExitCode.SESSION_FAILED, first.stderr
    # (announced as it failed, or, when the batch ended before the follow began, in the summary)
    assert "ended partial_failure: 2 completed, 1 failed of 3" in first.stderr
    sid = first.stdout.strip()

    # When it is resumed and followed
    resumed = worker_cli("--app", TEST_APP, "resume", sid, "--wait")

    # Then the follow shows the new run only: n2 completed in it, so no failure is announced
    assert resumed.exit_code == ExitCode.OK, resumed.stdout + resumed.stderr
    assert f"Session {sid} resumed: 1 node(s) sent again." in resumed.stdout
    assert f"Session {sid} ended completed: 3 completed, 0 failed of 3" in resumed.stdout
    assert "failed" not in resumed.stdout.replace("0 failed", ""), resumed.stdout


@pytest.fixture
def second_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A second broker (a redis-server of its own) that no worker listens to, and the CLI's default
    app pointed at it: the app a user without -A gets."""
    with redis_process(tmp_path / "other-broker") as server:
        monkeypatch.setitem(other_broker.conf, "broker_url", server.url)
        monkeypatch.setattr("tracker.cli.base.DEFAULT_APP", "tests.cli.apps:other_broker")
        yield server.url


def queued_on(url: str) -> int:
    """Messages waiting on a Redis broker, in any queue (and revokes broadcast there)."""
    client = redis.Redis.from_url(url)
    try:
        return sum(client.llen(key) for key in client.scan_iter(type="list")) + len(list(client.scan_iter("_kombu*")))
    finally:
        client.close()


def test_cancel_without_app_goes_through_the_broker_that_dispatched_the_session(
    worker_cli: Cli, tracked: SessionManager, canvas_file: Callable[..., Path], second_broker: str
) -> None:
    # Given a batch of 24 nodes of 1 s sent through the test app's broker (its worker runs 4 at a
    # time), and a default app whose broker is another one, where no worker listens
    path = canvas_file(*[f"step {i} #sleep=1.0" for i in range(24)])
    sid = worker_cli("--app", TEST_APP, "run", str(path)).stdout.strip()
    assert tracked.sync.get_session(sid).metadata["dispatched_by"]["app"] == TEST_APP
    wait_for(lambda: tracked.sync.get_session_status(sid)["running_nodes"] >= 1, 30, "a first node")

    # When it is cancelled without naming an app
    cancelled = worker_cli("cancel", sid)
    at_cancel = tracked.sync.get_session_status(sid)

    # Then the revokes went through the app that dispatched it (its import path was recorded): of
    # the nodes not finished then, only those already running (4 at most) finish; the queued ones
    # never run. Had the revokes gone to the other broker, all 24 would have completed.
    assert cancelled.exit_code == ExitCode.OK, cancelled.stderr
    wait_for(lambda: tracked.sync.get_session_status(sid)["running_nodes"] == 0, 30, "running nodes to finish")
    time.sleep(1.5)  # what a revoke failed to stop would have run by now
    status = tracked.sync.get_session_status(sid)
    assert status["status"] == "cancelled"
    assert status["completed_nodes"] <= at_cancel["completed_nodes"] + 4
    assert status["completed_nodes"] < 24 and status["completed_nodes"] + status["cancelled_nodes"] == 24
    assert queued_on(second_broker) == 0


def test_cancel_and_resume_through_another_broker_are_refused_and_change_nothing(
    cli_env: dict[str, str | None], tracked: SessionManager, canvas_file: Callable[..., Path], second_broker: str
) -> None:
    # Given a session the test app dispatched (no worker runs it)
    cli = Cli(cli_env, fresh=False)
    path = canvas_file("one", "two")
    sid = cli("--app", TEST_APP, "run", str(path)).stdout.strip()
    before = tracked.sync.get_session_status(sid)

    # When it is cancelled, then resumed, through an app whose broker is another one
    cancel = cli("--app", "tests.cli.apps:other_broker", "cancel", sid)
    resume = cli("resume", sid, env={"TRACKER_CELERY_APP": "tests.cli.apps:other_broker"})

    # Then both are refused (exit 2), naming the app to pass, and nothing changed
    for refused in (cancel, resume):
        assert refused.exit_code == ExitCode.USAGE, refused.stdout + refused.stderr
        assert f"was dispatched by the Celery app {TEST_APP}, through another broker" in refused.stderr
        assert f"Hint: name the app that dispatched it: tracker -A {TEST_APP}" in refused.stderr
    after = tracked.sync.get_session_status(sid)
    assert (after["status"], after["cancelled_nodes"], after["run"]) == (before["status"], 0, before["run"])
    assert queued_on(second_broker) == 0


def test_a_session_dispatched_by_an_app_without_import_path_needs_the_app_named(
    cli_env: dict[str, str | None], tracked: SessionManager, redis_url: str, second_broker: str, worker_app_queue: str
) -> None:
    cli = Cli(cli_env, fresh=False)
    # Given a session dispatched by an app made inside a function (no module holds it), on the
    # test app's broker, while the default app publishes elsewhere
    local = Celery(f"local-{uuid.uuid4().hex[:6]}", broker=redis_url, set_as_current=False)
    local.conf.update(task_default_queue=worker_app_queue, task_serializer="json")
    install(local, tracked, beat=False)
    try:
        sid = dispatch(group(local.signature("t.never") for _ in range(2)), canvas_path="local.canvas", app=local)
    finally:
        uninstall(local)
    assert tracked.sync.get_session(sid).metadata["dispatched_by"]["app"] is None

    # When it is cancelled without naming an app, it is refused (the default app has another broker)
    refused = cli("cancel", sid)
    assert refused.exit_code == ExitCode.USAGE
    assert "was dispatched by a Celery app with no import path, through another broker" in refused.stderr
    assert "tracker -A module:attr" in refused.stderr
    assert tracked.sync.get_session_status(sid)["status"] == "pending"

    # and naming an app on its broker cancels it
    done = cli("--app", TEST_APP, "cancel", sid)
    assert done.exit_code == ExitCode.OK, done.stderr
    assert tracked.sync.get_session_status(sid)["status"] == "cancelled"
    worker_app.control.purge()
