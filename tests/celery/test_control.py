"""Cancel, resume after a SIGKILLed prefork worker, beat cleanup, pool checks: real workers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
import redis
from celery import Celery, group
from celery.contrib.testing.worker import start_worker

from tests.celery.appmod import app, done, fails_once, work
from tests.celery.conftest import WorkerProcess, wait_for, wait_status
from tracker import InMemoryStorageAdapter, NodeStatus, SessionManager
from tracker.celery import BEAT_ENTRY, CLEANUP_TASK, cancel_session, dispatch, install, resume_session, uninstall

TERMINAL = {"completed", "failed", "partial_failure", "cancelled"}


def test_cancel_mid_batch(tracked: SessionManager, thread_worker: None, redis_url: str) -> None:
    # Given a batch of slow nodes, a few of which have run
    sid = dispatch(group(work.s(i, sleep=0.2) for i in range(40)), canvas_path="slow.canvas", app=app,
                   on_complete=done.s(kind="complete"))  # fmt: skip
    wait_for(lambda: tracked.sync.get_session_status(sid)["completed_nodes"] >= 4, what="first results")
    # When it is cancelled
    info = cancel_session(sid, app=app)
    # Then the status is cancelled at once, unfinished nodes are cancelled and do not run later
    assert info.status.value == "cancelled"
    time.sleep(1.5)
    status = tracked.sync.get_session_status(sid)
    assert status["status"] == "cancelled"
    assert status["completed_nodes"] + status["cancelled_nodes"] + status["failed_nodes"] == 40
    assert status["completed_nodes"] < 40
    # late results of nodes that were already running are recorded without moving the status
    nodes = tracked.sync.get_nodes(sid, limit=1000).nodes
    assert {n.status for n in nodes} <= {NodeStatus.COMPLETED, NodeStatus.CANCELLED}
    # and the cancel was the run's end: on_complete said so, once
    client = redis.Redis.from_url(redis_url)
    wait_for(lambda: client.llen(f"complete:{sid}") >= 1, 30, "the on_complete callback")
    assert client.lrange(f"complete:{sid}", 0, -1) == [b"cancelled 1"]
    client.close()


def test_sigkilled_prefork_worker_then_resume_counts_every_node_once(
    tracked: SessionManager, worker_process: Callable[..., WorkerProcess]
) -> None:
    # Given a prefork worker running a batch of slow nodes
    worker = worker_process(concurrency=2)
    sid = dispatch(group(work.s(i, sleep=0.3) for i in range(30)), canvas_path="kill.canvas", app=app,
                   node_ids=[f"n{i}" for i in range(30)])  # fmt: skip
    wait_for(lambda: tracked.sync.get_session_status(sid)["completed_nodes"] >= 4, what="first results")
    # When the worker and its children are SIGKILLed mid-batch
    worker.kill()
    stalled = tracked.sync.get_session_status(sid)
    assert stalled["status"] == "running"
    assert stalled["completed_nodes"] < 30
    done_before = {n.node_id for n in tracked.sync.get_nodes(sid, NodeStatus.COMPLETED, limit=1000).nodes}
    # and the batch is resumed with a fresh worker
    resent = resume_session(sid, app=app)
    assert resent == 30 - len(done_before)
    worker_process(concurrency=2)
    # Then every node is counted exactly once and the session completes
    status = wait_status(tracked, sid, TERMINAL, timeout_s=120)
    assert (status["status"], status["completed_nodes"], status["failed_nodes"]) == ("completed", 30, 0)
    nodes = {n.node_id: n for n in tracked.sync.get_nodes(sid, limit=1000).nodes}
    assert len(nodes) == 30
    assert all(n.result == int(n.node_id[1:]) * 2 for n in nodes.values())
    # completed nodes were not re-run (their attempt count did not move)
    assert all(nodes[nid].attempts == 1 for nid in done_before)


def test_cancel_with_terminate_stops_the_running_tasks(
    tracked: SessionManager, worker_process: Callable[..., WorkerProcess]
) -> None:
    # Given two nodes of a minute each, running in a prefork worker
    worker_process(concurrency=2)
    sid = dispatch(group(work.s(i, sleep=60) for i in range(2)), canvas_path="terminate.canvas", app=app,
                   node_ids=["a", "b"])  # fmt: skip
    wait_for(lambda: tracked.sync.get_session_status(sid)["running_nodes"] == 2, what="both nodes running")

    # When the session is cancelled with terminate=True
    cancel_session(sid, app=app, terminate=True)

    # Then the worker stops running them at once (not a minute later), and neither completes
    def running() -> int:
        return sum(len(tasks) for tasks in (app.control.inspect(timeout=1).active() or {}).values())

    wait_for(lambda: running() == 0, 30, "the running tasks to be terminated")
    status = tracked.sync.get_session_status(sid)
    assert (status["status"], status["cancelled_nodes"], status["completed_nodes"]) == ("cancelled", 2, 0)


def test_beat_cleanup_task_removes_an_expired_session(tracked: SessionManager, thread_worker: None) -> None:
    sid = tracked.sync.create_session("old.canvas", 1)
    keep = tracked.sync.create_session("new.canvas", 1)
    real_clock = tracked.clock
    tracked.clock = lambda: real_clock() + timedelta(seconds=tracked.settings.session_timeout_s + 5)
    try:
        tracked.sync.add_node_result(keep, "n", 1)  # written "later": not expired
        assert app.conf.beat_schedule[BEAT_ENTRY]["task"] == CLEANUP_TASK
        removed = app.send_task(CLEANUP_TASK).get(timeout=30)["removed"]
    finally:
        tracked.clock = real_clock
    assert removed == 1
    assert [s.session_id for s in tracked.sync.list_sessions().sessions] == [keep]
    assert sid not in {s.session_id for s in tracked.sync.list_sessions().sessions}


def test_beat_runs_cleanup_every_tracker_cleanup_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKER_CLEANUP_INTERVAL_S", "17")
    beat_app = Celery("beat-interval", broker="memory://", set_as_current=False)
    install(beat_app)
    try:
        assert beat_app.conf.beat_schedule[BEAT_ENTRY] == {"task": CLEANUP_TASK, "schedule": 17.0}
    finally:
        uninstall(beat_app)


def test_install_is_idempotent() -> None:
    from celery import signals

    before = len(signals.task_prerun.receivers)
    install(app)
    install(app)
    assert len(signals.task_prerun.receivers) == before


def test_in_memory_store_refuses_a_prefork_pool(celery_env: dict[str, str]) -> None:
    SessionManager.set_instance(SessionManager(storage=InMemoryStorageAdapter()))
    try:
        with (
            pytest.raises(SystemExit, match="in-memory store"),
            start_worker(app, pool="prefork", concurrency=2, perform_ping_check=False, loglevel="WARNING"),
        ):
            pass
    finally:
        SessionManager.reset_instance()


def test_uninstall_disconnects_and_recorders_keep_to_their_app(celery_env: dict[str, str]) -> None:
    from celery import Celery, signals

    from tracker.celery import uninstall

    other = Celery("other")
    before = len(signals.task_prerun.receivers)
    recorder = install(other, beat=False)
    assert len(signals.task_prerun.receivers) == before + 1
    assert recorder.mine(other.tasks.get(CLEANUP_TASK)) and not recorder.mine(work)
    uninstall(other)
    assert len(signals.task_prerun.receivers) == before
    assert install(other, beat=False) is not recorder  # installable again
    uninstall(other)


def test_callbacks_fire_once_each_across_a_failure_a_resume_and_the_end(
    tracked: SessionManager, thread_worker: None, redis_url: str
) -> None:
    # Given a batch with a node that fails its first run, and all three callbacks
    key = f"fails-once:{uuid.uuid4().hex}"
    calls = [work.s(1), fails_once.s(key), work.s(2)]
    sid = dispatch(group(calls), canvas_path="cb.canvas", app=app, node_ids=["a", "flaky", "b"],
                   on_complete=done.s(kind="complete"), on_success=done.s(kind="success"),
                   on_failure=done.s(kind="failure"))  # fmt: skip
    client = redis.Redis.from_url(redis_url)

    def said(kind: str) -> list[str]:
        return [entry.decode() for entry in client.lrange(f"{kind}:{sid}", 0, -1)]

    # When the first run ends partial_failure
    wait_status(tracked, sid, TERMINAL)
    wait_for(lambda: said("complete") and said("failure"), 30, "the first run's callbacks")
    # Then on_complete said so for run 1, and on_failure named the failed node, once
    assert said("complete") == ["partial_failure 1"]
    assert len(said("failure")) == 1 and said("failure")[0].endswith(" 1 flaky")
    assert said("success") == []
    # When it is resumed and the node succeeds
    assert resume_session(sid, app=app) == 1
    wait_status(tracked, sid, {"completed"})
    wait_for(lambda: len(said("complete")) == 2 and said("success"), 30, "the second run's callbacks")
    time.sleep(0.5)  # room for a duplicate to show
    # Then on_complete fired once for run 2, on_success once, on_failure not again
    assert said("complete") == ["partial_failure 1", "completed 2"]
    assert said("success") == ["completed 2"]
    assert len(said("failure")) == 1
    client.close()
