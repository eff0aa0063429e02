"""A node whose task opened child sessions ends with them: every test runs against every adapter.

The children are told to the parent session by two node events of its own (opened, ended), as the
Celery glue sends them; the child sessions themselves are not needed here.
"""

from __future__ import annotations

import uuid

import pytest

from tracker import NodeSpec, NodeStatus, SessionManager, SessionStatus, TrackerValidationError
from tracker.storage.base import ChildLink

S = SessionStatus


def child_id() -> str:
    return str(uuid.uuid4())


async def tell(manager: SessionManager, sid: str, node_id: str, link: ChildLink) -> None:
    await manager._record_nodes(sid, [manager.operations.child_event(sid, node_id, link)])


async def running_parent(manager: SessionManager, nodes: int = 1) -> str:
    sid = await manager.create_session("parent.canvas", nodes, nodes=[NodeSpec(node_id=f"p{i}") for i in range(nodes)])
    await manager._record_node(sid, "p0", "running", task_id="t-p0", attempt=1)
    return sid


async def test_a_node_waits_for_its_child_and_takes_its_success(manager: SessionManager) -> None:
    # Given a running node whose task opened a child session
    sid = await running_parent(manager)
    child = child_id()
    await tell(manager, sid, "p0", ChildLink(child))
    status = await manager.get_session_status(sid)
    assert (status["children"], status["children_open"]) == (1, 1)
    # When its task succeeds while the child runs
    done = await manager.add_node_result(sid, "p0", {"rows": 3}, task_id="t-p0", attempt=1)
    # Then the node stays running, its result kept, and the session goes on
    assert (done["status"], done["running_nodes"], done["completed_nodes"]) == ("running", 1, 0)
    (p0,) = (await manager.get_nodes(sid)).nodes
    assert (p0.status, p0.waiting, p0.result) == (NodeStatus.RUNNING, True, {"rows": 3})
    # When the child completes
    await tell(manager, sid, "p0", ChildLink(child, S.COMPLETED))
    # Then the node completes with its task's result, and the session with it
    status = await manager.get_session_status(sid)
    assert (status["status"], status["completed_nodes"], status["children_open"]) == ("completed", 1, 0)
    (p0,) = (await manager.get_nodes(sid)).nodes
    assert (p0.status, p0.waiting, p0.result) == (NodeStatus.COMPLETED, False, {"rows": 3})


@pytest.mark.parametrize("ended", [S.FAILED, S.PARTIAL_FAILURE, S.CANCELLED])
@pytest.mark.parametrize("policy", ["fail", "ignore"])
async def test_a_child_that_did_not_complete_fails_its_node_unless_ignored(
    manager: SessionManager, ended: SessionStatus, policy: str
) -> None:
    sid = await running_parent(manager)
    child = child_id()
    await tell(manager, sid, "p0", ChildLink(child, policy=policy))
    await manager.add_node_result(sid, "p0", 1, task_id="t-p0", attempt=1)
    await tell(manager, sid, "p0", ChildLink(child, ended))
    (p0,) = (await manager.get_nodes(sid)).nodes
    if policy == "ignore":
        assert (p0.status, p0.result) == (NodeStatus.COMPLETED, 1)
    else:
        assert p0.status is NodeStatus.FAILED
        assert p0.reason == f"child session {child} {ended.value}"
    assert (await manager.get_session_status(sid))["status"] == ("completed" if policy == "ignore" else "failed")


async def test_children_that_end_before_the_task_decide_at_its_success(manager: SessionManager) -> None:
    sid = await running_parent(manager, 2)
    await manager._record_node(sid, "p1", "running", task_id="t-p1", attempt=1)
    ok, bad = child_id(), child_id()
    await tell(manager, sid, "p0", ChildLink(ok))
    await tell(manager, sid, "p1", ChildLink(bad))
    await tell(manager, sid, "p0", ChildLink(ok, S.COMPLETED))
    await tell(manager, sid, "p1", ChildLink(bad, S.FAILED))
    await manager.add_node_result(sid, "p0", "a", task_id="t-p0", attempt=1)
    status = await manager.add_node_result(sid, "p1", "b", task_id="t-p1", attempt=1)
    assert (status["status"], status["completed_nodes"], status["failed_nodes"]) == ("partial_failure", 1, 1)
    nodes = {n.node_id: n for n in (await manager.get_nodes(sid)).nodes}
    assert nodes["p1"].reason == f"child session {bad} failed"


async def test_a_node_waits_for_every_child_and_each_is_told_once(manager: SessionManager) -> None:
    sid = await running_parent(manager)
    first, second = child_id(), child_id()
    for link in (ChildLink(first), ChildLink(first), ChildLink(second)):  # opened twice: a redelivered task
        await tell(manager, sid, "p0", link)
    await manager.add_node_result(sid, "p0", 1, task_id="t-p0", attempt=1)
    await tell(manager, sid, "p0", ChildLink(first, S.COMPLETED))
    await tell(manager, sid, "p0", ChildLink(first, S.COMPLETED))  # told twice: the same end
    status = await manager.get_session_status(sid)
    assert (status["status"], status["children"], status["children_open"]) == ("running", 2, 1)
    await tell(manager, sid, "p0", ChildLink(second, S.COMPLETED))
    assert (await manager.get_session_status(sid))["status"] == "completed"


async def test_only_the_latest_attempts_children_count(manager: SessionManager) -> None:
    # Given an attempt that opened a child, then failed and was retried
    sid = await running_parent(manager)
    await tell(manager, sid, "p0", ChildLink(child_id(), attempt=1))
    await manager._record_node(sid, "p0", "retrying", task_id="t-p0", attempt=1)
    await manager._record_node(sid, "p0", "running", task_id="t-p0", attempt=2)
    # When the second attempt succeeds without opening any
    status = await manager.add_node_result(sid, "p0", 2, task_id="t-p0", attempt=2)
    # Then the node completes: the first attempt's child does not hold it
    assert (status["status"], status["children_open"]) == ("completed", 1)


async def test_a_task_that_fails_fails_its_node_whatever_its_children(manager: SessionManager) -> None:
    sid = await running_parent(manager)
    await tell(manager, sid, "p0", ChildLink(child_id()))
    status = await manager.add_node_result(sid, "p0", status="failed", error=ValueError("no"), task_id="t-p0")
    assert (status["status"], status["failed_nodes"]) == ("failed", 1)


@pytest.mark.parametrize(
    "link",
    [ChildLink("not-a-uuid"), ChildLink(str(uuid.uuid4()), policy="maybe"), ChildLink(str(uuid.uuid4()), S.RUNNING),
     ChildLink(str(uuid.uuid4()), attempt=0)],
)  # fmt: skip
async def test_bad_child_links_are_refused(manager: SessionManager, link: ChildLink) -> None:
    sid = await running_parent(manager)
    with pytest.raises(TrackerValidationError):
        manager.operations.child_event(sid, "p0", link)


async def test_a_child_is_listed_by_its_parent_and_watched_until_told(manager: SessionManager) -> None:
    # Given a parent node whose task opens a child session
    sid = await running_parent(manager)
    child = child_id()
    await tell(manager, sid, "p0", ChildLink(child, policy="ignore"))
    created = await manager.create_session("child.canvas", 1, session_id=child, parent=(sid, "p0"))
    # Then the parent lists it, the child names its parent, and it is watched
    (listed,) = await manager.get_children(sid)
    assert (listed.session_id, listed.node_id, listed.child_failure, listed.status) == (child, "p0", "ignore", "open")
    status = await manager.get_session_status(created)
    assert (status["parent_session_id"], status["parent_node_id"]) == (sid, "p0")
    (watch,) = await manager._watched_children()
    assert watch == (child, sid, "p0")
    # When its end is told, it is listed so, and no longer watched once unwatched
    await tell(manager, sid, "p0", ChildLink(child, S.FAILED))
    assert [c.status for c in await manager.get_children(sid)] == ["failed"]
    await manager._unwatch_child(watch)
    assert await manager._watched_children() == []
    assert await manager.get_children(child) == []


async def test_a_bad_parent_is_refused(manager: SessionManager) -> None:
    with pytest.raises(TrackerValidationError):
        await manager.create_session("child.canvas", 1, parent=("not-a-session", "p0"))
    with pytest.raises(TrackerValidationError):
        await manager.create_session("child.canvas", 1, parent=(child_id(), "bad node"))
    assert await manager._watched_children() == []


async def test_a_resumed_node_waits_only_for_the_children_its_new_run_opens(manager: SessionManager) -> None:
    # Given a node failed by its child, then resumed (its task runs again, at attempt 1 again)
    sid = await running_parent(manager)
    first, second = child_id(), child_id()
    await tell(manager, sid, "p0", ChildLink(first))
    await manager.add_node_result(sid, "p0", 1, task_id="t-p0", attempt=1)
    await tell(manager, sid, "p0", ChildLink(first, S.FAILED))
    assert (await manager.get_session_status(sid))["status"] == "failed"
    (reset,) = (await manager._reopen_session(sid)).nodes
    await manager._record_node(sid, "p0", "running", task_id=reset.task_id, attempt=1)
    # When the new run opens a child that completes
    await tell(manager, sid, "p0", ChildLink(second))
    await manager.add_node_result(sid, "p0", 2, task_id=reset.task_id, attempt=1)
    await tell(manager, sid, "p0", ChildLink(second, S.COMPLETED))
    # Then the node completes: the first run's failed child no longer counts
    status = await manager.get_session_status(sid)
    assert (status["status"], status["children"], status["children_open"]) == ("completed", 2, 0)


async def test_a_progress_report_does_not_touch_a_node_waiting_for_its_children(manager: SessionManager) -> None:
    # Given a node whose task succeeded and waits for its child
    sid = await running_parent(manager)
    child = child_id()
    await tell(manager, sid, "p0", ChildLink(child))
    await manager.add_node_result(sid, "p0", "kept", task_id="t-p0", attempt=1)
    # When a report of that task comes late (a duplicate delivery still running, say)
    report = manager.operations.node_event(sid, "p0", "running", task_id="t-p0", attempt=1, progress=0.5)
    await manager._record_nodes(sid, [report])
    # Then the node still waits, keeps the result, and completes with its child
    (p0,) = (await manager.get_nodes(sid)).nodes
    assert (p0.waiting, p0.result, p0.progress) == (True, "kept", None)
    await tell(manager, sid, "p0", ChildLink(child, S.COMPLETED))
    (p0,) = (await manager.get_nodes(sid)).nodes
    assert (p0.status, p0.result) == (NodeStatus.COMPLETED, "kept")
