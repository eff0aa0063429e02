"""Growing a session that has not ended: every test runs against every adapter."""

from __future__ import annotations

import threading

import pytest

from tracker import (
    InvalidStateTransitionError,
    NodeSpec,
    NodeStatus,
    SessionManager,
    SessionNotFoundError,
    SessionStatus,
    TrackerSettings,
    TrackerValidationError,
)
from tracker.structure import grown, leaf_ids


def specs(*ids: str) -> list[NodeSpec]:
    return [NodeSpec(node_id=i, task_id=f"t-{i}", signature={"task": "t.work", "args": [i]}) for i in ids]


async def test_added_nodes_are_pending_and_the_session_waits_for_them(manager: SessionManager) -> None:
    # Given a running session of 2 nodes, one completed
    sid = await manager.create_session("grow.canvas", 2, nodes=specs("a", "b"))
    await manager.add_node_result(sid, "a", 1)
    # When two nodes are added
    outcome = await manager.add_nodes(sid, specs("c", "d"))
    # Then they are pending, counted, and progress counts them
    assert (outcome.added, outcome.pending) == (True, ["c", "d"])
    status = await manager.get_session_status(sid)
    assert (status["node_count"], status["pending_nodes"], status["progress_percent"]) == (4, 3, 25.0)
    pending = {n.node_id: n for n in (await manager.get_nodes(sid, "pending")).nodes}
    assert set(pending) == {"b", "c", "d"} and pending["c"].task_id == "t-c"
    # and the session ends only when they have results too
    assert (await manager.add_node_result(sid, "b", 2))["status"] == "running"
    await manager.add_node_result(sid, "c", 3)
    assert (await manager.add_node_result(sid, "d", 4))["status"] == "completed"
    assert [e.type for e in await manager.read_events(sid)].count("added") == 1


async def test_nodes_cannot_be_added_once_the_session_ended(manager: SessionManager) -> None:
    sid = await manager.create_session("grow.canvas", 1, nodes=specs("a"))
    await manager.add_node_result(sid, "a", None, status="failed")
    before = await manager.get_session_status(sid)
    with pytest.raises(InvalidStateTransitionError, match="nodes can no longer be added"):
        await manager.add_nodes(sid, specs("b"))
    assert await manager.get_session_status(sid) == before
    assert [n.node_id for n in (await manager.get_nodes(sid)).nodes] == ["a"]


async def test_the_same_call_again_changes_nothing_and_tells_what_is_pending(manager: SessionManager) -> None:
    sid = await manager.create_session("grow.canvas", 1, nodes=specs("a"))
    await manager.add_nodes(sid, specs("b", "c"))
    await manager._record_node(sid, "b", "running")
    before = await manager.get_session_status(sid)
    again = await manager.add_nodes(sid, specs("b", "c"))
    assert (again.added, again.pending, again.session.node_count) == (False, ["c"], 3)
    assert await manager.get_session_status(sid) == before


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (specs("a", "x"), "already a node"),  # some of them only
        (specs("x", "x"), "distinct"),
        ([], "at least one"),
        ([("x", "t")], "NodeSpec"),
        (specs("bad id"), "only letters"),
        (specs(*(f"n{i}" for i in range(10))), "TRACKER_MAX_NODE_COUNT"),
    ],
)
async def test_bad_additions_are_refused_and_change_nothing(
    store: object, clock: object, nodes: list[NodeSpec], message: str
) -> None:
    manager = SessionManager(storage=store, settings=TrackerSettings(max_node_count=10), clock=clock)  # type: ignore[arg-type]
    sid = await manager.create_session("grow.canvas", 2, nodes=specs("a", "b"))
    before = await manager.get_session_status(sid)
    with pytest.raises(TrackerValidationError, match=message):
        await manager.add_nodes(sid, nodes)
    assert await manager.get_session_status(sid) == before
    with pytest.raises(SessionNotFoundError):
        await manager.add_nodes("0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e", specs("x"))


async def test_a_chain_added_to_a_group_is_followed_and_the_tree_grows(manager: SessionManager) -> None:
    # Given a session of two tasks side by side (no tree)
    sid = await manager.create_session("grow.canvas", 2, nodes=specs("a", "b"))
    # When a chain c -> d is added, then a plain task e
    await manager.add_nodes(sid, specs("c", "d"), {"chain": [{"n": "c"}, {"n": "d"}]})
    await manager.add_nodes(sid, specs("e"))
    # Then the session's tree has every node, side by side with the chain, one level deep
    tree = await manager.get_structure(sid)
    assert tree is not None and set(tree) == {"group"}
    assert sorted(leaf_ids(tree)) == ["a", "b", "c", "d", "e"]
    assert {"chain": [{"n": "c"}, {"n": "d"}]} in tree["group"]
    # and the chain's link is followed: c failing skips d
    await manager._record_node(sid, "c", "failed")
    (d,) = [n for n in (await manager.get_nodes(sid)).nodes if n.node_id == "d"]
    assert d.status is NodeStatus.SKIPPED


def test_grown_keeps_a_plain_group_flat() -> None:
    chain = {"chain": [{"n": "c"}, {"n": "d"}]}
    assert grown(None, None, ["a"], ["b"]) is None
    assert grown(None, chain, ["a", "b"], ["c", "d"]) == {"group": [{"n": "a"}, {"n": "b"}, chain]}
    assert grown(None, chain, [], ["c", "d"]) == chain
    assert grown(chain, None, ["c", "d"], ["e"]) == {"group": [chain, {"n": "e"}]}
    assert grown({"group": [chain]}, {"group": [{"n": "x"}, {"n": "y"}]}, [], ["x", "y"]) == {
        "group": [chain, {"n": "x"}, {"n": "y"}]
    }


def test_an_addition_racing_the_last_result_either_grows_the_session_or_is_refused(manager: SessionManager) -> None:
    # The last node's result and an addition, from two threads at once, many times: the session
    # either ended with its one node (the addition refused, nothing added) or grew and runs on.
    grew = refused = 0
    for round_ in range(60):
        sid = manager.sync.create_session("race.canvas", 1, nodes=specs("a"))
        manager.sync._record_node(sid, "a", "running")
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def finish(session: str = sid, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            manager.sync.add_node_result(session, "a", 1)

        def grow(
            session: str = sid,
            name: str = f"x{round_}",
            barrier: threading.Barrier = barrier,
            errors: list[BaseException] = errors,
        ) -> None:
            barrier.wait()
            try:
                manager.sync.add_nodes(session, specs(name))
            except InvalidStateTransitionError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=finish), threading.Thread(target=grow)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        status = manager.sync.get_session_status(sid)
        if errors:
            refused += 1
            assert (status["status"], status["node_count"], status["completed_nodes"]) == ("completed", 1, 1)
            assert [n.node_id for n in manager.sync.get_nodes(sid).nodes] == ["a"]
        else:
            grew += 1
            assert (status["status"], status["node_count"], status["pending_nodes"]) == ("running", 2, 1)
            assert manager.sync.add_node_result(sid, f"x{round_}", 2)["status"] == SessionStatus.COMPLETED.value
    assert grew + refused == 60
