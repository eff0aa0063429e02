"""Lost nodes (issue 9) on every adapter: heartbeats, the holder registry and the reaper."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import FakeClock
from tracker import (
    InvalidStateTransitionError,
    NodeSpec,
    NodeStatus,
    SessionManager,
    SessionStatus,
    TrackerSettings,
)
from tracker.models import NodeOutcome
from tracker.storage.base import SessionStorageAdapter

W1, W2 = "celery@host-a:101", "celery@host-b:202"


def make(store: SessionStorageAdapter, clock: FakeClock, **settings: float) -> SessionManager:
    options = {"worker_stale_after_s": 30.0, **settings}
    return SessionManager(storage=store, settings=TrackerSettings(**options), clock=clock)  # type: ignore[arg-type]


def test_nodes_of_a_silent_worker_become_lost(store: SessionStorageAdapter, clock: FakeClock) -> None:
    # Given two nodes running on W1 and one completed, W2 alive
    manager = make(store, clock)
    sid = manager.sync.create_session("lost.canvas", 3)
    manager.sync._record_node(sid, "a", "running", worker=W1)
    manager.sync._record_node(sid, "b", "running", worker=W1)
    manager.sync._record_node(sid, "c", "running", worker=W2)
    manager.sync._record_node(sid, "c", "completed", worker=W2, result=1)
    # When W1 stays silent past the window while W2 keeps beating
    clock.advance(20)
    manager.sync._heartbeat(W2)
    assert manager.sync.reap_lost_nodes() == []  # not yet
    clock.advance(15)
    manager.sync._heartbeat(W2)
    assert manager.sync.reap_lost_nodes() == []  # silent 35 s: a suspect, its grace starts
    clock.advance(29)
    manager.sync._heartbeat(W2)
    assert manager.sync.reap_lost_nodes() == []  # still within the grace
    clock.advance(1)
    manager.sync._heartbeat(W2)
    lost = manager.sync.reap_lost_nodes()
    # Then exactly W1's running nodes are lost, the session finishes and can say why
    assert sorted(o.node.node_id for o in lost) == ["a", "b"]
    assert [o.finished for o in lost if o.finished] == [SessionStatus.PARTIAL_FAILURE]
    assert [o.first_failure for o in lost if o.first_failure] == ["a"]  # on_failure: once, the first
    status = manager.sync.get_session_status(sid)
    assert (status["status"], status["failed_nodes"], status["lost_nodes"]) == ("partial_failure", 2, 2)
    node = next(n for n in manager.sync.get_nodes(sid).nodes if n.node_id == "a")
    assert node.status is NodeStatus.LOST
    assert node.reason is not None and W1 in node.reason and "65 s ago" in node.reason
    # and a second pass finds nothing more
    assert manager.sync.reap_lost_nodes() == []


def reap_past_the_grace(manager: SessionManager, clock: FakeClock, *alive: str) -> list[NodeOutcome]:
    """Two reaper passes a grace apart (the first makes the silent workers suspects), ``alive`` beating."""
    assert manager.sync.reap_lost_nodes() == []
    clock.advance(30)
    for worker in alive:
        manager.sync._heartbeat(worker)
    return manager.sync.reap_lost_nodes()


def test_a_store_outage_of_any_length_never_makes_a_live_worker_lost(
    store: SessionStorageAdapter, clock: FakeClock
) -> None:
    # Given W1 and W2 running nodes, and a reaper pass that saw them alive
    manager = make(store, clock)
    sid = manager.sync.create_session("outage.canvas", 2)
    manager.sync._record_node(sid, "a", "running", worker=W1)
    manager.sync._record_node(sid, "b", "running", worker=W2)
    assert manager.sync.reap_lost_nodes() == []
    for outage_s in (40, 100, 1000):  # past the stale limit, and far past it
        # When no heartbeat reaches the store for the outage, and a reaper runs first when it is back
        clock.advance(outage_s)
        assert manager.sync.reap_lost_nodes() == []
        # and the workers beat within the grace
        clock.advance(5)
        manager.sync._heartbeat(W1)
        manager.sync._heartbeat(W2)
        clock.advance(26)
        # Then no pass makes their nodes lost
        assert manager.sync.reap_lost_nodes() == []
        assert manager.sync.get_session_status(sid)["running_nodes"] == 2
    # and nodes finish into the running session
    manager.sync._record_node(sid, "a", "completed", result=1, worker=W1)
    assert manager.sync._record_node(sid, "b", "completed", result=2, worker=W2).finished is SessionStatus.COMPLETED


def test_a_suspect_marked_before_an_outage_gets_its_grace_again(store: SessionStorageAdapter, clock: FakeClock) -> None:
    # Given W1 found silent (a suspect) by a pass just before the store went down, W2 alive then
    manager = make(store, clock)
    sid = manager.sync.create_session("outage.canvas", 1)
    manager.sync._record_node(sid, "a", "running", worker=W1)
    clock.advance(35)
    manager.sync._heartbeat(W2)
    assert manager.sync.reap_lost_nodes() == []
    # When the outage outlasts the grace and a pass runs first when the store is back
    clock.advance(120)
    assert manager.sync.reap_lost_nodes() == []  # nobody seen alive since: the grace starts again
    manager.sync._heartbeat(W1)  # W1 was alive all along
    clock.advance(40)
    manager.sync._heartbeat(W1)
    # Then it keeps its node
    assert manager.sync.reap_lost_nodes() == []
    assert manager.sync.get_nodes(sid).nodes[0].status is NodeStatus.RUNNING


def test_every_worker_dead_is_still_reaped(store: SessionStorageAdapter, clock: FakeClock) -> None:
    # Given the only worker dies (nobody beats any more: it looks like an outage at first)
    manager = make(store, clock)
    sid = manager.sync.create_session("dead.canvas", 1)
    manager.sync._record_node(sid, "a", "running", worker=W1)
    assert manager.sync.reap_lost_nodes() == []
    clock.advance(40)
    # Then the grace runs out on the passes after, and the session ends
    lost = reap_past_the_grace(manager, clock)
    assert [o.finished for o in lost] == [SessionStatus.FAILED]


def test_with_late_acks_a_dead_workers_nodes_wait_for_redelivery(
    store: SessionStorageAdapter, clock: FakeClock
) -> None:
    # Given W1 running two nodes, dead; its messages were not acknowledged (task_acks_late)
    manager = make(store, clock)
    sid = manager.sync.create_session("requeued.canvas", 2)
    manager.sync._record_node(sid, "a", "running", worker=W1, task_id="t-a")
    manager.sync._record_node(sid, "b", "running", worker=W1, task_id="t-b")
    clock.advance(35)
    manager.sync._heartbeat(W2)
    assert manager.sync.reap_lost_nodes(requeued=True) == []
    clock.advance(30)
    manager.sync._heartbeat(W2)
    # When the reaper knows the broker gives them back
    reaped = manager.sync.reap_lost_nodes(requeued=True)
    # Then they go back to pending (not lost, not failed): the session waits for them
    assert sorted((o.node.node_id, o.node.status) for o in reaped) == [("a", "pending"), ("b", "pending")]
    assert all(o.finished is None and o.first_failure is None for o in reaped)
    status = manager.sync.get_session_status(sid)
    assert (status["status"], status["running_nodes"], status["pending_nodes"], status["lost_nodes"]) == (
        "running", 0, 2, 0,
    )  # fmt: skip
    assert "redeliver" in (reaped[0].node.reason or "")
    # and the redelivered tasks count once each on the worker that runs them
    for nid in ("a", "b"):
        manager.sync._record_node(sid, nid, "running", worker=W2, task_id=f"t-{nid}")
    manager.sync._record_node(sid, "a", "completed", result=1, worker=W2, task_id="t-a")
    done = manager.sync._record_node(sid, "b", "completed", result=2, worker=W2, task_id="t-b")
    assert (done.finished, done.succeeded) == (SessionStatus.COMPLETED, True)
    assert manager.sync.get_session_status(sid)["completed_nodes"] == 2


def test_heartbeats_keep_a_long_running_nodes_session_from_expiring(
    store: SessionStorageAdapter, clock: FakeClock
) -> None:
    # Given a 60 s session timeout and a node running on W1
    manager = make(store, clock, session_timeout_s=60.0, finished_ttl_s=60.0)
    sid = manager.sync.create_session("long.canvas", 1)
    manager.sync._record_node(sid, "a", "running", worker=W1)
    # When W1 beats for twice the timeout while nothing else writes to the session
    for _ in range(12):
        clock.advance(10)
        manager.sync._heartbeat(W1, sessions=[sid])
        # Then cleanup keeps it
        assert manager.sync.cleanup_expired_sessions() == 0
    # and the node finishes into it
    assert manager.sync._record_node(sid, "a", "completed", worker=W1).finished is SessionStatus.COMPLETED
    # and an ended session is not kept alive by heartbeats: it expires as any other
    clock.advance(30)
    manager.sync._heartbeat(W1, sessions=[sid])
    clock.advance(31)
    assert manager.sync.cleanup_expired_sessions() == 1


def test_a_slow_but_alive_worker_is_never_reaped(store: SessionStorageAdapter, clock: FakeClock) -> None:
    manager = make(store, clock)
    sid = manager.sync.create_session("slow.canvas", 1)
    manager.sync._record_node(sid, "a", "running", worker=W1)
    for _ in range(10):  # ten windows long, beating every 10 s
        clock.advance(10)
        manager.sync._heartbeat(W1)
        assert manager.sync.reap_lost_nodes() == []
    assert manager.sync._record_node(sid, "a", "completed", worker=W1).finished is SessionStatus.COMPLETED


def test_a_late_result_after_lost_counts_once_and_rederives_the_ended_status(
    store: SessionStorageAdapter, clock: FakeClock
) -> None:
    # Given a session that ended partial_failure because its running node was reaped
    manager = make(store, clock)
    sid = manager.sync.create_session("late.canvas", 2)
    manager.sync._record_node(sid, "a", "running", worker=W1)
    manager.sync.add_node_result(sid, "b", 2)
    clock.advance(60)
    assert len(reap_past_the_grace(manager, clock)) == 1
    assert manager.sync.get_session_status(sid)["status"] == "partial_failure"
    # When the node's success arrives after all (twice: a redelivery)
    outcomes = [manager.sync._record_node(sid, "a", "completed", result=1, worker=W1) for _ in range(2)]
    # Then it counts once, and the ended status follows the counts, told as a status event
    status = manager.sync.get_session_status(sid)
    assert (status["completed_nodes"], status["failed_nodes"], status["lost_nodes"]) == (2, 0, 0)
    assert status["status"] == "completed"
    assert [o.finished for o in outcomes] == [None, None]  # not a new end of the run
    assert [o.succeeded for o in outcomes] == [True, False]  # on_success: exactly once
    events = [(e.type, e.status) for e in manager.sync.read_events(sid)]
    assert events.count(("status", SessionStatus.COMPLETED)) == 1
    assert events.index(("node", SessionStatus.COMPLETED)) < events.index(("status", SessionStatus.COMPLETED))
    # and a resume finds a completed session: nothing to do, refused
    with pytest.raises(InvalidStateTransitionError):
        manager.sync._reopen_session(sid)


def test_a_resume_with_nothing_to_resend_ends_at_once(store: SessionStorageAdapter, clock: FakeClock) -> None:
    # Given a session that ended partial_failure: a completed node and a failed one
    manager = make(store, clock)
    sid = manager.sync.create_session("nothing.canvas", 2)
    manager.sync.add_node_result(sid, "a", 1)
    manager.sync._record_node(sid, "b", "failed", error=ValueError("no"))
    # When it is resumed without retrying failed nodes (nothing to re-send)
    outcome = manager.sync._reopen_session(sid, retry_failed=False)
    # Then it ends at once with the status its counts give, never running, and its run is the same
    assert outcome.nodes == []
    assert outcome.session.status is SessionStatus.PARTIAL_FAILURE
    assert manager.sync.get_session_status(sid)["status"] == "partial_failure"
    assert outcome.session.run == 1
    # and a resume that re-sends starts the next run
    assert manager.sync._reopen_session(sid).session.run == 2


def test_a_node_redelivered_to_another_worker_is_not_reaped(store: SessionStorageAdapter, clock: FakeClock) -> None:
    manager = make(store, clock)
    sid = manager.sync.create_session("moved.canvas", 1)
    manager.sync._record_node(sid, "a", "running", worker=W1)
    clock.advance(10)
    manager.sync._record_node(sid, "a", "running", worker=W2, attempt=1)  # W2 took the redelivered task
    clock.advance(25)  # W1 silent for 35 s, W2 seen 25 s ago
    assert manager.sync.reap_lost_nodes() == []
    assert manager.sync.get_nodes(sid).nodes[0].status is NodeStatus.RUNNING


def test_node_run_limit(store: SessionStorageAdapter, clock: FakeClock) -> None:
    manager = make(store, clock, node_max_runtime_s=100.0)
    sid = manager.sync.create_session("limit.canvas", 2)
    manager.sync._record_node(sid, "old", "running", worker=W1)
    clock.advance(90)
    manager.sync._record_node(sid, "new", "running", worker=W1)
    clock.advance(20)
    manager.sync._heartbeat(W1)
    lost = manager.sync.reap_lost_nodes()
    assert [o.node.node_id for o in lost] == ["old"]
    assert lost[0].node.reason is not None and "100 s limit" in lost[0].node.reason


def test_two_reapers_at_once_mark_each_node_once(store: SessionStorageAdapter, clock: FakeClock) -> None:
    manager = make(store, clock)
    sid = manager.sync.create_session("race.canvas", 60)
    for i in range(60):
        manager.sync._record_node(sid, f"n{i}", "running", worker=W1 if i % 2 else W2)
    clock.advance(31)
    manager.sync.reap_lost_nodes()  # they become suspects
    clock.advance(30)
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


def test_a_session_left_waiting_by_a_message_lost_with_a_dead_worker_ends(
    store: SessionStorageAdapter, clock: FakeClock
) -> None:
    # Given sessions waiting on nodes: one whose last node's message died with W1 (never started),
    # one with a node running on live W2, and an idle one while no worker has died
    manager = make(store, clock)
    waiting = manager.sync.create_session("waiting.canvas", 2, nodes=[NodeSpec(node_id="a"), NodeSpec(node_id="b")])
    manager.sync._record_node(waiting, "a", "completed", result=1, worker=W1)
    busy = manager.sync.create_session("busy.canvas", 1, nodes=[NodeSpec(node_id="c")])
    manager.sync._record_node(busy, "c", "running", worker=W2)
    clock.advance(120)
    manager.sync._heartbeat(W2, sessions=[busy])
    assert manager.sync.end_stalled_sessions(60) == []  # no worker died: nothing is presumed lost
    # When W1 is reaped as dead (silent past the stale limit and the grace)
    manager.sync._record_node(busy, "c", "running", worker=W2)  # W2 still beats
    manager.sync._heartbeat(W1)
    clock.advance(31)
    manager.sync._heartbeat(W2, sessions=[busy])
    reap_past_the_grace(manager, clock, W2)
    manager.sync._heartbeat(W2, sessions=[busy])
    later = manager.sync.create_session("later.canvas", 1, nodes=[NodeSpec(node_id="d")])
    clock.advance(61)
    manager.sync._heartbeat(W2, sessions=[busy])
    # Then the waiting session ends: its unfinished node lost with a reason, its first failure told
    (ended,) = manager.sync.end_stalled_sessions(60)
    assert ended.session.session_id == waiting
    assert (ended.finished, ended.first_failure) == (SessionStatus.PARTIAL_FAILURE, "b")
    b = next(n for n in manager.sync.get_nodes(waiting).nodes if n.node_id == "b")
    assert b.status is NodeStatus.LOST and b.reason is not None and "never ran" in b.reason
    assert [n.node_id for n in manager.sync.get_nodes(waiting, "lost").nodes] == ["b"]
    assert manager.sync.get_nodes(waiting, "pending").nodes == []
    # and neither the session whose node runs on a live worker, nor one created after the death
    assert manager.sync.get_session_status(busy)["status"] == "running"
    assert manager.sync.get_session_status(later)["status"] == "pending"
    assert manager.sync.end_stalled_sessions(60) == []  # once
    # and if the message was only late after all, its result counts and the status follows
    manager.sync._record_node(waiting, "b", "completed", result=2, worker=W2)
    assert manager.sync.get_session_status(waiting)["status"] == "completed"
