"""On a real worker: failures by cause and a resume of one cause or of chosen nodes, the ETA of a
batch of known duration, and sessions found by tag and canvas path prefix."""

from __future__ import annotations

import time
import uuid
from datetime import datetime

import pytest
import redis
from celery import chain, group

from tests.celery.appmod import app, fails_as, work
from tests.celery.conftest import wait_for, wait_status
from tracker import SessionManager, TrackerValidationError
from tracker.celery import dispatch, resume_session
from tracker.errors import ResumeNotPossibleError

TERMINAL = {"completed", "failed", "partial_failure", "cancelled"}


def runs(redis_url: str, key: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.get(key) or 0)
    finally:
        client.close()


def test_resume_of_one_cause_re_runs_only_those_nodes_and_what_follows(
    tracked: SessionManager, thread_worker: None, redis_url: str
) -> None:
    # Given a batch whose first runs fail: three nodes time out (one of them a chain's first link),
    # one raises ValueError
    k = uuid.uuid4().hex
    canvas = group(
        fails_as.si(f"{k}-t1", "TimeoutError"),
        fails_as.si(f"{k}-t2", "TimeoutError"),
        fails_as.si(f"{k}-v1", "ValueError"),
        work.si(1),
        chain(fails_as.si(f"{k}-t3", "TimeoutError"), work.si(5)),
    )
    ids = ["t1", "t2", "v1", "w1", "t3", "w5"]
    sid = dispatch(canvas, canvas_path="jobs/causes.canvas", node_ids=ids, app=app)
    status = wait_status(tracked, sid, TERMINAL)
    assert (status["status"], status["completed_nodes"], status["failed_nodes"], status["skipped_nodes"]) == (
        "partial_failure", 1, 4, 1,
    )  # fmt: skip

    # Then its failures are grouped by cause
    failures = tracked.sync.get_failures(sid)
    assert [(g.error_type, g.count, sorted(g.node_ids)) for g in failures] == [  # ids in the order they failed
        ("TimeoutError", 3, ["t1", "t2", "t3"]),
        ("ValueError", 1, ["v1"]),
    ]
    assert failures[0].first_message.startswith("TimeoutError in ")
    assert status["failure_types"] == 2

    # When only the timeouts are resumed
    assert resume_session(sid, app=app, error_type="TimeoutError") == 4  # t1, t2, t3 and w5 after t3
    status = wait_status(tracked, sid, TERMINAL)

    # Then they (and the link after t3) ran again; the ValueError node kept its result, unrun
    assert (status["status"], status["completed_nodes"], status["failed_nodes"], status["skipped_nodes"]) == (
        "partial_failure", 5, 1, 0,
    )  # fmt: skip
    assert [runs(redis_url, f"{k}-{n}") for n in ("t1", "t2", "t3", "v1")] == [2, 2, 2, 1]
    assert [(g.error_type, g.count) for g in tracked.sync.get_failures(sid)] == [("ValueError", 1)]
    assert status["failure_types"] == 1 and status["run"] == 2


def test_resume_of_chosen_nodes_and_bad_subsets(tracked: SessionManager, thread_worker: None, redis_url: str) -> None:
    k = uuid.uuid4().hex
    canvas = group(fails_as.si(f"{k}-a", "ValueError"), fails_as.si(f"{k}-b", "ValueError"), work.si(3))
    sid = dispatch(canvas, canvas_path="chosen.canvas", node_ids=["a", "b", "c"], app=app)
    wait_status(tracked, sid, TERMINAL)
    before = tracked.sync.get_session_status(sid)

    # Bad subsets are refused before anything changes
    for bad in ({"nodes": ["nope"]}, {"nodes": ["c"]}, {"error_type": "KeyError"}, {"nodes": ["a"], "error_type": "x"}):
        with pytest.raises(ResumeNotPossibleError):
            resume_session(sid, app=app, **bad)  # type: ignore[arg-type]
    for malformed in ({"nodes": "a"}, {"nodes": []}, {"nodes": ["no spaces"]}):
        with pytest.raises(TrackerValidationError):
            resume_session(sid, app=app, **malformed)  # type: ignore[arg-type]
    assert tracked.sync.get_session_status(sid) == before

    # A chosen node runs again; the other failed one keeps its failure
    assert resume_session(sid, app=app, nodes=["a"]) == 1
    status = wait_status(tracked, sid, TERMINAL)
    assert (status["completed_nodes"], status["failed_nodes"]) == (2, 1)
    assert (runs(redis_url, f"{k}-a"), runs(redis_url, f"{k}-b")) == (2, 1)


def test_a_chord_header_node_cannot_run_again_without_its_failed_siblings(
    tracked: SessionManager, thread_worker: None
) -> None:
    k = uuid.uuid4().hex
    from celery import chord

    from tests.celery.appmod import total

    canvas = chord([fails_as.si(f"{k}-a", "ValueError"), fails_as.si(f"{k}-b", "TimeoutError")], total.s())
    sid = dispatch(canvas, canvas_path="chord.canvas", node_ids=["a", "b", "sum"], app=app)
    wait_status(tracked, sid, TERMINAL)
    with pytest.raises(ResumeNotPossibleError, match="node a cannot run again alone"):
        resume_session(sid, app=app, nodes=["a"])
    assert tracked.sync.get_session_status(sid)["run"] == 1


def test_the_eta_of_a_batch_of_known_duration(tracked: SessionManager, thread_worker: None) -> None:
    # Given 24 tasks of 0.5 s on a worker running 4 at a time (3 s in all)
    sid = dispatch(group(work.si(i, sleep=0.5) for i in range(24)), canvas_path="eta.canvas", app=app)

    # When half of the batch has finished (the rate then spans whole waves, not the first one's
    # start-up on a loaded machine), the ETA is read
    def half_done() -> bool:
        status = tracked.sync.get_session_status(sid)
        return status["completed_nodes"] >= 12 and status["eta_s"] is not None

    wait_for(half_done, what="half of the batch")
    read_at = tracked.clock()
    estimate = tracked.sync.get_session_status(sid)["eta_s"]
    status = wait_status(tracked, sid, TERMINAL)

    # Then it was within 20 % of the time the rest really took
    took = (datetime.fromisoformat(status["finished_at"]) - read_at).total_seconds()
    assert estimate == pytest.approx(took, rel=0.2), (estimate, took)
    assert status["rate_per_s"] == pytest.approx(8, rel=0.2)  # 4 tasks per 0.5 s


def test_a_dispatched_batch_is_found_by_tag_and_canvas_path_prefix(
    tracked: SessionManager, thread_worker: None
) -> None:
    tag = f"customer:{uuid.uuid4().hex[:8]}"
    first = dispatch(group(work.si(1)), canvas_path="nightly/etl.canvas", app=app, tags=["nightly", tag])
    time.sleep(0.01)
    second = dispatch(group(work.si(2)), canvas_path="nightly/report.canvas", app=app, tags=[tag])
    other = dispatch(group(work.si(3)), canvas_path="adhoc.canvas", app=app)
    for sid in (first, second, other):
        wait_status(tracked, sid, TERMINAL)
    assert [s.session_id for s in tracked.sync.list_sessions(tag=tag).sessions] == [second, first]
    assert [s.session_id for s in tracked.sync.list_sessions(path="nightly/").sessions] == [first, second]  # by path
    assert tracked.sync.get_session_status(first)["tags"] == ["nightly", tag]
    with pytest.raises(TrackerValidationError):
        dispatch(group(work.si(4)), canvas_path="bad.canvas", app=app, tags=["no spaces"])
