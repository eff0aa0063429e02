"""Child sessions through a real prefork worker: a task that dispatches a batch waits for it, and
takes its outcome; three levels deep; cancelled as a tree."""

from __future__ import annotations

from typing import Any

import pytest
from celery import group

from tests.celery.appmod import nest, parent
from tests.celery.conftest import wait_for, wait_status
from tracker import NodeStatus, SessionManager, TrackerValidationError
from tracker.celery import cancel_session, dispatch

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
