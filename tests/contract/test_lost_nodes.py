"""Lost nodes (issue 9) on every adapter: heartbeats, the holder registry and the reaper."""

from __future__ import annotations

import threading

from tests.conftest import FakeClock
from tracker import NodeStatus, SessionManager, SessionStatus, TrackerSettings
from tracker.storage.base import SessionStorageAdapter

W1, W2 = "celery@host-a:101", "celery@host-b:202"


def make(store: SessionStorageAdapter, clock: FakeClock, **settings: float) -> SessionManager:
    options = {"worker_stale_after": 30.0, **settings}
    return SessionManager(storage=store, settings=TrackerSettings(**options), clock=clock)  # type: ignore[arg-type]


def test_nodes_of_a_silent_worker_become_lost(store: SessionStorageAdapter, clock: FakeClock) -> None:
    # Given two nodes running on W1 and one completed, W2 alive
    manager = make(store, clock)
    sid = manager.sync.create_session("lost.canvas", 3)
    manager.sync.record_node(sid, "a", "running", worker=W1)
    manager.sync.record_node(sid, "b", "running", worker=W1)
    manager.sync.record_node(sid, "c", "running", worker=W2)
    manager.sync.record_node(sid, "c", "completed", worker=W2, result=1)
    # When W1 stays silent past the window while W2 keeps beating
    clock.advance(20)
    manager.sync.heartbeat(W2)
    assert manager.sync.reap_lost_nodes() == []  # not yet
    clock.advance(15)
    manager.sync.heartbeat(W2)
    lost = manager.sync.reap_lost_nodes()
    # Then exactly W1's running nodes are lost, the session finishes and can say why
    assert sorted(o.node.node_id for o in lost) == ["a", "b"]
    assert [o.finished for o in lost if o.finished] == [SessionStatus.PARTIAL_FAILURE]
    status = manager.sync.get_session_status(sid)
    assert (status["status"], status["failed_nodes"], status["lost_nodes"]) == ("partial_failure", 2, 2)
    node = next(n for n in manager.sync.get_nodes(sid).nodes if n.node_id == "a")
    assert node.status is NodeStatus.LOST
    assert node.reason is not None and W1 in node.reason and "35 s ago" in node.reason
    # and a second pass finds nothing more
    assert manager.sync.reap_lost_nodes() == []


def test_a_slow_but_alive_worker_is_never_reaped(store: SessionStorageAdapter, clock: FakeClock) -> None:
    manager = make(store, clock)
    sid = manager.sync.create_session("slow.canvas", 1)
    manager.sync.record_node(sid, "a", "running", worker=W1)
    for _ in range(10):  # ten windows long, beating every 10 s
        clock.advance(10)
        manager.sync.heartbeat(W1)
        assert manager.sync.reap_lost_nodes() == []
    assert manager.sync.record_node(sid, "a", "completed", worker=W1).finished is SessionStatus.COMPLETED


def test_a_late_result_after_lost_counts_once(store: SessionStorageAdapter, clock: FakeClock) -> None:
    manager = make(store, clock)
    sid = manager.sync.create_session("late.canvas", 2)
    manager.sync.record_node(sid, "a", "running", worker=W1)
    manager.sync.add_node_result(sid, "b", 2)
    clock.advance(60)
    assert len(manager.sync.reap_lost_nodes()) == 1
    assert manager.sync.get_session_status(sid)["status"] == "partial_failure"
    for _ in range(2):
        status = manager.sync.add_node_result(sid, "a", 1, worker=W1)
    assert (status["completed_nodes"], status["failed_nodes"], status["lost_nodes"]) == (2, 0, 0)
    assert status["status"] == "partial_failure"  # an ended session keeps its status


def test_a_node_redelivered_to_another_worker_is_not_reaped(store: SessionStorageAdapter, clock: FakeClock) -> None:
    manager = make(store, clock)
    sid = manager.sync.create_session("moved.canvas", 1)
    manager.sync.record_node(sid, "a", "running", worker=W1)
    clock.advance(10)
    manager.sync.record_node(sid, "a", "running", worker=W2, attempt=1)  # W2 took the redelivered task
    clock.advance(25)  # W1 silent for 35 s, W2 seen 25 s ago
    assert manager.sync.reap_lost_nodes() == []
    assert manager.sync.get_nodes(sid).nodes[0].status is NodeStatus.RUNNING


def test_node_run_limit(store: SessionStorageAdapter, clock: FakeClock) -> None:
    manager = make(store, clock, node_max_runtime=100.0)
    sid = manager.sync.create_session("limit.canvas", 2)
    manager.sync.record_node(sid, "old", "running", worker=W1)
    clock.advance(90)
    manager.sync.record_node(sid, "new", "running", worker=W1)
    clock.advance(20)
    manager.sync.heartbeat(W1)
    lost = manager.sync.reap_lost_nodes()
    assert [o.node.node_id for o in lost] == ["old"]
    assert lost[0].node.reason is not None and "100 s limit" in lost[0].node.reason


def test_two_reapers_at_once_mark_each_node_once(store: SessionStorageAdapter, clock: FakeClock) -> None:
    manager = make(store, clock)
    sid = manager.sync.create_session("race.canvas", 60)
    for i in range(60):
        manager.sync.record_node(sid, f"n{i}", "running", worker=W1 if i % 2 else W2)
    clock.advance(31)
    results: list[list[object]] = []
    threads = [threading.Thread(target=lambda: results.append(manager.sync.reap_lost_nodes())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    marked = [o.node.node_id for batch in results for o in batch]  # type: ignore[attr-defined]
    assert sorted(marked) == sorted(f"n{i}" for i in range(60))
    finishes = [o.finished for batch in results for o in batch if o.finished]  # type: ignore[attr-defined]
    assert finishes == [SessionStatus.FAILED]
    assert manager.sync.get_session_status(sid)["lost_nodes"] == 60
