"""The handlers' writer: outcomes written before the handler returns, each with its start; starts behind.

The handlers run for stand-in tasks (the request Celery gives: id, retries, hostname, stamps)
against a real Redis store; what reaches the store is read back through the manager and the
session's event stream.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.celery.conftest import wait_for
from tracker import NodeStatus, SessionManager, TrackerSettings
from tracker.celery import NODE_STAMP, SESSION_STAMP, Recorder, handlers
from tracker.storage.keys import KeySpace
from tracker.storage.redis import RedisStorageAdapter

HOST = "celery@writer-test"


class Calls:
    """Counts the store calls a manager makes for node events (wraps the store's own method)."""

    def __init__(self, manager: SessionManager) -> None:
        self.count = 0
        store = manager.storage
        real = store.record_nodes

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return real(*args, **kwargs)

        store.record_nodes = counted  # type: ignore[method-assign]


@pytest.fixture
def make(redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Recorders on the test store whose writer thread writes a waiting start only after
    ``flush_interval_s`` (a minute unless a test says otherwise), so that tests flush by hand."""
    made: list[tuple[Recorder, SessionManager]] = []

    def build(flush_interval_s: float = 60.0, url: str | None = None) -> tuple[Recorder, SessionManager]:
        settings = TrackerSettings(redis_url=url or redis_url, key_prefix=key_prefix, flush_interval_s=flush_interval_s,
                                   redis_retries=0, redis_socket_timeout_s=1)  # fmt: skip
        manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
        recorder = Recorder(Celery("writer-test", set_as_current=False), manager)
        made.append((recorder, manager))
        return recorder, manager

    yield build
    for recorder, manager in made:
        recorder.stop_writer()
        manager.storage.close()


def task(recorder: Recorder, sid: str, nid: str, retries: int = 0) -> SimpleNamespace:
    request = SimpleNamespace(
        id=str(uuid.uuid4()), retries=retries, hostname=HOST, stamps={SESSION_STAMP: sid, NODE_STAMP: nid}
    )
    return SimpleNamespace(app=recorder.app, request=request)


def start(recorder: Recorder, t: SimpleNamespace) -> None:
    recorder.on_prerun(sender=t, task_id=t.request.id, task=t)


def succeed(recorder: Recorder, t: SimpleNamespace, result: Any = None) -> None:
    recorder.on_success(sender=t, result=result)


def node(manager: SessionManager, sid: str, nid: str) -> Any:
    return next(n for n in manager.sync.get_nodes(sid).nodes if n.node_id == nid)


def status_of(manager: SessionManager, sid: str, nid: str) -> NodeStatus | None:
    """The node's status in the store, None while nothing was written of it."""
    return next((n.status for n in manager.sync.get_nodes(sid).nodes if n.node_id == nid), None)


def busy_stretch_of(recorder: Recorder, sid: str, count: int) -> int:
    """``count`` tasks that start and succeed one after the other (nodes n0, n1...); returns count."""
    for i in range(count):
        t = task(recorder, sid, f"n{i}")
        start(recorder, t)
        succeed(recorder, t, i)
    return count


def test_an_outcome_is_in_the_store_when_its_handler_returns_with_its_start(
    make: Any, redis_url: str, key_prefix: str
) -> None:
    # Given a writer whose thread would write a waiting start only a minute later
    recorder, manager = make()
    calls = Calls(manager)
    sid = manager.sync.create_session("w.canvas", 3)
    t = task(recorder, sid, "a")

    # When a task starts (its start waits) and succeeds
    start(recorder, t)
    time.sleep(0.01)
    assert (status_of(manager, sid, "a"), calls.count) == (None, 0)
    succeed(recorder, t, {"rows": 1})

    # Then, as the success handler returns (before Celery would acknowledge the message), one
    # store call has written the node as started, then completed, and one node event
    a = node(manager, sid, "a")
    assert (a.status, a.attempts, a.task_id, a.result) == (NodeStatus.COMPLETED, 1, t.request.id, {"rows": 1})
    assert a.worker is not None and a.worker.startswith(HOST)
    assert a.started_at is not None and a.finished_at is not None and a.finished_at > a.started_at
    assert calls.count == 1 and recorder.held_events == 0
    events = [e for e in manager.sync.read_events(sid) if e.type == "node"]
    assert [(e.node_id, e.node_status) for e in events] == [("a", NodeStatus.COMPLETED)]
    status = manager.sync.get_session_status(sid)
    assert (status["running_nodes"], status["completed_nodes"]) == (0, 1)
    # and the worker's holder registry was never touched for it
    assert redis.Redis.from_url(redis_url).scard(KeySpace(key_prefix).held(a.worker)) == 0


@pytest.mark.parametrize("outcome", ["fail", "retry"])
def test_failures_and_retries_are_written_before_their_handler_returns(make: Any, outcome: str) -> None:
    recorder, manager = make()
    sid = manager.sync.create_session("w.canvas", 1)
    t = task(recorder, sid, "a")
    start(recorder, t)
    if outcome == "fail":
        recorder.on_failure(sender=t, task_id=t.request.id, exception=ValueError("no"))
        expected = NodeStatus.FAILED
    else:
        recorder.on_retry(sender=t, request=t.request, reason=KeyError("again"))
        expected = NodeStatus.RETRYING
    a = node(manager, sid, "a")
    assert (a.status, a.error is not None and a.error.type) == (
        expected,
        "ValueError" if outcome == "fail" else "KeyError",
    )
    assert recorder.held_events == 0


def test_a_result_is_recorded_as_it_was_returned(make: Any) -> None:
    # Given a task that returns an object its code keeps changing (a module-level dict, say)
    recorder, manager = make()
    sid = manager.sync.create_session("w.canvas", 2)
    shared = {"runs": 1}
    t = task(recorder, sid, "a")
    start(recorder, t)
    succeed(recorder, t, shared)
    # When it changes before the writer writes, Then the node keeps what the task returned
    shared["runs"] = 2
    recorder.flush()
    assert node(manager, sid, "a").result == {"runs": 1}


def test_a_start_still_waiting_at_a_flush_is_written_then(make: Any, redis_url: str, key_prefix: str) -> None:
    recorder, manager = make()
    sid = manager.sync.create_session("w.canvas", 2)
    t = task(recorder, sid, "slow")
    start(recorder, t)
    assert recorder.held_events == 1
    recorder.flush()
    running = node(manager, sid, "slow")
    assert running.status is NodeStatus.RUNNING and running.worker is not None
    held = KeySpace(key_prefix).held(running.worker)
    client = redis.Redis.from_url(redis_url)
    assert client.sismember(held, f"{sid} slow")  # the reaper can see it
    succeed(recorder, t, 5)
    done = node(manager, sid, "slow")
    assert (done.status, done.started_at, done.result) == (NodeStatus.COMPLETED, running.started_at, 5)
    assert not client.sismember(held, f"{sid} slow")


#: A handler call: what happened, to which node, and which of its two tasks (a resume's new task, or the
#: same task delivered again).
CALLS = st.lists(
    st.tuples(st.sampled_from(["start", "succeed", "fail", "retry"]), st.sampled_from("ab"), st.sampled_from([0, 1])),
    max_size=14,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=CALLS, flush_after=st.sets(st.integers(0, 13)))
@example(calls=[("start", "a", 0), ("retry", "a", 0), ("fail", "a", 0)], flush_after=set())  # a retry in between
@example(calls=[("start", "a", 0), ("succeed", "a", 0), ("start", "a", 0)], flush_after=set())  # delivered again
@example(calls=[("start", "a", 0), ("start", "a", 0), ("succeed", "a", 0)], flush_after=set())
@example(calls=[("start", "a", 0), ("start", "a", 1), ("fail", "a", 0), ("succeed", "a", 1)], flush_after={1})
@example(calls=[("start", "a", 0), ("start", "a", 1), ("fail", "a", 0)], flush_after=set())  # the old task's failure
def test_batched_events_leave_what_the_same_events_one_by_one_leave(
    make: Any, calls: list[tuple[str, str, int]], flush_after: set[int]
) -> None:
    # Given two recorders: one writes each event at once, the other keeps them for its flushes
    (one_by_one, m1), (batched, m2) = make(flush_interval_s=0), make()
    sessions = {one_by_one: m1.sync.create_session("w.canvas", 2), batched: m2.sync.create_session("w.canvas", 2)}
    ids = {(nid, k): str(uuid.uuid4()) for nid in "ab" for k in (0, 1)}

    # When both see the same handler calls (the batched one flushing at some points between them)
    for recorder, sid in sessions.items():
        for index, (call, nid, k) in enumerate(calls):
            t = task(recorder, sid, nid)
            t.request.id = ids[nid, k]
            if call == "start":
                start(recorder, t)
            elif call == "succeed":
                succeed(recorder, t, {"k": k})
            elif call == "fail":
                recorder.on_failure(sender=t, task_id=t.request.id, exception=ValueError(f"k{k}"))
            else:
                recorder.on_retry(sender=t, request=t.request, reason=KeyError(f"k{k}"))
            if recorder is batched and index in flush_after:
                recorder.flush()
        recorder.flush()

    # Then every node and every counter is the same (which times are set, not their values: each
    # recorder read its own clock)
    def state(manager: SessionManager, sid: str) -> Any:
        nodes = {
            n.node_id: (n.status, n.attempts, n.task_id, n.result, n.error, n.started_at is None, n.finished_at is None)
            for n in manager.sync.get_nodes(sid).nodes
        }
        status = manager.sync.get_session_status(sid)
        return nodes, {k: v for k, v in status.items() if k.endswith("_nodes") or k == "status"}

    assert state(m2, sessions[batched]) == state(m1, sessions[one_by_one])


def test_with_flush_interval_zero_each_event_is_written_before_the_handler_returns(make: Any) -> None:
    recorder, manager = make(flush_interval_s=0)
    sid = manager.sync.create_session("w.canvas", 2)
    t = task(recorder, sid, "a")
    start(recorder, t)
    assert node(manager, sid, "a").status is NodeStatus.RUNNING
    succeed(recorder, t, 1)
    assert node(manager, sid, "a").status is NodeStatus.COMPLETED
    assert recorder.held_events == 0


def test_the_writer_thread_writes_a_start_within_the_flush_interval(make: Any) -> None:
    # Given a flush interval of 0.2 s
    recorder, manager = make(flush_interval_s=0.2)
    sid = manager.sync.create_session("w.canvas", 2)
    started = time.monotonic()
    # When a task starts and runs on, Then its writer thread writes the start (not the next heartbeat)
    start(recorder, task(recorder, sid, "long"))
    wait_for(lambda: status_of(manager, sid, "long") is NodeStatus.RUNNING, 5, "the start written")
    assert time.monotonic() - started >= 0.2
    assert recorder.held_events == 0


def test_each_outcome_is_one_store_call_however_busy_the_process(make: Any) -> None:
    # Given tasks that start and succeed one after the other (each start waits for its outcome)
    recorder, manager = make()
    calls = Calls(manager)
    sid = manager.sync.create_session("w.canvas", 1000)
    sent = busy_stretch_of(recorder, sid, 150)
    # Then every result is in the store already, one store call a task (never one per event)
    assert manager.sync.get_session_status(sid)["completed_nodes"] == sent
    assert calls.count == sent and recorder.held_events == 0


def test_stopping_the_writer_writes_what_it_holds(make: Any) -> None:
    recorder, manager = make()
    sid = manager.sync.create_session("w.canvas", 1)
    start(recorder, task(recorder, sid, "a"))
    assert recorder.held_events == 1
    recorder.stop_writer()  # worker_process_shutdown / worker_shutdown
    assert node(manager, sid, "a").status is NodeStatus.RUNNING


def test_a_store_that_stays_down_holds_a_bounded_backlog(
    make: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    # Given a store nobody listens on, and a backlog bound of 20 events
    monkeypatch.setattr(handlers, "BACKLOG_SIZE", 20)
    recorder, _ = make(url=f"redis://127.0.0.1:{free_port()}/0")
    sid = str(uuid.uuid4())
    caplog.set_level(logging.WARNING, logger="tracker.celery")

    # When 30 tasks end (60 events) and the writer fails to write them
    for i in range(30):
        t = task(recorder, sid, f"n{i}")
        start(recorder, t)
        succeed(recorder, t, i)
        recorder.flush()

    # Then it holds the newest 20, and said once that it is dropping the oldest
    assert recorder.held_events == 20
    drops = [r for r in caplog.records if "dropping the oldest" in r.getMessage()]
    assert len(drops) == 1


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_prefork_pool_records_every_node_and_sends_the_completion_callback_once(
    tracked: SessionManager, worker_process: Any, redis_url: str
) -> None:
    # Given a prefork worker (each pool child has its own writer), and a batch with a callback
    from celery import group

    from tests.celery.appmod import done, work
    from tracker.celery import dispatch

    worker_process(concurrency=2)
    sid = dispatch(group(work.s(i) for i in range(40)), canvas_path="pre.canvas", on_complete=done.s())

    # Then the session ends with every node counted once, each result having carried its node's
    # start, and the callback (sent from the pool child that wrote the last result) ran exactly once
    wait_for(lambda: tracked.sync.get_session_status(sid)["status"] == "completed", 60, "the session to end")
    status = tracked.sync.get_session_status(sid)
    assert (status["completed_nodes"], status["running_nodes"]) == (40, 0)
    nodes = tracked.sync.get_nodes(sid, limit=100).nodes
    assert all(n.started_at is not None and n.finished_at is not None and n.attempts == 1 for n in nodes)
    assert all(n.worker and re.fullmatch(r".+@.+:\d+", n.worker) for n in nodes)  # the pool child's host:pid
    client = redis.Redis.from_url(redis_url)
    wait_for(lambda: client.llen(f"done:{sid}") >= 1, 30, "the completion callback")
    time.sleep(0.5)
    assert client.lrange(f"done:{sid}", 0, -1) == [b"completed"]


def test_the_heartbeat_names_the_sessions_of_the_nodes_running_in_the_process(make: Any) -> None:
    recorder, manager = make()
    sid = manager.sync.create_session("w.canvas", 2)
    t = task(recorder, sid, "a")
    start(recorder, t)
    writer = recorder.writer(HOST)
    assert writer.running_sessions == [sid]  # kept alive by each heartbeat while "a" runs
    succeed(recorder, t, 1)
    assert writer.running_sessions == []


def test_a_busy_process_wakes_its_writer_thread_once_not_once_per_task(make: Any) -> None:
    # Given a writer whose thread, once woken, ticks only a minute later, and its wake-ups counted
    recorder, manager = make()
    sid = manager.sync.create_session("w.canvas", 1000)
    writer = recorder.writer(HOST)
    notify = writer._wake.notify
    wakes = 0

    def counted(n: int = 1) -> None:
        nonlocal wakes
        wakes += 1
        notify(n)

    writer._wake.notify = counted  # type: ignore[method-assign]
    # When 100 tasks start and succeed
    sent = busy_stretch_of(recorder, sid, 100)
    # Then only the first start woke the thread (it ticks from then on); every result is written
    assert wakes == 1
    assert manager.sync.get_session_status(sid)["completed_nodes"] == sent


def test_an_idle_writer_is_woken_again_by_the_next_start(make: Any) -> None:
    # Given a writer ticking every 0.1 s, which wrote a long task's start and then went idle
    recorder, manager = make(flush_interval_s=0.1)
    sid = manager.sync.create_session("w.canvas", 2)
    start(recorder, task(recorder, sid, "first"))
    wait_for(lambda: status_of(manager, sid, "first") is NodeStatus.RUNNING, 5, "the first start written")
    writer = recorder.writer(HOST)
    wait_for(lambda: writer._idle, 5, "the writer thread idle")
    # When another long task starts, Then the thread wakes and writes it (not at the next heartbeat)
    start(recorder, task(recorder, sid, "second"))
    wait_for(lambda: status_of(manager, sid, "second") is NodeStatus.RUNNING, 2, "the second start written")
