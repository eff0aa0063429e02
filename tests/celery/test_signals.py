"""Signals drive sessions: real worker (threads pool), real Redis broker, real Redis store."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery, Signature, chain, chord, group

from tests.celery.appmod import add, deep, done, flaky, total, undecodable, unjsonable, work
from tests.celery.conftest import wait_for, wait_status
from tracker import InMemoryStorageAdapter, NodeStatus, SessionManager, TrackerValidationError
from tracker.celery import add_nodes, cancel_session, dispatch, install, resume_session, uninstall
from tracker.celery.dispatch import leaves, node_spec
from tracker.celery.stamps import ids_of


def test_group_with_known_failures_ends_partial(tracked: SessionManager, thread_worker: None, redis_url: str) -> None:
    # Given a group of 60 nodes where every 7th fails
    failing = {i for i in range(60) if i % 7 == 0}
    batch = group(work.s(i, fail=i in failing) for i in range(60))
    # When it is dispatched with a completion callback
    sid = dispatch(batch, canvas_path="sixty.canvas", node_ids=[f"n{i}" for i in range(60)], on_complete=done.s())
    # Then the session ends partial_failure with exact counters
    status = wait_status(tracked, sid, {"partial_failure", "completed", "failed"})
    assert status["status"] == "partial_failure"
    assert (status["completed_nodes"], status["failed_nodes"]) == (60 - len(failing), len(failing))
    assert status["progress_percent"] == 100
    nodes = {n.node_id: n for n in tracked.sync.get_nodes(sid, limit=1000).nodes}
    assert nodes["n1"].result == 2
    assert nodes["n7"].status is NodeStatus.FAILED
    assert nodes["n7"].error is not None and nodes["n7"].error.type == "ValueError"
    assert nodes["n3"].worker and nodes["n3"].task_id and nodes["n3"].execution_time_ms is not None
    # and the completion callback ran exactly once
    client = redis.Redis.from_url(redis_url)
    wait_for(lambda: client.llen(f"done:{sid}") >= 1, what="completion callback")
    assert client.lrange(f"done:{sid}", 0, -1) == [b"partial_failure"]


def test_all_succeed_and_all_fail(tracked: SessionManager, thread_worker: None) -> None:
    ok = dispatch(group(work.s(i) for i in range(50)), canvas_path="ok.canvas")
    bad = dispatch(group(work.s(i, fail=True) for i in range(50)), canvas_path="bad.canvas")
    assert wait_status(tracked, ok, {"completed", "partial_failure", "failed"})["status"] == "completed"
    status = wait_status(tracked, bad, {"completed", "partial_failure", "failed"})
    assert (status["status"], status["failed_nodes"]) == ("failed", 50)


def test_retries_are_counted_in_attempts(tracked: SessionManager, thread_worker: None) -> None:
    sid = dispatch(group([flaky.s(2), flaky.s(0)]), canvas_path="flaky.canvas", node_ids=["twice", "never"])
    wait_status(tracked, sid, {"completed"})
    nodes = {n.node_id: n for n in tracked.sync.get_nodes(sid).nodes}
    assert nodes["twice"].attempts == 3
    assert nodes["twice"].result == 2
    assert nodes["never"].attempts == 1


def test_chain_and_chord_are_tracked(tracked: SessionManager, thread_worker: None) -> None:
    sid = dispatch(chain(add.s(1, 2), add.s(10), add.s(100)), canvas_path="chain.canvas", node_ids=["a", "b", "c"])
    status = wait_status(tracked, sid, {"completed", "failed", "partial_failure"})
    assert (status["status"], status["completed_nodes"]) == ("completed", 3)
    assert {n.node_id: n.result for n in tracked.sync.get_nodes(sid).nodes} == {"a": 3, "b": 13, "c": 113}


def test_unstorable_result_still_completes_the_node(tracked: SessionManager, thread_worker: None) -> None:
    sid = dispatch(group([unjsonable.s(), work.s(1)]), canvas_path="big.canvas", node_ids=["big", "small"])
    status = wait_status(tracked, sid, {"completed", "partial_failure", "failed"})
    assert status["status"] == "completed"
    big = next(n for n in tracked.sync.get_nodes(sid).nodes if n.node_id == "big")
    assert big.result is None
    assert big.reason and "cap" in big.reason


def test_a_failure_whose_message_utf_8_cannot_hold_is_recorded(tracked: SessionManager, thread_worker: None) -> None:
    # Given a batch whose task fails on a file name with an undecodable byte (a lone surrogate)
    sid = dispatch(group([undecodable.s(), work.s(1)]), canvas_path="odd.canvas", node_ids=["odd", "fine"])
    # Then its failure is recorded, with that byte escaped, and the session ends
    status = wait_status(tracked, sid, {"completed", "partial_failure", "failed"})
    assert (status["status"], status["failed_nodes"], status["completed_nodes"]) == ("partial_failure", 1, 1)
    odd = tracked.sync.get_node(sid, "odd")
    assert odd.error is not None and odd.error.type == "FileNotFoundError"
    assert odd.error.message == "no such file: 'report-\\udcff.csv'"


def test_leaves_of_a_nested_canvas() -> None:
    canvas = chain(add.s(1, 2), group(add.s(1), add.s(2)), chord([add.s(1, 1), add.s(2, 2)], total.s()))
    assert [sig.task for sig in leaves(canvas)] == ["t.add"] * 5 + ["t.total"]


def test_each_node_gets_its_own_uuid4_task_id() -> None:
    app = Celery("ids", broker="memory://", set_as_current=False)
    install(app, beat=False)
    manager = SessionManager(storage=InMemoryStorageAdapter())
    try:
        sid = dispatch(group(app.signature("t.x") for _ in range(50)), canvas_path="ids.canvas", manager=manager)
    finally:
        uninstall(app)
    ids = [n.task_id for n in manager.sync.get_nodes(sid).nodes]
    assert len(set(ids)) == 50
    for text in ids:
        assert text is not None
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)


def test_a_node_is_sent_with_the_stamps_and_kept_without_them() -> None:
    sig = add.s(1, 2).set(queue="q")
    spec = node_spec(sig, "0b7c1c3e-8f0e-4a55-9d61-1f4bb5b4f1a2", "n1", "3f1e1c3e-8f0e-4a55-9d61-1f4bb5b4f1a2")
    # What is sent carries the session and node ids (what the handlers read), and the task id
    assert ids_of(SimpleNamespace(stamps={k: sig.options[k] for k in sig.options["stamped_headers"]})) == (
        "0b7c1c3e-8f0e-4a55-9d61-1f4bb5b4f1a2", "n1")  # fmt: skip
    assert sig.options["task_id"] == spec.task_id == "3f1e1c3e-8f0e-4a55-9d61-1f4bb5b4f1a2"
    # What the session keeps for resume is the caller's signature (resume tags it afresh)
    assert spec.signature == {"task": "t.add", "args": [1, 2], "kwargs": {}, "options": {"queue": "q"},
                              "subtask_type": None, "immutable": False}  # fmt: skip


def test_untracked_tasks_are_ignored(tracked: SessionManager, thread_worker: None) -> None:
    assert work.delay(21).get(timeout=30) == 42
    assert tracked.sync.list_sessions().sessions == []


def test_chord_is_tracked(tracked: SessionManager, thread_worker: None) -> None:
    canvas = chord([add.s(1, 1), add.s(2, 2), add.s(3, 3)], total.s())
    sid = dispatch(canvas, canvas_path="chord.canvas", node_ids=["h1", "h2", "h3", "body"])
    status = wait_status(tracked, sid, {"completed", "failed", "partial_failure"})
    assert (status["status"], status["completed_nodes"], status["node_count"]) == ("completed", 4, 4)
    assert next(n.result for n in tracked.sync.get_nodes(sid).nodes if n.node_id == "body") == 12


def test_a_failed_send_marks_the_session_failed(tracked: SessionManager, redis_url: str) -> None:
    from celery import Celery

    from tracker import SessionStatus

    # Given an app whose broker cannot be reached
    broken = Celery("broken", broker="redis://127.0.0.1:1/0")
    broken.conf.update(broker_connection_retry=False, broker_connection_max_retries=0, task_publish_retry=False)
    install(broken, tracked, beat=False)

    @broken.task(name="t.never")
    def never() -> None:
        """Never sent."""

    # When dispatch cannot send the batch
    with pytest.raises(Exception, match=r"(?i)connect|refused|error"):
        dispatch(group([never.s()]), canvas_path="unsent.canvas", app=broken)
    # Then the session it created says so instead of staying pending forever
    (session,) = tracked.sync.list_sessions().sessions
    assert session.status is SessionStatus.FAILED


def test_a_result_deeper_than_the_recursion_limit_completes_the_node_unstored(
    tracked: SessionManager, thread_worker: None
) -> None:
    # Given a task whose return value is nested 1500 levels deep (no result backend for it)
    sid = dispatch(group([deep.s(1500), work.s(1)]), canvas_path="deep.canvas", node_ids=["deep", "ok"])
    # Then the session ends: the node completed, its result not stored, and says why
    status = wait_status(tracked, sid, {"completed", "partial_failure", "failed"}, timeout_s=30)
    assert (status["status"], status["completed_nodes"]) == ("completed", 2)
    node = next(n for n in tracked.sync.get_nodes(sid).nodes if n.node_id == "deep")
    assert node.result is None and node.reason is not None and "result not stored" in node.reason


@pytest.mark.parametrize(
    ("canvas", "why"),
    [
        (lambda: group([]), "no task"),
        (lambda: [add.s(1, 2), add.s(3, 4)], "expected a Celery signature"),
        (lambda: add, "expected a Celery signature"),
        (lambda: None, "expected a Celery signature"),
    ],
    ids=["empty group", "a list", "a task", "None"],
)
def test_a_canvas_that_cannot_run_is_refused_and_nothing_is_stored(
    tracked: SessionManager, canvas: Any, why: str
) -> None:
    with pytest.raises(TrackerValidationError, match=why):
        dispatch(canvas(), canvas_path="bad.canvas")
    assert tracked.sync.list_sessions().sessions == []


@pytest.mark.parametrize(
    ("make", "kwargs", "why"),
    [
        (lambda: group([add.s(1, 2), add.s(3, 4)]), {"node_ids": "ab"}, "expected a list of node ids"),
        (lambda: group([add.s(1, 2), add.s(3, 4)]), {"node_ids": 5}, "expected a list of node ids"),
        (lambda: group([add.s(1, 2), add.s(3, 4)]), {"node_ids": [None, 7]}, "node_id"),
        (lambda: add.s(1, 2), {"metadata": [1]}, "expected a JSON object"),
        (lambda: add.s(1, 2), {"on_failure": "alert"}, "expected a Celery signature"),
        (lambda: add.s(1, 2), {"on_complete": {"task": "t.done"}}, "expected a Celery signature"),
        (lambda: add.s(1, 2), {"app": "proj"}, "expected a Celery app"),
        (lambda: add.s(1, 2), {"manager": "default"}, "expected a SessionManager"),
        (lambda: add.s(1, 2).set(task_id=5), {}, "task_id"),
        (lambda: group([add.s(1, 2), Signature({"task": None})]), {}, "expected a task name"),
        (lambda: group([add.s(1, 2), Signature({"task": "t.add"})]), {}, "expected args, kwargs and options"),
        (lambda: chord([add.s(1, 2)]), {}, "a chord needs a body"),
    ],
    ids=[
        "node ids as text",
        "node ids as a number",
        "node ids not text",
        "metadata not a dict",
        "a callback by name",
        "a callback as a dict",
        "app by name",
        "manager by name",
        "a task id not text",
        "a signature without task",
        "a signature without options",
        "a chord without body",
    ],
)
def test_bad_dispatch_arguments_are_refused_and_nothing_is_stored(
    tracked: SessionManager, make: Any, kwargs: dict[str, Any], why: str
) -> None:
    with pytest.raises(TrackerValidationError, match=why):
        dispatch(make(), canvas_path="bad.canvas", **kwargs)
    assert tracked.sync.list_sessions().sessions == []


def test_cancel_and_resume_take_only_true_or_false_for_their_switches(tracked: SessionManager) -> None:
    sid = dispatch(add.s(1, 2), canvas_path="switch.canvas")
    before = tracked.sync.get_session_status(sid)
    for flag in ("no", 0, None):
        with pytest.raises(TrackerValidationError, match="expected True or False"):
            cancel_session(sid, terminate=flag)  # type: ignore[arg-type]
        with pytest.raises(TrackerValidationError, match="expected True or False"):
            resume_session(sid, retry_failed=flag)  # type: ignore[arg-type]
    assert tracked.sync.get_session_status(sid) == before


def test_a_chord_through_an_app_without_result_backend_is_refused_and_nothing_is_stored(
    tracked: SessionManager,
) -> None:
    # Given an app with no result backend (Celery's default), whose broker would take the tasks
    app = Celery("no-backend", broker="memory://", set_as_current=False)
    install(app, tracked, beat=False)
    try:
        part = app.signature("t.add", args=(1, 2))
        # Then what Celery runs as a chord is refused before anything is stored or sent
        for canvas in (
            chord([part, part], part),
            chain(group(part, part), part),
            group(part, chain(group(part, part), part)),
            chain(chain(part, group(part, part)), part),
        ):
            with pytest.raises(TrackerValidationError, match="only with a result_backend"):
                dispatch(canvas, canvas_path="chord.canvas", app=app)
        assert tracked.sync.list_sessions().sessions == []
        # and what it runs without one is not
        for canvas in (chain(part, group(part, part)), chain(group(part), part)):
            sid = dispatch(canvas, canvas_path="chain.canvas", app=app)
            assert tracked.sync.get_session(sid).node_count == len(list(leaves(canvas)))
        # and adding a chord to a running batch is refused the same way, adding nothing
        with pytest.raises(TrackerValidationError, match="only with a result_backend"):
            add_nodes(sid, chord([part, part], part), app=app)
        assert tracked.sync.get_session(sid).node_count == 2
    finally:
        uninstall(app)


def test_node_count_is_bounded(tracked: SessionManager) -> None:
    for count in (0, -1, 11):
        with pytest.raises(TrackerValidationError, match="node_count"):
            SessionManager(storage=tracked.storage, settings=tracked.settings.model_copy(update={"max_node_count": 10})
                           ).sync.create_session("big.canvas", count)  # fmt: skip
    assert tracked.sync.list_sessions().sessions == []
    assert tracked.settings.max_node_count == 10_000_000


def test_a_task_the_worker_does_not_know_fails_its_node(tracked: SessionManager, thread_worker: None) -> None:
    # Given a batch with a task no worker has registered (a rolling deploy: an old worker, a new task)
    from tests.celery.appmod import app

    sid = dispatch(group([app.signature("t.not_deployed_yet", args=(1,)), work.s(1)]), canvas_path="unknown.canvas",
                   node_ids=["new", "old"])  # fmt: skip
    # Then the worker's refusal fails that node, and the session ends instead of waiting for it
    status = wait_status(tracked, sid, {"completed", "partial_failure", "failed"}, timeout_s=30)
    assert (status["status"], status["completed_nodes"], status["failed_nodes"]) == ("partial_failure", 1, 1)
    node = next(n for n in tracked.sync.get_nodes(sid).nodes if n.node_id == "new")
    assert node.status is NodeStatus.FAILED and node.reason is not None
    assert "'t.not_deployed_yet' is not registered on worker" in node.reason


def test_a_message_the_worker_rejects_fails_its_node(tracked: SessionManager, thread_worker: None) -> None:
    # Given a tracked node whose message reaches the worker without a task name (not a task it can read)
    from kombu import Exchange, Producer

    from tests.celery.appmod import app
    from tracker.celery.stamps import NODE_STAMP, SESSION_STAMP

    sid = tracked.sync.create_session("rejected.canvas", 1)
    headers = {"id": "t-odd", "stamps": {SESSION_STAMP: sid, NODE_STAMP: "odd"}}
    with app.connection_for_write() as conn:
        Producer(conn).publish({"not": "a task"}, exchange=Exchange(""), routing_key=app.conf.task_default_queue,
                               headers=headers, serializer="json")  # fmt: skip
    # Then the worker's rejection fails the node and the session ends
    status = wait_status(tracked, sid, {"failed"}, timeout_s=30)
    assert status["failed_nodes"] == 1
    node = tracked.sync.get_nodes(sid).nodes[0]
    assert node.reason is not None and "message rejected by worker" in node.reason


def test_a_message_the_worker_cannot_decode_fails_its_node(tracked: SessionManager, thread_worker: None) -> None:
    # Given a tracked task message whose body is not the JSON its content type says
    from kombu import Exchange, Producer

    from tests.celery.appmod import app
    from tracker.celery.stamps import NODE_STAMP, SESSION_STAMP

    sid = tracked.sync.create_session("undecodable.canvas", 1)
    headers = {"id": "t-garbled", "task": "t.add", "stamps": {SESSION_STAMP: sid, NODE_STAMP: "garbled"}}
    with app.connection_for_write() as conn:
        Producer(conn).publish(b"{not json", exchange=Exchange(""), routing_key=app.conf.task_default_queue,
                               headers=headers, content_type="application/json", content_encoding="utf-8")  # fmt: skip
    # Then the worker's decode error fails the node (Celery itself only logs it) and the session ends
    status = wait_status(tracked, sid, {"failed"}, timeout_s=30)
    assert status["failed_nodes"] == 1
    node = tracked.sync.get_nodes(sid).nodes[0]
    assert node.reason is not None and "message could not be decoded by worker" in node.reason


def test_a_users_own_task_base_and_request_class_keep_working(
    tracked: SessionManager, worker_process: Any, redis_url: str
) -> None:
    # Given tasks with the user's own Task base class and Request class, on a prefork worker
    from tests.celery.appmod import custom

    worker_process(concurrency=2)
    sid = dispatch(
        group(custom.s(i) for i in range(6)), canvas_path="custom.canvas", node_ids=[f"n{i}" for i in range(6)]
    )
    # Then the session ends with every result, and the user's hooks ran for every task
    status = wait_status(tracked, sid, {"completed", "partial_failure", "failed"}, timeout_s=60)
    assert (status["status"], status["completed_nodes"], status["failed_nodes"]) == ("partial_failure", 5, 1)
    nodes = {n.node_id: n for n in tracked.sync.get_nodes(sid).nodes}
    assert sorted(n.result for n in nodes.values() if n.node_id != "n3") == [0, 10, 20, 40, 50]
    assert nodes["n3"].error is not None and nodes["n3"].error.type == "ValueError"
    client = redis.Redis.from_url(redis_url)
    for nid, node in nodes.items():
        if nid != "n3":
            assert client.lrange(f"custom-task:{node.task_id}", 0, -1) == [str(node.result).encode()]
    wait_for(lambda: client.lrange(f"custom-request:{nodes['n3'].task_id}", 0, -1) == [b"ValueError"], 10,
             "the Request class's failure hook")  # fmt: skip
    client.close()


def test_dispatch_through_an_app_without_the_tracker_refuses_and_sends_nothing() -> None:
    from tracker import TrackerNotInstalledError

    bare = Celery("bare", broker="memory://", set_as_current=False)
    manager = SessionManager(storage=InMemoryStorageAdapter())
    queue = f"bare-{uuid.uuid4().hex[:8]}"  # the memory transport's queues are the whole process's
    with pytest.raises(
        TrackerNotInstalledError, match=r"not installed in the Celery app 'bare'.*install\(app\)"
    ) as caught:
        dispatch(group(bare.signature("t.x", queue=queue) for _ in range(2)), canvas_path="b.canvas", manager=manager)
    assert caught.value.hint == "from tracker.celery import install; install(app) right after app = Celery(...)"
    assert manager.sync.list_sessions().sessions == []
    with bare.connection_for_write() as connection:
        assert connection.SimpleQueue(queue).qsize() == 0


def test_without_node_ids_each_node_is_named_by_its_task_id() -> None:
    app = Celery("named", broker="memory://", set_as_current=False)
    install(app, beat=False)
    manager = SessionManager(storage=InMemoryStorageAdapter())
    try:
        canvas = group(app.signature("t.x") for _ in range(3))
        sid = dispatch(canvas, canvas_path="named.canvas", manager=manager)
    finally:
        uninstall(app)
    nodes = manager.sync.get_nodes(sid).nodes
    assert sorted(n.node_id for n in nodes) == sorted(sig.id for sig in canvas.tasks)
    assert all(n.node_id == n.task_id for n in nodes)
