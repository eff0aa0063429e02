"""Lost nodes with real prefork workers (issue 9): killed children, dead workers, time limits."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable

from celery import Celery, group

from tests.celery.appmod import app, limited, slow_ok, work
from tests.celery.conftest import WorkerProcess, wait_for, wait_status
from tests.conftest import FakeClock
from tracker import NodeSpec, NodeStatus, SessionManager, TrackerSettings
from tracker.celery import dispatch, maintain, resume_session
from tracker.celery.handlers import Recorder
from tracker.storage.redis import RedisStorageAdapter

TERMINAL = {"completed", "failed", "partial_failure", "cancelled"}
FAST_BEAT = {"TRACKER_HEARTBEAT_INTERVAL_S": "0.3", "TRACKER_WORKER_STALE_AFTER_S": "2"}


def running_node(manager: SessionManager, sid: str, node_id: str) -> str:
    """Wait until ``node_id`` runs; return the ``host:pid`` of the process running it."""
    wait_for(
        lambda: any(n.node_id == node_id and n.status is NodeStatus.RUNNING for n in manager.sync.get_nodes(sid).nodes),
        what=f"{node_id} running",
    )
    node = next(n for n in manager.sync.get_nodes(sid).nodes if n.node_id == node_id)
    assert node.worker is not None
    return node.worker


def test_sigkilled_child_makes_its_node_lost_then_resume_finishes(
    tracked: SessionManager, worker_process: Callable[..., WorkerProcess]
) -> None:
    # Given a prefork worker that does not requeue work of a lost child
    worker_process(concurrency=2, env_extra={"TRACKER_TEST_REJECT_ON_LOST": "0", **FAST_BEAT})
    calls = [work.s(0, sleep=4), *(work.s(i) for i in range(1, 6))]
    sid = dispatch(group(calls), canvas_path="child.canvas", app=app, node_ids=[f"n{i}" for i in range(6)])
    holder = running_node(tracked, sid, "n0")
    # When the child running n0 is SIGKILLed
    os.kill(int(holder.rsplit(":", 1)[1]), signal.SIGKILL)
    # Then n0 is lost (Celery's worker-lost failure, recorded at once) and the session ends
    status = wait_status(tracked, sid, TERMINAL, timeout_s=30)
    assert (status["status"], status["completed_nodes"], status["lost_nodes"]) == ("partial_failure", 5, 1)
    lost = next(n for n in tracked.sync.get_nodes(sid).nodes if n.node_id == "n0")
    assert lost.status is NodeStatus.LOST and lost.reason and "lost" in lost.reason
    # and resume re-runs only that node, and the session completes with every node counted once
    assert resume_session(sid, app=app) == 1
    status = wait_status(tracked, sid, {"completed"}, timeout_s=60)
    assert (status["completed_nodes"], status["failed_nodes"], status["lost_nodes"]) == (6, 0, 0)
    nodes = {n.node_id: n for n in tracked.sync.get_nodes(sid).nodes}
    assert all(nodes[f"n{i}"].attempts == 1 for i in range(1, 6))


def test_processes_that_stop_cleanly_are_never_reaped_so_queued_sessions_wait(
    redis_url: str, key_prefix: str, tracked: SessionManager, worker_process: Callable[..., WorkerProcess]
) -> None:
    # Given a worker whose pool child is replaced after each task, and a session waiting in a
    # queue no worker consumes yet
    worker = worker_process(concurrency=1, extra=("--max-tasks-per-child", "1"), env_extra=FAST_BEAT)
    worker.wait_ready()
    # (its Redis broker gives a dead worker's messages back after kombu's default hour: it says so)
    assert "tracker: this broker gives a dead worker's messages back only after up to" in worker.output
    queued = dispatch(group(work.s(i).set(queue=f"later-{uuid.uuid4().hex[:8]}") for i in range(2)),
                      canvas_path="queued.canvas", app=app)  # fmt: skip
    sid = dispatch(group(work.s(i) for i in range(3)), canvas_path="recycled.canvas", app=app)
    wait_status(tracked, sid, {"completed"}, timeout_s=60)

    # Then the replaced children left the registry: only processes alive now are listed
    def listed_pids() -> set[int]:
        return {int(w.worker.rsplit(":", 1)[1]) for w in tracked.sync.list_workers()}

    assert worker.proc is not None
    main = worker.proc.pid
    wait_for(lambda: listed_pids() <= {main, *worker.children()}, timeout_s=30, what="replaced children gone")
    # and once the worker stops cleanly, none of it
    worker.stop()
    wait_for(lambda: not listed_pids(), timeout_s=30, what="stopped worker gone")

    # When reapers pass after the heartbeat window and its grace, and stalled sessions are ended
    settings = TrackerSettings(redis_url=redis_url, key_prefix=key_prefix, worker_stale_after_s=2)
    reaper = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    for _ in range(3):
        assert reaper.sync.reap_lost_nodes() == []
        time.sleep(2.2)
    ended = reaper.sync.end_stalled_sessions(1)

    # Then nothing was taken for a dead worker's loss: the queued session still waits, whole
    assert ended == []
    status = tracked.sync.get_session_status(queued)
    assert (status["status"], status["pending_nodes"], status["failed_nodes"]) == ("pending", 2, 0)


def test_dead_worker_is_reaped_and_resume_completes(
    redis_url: str, key_prefix: str, tracked: SessionManager, worker_process: Callable[..., WorkerProcess]
) -> None:
    # Given a batch whose slow node runs on a worker that then dies whole (no one reports it)
    worker = worker_process(concurrency=1, env_extra=FAST_BEAT)
    sid = dispatch(group([work.s(1, sleep=2.5), work.s(2)]), canvas_path="dead.canvas", app=app,
                   node_ids=["slow", "quick"])  # fmt: skip
    running_node(tracked, sid, "slow")
    worker.kill()
    settings = TrackerSettings(redis_url=redis_url, key_prefix=key_prefix, worker_stale_after_s=2)
    reaper = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    # When the reaper runs after the heartbeat window
    assert reaper.sync.reap_lost_nodes() == []  # the worker was seen less than 2 s ago
    time.sleep(2.5)
    assert reaper.sync.reap_lost_nodes() == []  # silent 2 s: a suspect, with 2 s of grace to beat again
    time.sleep(2.5)
    lost = reaper.sync.reap_lost_nodes()
    # Then the node is lost, once, and the session is not left running
    assert [o.node.node_id for o in lost] == ["slow"]
    assert reaper.sync.reap_lost_nodes() == []
    status = tracked.sync.get_session_status(sid)
    assert (status["lost_nodes"], status["completed_nodes"]) == (1, 0)  # "quick" was still queued behind it
    # and its failures name the cause: lost, with the reaper's reason
    (cause,) = tracked.sync.get_failures(sid)
    assert (cause.error_type, cause.count, cause.node_ids) == ("lost", 1, ["slow"])
    assert cause.first_message.startswith("worker ") and "last seen" in cause.first_message
    # and resume with a new worker finishes every node exactly once
    resume_session(sid, app=app)
    worker_process(concurrency=2, env_extra=FAST_BEAT)
    status = wait_status(tracked, sid, {"completed"}, timeout_s=60)
    assert (status["completed_nodes"], status["failed_nodes"], status["lost_nodes"]) == (2, 0, 0)
    assert tracked.sync.get_failures(sid) == [] and status["failure_types"] == 0


def test_hard_time_limit_fails_the_node(tracked: SessionManager, worker_process: Callable[..., WorkerProcess]) -> None:
    worker_process(concurrency=2, env_extra={"TRACKER_TEST_REJECT_ON_LOST": "0"})
    sid = dispatch(group([limited.s(5), limited.s(0)]), canvas_path="limit.canvas", app=app, node_ids=["slow", "ok"])
    status = wait_status(tracked, sid, TERMINAL, timeout_s=60)
    assert (status["status"], status["completed_nodes"], status["failed_nodes"]) == ("partial_failure", 1, 1)
    slow = next(n for n in tracked.sync.get_nodes(sid).nodes if n.node_id == "slow")
    assert slow.error is not None and slow.error.type == "TimeLimitExceeded"
    assert [(g.error_type, g.node_ids) for g in tracked.sync.get_failures(sid)] == [("TimeLimitExceeded", ["slow"])]


def test_slow_but_alive_node_is_never_reaped(
    redis_url: str, key_prefix: str, tracked: SessionManager, worker_process: Callable[..., WorkerProcess]
) -> None:
    worker_process(concurrency=1, env_extra=FAST_BEAT)
    sid = dispatch(group([work.s(1, sleep=4)]), canvas_path="alive.canvas", app=app, node_ids=["slow"])
    running_node(tracked, sid, "slow")
    settings = TrackerSettings(redis_url=redis_url, key_prefix=key_prefix, worker_stale_after_s=2)
    reaper = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    while tracked.sync.get_session_status(sid)["status"] == "running":
        assert reaper.sync.reap_lost_nodes() == []
        time.sleep(0.3)
    assert tracked.sync.get_session_status(sid)["status"] == "completed"


def test_worker_processes_keep_heartbeats(tracked: SessionManager, worker_process: Callable[..., WorkerProcess],
                                          redis_client: object, key_prefix: str) -> None:  # fmt: skip
    worker_process(concurrency=2, env_extra=FAST_BEAT)
    import redis

    client = redis.Redis.from_url(tracked.settings.redis_url or "")
    wait_for(lambda: client.zcard(f"{key_prefix}:workers") >= 2, what="two child heartbeats")
    pids = {m.decode().rsplit(":", 1)[1] for m in client.zrange(f"{key_prefix}:workers", 0, -1)}
    children = subprocess.run(["pgrep", "-f", "tests.celery.appmod"], capture_output=True, text=True).stdout.split()
    assert pids <= set(children), (pids, children)
    client.close()


def test_a_node_running_twice_the_session_timeout_finishes_into_an_intact_session(
    redis_url: str, key_prefix: str, tracked: SessionManager, worker_process: Callable[..., WorkerProcess]
) -> None:
    # Given a 2 s session timeout (the store's TTLs and cleanup alike) and a node that runs 4.5 s
    short = {"TRACKER_SESSION_TIMEOUT_S": "2", **FAST_BEAT}
    worker_process(concurrency=1, env_extra=short)
    settings = TrackerSettings(redis_url=redis_url, key_prefix=key_prefix, session_timeout_s=2)
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    sid = dispatch(group([slow_ok.s(4.5)]), canvas_path="long.canvas", app=app, manager=manager, node_ids=["long"])
    running_node(manager, sid, "long")
    # When cleanup runs all along (as beat would, more often)
    while manager.sync.get_session_status(sid)["status"] == "running":
        assert manager.sync.cleanup_expired_sessions() == 0
        time.sleep(0.3)
    # Then the worker's heartbeats kept it: the node finished into it
    status = manager.sync.get_session_status(sid)
    assert (status["status"], status["completed_nodes"]) == ("completed", 1)
    manager.storage.close()


def test_a_success_celery_stored_before_its_pool_child_died_is_recorded_not_lost(
    redis_url: str, key_prefix: str
) -> None:
    # Given a session of two nodes whose app keeps results in Redis: "a" completed on worker W1;
    # "b"'s task ran and Celery stored its SUCCESS, but its pool child died before the tracker's
    # task_success handler wrote it (Celery then acknowledges the message, and says nothing)
    clock = FakeClock()
    settings = TrackerSettings(redis_url=redis_url, key_prefix=key_prefix, worker_stale_after_s=30, stalled_after_s=60)
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings, clock=clock)  # type: ignore[arg-type]
    results = Celery("reconcile", broker="memory://", backend=redis_url, set_as_current=False)
    results.conf.update(result_serializer="json", accept_content=["json"], result_accept_content=["json"])
    recorder = Recorder(results, manager)
    tb = f"tb-{uuid.uuid4().hex[:12]}"
    nodes = [NodeSpec(node_id="a", task_id=f"ta-{uuid.uuid4().hex[:12]}"), NodeSpec(node_id="b", task_id=tb)]
    sid = manager.sync.create_session("r.canvas", 2, nodes=nodes)
    manager.sync._record_node(sid, "a", "completed", result=1, worker="celery@w1:1")
    results.backend.store_result(tb, {"rows": 7}, "SUCCESS")

    # When that worker is reaped as dead (silent past the stale limit and the grace, while another
    # one beats), and the session, waiting on "b", is ended as stalled
    manager.sync._heartbeat("celery@w1:1")
    stalled = 0
    for _ in range(3):
        clock.advance(31)
        manager.sync._heartbeat("celery@w2:2")
        stalled += maintain(recorder.app, recorder.manager)["stalled"]
    assert stalled == 1

    # Then "b" is completed with the result Celery stored, and the session completed, not lost
    b = next(n for n in manager.sync.get_nodes(sid).nodes if n.node_id == "b")
    assert (b.status, b.result) == (NodeStatus.COMPLETED, {"rows": 7})
    status = manager.sync.get_session_status(sid)
    assert (status["status"], status["completed_nodes"], status["lost_nodes"]) == ("completed", 2, 0)
    manager.storage.close()
