"""``add_nodes`` through a real worker: work added to a running session from outside and from
inside its own task, and refused once the session ended (nothing sent)."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from celery import chain, group

from tests.celery.appmod import add, slow_ok, work
from tests.celery.conftest import wait_status
from tracker import InvalidStateTransitionError, NodeStatus, SessionManager, TrackerValidationError
from tracker.celery import add_nodes, dispatch


def test_nodes_added_to_a_running_session_run_and_it_ends_when_they_have(
    tracked: SessionManager, thread_worker: None
) -> None:
    # Given a running batch of one slow task
    sid = dispatch(group([slow_ok.s(1.0)]), canvas_path="grow.canvas", node_ids=["slow"])
    # When a chain and two tasks are added while it runs
    ids = add_nodes(sid, group(chain(add.s(1, 2), add.s(10)), work.s(7)), node_ids=["c1", "c2", "w"])
    assert ids == ["c1", "c2", "w"]
    # Then the session ends once all of them ran, each result in its node, the chain's fed along
    status = wait_status(tracked, sid, {"completed", "partial_failure", "failed"}, timeout_s=30)
    assert (status["status"], status["node_count"], status["completed_nodes"]) == ("completed", 4, 4)
    results = {n.node_id: n.result for n in tracked.sync.get_nodes(sid).nodes}
    assert results == {"slow": "ok", "c1": 3, "c2": 13, "w": 14}


def test_adding_to_an_ended_session_is_refused_and_sends_nothing(
    tracked: SessionManager, thread_worker: None, redis_url: str, celery_env: dict[str, str]
) -> None:
    sid = dispatch(group([work.s(1)]), canvas_path="grow.canvas", node_ids=["w"])
    wait_status(tracked, sid, {"completed"}, timeout_s=30)
    before = tracked.sync.get_session_status(sid)
    with pytest.raises(InvalidStateTransitionError, match="nodes can no longer be added"):
        add_nodes(sid, work.s(2), node_ids=["late"])
    assert tracked.sync.get_session_status(sid) == before
    assert redis.Redis.from_url(redis_url).llen(celery_env["TRACKER_TEST_QUEUE"]) == 0


def test_add_nodes_outside_a_task_needs_the_session(tracked: SessionManager) -> None:
    with pytest.raises(TrackerValidationError, match="name the session"):
        add_nodes(work.s(1))


def test_a_task_adds_work_to_its_own_session(tracked: SessionManager, worker_process: Any) -> None:
    # Given a prefork worker and a batch of one task that, as it runs, finds 3 more things to do
    from tests.celery.appmod import crawl

    worker_process(concurrency=2)
    sid = dispatch(group([crawl.s(3)]), canvas_path="crawl.canvas", node_ids=["root"])
    # Then the session grows by 3 nodes and completes when they have run, each once
    status = wait_status(tracked, sid, {"completed", "partial_failure", "failed"}, timeout_s=60)
    assert (status["status"], status["node_count"], status["completed_nodes"]) == ("completed", 4, 4)
    nodes = tracked.sync.get_nodes(sid).nodes
    assert sorted(n.result for n in nodes if n.node_id != "root") == [0, 2, 4]
    assert all(n.status is NodeStatus.COMPLETED for n in nodes)
