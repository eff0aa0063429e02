"""``report_progress`` from inside a task: through a real prefork worker, and its checks.

How the writer queues reports (once per node per flush, written behind) is in test_writer.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from celery import Celery, group

from tests.celery.appmod import steps
from tests.celery.conftest import wait_for, wait_status
from tracker import SessionManager, TrackerValidationError
from tracker.celery import dispatch, report_progress


def test_report_progress_outside_a_tracked_task_does_nothing() -> None:
    assert report_progress(3, 10) is False  # no task at all
    app = Celery("untracked", set_as_current=False)

    @app.task
    def plain() -> bool:
        return report_progress(0.5)

    assert plain.apply().get() is False  # a task that is not a node of a tracked session


@pytest.mark.parametrize(
    ("done", "total"), [(-1, 10), (11, 10), (1, 0), (1, -5), (float("nan"), None), (1.5, None), ("3", 10), (1, True)]
)
def test_report_progress_refuses_bad_numbers(done: Any, total: Any) -> None:
    with pytest.raises(TrackerValidationError):
        report_progress(done, total)


def test_a_long_task_on_a_prefork_worker_shows_its_progress_while_it_runs(
    tracked: SessionManager, worker_process: Any, redis_url: str
) -> None:
    # Given two 4-step tasks on a prefork worker, each waiting at every step for the test's word
    worker_process(concurrency=2)
    client = redis.Redis.from_url(redis_url)
    gate_a, gate_b = f"gate-a-{tracked.settings.key_prefix}", f"gate-b-{tracked.settings.key_prefix}"
    sid = dispatch(group(steps.s(4, gate_a), steps.s(4, gate_b)), canvas_path="steps.canvas", node_ids=["a", "b"])

    def progress_of(nid: str) -> float | None:
        return next((n.progress for n in tracked.sync.get_nodes(sid).nodes if n.node_id == nid), None)

    # When a has done one step of four and b three
    client.set(gate_a, 1)
    client.set(gate_b, 3)
    # Then, while both still run, their fractions are in the store and in the session's progress
    wait_for(lambda: (progress_of("a"), progress_of("b")) == (0.25, 0.75), 30, "both reports")
    status = tracked.sync.get_session_status(sid)
    assert (status["status"], status["running_nodes"], status["progress_percent"]) == ("running", 2, 50.0)
    # When a finishes and b does its last step
    client.set(gate_a, 4)
    client.set(gate_b, 4)
    # Then the session completes at 100 %, each node a whole one with no fraction left
    status = wait_status(tracked, sid, {"completed", "partial_failure", "failed"}, timeout_s=30)
    assert (status["status"], status["progress_percent"], status["completed_nodes"]) == ("completed", 100.0, 2)
    assert [n.progress for n in tracked.sync.get_nodes(sid).nodes] == [None, None]
    client.close()
