"""Child sessions through a real prefork worker: a task that dispatches a batch waits for it, and
takes its outcome; three levels deep; cancelled as a tree."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from celery import group

from tests.celery.appmod import nest, parent
from tests.celery.conftest import wait_for, wait_status
from tracker import NodeSpec, NodeStatus, SessionManager, TrackerValidationError
from tracker.celery import cancel_session, dispatch, maintain, resume_session
from tracker.storage.base import ChildLink
from tracker.storage.keys import KeySpace

ENDED = {"completed", "partial_failure", "failed", "cancelled"}


def only_child(manager: SessionManager, sid: str) -> str:
    (child,) = manager.sync.get_children(sid)
    return child.session_id


def test_a_parent_node_waits_for_its_child_session_and_completes_after_it(
    tracked: SessionManager, worker_process: Any
) -> None:
    # Given a batch of one task that dispatches a child batch of 3 slow tasks
    worker_process(concurrency=2)
    sid = dispatch(group([parent.s(3, sleep=0.3)]), canvas_path="parent.canvas", node_ids=["p"])
    # When its task has returned while the child still runs
    wait_for(lambda: len(tracked.sync.get_children(sid)) == 1, 30, "the child session")
    child = only_child(tracked, sid)
    wait_for(lambda: tracked.sync.get_nodes(sid).nodes[0].waiting, 30, "the parent task's success")
    # Then the parent node is running, waiting, and the parent session goes on
    status = tracked.sync.get_session_status(sid)
    assert (status["status"], status["running_nodes"], status["children"], status["children_open"]) == (
        "running", 1, 1, 1,
    )  # fmt: skip
    # Then the child completes, and the parent after it, with its task's own result
    child_status = wait_status(tracked, child, ENDED, timeout_s=30)
    assert (child_status["status"], child_status["parent_session_id"], child_status["parent_node_id"]) == (
        "completed", sid, "p",
    )  # fmt: skip
    status = wait_status(tracked, sid, ENDED, timeout_s=30)
    assert (status["status"], status["children_open"]) == ("completed", 0)
    (p,) = tracked.sync.get_nodes(sid).nodes
    assert (p.status, p.result, p.waiting) == (NodeStatus.COMPLETED, "parent done", False)
    assert status["finished_at"] >= child_status["finished_at"]


@pytest.mark.parametrize("child_failure", ["fail", "ignore"])
def test_a_child_that_fails_fails_its_parent_node_unless_ignored(
    tracked: SessionManager, worker_process: Any, child_failure: str
) -> None:
    worker_process(concurrency=2)
    sid = dispatch(group([parent.s(2, fail_child=True, child_failure=child_failure)]), canvas_path="p.canvas",
                   node_ids=["p"])  # fmt: skip
    status = wait_status(tracked, sid, ENDED, timeout_s=60)
    child = only_child(tracked, sid)
    assert tracked.sync.get_session_status(child)["status"] == "partial_failure"
    (p,) = tracked.sync.get_nodes(sid).nodes
    if child_failure == "ignore":
        assert (status["status"], p.status, p.result) == ("completed", NodeStatus.COMPLETED, "parent done")
    else:
        assert (status["status"], p.status) == ("failed", NodeStatus.FAILED)
        assert p.reason == f"child session {child} partial_failure"


def test_three_levels_end_from_the_bottom_up(tracked: SessionManager, worker_process: Any) -> None:
    worker_process(concurrency=2)
    top = dispatch(group([nest.s(2)]), canvas_path="level-2.canvas", node_ids=["n"])
    top_status = wait_status(tracked, top, ENDED, timeout_s=60)
    middle = only_child(tracked, top)
    bottom = only_child(tracked, middle)
    assert tracked.sync.get_children(bottom) == []
    statuses = [tracked.sync.get_session_status(s) for s in (bottom, middle)] + [top_status]
    assert [s["status"] for s in statuses] == ["completed"] * 3
    assert [(s["parent_session_id"], s["children"]) for s in statuses] == [(middle, 0), (top, 1), (None, 1)]
    assert statuses[0]["finished_at"] <= statuses[1]["finished_at"] <= statuses[2]["finished_at"]


def test_cancelling_a_parent_cancels_its_children(tracked: SessionManager, worker_process: Any) -> None:
    worker_process(concurrency=2)
    sid = dispatch(group([parent.s(6, sleep=1.0)]), canvas_path="p.canvas", node_ids=["p"])
    wait_for(lambda: len(tracked.sync.get_children(sid)) == 1, 30, "the child session")
    child = only_child(tracked, sid)
    cancel_session(sid)
    assert tracked.sync.get_session_status(sid)["status"] == "cancelled"
    assert tracked.sync.get_session_status(child)["status"] == "cancelled"
    (listed,) = tracked.sync.get_children(sid)
    assert listed.status == "cancelled"


def test_a_bad_parent_or_policy_is_refused_before_anything_is_sent(tracked: SessionManager) -> None:
    from tests.celery.appmod import work

    with pytest.raises(TrackerValidationError):
        dispatch(group([work.s(1)]), canvas_path="c.canvas", parent=("nope", "p"))
    with pytest.raises(TrackerValidationError):
        dispatch(group([work.s(1)]), canvas_path="c.canvas", child_failure="maybe")
    assert tracked.sync.list_sessions().sessions == []


def _waiting_parent(manager: SessionManager) -> tuple[str, str]:
    """A parent session whose node p's task succeeded after opening a child session (created, one
    node), as a worker leaves them; returns (parent, child)."""
    sid = manager.sync.create_session("p.canvas", 1, nodes=[NodeSpec(node_id="p")])
    manager.sync._record_node(sid, "p", "running", task_id="t-p", attempt=1)
    child = str(uuid.uuid4())
    manager.sync._record_nodes(sid, [manager.operations.child_event(sid, "p", ChildLink(child))])
    manager.sync.create_session("c.canvas", 1, session_id=child, parent=(sid, "p"))
    manager.sync.add_node_result(sid, "p", "mine", task_id="t-p", attempt=1)
    return sid, child


def test_maintain_tells_a_parent_the_end_nobody_told(tracked: SessionManager) -> None:
    # Given a child that ended by a call that did not tell its parent (the process died right after)
    from tests.celery.appmod import app

    sid, child = _waiting_parent(tracked)
    tracked.sync.add_node_result(child, "c0", 1)
    assert tracked.sync.get_session_status(child)["status"] == "completed"
    assert tracked.sync.get_session_status(sid)["status"] == "running"
    # When beat's upkeep runs
    counts = maintain(app, tracked)
    # Then the parent's node took the child's end, and the child is no longer watched
    assert counts["children"] == 1
    assert tracked.sync.get_session_status(sid)["status"] == "completed"
    assert tracked.sync.get_nodes(sid).nodes[0].result == "mine"
    assert tracked.sync._watched_children() == []
    assert maintain(app, tracked)["children"] == 0  # told once


def test_maintain_fails_the_node_of_a_child_that_is_gone_and_keeps_waiting_parents_alive(
    tracked: SessionManager, redis_url: str
) -> None:
    from tests.celery.appmod import app

    # Given two waiting parents: one whose child is still running, one whose child was removed
    running_parent, running_child = _waiting_parent(tracked)
    gone_parent, gone_child = _waiting_parent(tracked)
    tracked.sync.delete_session(gone_child)
    # When beat's upkeep runs
    maintain(app, tracked)
    # Then the node of the removed child failed, naming it
    (node,) = tracked.sync.get_nodes(gone_parent).nodes
    assert (node.status, node.reason) == (NodeStatus.FAILED, f"child session {gone_child} failed")
    # and the parent still waiting was kept alive (as a heartbeat keeps a running node's session)
    alive = redis.Redis.from_url(redis_url).hget(
        KeySpace(tracked.settings.key_prefix).session(running_parent).session, "alive_ms"
    )
    assert alive is not None
    assert [w.child_id for w in tracked.sync._watched_children()] == [running_child]


def test_resuming_a_parent_runs_its_failed_node_again_with_a_new_child(
    tracked: SessionManager, worker_process: Any
) -> None:
    # Given a parent node failed because its child's only task failed (on its first run only)
    from tests.celery.appmod import parent_of_flaky

    worker_process(concurrency=2)
    key = f"flaky-{uuid.uuid4().hex[:8]}"
    sid = dispatch(group([parent_of_flaky.s(key)]), canvas_path="p.canvas", node_ids=["p"])
    assert wait_status(tracked, sid, ENDED, timeout_s=60)["status"] == "failed"
    first = only_child(tracked, sid)
    # When the parent is resumed
    assert resume_session(sid) == 1
    # Then its task runs again and opens a new child (its task id is new), which completes, and so does the parent
    status = wait_status(tracked, sid, ENDED, timeout_s=60)
    children = {c.session_id: c.status for c in tracked.sync.get_children(sid)}
    assert status["status"] == "completed" and len(children) == 2
    assert children.pop(first) == "failed" and list(children.values()) == ["completed"]


def test_parent_none_opts_out_and_an_explicit_parent_links_a_batch_sent_from_elsewhere(
    tracked: SessionManager, worker_process: Any
) -> None:
    from tests.celery.appmod import work

    worker_process(concurrency=2)
    # A task that dispatches with parent=None: its batch is unrelated, its node completes at once
    sid = dispatch(group([parent.s(2, unrelated=True)]), canvas_path="p.canvas", node_ids=["p"])
    assert wait_status(tracked, sid, ENDED, timeout_s=30)["children"] == 0
    assert tracked.sync.get_children(sid) == []
    # A batch sent from here with parent=(session, node): that node waits for it
    other = tracked.sync.create_session("o.canvas", 1, nodes=[NodeSpec(node_id="n")])
    tracked.sync._record_node(other, "n", "running", task_id="t-n", attempt=1)
    child = dispatch(group([work.s(1)]), canvas_path="c.canvas", parent=(other, "n"))
    wait_status(tracked, child, ENDED, timeout_s=30)
    wait_for(lambda: tracked.sync.get_children(other)[0].status == "completed", 30, "the end told")
    assert tracked.sync.add_node_result(other, "n", "done", task_id="t-n", attempt=1)["status"] == "completed"


def test_a_child_the_tracker_refuses_is_never_opened_on_its_parent(
    tracked: SessionManager, worker_process: Any
) -> None:
    # A task whose child batch is refused (bad input) and goes on: its node must not wait for it
    from tests.celery.appmod import bad_child

    worker_process(concurrency=2)
    sid = dispatch(group([bad_child.s()]), canvas_path="p.canvas", node_ids=["p"])
    status = wait_status(tracked, sid, ENDED, timeout_s=30)
    assert (status["status"], status["children"]) == ("completed", 0)
    assert tracked.sync.get_nodes(sid).nodes[0].result == "refused"
