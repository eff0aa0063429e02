"""Chains, chords and nested canvases on a real worker: every session ends, what Celery never runs
is ``skipped``, and resume completes it with the results Celery would have produced."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Signature, chain, chord, group

from tests.celery.conftest import wait_for, wait_status
from tracker import NodeStatus, ResumeNotPossibleError, SessionManager, TrackerValidationError
from tracker.celery import dispatch, resume_session

Build = Callable[[Callable[[str], Signature]], Signature]


def _shapes() -> dict[str, tuple[Build, list[str]]]:
    """Canvas builders (given a step maker) and their node ids in node order."""
    from tests.celery.appmod import on_error

    return {
        "chain": (lambda s: chain(s("a"), s("b"), s("c")), ["a", "b", "c"]),
        "chord": (lambda s: chord([s("a"), s("b"), s("c")], s("d")), ["a", "b", "c", "d"]),
        "chord_in_chain": (lambda s: chain(s("a"), chord([s("b"), s("c")], s("d")), s("e")), ["a", "b", "c", "d", "e"]),
        "group_of_chains": (lambda s: group(chain(s("a"), s("b")), chain(s("c"), s("d"))), ["a", "b", "c", "d"]),
        "chain_link_error": (
            lambda s: chain(s("a"), s("b"), s("c")).on_error(on_error.s(tag="x")),
            ["a", "b", "c", "x"],
        ),
    }


SHAPES = _shapes()


class Run:
    """One dispatch of a shape: which node fails once, and where runs are logged."""

    def __init__(self, broker: str, build: Build, ids: list[str], fail: str | None) -> None:
        self.key = f"canvas-test:{uuid.uuid4().hex}"
        self.log = f"{self.key}:ran"
        self.fail = fail
        self.ids = ids
        self.client = redis.Redis.from_url(broker, decode_responses=True)
        self.canvas = build(self.step)

    def step(self, tag: str) -> Signature:
        from tests.celery.appmod import op

        return op.s(tag=tag, fail=f"{self.key}:{tag}" if tag == self.fail else "", log=self.log)

    def dispatch(self) -> str:
        return dispatch(self.canvas, canvas_path="c.canvas", node_ids=self.ids)

    def ran(self) -> set[str]:
        return set(self.client.lrange(self.log, 0, -1))


def _nodes(manager: SessionManager, sid: str) -> dict[str, Any]:
    return {n.node_id: n for n in manager.sync.get_nodes(sid, limit=1000).nodes}


_ORACLES: dict[str, dict[str, Any]] = {}


def _oracle(broker: str, shape: str, manager: SessionManager) -> dict[str, Any]:
    """Each node's result when nothing fails (what Celery itself produces), once per shape."""
    if shape in _ORACLES:
        return _ORACLES[shape]
    build, ids = SHAPES[shape]
    run = Run(broker, build, ids, None)
    sid = run.dispatch()
    wait_status(manager, sid, {"completed"})
    _ORACLES[shape] = {node_id: node.result for node_id, node in _nodes(manager, sid).items()}
    return _ORACLES[shape]


POSITIONS = {
    "chain": ["a", "b", "c"],
    "chord": ["a", "b", "d"],
    "chord_in_chain": ["a", "c", "e"],
    "group_of_chains": ["a", "c", "d"],
    "chain_link_error": ["a", "b", "c"],
}


@pytest.mark.parametrize(("shape", "fail"), [(shape, node) for shape, nodes in POSITIONS.items() for node in nodes])
def test_a_failing_node_ends_the_session_and_resume_completes_it(
    tracked: SessionManager, thread_worker: None, redis_url: str, shape: str, fail: str
) -> None:
    build, ids = SHAPES[shape]
    expected = _oracle(redis_url, shape, tracked)
    run = Run(redis_url, build, ids, fail)
    sid = run.dispatch()

    ended = wait_status(tracked, sid, {"partial_failure", "failed"}, timeout_s=30)
    nodes = _nodes(tracked, sid)
    ran = run.ran()
    skipped = {n for n, node in nodes.items() if node.status is NodeStatus.SKIPPED}
    # Skipped are exactly the nodes Celery never ran (the error callback is not a t.op: it never logs).
    assert skipped == set(ids) - ran - {"x"} | ({"x"} & skipped)
    assert nodes[fail].status is NodeStatus.FAILED
    for node_id in skipped - {"x"}:
        assert nodes[node_id].reason == f"skipped: node {fail} failed"
    if shape == "chain_link_error":
        wait_for(lambda: _nodes(tracked, sid)["x"].status is NodeStatus.COMPLETED, 30, "the error callback's run")
    counts = tracked.sync.get_session_status(sid)
    assert counts["completed_nodes"] + counts["failed_nodes"] + counts["skipped_nodes"] == len(ids)
    assert counts["skipped_nodes"] == len(skipped)
    assert ended["pending_nodes"] == 0

    sent = resume_session(sid, manager=tracked)
    assert sent >= 1
    wait_status(tracked, sid, {"completed"}, timeout_s=30)
    after = _nodes(tracked, sid)
    for node_id in ids:
        if node_id == "x":
            continue
        assert after[node_id].status is NodeStatus.COMPLETED, node_id
        assert after[node_id].result == expected[node_id], node_id


def test_an_error_callback_nothing_needed_is_skipped_and_the_session_completes(
    tracked: SessionManager, thread_worker: None, redis_url: str
) -> None:
    build, ids = SHAPES["chain_link_error"]
    sid = Run(redis_url, build, ids, None).dispatch()
    status = wait_status(tracked, sid, {"completed", "partial_failure", "failed"})
    assert status["status"] == "completed"
    assert (status["completed_nodes"], status["skipped_nodes"]) == (3, 1)
    x = _nodes(tracked, sid)["x"]
    assert x.status is NodeStatus.SKIPPED
    assert x.reason == "skipped: an error callback, and no task it handles failed"


def test_resume_refuses_before_changing_anything_when_a_parent_result_was_not_stored(
    tracked: SessionManager, thread_worker: None, redis_url: str
) -> None:
    from tests.celery.appmod import op, unjsonable

    key = f"canvas-test:{uuid.uuid4().hex}"
    canvas = chain(unjsonable.s(), op.s(tag="b", fail=key))
    sid = dispatch(canvas, canvas_path="c.canvas", node_ids=["a", "b"])
    wait_status(tracked, sid, {"partial_failure"})
    before = (tracked.sync.get_session_status(sid), _nodes(tracked, sid))
    with pytest.raises(ResumeNotPossibleError, match="result of node a"):
        resume_session(sid, manager=tracked)
    assert (tracked.sync.get_session_status(sid), _nodes(tracked, sid)) == before


def _appended(canvas: group, item: object) -> group:
    canvas.tasks.append(item)
    return canvas


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda add: group([add.s(1, 2), group([])]), "empty group"),
        (lambda add: group(add.s(1, 2), chain()), "empty chain"),
        (lambda add: _appended(group([add.s(1, 2)]), "not a task"), "in every place"),
    ],
    ids=["empty group in a group", "empty chain in a group", "a string in a group"],
)
def test_bad_canvases_are_refused_and_nothing_is_stored_or_sent(
    tracked: SessionManager, celery_env: dict[str, str], redis_url: str, make: Callable[[Any], Any], message: str
) -> None:
    from tests.celery.appmod import add

    with pytest.raises(TrackerValidationError, match=message):
        dispatch(make(add), canvas_path="c.canvas")
    assert tracked.sync.list_sessions().sessions == []
    # The Redis broker keeps a queue's messages in a list of the queue's name.
    assert redis.Redis.from_url(redis_url).llen(celery_env["TRACKER_TEST_QUEUE"]) == 0


def test_a_canvas_deeper_than_the_limit_is_refused(tracked: SessionManager, celery_env: dict[str, str]) -> None:
    from tests.celery.appmod import add

    canvas: Signature = add.s(1, 1)
    for _ in range(tracked.settings.max_canvas_depth + 1):
        canvas = group(canvas, add.s(2, 2))
    with pytest.raises(TrackerValidationError, match="nested deeper than"):
        dispatch(canvas, canvas_path="c.canvas")
    assert tracked.sync.list_sessions().sessions == []


def test_an_error_callback_celery_calls_in_place_is_not_a_node(
    tracked: SessionManager, thread_worker: None, redis_url: str
) -> None:
    from tests.celery.appmod import on_error_inline

    run = Run(redis_url, lambda s: chain(s("a"), s("b")).on_error(on_error_inline.s()), ["a", "b"], "a")
    sid = run.dispatch()  # two nodes: the callback takes (request, exc, traceback), Celery calls it in place
    status = wait_status(tracked, sid, {"partial_failure", "failed"}, timeout_s=30)
    assert (status["node_count"], status["failed_nodes"], status["skipped_nodes"]) == (2, 1, 1)
    failed_task = _nodes(tracked, sid)["a"].task_id
    client = redis.Redis.from_url(redis_url)
    wait_for(lambda: client.llen(f"inline-errback:{failed_task}") == 1, 30, "the callback's call")


def test_only_a_canvas_with_links_keeps_a_structure_and_success_callbacks_are_kept_for_resume(
    tracked: SessionManager, celery_env: dict[str, str]
) -> None:
    from tests.celery.appmod import add, app, total

    flat = dispatch(group(add.s(1, 1), add.s(2, 2)), canvas_path="c.canvas", node_ids=["a", "b"])
    assert tracked.sync.get_structure(flat) is None
    linked = add.s(1, 1)
    linked.link(total.s())  # a success callback: not a node, sent again with its task on resume
    chained = dispatch(chain(linked, add.s(3)), canvas_path="c.canvas", node_ids=["a", "b"])
    assert tracked.sync.get_structure(chained) == {"chain": [{"n": "a"}, {"n": "b"}]}
    tracked.sync.update_status(chained, "cancelled")
    outcome = tracked.sync._reopen_session(chained)
    signatures = {node.node_id: node.signature for node in outcome.nodes}
    assert signatures["a"] is not None and signatures["a"]["options"]["link"][0]["task"] == "t.total"
    app.control.purge()
