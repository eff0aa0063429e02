"""A session's canvas structure in the stores, against every adapter (in-memory and Redis).

A node that ends without completing marks ``skipped``, in the same store call, what Celery will
never run after it (tracker.structure.skips); an error callback with nothing to handle is skipped
too. A resume may name exactly the nodes to reset.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import FakeClock, make_store
from tests.trees import chain, chord, group, t, with_errbacks
from tracker import NodeSpec, NodeStatus, SessionManager, SessionStatus, TrackerSettings
from tracker.manager import SyncSessionManager
from tracker.models import NodeResult
from tracker.states import FAILED_NODE_STATUSES, finish_status, rederived_status
from tracker.storage.base import NodeEvent, ResumePlanChanged, SessionStorageAdapter
from tracker.structure import ERRBACK_NOT_NEEDED, Tree, depth, leaf_ids, links, skipped_reason

N = NodeStatus
S = SessionStatus


async def structured(manager: SessionManager, tree: Tree | None, ids: list[str] | None = None) -> str:
    """A session whose nodes are the tasks of ``tree`` (``ids``: without a structure)."""
    ids = ids if ids is not None else list(leaf_ids(tree or {}))
    specs = [NodeSpec(node_id=n, signature={"task": f"t.{n}"}) for n in ids]
    return await manager.create_session("structure.canvas", len(ids), nodes=specs, structure=tree)


async def nodes_of(manager: SessionManager, sid: str) -> dict[str, NodeResult]:
    return {n.node_id: n for n in (await manager.get_nodes(sid, limit=1000)).nodes}


async def statuses(manager: SessionManager, sid: str) -> dict[str, NodeStatus]:
    return {n: node.status for n, node in (await nodes_of(manager, sid)).items()}


async def node_events(manager: SessionManager, sid: str) -> list[tuple[str | None, NodeStatus | None]]:
    return [(e.node_id, e.node_status) for e in await manager.read_events(sid, limit=1000) if e.type == "node"]


def counted(found: dict[str, NodeStatus]) -> tuple[int, ...]:
    """(completed, failed, cancelled, skipped, running, retrying, lost) as the counters must say."""
    c = Counter(found.values())
    return (c[N.COMPLETED], c[N.FAILED] + c[N.LOST], c[N.CANCELLED], c[N.SKIPPED], c[N.RUNNING], c[N.RETRYING],
            c[N.LOST])  # fmt: skip


def counters(info: Any) -> tuple[int, ...]:
    return (info.completed_nodes, info.failed_nodes, info.cancelled_nodes, info.skipped_nodes, info.running_nodes,
            info.retrying_nodes, info.lost_nodes)  # fmt: skip


# -- chains -------------------------------------------------------------------------------------


async def test_a_failed_chain_link_skips_the_rest_in_the_same_call(manager: SessionManager) -> None:
    tree = chain("a", "b", "c")
    sid = await structured(manager, tree)
    assert await manager.get_structure(sid) == tree
    await manager._record_node(sid, "a", "completed", result=1)
    outcome = await manager._record_node(sid, "b", "failed")
    # The outcome of b's own call already counts c and ends the session
    info = outcome.session
    assert (info.completed_nodes, info.failed_nodes, info.skipped_nodes) == (1, 1, 1)
    assert info.status is S.PARTIAL_FAILURE
    assert outcome.finished is S.PARTIAL_FAILURE
    assert info.finished_at is not None and info.progress_percent == 100
    assert outcome.node.status is N.FAILED
    nodes = await nodes_of(manager, sid)
    assert {n: v.status for n, v in nodes.items()} == {"a": N.COMPLETED, "b": N.FAILED, "c": N.SKIPPED}
    assert nodes["c"].reason == "skipped: node b failed"
    assert nodes["c"].finished_at is not None
    # One node event for b, then one for c, after it
    assert await node_events(manager, sid) == [("a", N.COMPLETED), ("b", N.FAILED), ("c", N.SKIPPED)]
    last = [e for e in await manager.read_events(sid) if e.type == "node"][-1]
    assert last.status is S.PARTIAL_FAILURE
    assert counters(await manager.get_session(sid)) == counted({n: v.status for n, v in nodes.items()})


async def test_skipping_is_transitive_and_names_the_node_that_ended(manager: SessionManager) -> None:
    sid = await structured(manager, chain("a", "b", "c", "d"))
    outcome = await manager._record_node(sid, "a", "failed")
    assert outcome.session.skipped_nodes == 3
    assert outcome.session.status is S.FAILED  # nothing completed
    nodes = await nodes_of(manager, sid)
    assert [nodes[n].reason for n in "bcd"] == ["skipped: node a failed"] * 3
    assert await node_events(manager, sid) == [("a", N.FAILED), ("b", N.SKIPPED), ("c", N.SKIPPED), ("d", N.SKIPPED)]


async def test_a_batch_call_skips_in_that_call(manager: SessionManager) -> None:
    sid = await structured(manager, chain("a", "b", "c"))
    events = [NodeEvent("a", N.COMPLETED, "1"), NodeEvent("b", N.FAILED)]
    outcome = await manager._record_nodes(sid, events)
    assert outcome.session.skipped_nodes == 1
    assert outcome.finished is S.PARTIAL_FAILURE
    assert await node_events(manager, sid) == [("a", N.COMPLETED), ("b", N.FAILED), ("c", N.SKIPPED)]


async def test_a_running_successor_is_not_skipped(manager: SessionManager) -> None:
    sid = await structured(manager, chain("a", "b", "c"))
    await manager._record_node(sid, "b", "running")  # out of order: b started already
    outcome = await manager._record_node(sid, "a", "failed")
    assert outcome.session.skipped_nodes == 0
    assert await statuses(manager, sid) == {"a": N.FAILED, "b": N.RUNNING, "c": N.PENDING}


# -- chords -------------------------------------------------------------------------------------


async def test_a_failed_chord_header_task_skips_the_body_and_what_follows(manager: SessionManager) -> None:
    sid = await structured(manager, chain("x", chord(["a", "b", "c"], "d"), "y"))
    await manager._record_node(sid, "x", "completed", result=0)
    await manager._record_node(sid, "a", "running")
    outcome = await manager._record_node(sid, "b", "failed")
    assert outcome.session.skipped_nodes == 2
    assert outcome.session.status is S.RUNNING and outcome.finished is None  # a and c still to come
    nodes = await nodes_of(manager, sid)
    assert {n: v.status for n, v in nodes.items()} == {
        "x": N.COMPLETED, "a": N.RUNNING, "b": N.FAILED, "c": N.PENDING, "d": N.SKIPPED, "y": N.SKIPPED,
    }  # fmt: skip
    assert nodes["d"].reason == nodes["y"].reason == "skipped: node b failed"
    # The other header tasks still run and end the session
    await manager._record_node(sid, "a", "completed", result=1)
    last = await manager._record_node(sid, "c", "completed", result=2)
    assert last.finished is S.PARTIAL_FAILURE
    assert counters(last.session) == (3, 1, 0, 2, 0, 0, 0)


# -- error callbacks -----------------------------------------------------------------------------


async def test_an_error_callback_is_skipped_when_everything_it_handles_completed(manager: SessionManager) -> None:
    sid = await structured(manager, with_errbacks(chain("a", "b"), "h"))
    first = await manager._record_node(sid, "a", "completed", result=1)
    assert first.session.skipped_nodes == 0  # b may still fail
    outcome = await manager._record_node(sid, "b", "completed", result=2)
    assert outcome.session.skipped_nodes == 1
    assert outcome.finished is S.COMPLETED and outcome.succeeded
    nodes = await nodes_of(manager, sid)
    assert nodes["h"].status is N.SKIPPED
    assert nodes["h"].reason == ERRBACK_NOT_NEEDED
    assert await node_events(manager, sid) == [("a", N.COMPLETED), ("b", N.COMPLETED), ("h", N.SKIPPED)]


@pytest.mark.parametrize("status", ["failed", "lost"])
async def test_an_error_callback_is_not_skipped_when_a_node_it_handles_fails(
    manager: SessionManager, status: str
) -> None:
    sid = await structured(manager, with_errbacks(chain("a", "b"), "h"))
    await manager._record_node(sid, "a", "completed", result=1)
    outcome = await manager._record_node(sid, "b", status)
    assert outcome.session.skipped_nodes == 0
    assert outcome.session.status is S.RUNNING and outcome.finished is None  # Celery runs h
    assert (await statuses(manager, sid))["h"] is N.PENDING
    last = await manager._record_node(sid, "h", "completed")
    assert last.finished is S.PARTIAL_FAILURE


async def test_a_chord_body_error_callback_waits_for_a_failed_header_task(manager: SessionManager) -> None:
    # Celery calls the body's error callbacks when a header task fails: h will run.
    sid = await structured(manager, chord(["a", "b"], t("c", t("h"))))
    await manager._record_node(sid, "b", "completed", result=2)
    outcome = await manager._record_node(sid, "a", "failed")
    assert await statuses(manager, sid) == {"a": N.FAILED, "b": N.COMPLETED, "c": N.SKIPPED, "h": N.PENDING}
    assert outcome.session.status is S.RUNNING


# -- lost and cancelled ---------------------------------------------------------------------------


async def test_a_lost_node_skips_its_successors(manager: SessionManager) -> None:
    sid = await structured(manager, chain("a", "b", "c"))
    outcome = await manager._record_node(sid, "a", "lost", reason="worker vanished")
    assert (outcome.session.failed_nodes, outcome.session.lost_nodes, outcome.session.skipped_nodes) == (1, 1, 2)
    assert outcome.finished is S.FAILED
    nodes = await nodes_of(manager, sid)
    assert [nodes[n].reason for n in "bc"] == ["skipped: node a lost"] * 2


def test_a_reaped_node_skips_its_successors(store: SessionStorageAdapter, clock: FakeClock) -> None:
    worker = "celery@host-a:101"
    manager = SessionManager(storage=store, settings=TrackerSettings(worker_stale_after_s=30.0), clock=clock)
    specs = [NodeSpec(node_id=n) for n in "abc"]
    sid = manager.sync.create_session("structure.canvas", 3, nodes=specs, structure=chain("a", "b", "c"))
    manager.sync._record_node(sid, "a", "running", worker=worker)
    lost = []
    for _ in range(5):  # silent past the window, then past the grace
        clock.advance(31)
        lost += manager.sync.reap_lost_nodes()
    assert [o.node.node_id for o in lost] == ["a"]
    assert lost[0].session.skipped_nodes == 2
    nodes = {n.node_id: n for n in manager.sync.get_nodes(sid).nodes}
    assert [nodes[n].status for n in "abc"] == [N.LOST, N.SKIPPED, N.SKIPPED]
    assert nodes["b"].reason == "skipped: node a lost"
    assert manager.sync.get_session(sid).status is S.FAILED


async def test_a_cancelled_node_skips_the_rest_and_the_session_ends_cancelled(manager: SessionManager) -> None:
    sid = await structured(manager, chain("a", "b", "c"))
    outcome = await manager._record_node(sid, "a", "cancelled")
    assert (outcome.session.cancelled_nodes, outcome.session.skipped_nodes) == (1, 2)
    assert outcome.finished is S.CANCELLED
    assert outcome.session.status is S.CANCELLED
    nodes = await nodes_of(manager, sid)
    assert [nodes[n].reason for n in "bc"] == ["skipped: node a cancelled"] * 2


async def test_a_cancelled_node_after_a_completed_one_is_a_partial_failure(manager: SessionManager) -> None:
    sid = await structured(manager, chain("a", "b", "c"))
    await manager._record_node(sid, "a", "completed", result=1)
    outcome = await manager._record_node(sid, "b", "cancelled")
    assert counters(outcome.session) == (1, 0, 1, 1, 0, 0, 0)
    assert outcome.finished is S.PARTIAL_FAILURE


# -- without a structure ------------------------------------------------------------------------


async def test_a_session_without_structure_never_skips(manager: SessionManager) -> None:
    sid = await structured(manager, None, ids=["a", "b", "c"])
    assert await manager.get_structure(sid) is None
    await manager._record_node(sid, "a", "completed", result=1)
    outcome = await manager._record_node(sid, "b", "failed")
    await manager._record_node(sid, "b", "lost")
    await manager._record_node(sid, "b", "cancelled")
    assert outcome.session.skipped_nodes == 0
    assert (await statuses(manager, sid))["c"] is N.PENDING
    assert (await manager.get_session(sid)).status is S.RUNNING
    assert [n for n, _ in await node_events(manager, sid)] == ["a", "b", "b", "b"]


async def test_a_group_of_tasks_never_skips(manager: SessionManager) -> None:
    sid = await structured(manager, group("a", "b", "c"))
    outcome = await manager._record_node(sid, "a", "failed")
    assert outcome.session.skipped_nodes == 0
    assert await statuses(manager, sid) == {"a": N.FAILED, "b": N.PENDING, "c": N.PENDING}


# -- late results ---------------------------------------------------------------------------------


async def test_a_late_success_after_a_skip_keeps_the_counts_and_rederives_the_status(manager: SessionManager) -> None:
    sid = await structured(manager, chain("a", "b", "c"))
    await manager._record_node(sid, "a", "completed", result=1)
    failed = await manager._record_node(sid, "b", "failed")
    assert failed.session.status is S.PARTIAL_FAILURE
    assert (await statuses(manager, sid))["c"] is N.SKIPPED
    # b succeeds after all (a redelivery): it is completed; c stays skipped until it runs
    late = await manager._record_node(sid, "b", "completed", result=2)
    assert late.finished is None  # not a new end
    found = await statuses(manager, sid)
    assert found == {"a": N.COMPLETED, "b": N.COMPLETED, "c": N.SKIPPED}
    assert counters(late.session) == counted(found) == (2, 0, 0, 1, 0, 0, 0)
    # c may run yet (Celery follows the chain after b's success): not completed while c is skipped
    assert late.session.status is S.PARTIAL_FAILURE
    assert (await manager.get_session(sid)).status is S.PARTIAL_FAILURE
    last_event = (await manager.read_events(sid))[-1]
    assert (last_event.type, last_event.status) == ("node", S.PARTIAL_FAILURE)
    # c runs after all
    running = await manager._record_node(sid, "c", "running")
    assert running.node.status is N.SKIPPED  # a start never reopens a terminal node
    done = await manager._record_node(sid, "c", "completed", result=3)
    found = await statuses(manager, sid)
    assert found == {"a": N.COMPLETED, "b": N.COMPLETED, "c": N.COMPLETED}
    assert counters(done.session) == counted(found) == (3, 0, 0, 0, 0, 0, 0)
    assert done.session.status is S.COMPLETED


async def test_a_link_skipped_after_a_lost_parent_that_succeeds_late_then_fails_keeps_status_and_counts(
    manager: SessionManager,
) -> None:
    sid = await structured(manager, chain("a", "b"))
    lost = await manager._record_node(sid, "a", "lost", reason="worker gone")
    assert (lost.session.status, lost.session.skipped_nodes) == (S.FAILED, 1)
    late = await manager._record_node(sid, "a", "completed", result=1)
    assert late.session.status is S.PARTIAL_FAILURE  # b is skipped, and may run yet
    assert not late.succeeded
    failed = await manager._record_node(sid, "b", "failed")  # it ran after all, and failed
    assert (failed.session.status, failed.session.completed_nodes, failed.session.failed_nodes) == (
        S.PARTIAL_FAILURE, 1, 1)  # fmt: skip
    assert failed.session.skipped_nodes == 0
    assert counters(await manager.get_session(sid)) == counted(await statuses(manager, sid))


# -- resume with explicit nodes --------------------------------------------------------------------


async def test_resume_resets_exactly_the_nodes_named(manager: SessionManager) -> None:
    sid = await structured(manager, group(chain("a", "b", "c"), "d"))
    await manager._record_node(sid, "a", "completed", result=1)
    await manager._record_node(sid, "b", "failed")
    await manager._record_node(sid, "d", "failed")
    assert (await manager.get_session(sid)).status is S.PARTIAL_FAILURE
    before = await nodes_of(manager, sid)
    # retry_failed is not consulted: the nodes named are reset, failed or not; d is not named
    outcome = await manager._reopen_session(sid, retry_failed=False, nodes=["b", "c"])
    assert sorted(n.node_id for n in outcome.nodes) == ["b", "c"]
    assert all(n.task_id and n.task_id not in (before[n.node_id].task_id,) for n in outcome.nodes)
    assert {n.node_id: n.signature for n in outcome.nodes} == {"b": {"task": "t.b"}, "c": {"task": "t.c"}}
    assert outcome.previous_status is S.PARTIAL_FAILURE
    assert await statuses(manager, sid) == {"a": N.COMPLETED, "b": N.PENDING, "c": N.PENDING, "d": N.FAILED}
    info = outcome.session
    assert info.status is S.RUNNING and info.run == 2
    assert counters(info) == (1, 1, 0, 0, 0, 0, 0)
    assert counters(await manager.get_session(sid)) == counters(info)
    # and the structure still holds for the new run
    again = await manager._record_node(sid, "b", "failed")
    assert again.session.skipped_nodes == 1 and again.finished is S.PARTIAL_FAILURE


async def test_resume_with_a_completed_node_named_changes_nothing(manager: SessionManager) -> None:
    sid = await structured(manager, chain("a", "b", "c"))
    await manager._record_node(sid, "a", "completed", result=1)
    await manager._record_node(sid, "b", "failed")
    before = (await manager.get_session(sid), await nodes_of(manager, sid), await manager.read_events(sid))
    with pytest.raises(ResumePlanChanged):
        await manager._reopen_session(sid, nodes=["a", "b", "c"])
    after = (await manager.get_session(sid), await nodes_of(manager, sid), await manager.read_events(sid))
    assert after == before


async def test_resume_naming_a_node_twice_resets_it_once(manager: SessionManager) -> None:
    sid = await structured(manager, chain("a", "b", "c"))
    await manager._record_node(sid, "a", "completed", result=1)
    await manager._record_node(sid, "b", "failed")
    outcome = await manager._reopen_session(sid, nodes=["b", "c", "c"])
    assert sorted(n.node_id for n in outcome.nodes) == ["b", "c"]
    found = await statuses(manager, sid)
    assert counters(outcome.session) == counted(found) == (1, 0, 0, 0, 0, 0, 0)


async def test_a_node_named_like_a_structure_field_keeps_its_signature(manager: SessionManager) -> None:
    # Node ids may hold '@': a node "@tree" is a node like any other.
    tree = chain("@tree", "b")
    sid = await structured(manager, tree)
    assert await manager.get_structure(sid) == tree
    await manager._record_node(sid, "@tree", "failed")
    outcome = await manager._reopen_session(sid)
    assert {n.node_id: n.signature for n in outcome.nodes} == {"@tree": {"task": "t.@tree"}, "b": {"task": "t.b"}}


# -- properties ---------------------------------------------------------------------------------


def _shape_with_leaf_errback(children: st.SearchStrategy[Tree]) -> st.SearchStrategy[Tree]:
    return st.builds(lambda e: {"n": None, "e": [e]}, children)


def _extend(children: st.SearchStrategy[Tree]) -> st.SearchStrategy[Tree]:
    parts = st.lists(children, min_size=1, max_size=3)
    errbacks = st.lists(children, max_size=1)
    return st.one_of(
        st.builds(lambda p, e: {"chain": p, "e": e}, parts, errbacks),
        st.builds(lambda p, e: {"group": p, "e": e}, parts, errbacks),
        st.builds(lambda p, b, e: {"chord": p, "body": b, "e": e}, parts, children, errbacks),
        _shape_with_leaf_errback(children),
    )


def _numbered(shape: Tree, ids: Iterator[int]) -> Tree:
    """``shape`` as a fresh tree whose tasks are n0, n1, ... (empty error callback lists left out)."""
    out: Tree = {}
    if "n" in shape:
        out["n"] = f"n{next(ids)}"
    for key in ("chain", "group", "chord"):
        if key in shape:
            out[key] = [_numbered(part, ids) for part in shape[key]]
    if "body" in shape:
        out["body"] = _numbered(shape["body"], ids)
    if shape.get("e"):
        out["e"] = [_numbered(errback, ids) for errback in shape["e"]]
    return out


TREES = (
    st.recursive(st.builds(lambda: {"n": None}), _extend, max_leaves=12)
    .map(lambda shape: _numbered(shape, itertools.count()))
    .filter(lambda tree: depth(tree) <= 3 and len(list(leaf_ids(tree))) <= 12)
)
EVENTS = st.lists(st.tuples(st.integers(0, 11), st.sampled_from(list(NodeStatus))), min_size=1, max_size=30)


def _sync_statuses(manager: SyncSessionManager, sid: str) -> dict[str, NodeResult]:
    return {n.node_id: n for n in manager.get_nodes(sid, limit=1000).nodes}


@settings(max_examples=60, deadline=None)
@given(tree=TREES, events=EVENTS)
def test_both_stores_skip_alike_and_only_what_the_links_allow(
    redis_url: str, tree: Tree, events: list[tuple[int, NodeStatus]]
) -> None:
    ids = list(leaf_ids(tree))
    found = links(tree)
    before_of: dict[str, list[str]] = {}
    for parent, children in found.after.items():
        for child in children:
            before_of.setdefault(child, []).append(parent)
    stores = [make_store("memory", redis_url, ""), make_store("redis", redis_url, f"s{uuid.uuid4().hex[:10]}")]
    try:
        managers = [SessionManager(storage=store, settings=TrackerSettings()).sync for store in stores]
        sid = str(uuid.uuid4())
        for manager in managers:
            manager.create_session("prop.canvas", len(ids), nodes=[NodeSpec(node_id=n) for n in ids],
                                   session_id=sid, structure=tree)  # fmt: skip
        status = S.PENDING
        finishes = [0, 0]
        last_event = [manager.read_events(sid)[-1].id for manager in managers]
        before = {n: N.PENDING for n in ids}
        for index, incoming in events:
            node = ids[index % len(ids)]
            outcomes = [manager._record_node(sid, node, incoming) for manager in managers]
            nodes = [_sync_statuses(manager, sid) for manager in managers]
            after = {n: v.status for n, v in nodes[0].items()}
            # The same statuses in both stores, and counters that agree with them
            assert {n: v.status for n, v in nodes[1].items()} == after
            for manager, outcome in zip(managers, outcomes, strict=True):
                assert counters(outcome.session) == counted(after)
                assert counters(manager.get_session(sid)) == counted(after)
                for listed in (N.SKIPPED, N.PENDING):  # and the status index moved with them
                    page = manager.get_nodes(sid, listed, limit=len(ids))
                    assert [n.node_id for n in page.nodes] == sorted(n for n, v in after.items() if v is listed)
            completed, failed, cancelled, skipped, *_ = counted(after)
            unneeded = sum(v.status is N.SKIPPED and v.reason == ERRBACK_NOT_NEEDED for v in nodes[0].values())
            if status is S.PENDING:
                status = S.RUNNING
            if status is S.RUNNING:
                status = finish_status(completed, failed, cancelled, len(ids), skipped, unneeded) or status
            else:
                status = rederived_status(status, completed, failed, cancelled, len(ids), skipped, unneeded)
            for i, outcome in enumerate(outcomes):
                assert outcome.session.status is status
                finishes[i] += outcome.finished is not None
            # Every node skipped by this call was pending, and the links allow it
            marked = [n for n in ids if n != node and after[n] is N.SKIPPED and before[n] is not N.SKIPPED]
            for n in marked:
                assert before[n] is N.PENDING
                ended_before = [p for p in before_of.get(n, []) if after[p].is_terminal and after[p] is not N.COMPLETED]
                handled = found.handles.get(n)
                needless = handled is not None and all(
                    after[h].is_terminal and after[h] not in FAILED_NODE_STATUSES for h in handled
                )
                assert ended_before or needless, (n, after)
                for store_nodes in nodes:
                    reason = store_nodes[n].reason
                    assert reason == ERRBACK_NOT_NEEDED or reason == skipped_reason(node, after[node]), reason
            # What runs only after a node that just ended without completing is not left pending, nor
            # an error callback whose handled nodes all ended without failing
            changed = after[node] is not before[node] and after[node].is_terminal
            if changed and after[node] is not N.COMPLETED:
                assert all(after[child] is not N.PENDING for child in found.after.get(node, [])), after
            if changed and after[node] not in FAILED_NODE_STATUSES:
                for errback in found.errbacks.get(node, []):
                    handled_ended = all(
                        after[h].is_terminal and after[h] not in FAILED_NODE_STATUSES for h in found.handles[errback]
                    )
                    assert not handled_ended or after[errback] is not N.PENDING, (errback, after)
            # One node event for the node, then one per node it skipped, in both stores alike
            streams = []
            for i, manager in enumerate(managers):
                fresh = manager.read_events(sid, after=last_event[i], limit=1000)
                last_event[i] = fresh[-1].id
                streams.append([(e.node_id, e.node_status) for e in fresh if e.type == "node"])
            assert streams[0] == streams[1]
            assert streams[0][0] == (node, after[node])
            assert sorted(str(n) for n, _ in streams[0][1:]) == sorted(marked)
            assert all(s is N.SKIPPED for _, s in streams[0][1:])
            before = after
        assert finishes == ([1, 1] if status.is_terminal else [0, 0])
    finally:
        for store in stores:
            store.close()


async def test_an_error_callback_is_skipped_when_a_link_before_the_last_ends_last(manager: SessionManager) -> None:
    # Celery sends a chain's next link before the link's own outcome is recorded: the last link
    # may be recorded before the first one.
    sid = await structured(manager, with_errbacks(chain("a", "b", "c"), "h"))
    for node in ("c", "b"):
        outcome = await manager._record_node(sid, node, "completed", result=node)
        assert outcome.session.status is S.RUNNING
    last = await manager._record_node(sid, "a", "completed", result="a")
    assert (await statuses(manager, sid))["h"] is N.SKIPPED
    assert (last.session.status, last.finished) == (S.COMPLETED, S.COMPLETED)
