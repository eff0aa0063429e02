"""The reads the dashboard's views need, on every adapter: worker processes from their heartbeats
(``list_workers``) and one node of a session (``get_node``).

Workers come from the registry the reaper reads (worker -> last heartbeat, worker -> the nodes it
holds), so what a person sees as silent is what a reaper will reap.
"""

from __future__ import annotations

import pytest

from tests.conftest import FakeClock
from tracker import (
    NodeError,
    NodeNotFoundError,
    NodeSpec,
    NodeStatus,
    SessionManager,
    SessionNotFoundError,
    TrackerSettings,
    TrackerValidationError,
)
from tracker.models import HeldNode
from tracker.storage.base import WORKER_NODES_SHOWN, SessionStorageAdapter

W1, W2, W3 = "celery@host-a:101", "celery@host-b:202", "celery@host-c:303"


def held(manager: SessionManager) -> dict[str, tuple[int, list[tuple[str, str]]]]:
    """Each listed worker -> (running, its listed nodes as (session, node))."""
    return {w.worker: (w.running, [(n.session_id, n.node_id) for n in w.nodes]) for w in manager.sync.list_workers()}


# -- workers --------------------------------------------------------------------------------------


async def test_workers_are_listed_newest_heartbeat_first_with_the_nodes_they_run(
    manager: SessionManager, clock: FakeClock
) -> None:
    # Given W1 running two nodes of one session and one of another, W2 one node, W3 only beating
    s1 = await manager.create_session("w.canvas", 3)
    s2 = await manager.create_session("w.canvas", 2)
    await manager._record_node(s1, "b", "running", worker=W1)
    await manager._record_node(s1, "a", "running", worker=W1)
    await manager._record_node(s2, "x", "running", worker=W1)
    w1_seen = clock.now
    clock.advance(5)
    await manager._record_node(s2, "y", "running", worker=W2)
    w2_seen = clock.now
    clock.advance(5)
    await manager._heartbeat(W3)

    # When they are listed
    workers = await manager.list_workers()

    # Then the newest heartbeat comes first, each with when it was seen and its nodes, sorted
    assert [w.worker for w in workers] == [W3, W2, W1]
    assert [w.last_seen_at for w in workers] == [clock.now, w2_seen, w1_seen]
    assert [w.running for w in workers] == [0, 1, 3]
    assert workers[0].nodes == []
    assert workers[1].nodes == [HeldNode(session_id=s2, node_id="y")]
    assert [(n.session_id, n.node_id) for n in workers[2].nodes] == sorted([(s1, "a"), (s1, "b"), (s2, "x")])
    # and the blocking flavour answers the same
    assert manager.sync.list_workers() == workers


async def test_a_node_leaves_its_worker_when_it_stops_running_and_a_heartbeat_moves_it_up(
    manager: SessionManager, clock: FakeClock
) -> None:
    sid = await manager.create_session("w.canvas", 3)
    await manager._record_node(sid, "a", "running", worker=W1)
    await manager._record_node(sid, "b", "running", worker=W1)
    clock.advance(1)
    await manager._record_node(sid, "c", "running", worker=W2)

    # When a finishes, b fails and W1 beats again
    await manager._record_node(sid, "a", "completed", worker=W1, result=1)
    await manager._record_node(sid, "b", "failed", worker=W1, error=NodeError(type="E", message="m"))
    clock.advance(1)
    await manager._heartbeat(W1)

    # Then W1 runs nothing any more, and is the newest
    assert held(manager) == {W1: (0, []), W2: (1, [(sid, "c")])}
    assert [w.worker for w in await manager.list_workers()] == [W1, W2]


async def test_a_node_cancelled_while_it_runs_leaves_its_worker_when_the_worker_reports_its_end(
    manager: SessionManager,
) -> None:
    # Given a session cancelled while W1 runs two of its nodes (a cancel without terminate: they
    # go on running)
    sid = await manager.create_session("w.canvas", 3)
    await manager._record_node(sid, "a", "running", worker=W1)
    await manager._record_node(sid, "b", "running", worker=W1)
    await manager.update_status(sid, "cancelled")

    # When W1 reports their ends: one finished, one revoked when it was terminated
    await manager._record_node(sid, "a", "completed", worker=W1, result=1)
    await manager._record_node(sid, "b", "cancelled", worker=W1)

    # Then W1 runs nothing any more
    assert held(manager) == {W1: (0, [])}


async def test_a_node_of_a_removed_session_leaves_its_worker_when_the_worker_reports_its_end(
    manager: SessionManager,
) -> None:
    # Given W1 running a node of a session that is then removed, and one of another session
    gone = await manager.create_session("w.canvas", 2)
    kept = await manager.create_session("w.canvas", 1)
    await manager._record_node(gone, "a", "running", worker=W1)
    await manager._record_node(kept, "k", "running", worker=W1)
    await manager.delete_session(gone)

    # When W1 reports that node's end (which the store refuses: the session is gone)
    with pytest.raises(SessionNotFoundError):
        await manager._record_node(gone, "a", "completed", worker=W1, result=1)

    # Then W1 runs only the other session's node
    assert held(manager) == {W1: (1, [(kept, "k")])}


async def test_a_worker_that_stopped_cleanly_leaves_the_registry_unless_it_still_holds_nodes(
    manager: SessionManager,
) -> None:
    # Given W1 that ran a node to its end, and W2 that still holds one
    sid = await manager.create_session("w.canvas", 2)
    await manager._record_node(sid, "a", "running", worker=W1)
    await manager._record_node(sid, "a", "completed", worker=W1, result=1)
    await manager._record_node(sid, "b", "running", worker=W2)

    # When both stop cleanly (a process that never beat, too)
    for worker in (W1, W2, W3):
        await manager._retire(worker)

    # Then only W2 is left, for a reaper to decide about its node
    assert held(manager) == {W2: (1, [(sid, "b")])}
    with pytest.raises(TrackerValidationError):
        await manager._retire("not a worker id")


async def test_equal_heartbeats_come_in_one_order_on_every_store(manager: SessionManager) -> None:
    for worker in (W2, W1, W3):
        await manager._heartbeat(worker)
    # (as a Redis ZREVRANGE orders equal scores: by name, last first)
    assert [w.worker for w in await manager.list_workers()] == [W3, W2, W1]


async def test_a_worker_running_many_nodes_names_twenty_and_counts_them_all(manager: SessionManager) -> None:
    sid = await manager.create_session("many.canvas", 30)
    for i in range(30):
        await manager._record_node(sid, f"n{i:02d}", "running", worker=W1)

    (worker,) = await manager.list_workers()

    assert worker.running == 30
    listed = [(n.session_id, n.node_id) for n in worker.nodes]
    assert len(listed) == WORKER_NODES_SHOWN == 20
    assert listed == sorted(set(listed))  # distinct, sorted
    assert {node for _, node in listed} <= {f"n{i:02d}" for i in range(30)}
    assert {s for s, _ in listed} == {sid}


async def test_list_workers_pages_at_its_limit_and_checks_it(manager: SessionManager, clock: FakeClock) -> None:
    assert await manager.list_workers() == []
    for i in range(5):
        await manager._heartbeat(f"celery@h:{i}")
        clock.advance(1)

    assert [w.worker for w in await manager.list_workers(limit=2)] == ["celery@h:4", "celery@h:3"]
    assert len(await manager.list_workers(limit=1000)) == 5
    for bad in (0, 1001, -1, True, 2.0, "3", None):
        with pytest.raises(TrackerValidationError):
            await manager.list_workers(limit=bad)  # type: ignore[arg-type]


async def test_a_silent_worker_shows_silent_then_leaves_once_reaped(
    store: SessionStorageAdapter, clock: FakeClock
) -> None:
    # Given W1 running a node, W2 beating
    manager = SessionManager(storage=store, settings=TrackerSettings(worker_stale_after_s=30.0), clock=clock)
    sid = await manager.create_session("silent.canvas", 1)
    await manager._record_node(sid, "a", "running", worker=W1)
    stale_s = manager.settings.worker_stale_after_s

    # When W1 stays silent past the stale window
    clock.advance(31)
    await manager._heartbeat(W2)
    views = {w.worker: w.seen_at(clock.now, stale_s) for w in await manager.list_workers()}

    # Then it is listed as silent (seen 31 s ago), W2 as alive
    assert (views[W1].alive, views[W1].seen_s_ago, views[W1].running) == (False, 31.0, 1)
    assert (views[W2].alive, views[W2].seen_s_ago) == (True, 0.0)
    assert views[W1].to_dict()["seen_s_ago"] == 31.0

    # and once a reaper took its node, it is gone
    await manager.reap_lost_nodes()
    clock.advance(30)
    await manager._heartbeat(W2)
    assert [o.node.node_id for o in await manager.reap_lost_nodes()] == ["a"]
    assert [w.worker for w in await manager.list_workers()] == [W2]


def test_the_alive_rule_is_the_reapers() -> None:
    from datetime import UTC, datetime, timedelta

    from tracker.models import WorkerInfo

    seen = datetime(2026, 1, 1, tzinfo=UTC)
    worker = WorkerInfo(worker=W1, last_seen_at=seen, running=0)
    assert worker.seen_at(seen + timedelta(seconds=30), 30.0).alive  # the reaper suspects it only past 30 s
    assert not worker.seen_at(seen + timedelta(seconds=30.001), 30.0).alive
    assert worker.seen_at(seen - timedelta(seconds=2), 30.0).seen_s_ago == 0.0  # a clock ahead of ours


# -- one node -------------------------------------------------------------------------------------


async def test_get_node_answers_what_the_node_pages_hold(manager: SessionManager, clock: FakeClock) -> None:
    # Given a session created with two known nodes, one of which ran and completed, and a third
    # node (with a '/' in its id) recorded later, failed
    sid = await manager.create_session(
        "one.canvas", 3, nodes=[NodeSpec(node_id="a", task_id="t-a"), NodeSpec(node_id="b")]
    )
    await manager._record_node(sid, "a", "running", worker=W1, task_id="t-a", attempt=1)
    clock.advance(2)
    await manager._record_node(sid, "a", "completed", worker=W1, result={"rows": [1, 2]})
    await manager._record_node(sid, "dir/c", "failed", error=NodeError(type="ValueError", message="bad row"))

    # When each is read alone
    a, b, c = [await manager.get_node(sid, node_id) for node_id in ("a", "b", "dir/c")]

    # Then each is its record, as the node pages have it
    assert (a.status, a.result, a.worker) == (NodeStatus.COMPLETED, {"rows": [1, 2]}, W1)
    assert (a.task_id, a.attempts) == ("t-a", 1)
    assert a.execution_time_ms == 2000.0
    assert (b.status, b.result, b.started_at) == (NodeStatus.PENDING, None, None)
    assert (c.status, c.error) == (NodeStatus.FAILED, NodeError(type="ValueError", message="bad row"))
    paged = {n.node_id: n for n in (await manager.get_nodes(sid, limit=1000)).nodes}
    assert [a, b, c] == [paged["a"], paged["b"], paged["dir/c"]]
    assert manager.sync.get_node(sid, "a") == a


async def test_get_node_tells_an_unknown_session_from_an_unknown_node(manager: SessionManager) -> None:
    sid = await manager.create_session("one.canvas", 2, nodes=[NodeSpec(node_id="a")])
    other = await manager.create_session("other.canvas", 1)
    await manager.add_node_result(other, "elsewhere", 1)

    with pytest.raises(NodeNotFoundError) as found:
        await manager.get_node(sid, "elsewhere")  # a node of another session
    assert (found.value.session_id, found.value.node_id) == (sid, "elsewhere")
    assert "'elsewhere'" in str(found.value) and sid in str(found.value)
    with pytest.raises(NodeNotFoundError):
        manager.sync.get_node(sid, "b")  # within node_count, but never recorded

    await manager.delete_session(sid)
    with pytest.raises(SessionNotFoundError):
        await manager.get_node(sid, "a")
    with pytest.raises(SessionNotFoundError):
        manager.sync.get_node("0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e", "a")


@pytest.mark.parametrize(
    ("session_id", "node_id"),
    [
        ("not-a-uuid", "a"),
        ("0B0C1A3E-58C3-4CC9-8A4A-3F0E8F6C1D2E", "a"),
        ("0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e", ""),
        ("0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e", "a b"),
        ("0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e", "x" * 201),
        ("0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e", None),
    ],
)
async def test_get_node_checks_both_ids_before_the_store(
    manager: SessionManager, session_id: str, node_id: str
) -> None:
    with pytest.raises(TrackerValidationError):
        await manager.get_node(session_id, node_id)
