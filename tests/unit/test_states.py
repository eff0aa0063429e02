"""The state machine and the counting rules, as pure functions, with hypothesis properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tracker import VALID_TRANSITIONS, NodeStatus, SessionStatus, is_valid_transition
from tracker.states import (
    RESUMABLE_STATUSES,
    TERMINAL_STATUSES,
    allowed_from,
    finish_status,
    merge_node_status,
    progress_from_counts,
    rederived_status,
)

S = SessionStatus

#: The DESIGN table, written out independently of the code.
DESIGN_TABLE = {
    "pending": {"running", "cancelled", "failed"},
    "running": {"completed", "partial_failure", "failed", "cancelled"},
    "partial_failure": {"running", "completed", "failed"},
    "failed": {"running", "completed", "partial_failure"},
    "cancelled": {"running"},
    "completed": set(),
}


def test_transitions_are_exactly_the_design_table() -> None:
    assert {k.value: {v.value for v in vs} for k, vs in VALID_TRANSITIONS.items()} == DESIGN_TABLE


def test_status_values_are_the_seed_enum() -> None:
    assert [s.value for s in S] == ["pending", "running", "completed", "partial_failure", "failed", "cancelled"]
    assert S("running") is S.RUNNING
    assert S.RUNNING == "running"


@given(st.sampled_from([*S, "bogus"]), st.sampled_from([*S, "bogus"]))
def test_is_valid_transition_matches_the_table(a: str, b: str) -> None:
    expected = a in DESIGN_TABLE and b in DESIGN_TABLE[a]
    assert is_valid_transition(a, b) is expected


def test_resume_edges_are_left_out_of_plain_updates() -> None:
    assert allowed_from(S.RUNNING) == {S.PENDING}
    assert allowed_from(S.RUNNING, resume=True) == {S.PENDING, *RESUMABLE_STATUSES}
    assert {S.PARTIAL_FAILURE, S.FAILED, S.CANCELLED} == RESUMABLE_STATUSES
    assert allowed_from(S.CANCELLED) == {S.PENDING, S.RUNNING}
    assert all(s.is_terminal for s in TERMINAL_STATUSES)


def test_edges_between_ended_statuses_are_for_late_results_only() -> None:
    # A plain update never moves an ended session: only its counts do (rederived_status).
    assert allowed_from(S.COMPLETED) == {S.RUNNING}
    assert allowed_from(S.PARTIAL_FAILURE) == {S.RUNNING}
    assert allowed_from(S.FAILED) == {S.PENDING, S.RUNNING}


@given(st.sampled_from(list(S)), st.integers(0, 20), st.integers(0, 20), st.integers(0, 20), st.integers(1, 60))
def test_an_ended_status_always_agrees_with_its_counts(
    current: SessionStatus, completed: int, failed: int, cancelled: int, node_count: int
) -> None:
    result = rederived_status(current, completed, failed, cancelled, node_count)
    if current in (S.PENDING, S.RUNNING, S.CANCELLED, S.COMPLETED):
        assert result is current  # not ended (the finish rule ends it), ended by a user, or final
        return
    expected = finish_status(completed, failed, cancelled, node_count)
    if expected in (S.COMPLETED, S.PARTIAL_FAILURE, S.FAILED):
        assert result is expected
    else:
        assert result is current  # not every node has a result, or all were revoked
    # Every move it makes is an edge of the table
    assert result is current or is_valid_transition(current, result)


@given(
    st.integers(0, 50),
    st.integers(0, 50),
    st.integers(0, 50),
    st.integers(0, 50),
    st.integers(0, 50),
    st.integers(0, 3),
)
def test_finish_status(completed: int, failed: int, cancelled: int, skipped: int, unneeded: int, pending: int) -> None:
    unneeded = min(unneeded, skipped)
    node_count = completed + failed + cancelled + skipped + pending
    result = finish_status(completed, failed, cancelled, node_count, skipped, unneeded)
    if node_count == 0 or pending:
        assert result is None
    elif completed and completed + unneeded == node_count:
        assert result is S.COMPLETED
    elif cancelled and cancelled + skipped == node_count:
        assert result is S.CANCELLED
    elif completed == 0:
        assert result is S.FAILED
    else:
        assert result is S.PARTIAL_FAILURE
    if result is not None:
        assert result in VALID_TRANSITIONS[S.RUNNING]


def test_finish_status_examples() -> None:
    assert finish_status(3, 0, 0, 3) is S.COMPLETED
    assert finish_status(3, 0, 0, 4, skipped=1, unneeded=1) is S.COMPLETED  # an error callback nothing needed
    # a link skipped after its parent was lost, and the parent's late success: the link may run yet
    assert finish_status(3, 0, 0, 4, skipped=1) is S.PARTIAL_FAILURE
    assert finish_status(1, 1, 0, 4, skipped=2) is S.PARTIAL_FAILURE  # a chain link failed, the rest skipped
    assert finish_status(0, 1, 0, 3, skipped=2) is S.FAILED
    assert finish_status(0, 0, 1, 3, skipped=2) is S.CANCELLED  # the first link revoked
    assert finish_status(1, 0, 1, 3, skipped=1) is S.PARTIAL_FAILURE
    assert finish_status(2, 0, 0, 4, skipped=1) is None


@given(st.lists(st.sampled_from(list(NodeStatus)), min_size=1, max_size=30))
def test_merge_rules(events: list[NodeStatus]) -> None:
    status: NodeStatus | None = None
    for event in events:
        new = merge_node_status(status, event)
        if status is NodeStatus.COMPLETED:
            assert new is NodeStatus.COMPLETED  # completed is final
        elif status is not None and status.is_terminal and not event.is_terminal:
            assert new is status  # a start never reopens a result
        else:
            assert new is event  # otherwise the latest event wins
        status = new
    if NodeStatus.COMPLETED in events:
        assert status is NodeStatus.COMPLETED


def test_progress_rounding() -> None:
    assert progress_from_counts(1, 3) == 33.33
    assert progress_from_counts(2, 3) == 66.67
    assert progress_from_counts(0, 0) == 0
    assert progress_from_counts(7, 7) == 100


def test_stale_reports() -> None:
    from tracker.states import is_stale_report

    assert is_stale_report(NodeStatus.CANCELLED, "old", "new")
    assert is_stale_report(NodeStatus.FAILED, "old", "new")
    assert not is_stale_report(NodeStatus.COMPLETED, "old", "new")  # a success always counts
    assert not is_stale_report(NodeStatus.FAILED, "same", "same")
    assert not is_stale_report(NodeStatus.FAILED, None, "new")  # no task id: nothing to compare
    assert not is_stale_report(NodeStatus.RUNNING, "old", "new")
