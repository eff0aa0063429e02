"""A running node's progress, as its task reports it: every test runs against every adapter."""

from __future__ import annotations

import math

import pytest

from tests.contract.test_storage_contract import new_session
from tracker import NodeStatus, SessionManager, SessionStatus, TrackerValidationError
from tracker.states import progress_from_counts, progress_units


async def report(manager: SessionManager, sid: str, node_id: str, fraction: float, **details: object) -> None:
    event = manager.operations.node_event(sid, node_id, "running", progress=fraction, **details)  # type: ignore[arg-type]
    await manager._record_nodes(sid, [event])


async def test_running_nodes_fractions_count_in_the_session_progress(manager: SessionManager) -> None:
    sid = await new_session(manager, 4)
    await manager._record_node(sid, "a", "running", task_id="t-a", attempt=1)
    await manager._record_node(sid, "b", "running", task_id="t-b", attempt=1)
    await report(manager, sid, "a", 0.5, task_id="t-a", attempt=1)
    assert (await manager.get_session_status(sid))["progress_percent"] == 12.5
    await report(manager, sid, "b", 0.25, task_id="t-b", attempt=1)
    await report(manager, sid, "a", 0.75, task_id="t-a", attempt=1)  # replaces a's 0.5
    status = await manager.get_session_status(sid)
    assert status["progress_percent"] == 25.0
    assert (status["running_nodes"], status["completed_nodes"], status["status"]) == (2, 0, "running")
    nodes = {node.node_id: node for node in (await manager.get_nodes(sid, "running")).nodes}
    assert (nodes["a"].progress, nodes["b"].progress) == (0.75, 0.25)

    # The result replaces the fraction: a is one whole node now, its progress gone.
    done = await manager.add_node_result(sid, "a", {"ok": True}, task_id="t-a", attempt=1)
    assert done["progress_percent"] == 31.25
    (a,) = (await manager.get_nodes(sid, "completed")).nodes
    assert (a.status, a.progress) == (NodeStatus.COMPLETED, None)
    # A failed attempt waiting for its retry is not running: its fraction leaves the sum.
    await manager._record_node(sid, "b", "retrying", task_id="t-b", attempt=1, error=RuntimeError("flaky"))
    assert (await manager.get_session_status(sid))["progress_percent"] == 25.0


async def test_a_report_that_is_not_of_the_running_attempt_changes_nothing(manager: SessionManager) -> None:
    sid = await new_session(manager, 3)
    await manager._record_node(sid, "a", "running", task_id="t-a", attempt=2)
    await manager.add_node_result(sid, "b", 1, task_id="t-b")
    before = await manager.get_session_status(sid)
    events_before = len(await manager.read_events(sid, limit=1000))
    await report(manager, sid, "a", 0.5, task_id="t-a", attempt=1)  # a retry replaced that attempt
    await report(manager, sid, "a", 0.5, task_id="t-other", attempt=2)  # a resume replaced that task
    await report(manager, sid, "b", 0.5, task_id="t-b")  # late: b has its result
    await report(manager, sid, "c", 0.5)  # never started
    assert await manager.get_session_status(sid) == before
    assert len(await manager.read_events(sid, limit=1000)) == events_before
    assert [n.node_id for n in (await manager.get_nodes(sid)).nodes] == ["a", "b"]
    outcome = await manager._record_node(sid, "c", "running", progress=0.5)
    assert (outcome.node.status, outcome.previous_node_status) == (NodeStatus.PENDING, None)


async def test_the_fraction_of_a_node_cancelled_while_running_leaves_the_sum(manager: SessionManager) -> None:
    sid = await new_session(manager, 2)
    await manager._record_node(sid, "a", "running", task_id="t-a", attempt=1)
    await report(manager, sid, "a", 0.5, task_id="t-a", attempt=1)
    assert (await manager.get_session_status(sid))["progress_percent"] == 25.0
    cancelled = await manager.update_status(sid, SessionStatus.CANCELLED)
    # a, cancelled while running, is one whole node ended: its half is not counted as well (75 %).
    assert (cancelled["cancelled_nodes"], cancelled["progress_percent"]) == (1, 50.0)


async def test_a_start_after_a_report_begins_again_at_zero(manager: SessionManager) -> None:
    sid = await new_session(manager, 1)
    await manager._record_node(sid, "a", "running", task_id="t-a", attempt=1)
    await report(manager, sid, "a", 0.8, task_id="t-a", attempt=1)
    await manager._record_node(sid, "a", "retrying", task_id="t-a", attempt=1)
    await manager._record_node(sid, "a", "running", task_id="t-a", attempt=2)
    status = await manager.get_session_status(sid)
    assert (status["progress_percent"], status["running_nodes"]) == (0.0, 1)
    await report(manager, sid, "a", 0.1, task_id="t-a", attempt=2)
    assert (await manager.get_session_status(sid))["progress_percent"] == 10.0


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf, "half", True, None.__class__])
async def test_a_bad_fraction_is_refused_before_anything_changes(manager: SessionManager, bad: object) -> None:
    sid = await new_session(manager, 1)
    await manager._record_node(sid, "a", "running")
    before = await manager.get_session_status(sid)
    with pytest.raises(TrackerValidationError):
        manager.operations.node_event(sid, "a", "running", progress=bad)  # type: ignore[arg-type]
    assert await manager.get_session_status(sid) == before


async def test_only_a_running_node_reports_progress(manager: SessionManager) -> None:
    sid = await new_session(manager, 1)
    with pytest.raises(TrackerValidationError, match="only a running node"):
        manager.operations.node_event(sid, "a", "completed", progress=0.5)


def test_progress_formula_matches_whole_nodes_and_rounds_half_up() -> None:
    assert progress_from_counts(1, 4, progress_units(0.5)) == 37.5
    assert progress_from_counts(0, 3, progress_units(1 / 3)) == 11.11
    assert progress_from_counts(2, 2, 0) == 100.0
    assert progress_units(0.33335) == 3334
