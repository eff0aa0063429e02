"""Hypothesis properties of the counting rules, checked against every adapter.

A plain Python model (``merge_node_status`` + ``finish_status``) says what the counters and the
status must be after any sequence of node events; both adapters must agree with it exactly.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import by_status, make_store
from tracker import NodeStatus, SessionManager, SessionStatus, TrackerSettings
from tracker.states import finish_status, merge_node_status, rederived_status

EVENTS = st.lists(st.tuples(st.integers(0, 7), st.sampled_from(list(NodeStatus))), min_size=1, max_size=40)


@pytest.mark.parametrize("kind", ["memory", "redis"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(node_count=st.integers(1, 8), events=EVENTS)
def test_counters_follow_the_model(
    kind: str, redis_url: str, node_count: int, events: list[tuple[int, NodeStatus]]
) -> None:
    store = make_store(kind, redis_url, f"p{uuid.uuid4().hex[:10]}")
    manager = SessionManager(storage=store, settings=TrackerSettings())
    try:
        sid = manager.sync.create_session("prop.canvas", node_count)
        model: dict[int, NodeStatus] = {}
        status = SessionStatus.PENDING
        finishes = 0
        for node, event in events:
            if node >= node_count:
                continue
            outcome = manager.sync._record_node(sid, f"n{node}", event)
            model[node] = merge_node_status(model.get(node), event)
            completed = sum(s is NodeStatus.COMPLETED for s in model.values())
            failed = sum(s in {NodeStatus.FAILED, NodeStatus.LOST} for s in model.values())
            cancelled = sum(s is NodeStatus.CANCELLED for s in model.values())
            skipped = sum(s is NodeStatus.SKIPPED for s in model.values())
            running = sum(s is NodeStatus.RUNNING for s in model.values())
            retrying = sum(s is NodeStatus.RETRYING for s in model.values())
            info = outcome.session
            assert (
                info.completed_nodes, info.failed_nodes, info.cancelled_nodes, info.skipped_nodes, info.running_nodes,
                info.retrying_nodes,
            ) == (completed, failed, cancelled, skipped, running, retrying)  # fmt: skip
            assert info.completed_nodes + info.failed_nodes <= info.node_count
            if status is SessionStatus.PENDING:
                status = SessionStatus.RUNNING
            if status is SessionStatus.RUNNING:
                status = finish_status(completed, failed, cancelled, node_count, skipped) or status
            else:  # an ended status follows late results
                status = rederived_status(status, completed, failed, cancelled, node_count, skipped)
            assert info.status is status
            finishes += outcome.finished is not None
            assert outcome.node.status is model[node]
        assert finishes == (1 if status.is_terminal else 0)
        assert manager.sync.get_session_status(sid)["status"] == status.value
        # and the nodes listed by status, two at a time, are exactly the model's, each page full
        for wanted in NodeStatus:
            assert by_status(manager, sid, wanted, 2) == sorted(f"n{n}" for n, s in model.items() if s is wanted)
    finally:
        store.close()
