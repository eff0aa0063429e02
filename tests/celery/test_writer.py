"""The handlers' writer: events written behind the task, in batches, with a start riding on its result.

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
    """Recorders on the test store whose writer thread writes only after ``flush_interval`` (the
    idle rule is off unless a test turns it back on), so that tests flush by hand."""
    monkeypatch.setattr(handlers, "IDLE_FLUSH_S", 60.0)
    made: list[tuple[Recorder, SessionManager]] = []

    def build(flush_interval: float = 60.0, url: str | None = None) -> tuple[Recorder, SessionManager]:
        settings = TrackerSettings(redis_url=url or redis_url, key_prefix=key_prefix, flush_interval=flush_interval,
                                   redis_retries=0, redis_socket_timeout=1)  # fmt: skip
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


def busy_stretch(recorder: Recorder, sid: str, seconds: float) -> int:
    """Tasks that start and succeed one every 2 ms for ``seconds`` (nodes n0, n1...); how many ran."""
    sent = 0
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        t = task(recorder, sid, f"n{sent}")
        start(recorder, t)
        succeed(recorder, t, sent)
        sent += 1
        time.sleep(0.002)
    return sent


def test_a_task_that_ends_before_the_flush_is_one_event_with_its_start(
    make: Any, redis_url: str, key_prefix: str
) -> None:
    # Given a writer that only writes when flushed
    recorder, manager = make()
    calls = Calls(manager)
    sid = manager.sync.create_session("w.canvas", 3)
    t = task(recorder, sid, "a")

    # When a task starts and succeeds, then the writer flushes
    start(recorder, t)
    time.sleep(0.01)
    succeed(recorder, t, {"rows": 1})
    assert manager.sync.get_session_status(sid)["completed_nodes"] == 0  # nothing written yet
    recorder.flush()

    # Then one store call wrote the node as started, then completed, and one node event
    a = node(manager, sid, "a")
    assert (a.status, a.attempts, a.task_id, a.result) == (NodeStatus.COMPLETED, 1, t.request.id, {"rows": 1})
    assert a.worker is not None and a.worker.startswith(HOST)
    assert a.started_at is not None and a.finished_at is not None and a.finished_at > a.started_at
    assert calls.count == 1
    events = [e for e in manager.sync.read_events(sid) if e.type == "node"]
    assert [(e.node_id, e.node_status) for e in events] == [("a", NodeStatus.COMPLETED)]
    status = manager.sync.get_session_status(sid)
    assert (status["running_nodes"], status["completed_nodes"]) == (0, 1)
    # and the worker's holder registry was never touched for it
    assert redis.Redis.from_url(redis_url).scard(KeySpace(key_prefix).held(a.worker)) == 0


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
    recorder.flush()
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
    (one_by_one, m1), (batched, m2) = make(flush_interval=0), make()
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
    recorder, manager = make(flush_interval=0)
    sid = manager.sync.create_session("w.canvas", 2)
    t = task(recorder, sid, "a")
    start(recorder, t)
    assert node(manager, sid, "a").status is NodeStatus.RUNNING
    succeed(recorder, t, 1)
    assert node(manager, sid, "a").status is NodeStatus.COMPLETED
    assert recorder.held_events == 0


def test_the_writer_thread_writes_once_the_process_is_idle(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a long flush_interval: only the idle rule (back at its default) can write soon
    monkeypatch.setattr(handlers, "IDLE_FLUSH_S", 0.01)
    recorder, manager = make(flush_interval=30)
    sid = manager.sync.create_session("w.canvas", 5)
    for i in range(5):
        t = task(recorder, sid, f"n{i}")
        start(recorder, t)
        succeed(recorder, t, i)
    # When no event comes for a while, Then the writer thread writes them all, in one call
    wait_for(lambda: manager.sync.get_session_status(sid)["status"] == "completed", 5, "the idle flush")
    assert recorder.held_events == 0


def test_the_last_nodes_of_a_session_are_written_as_they_come(make: Any) -> None:
    # Given a writer that writes only when flushed (neither its interval nor the idle rule comes
    # within the test), and a session it has written 9 of 41 results of
    recorder, manager = make()
    sid = manager.sync.create_session("w.canvas", handlers.NEAR_END_NODES + 9)
    tasks = [task(recorder, sid, f"n{i}") for i in range(handlers.NEAR_END_NODES + 9)]

    def run(t: SimpleNamespace) -> None:
        start(recorder, t)
        succeed(recorder, t, None)

    def completed() -> int:
        return int(manager.sync.get_session_status(sid)["completed_nodes"])

    for t in tasks[:8]:
        run(t)
    recorder.flush()
    # While more than NEAR_END_NODES are left, an event waits for the next flush
    run(tasks[8])
    time.sleep(0.3)
    assert completed() == 8 and recorder.held_events == 2  # its start and its result
    recorder.flush()

    # When the session has NEAR_END_NODES left, Then each result is written as it comes, with its
    # start (one store call a task: a start alone is not urgent, it waits for its result)
    calls = Calls(manager)
    for done, t in enumerate(tasks[9:-1], start=10):
        run(t)
        wait_for(lambda done=done: completed() == done, 5, f"result {done} written without a flush")
    assert calls.count == len(tasks[9:-1])
    # And a start alone waits for the next flush, even so near the end
    start(recorder, tasks[-1])
    time.sleep(0.3)
    assert calls.count == len(tasks[9:-1]) and recorder.held_events == 1
    succeed(recorder, tasks[-1], None)
    wait_for(lambda: completed() == len(tasks), 5, "the last result written without a flush")
    assert calls.count == len(tasks[9:])
    assert manager.sync.get_session_status(sid)["status"] == "completed"
    assert recorder.held_events == 0


def test_a_busy_process_batches_its_events(make: Any) -> None:
    # Given events coming every 2 ms for 0.6 s (never idle), and a flush_interval of 0.2 s
    recorder, manager = make(flush_interval=0.2)
    calls = Calls(manager)
    sid = manager.sync.create_session("w.canvas", 1000)
    sent = busy_stretch(recorder, sid, 0.6)
    wait_for(lambda: manager.sync.get_session_status(sid)["completed_nodes"] == sent, 5, "every result")
    # Then they went in a handful of store calls, not one per event
    assert sent >= 100
    assert 2 <= calls.count <= 8, calls.count


def test_a_busy_writer_ticks_without_being_woken_until_an_interval_passes_idle(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the idle rule on (at 50 ms, so that a stall of the test machine does not end the
    # stretch), a flush_interval of 0.1 s, and the writer's wake-ups by handlers counted
    monkeypatch.setattr(handlers, "IDLE_FLUSH_S", 0.05)
    recorder, manager = make(flush_interval=0.1)
    calls = Calls(manager)
    sid = manager.sync.create_session("w.canvas", 1000)
    writer = recorder.writer(HOST)
    notify = writer._wake.notify
    wakes = 0

    def counted(n: int = 1) -> None:
        nonlocal wakes
        wakes += 1
        notify(n)

    writer._wake.notify = counted  # type: ignore[method-assign]

    # When events come every 2 ms for 0.6 s (six flush intervals)
    sent = busy_stretch(recorder, sid, 0.6)

    # Then they went in about one store call per interval, and only the first event woke the thread
    # (one wake-up per interval without ticking; a second if the machine stalled for an interval)
    wait_for(lambda: manager.sync.get_session_status(sid)["completed_nodes"] == sent, 5, "every result")
    assert sent >= 100
    assert 3 <= calls.count <= 9, calls.count
    assert wakes <= 2, wakes
    busy_wakes = wakes

    # And once an interval has passed without events, the next event wakes the thread again and is
    # written by the idle rule, not at the next heartbeat (5 s away)
    time.sleep(0.3)
    t = task(recorder, sid, "late")
    start(recorder, t)
    succeed(recorder, t, None)
    wait_for(lambda: manager.sync.get_session_status(sid)["completed_nodes"] == sent + 1, 1, "the late result")
    assert wakes == busy_wakes + 1, (busy_wakes, wakes)


def test_stopping_the_writer_writes_what_it_holds(make: Any) -> None:
    recorder, manager = make()
    sid = manager.sync.create_session("w.canvas", 1)
    t = task(recorder, sid, "a")
    start(recorder, t)
    succeed(recorder, t, 1)
    recorder.stop_writer()  # worker_process_shutdown / worker_shutdown
    assert manager.sync.get_session_status(sid)["status"] == "completed"


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


def test_a_prefork_pool_writes_behind_and_sends_the_completion_callback_once(
    tracked: SessionManager, worker_process: Any, redis_url: str
) -> None:
    # Given a prefork worker (each pool child has its own writer), and a batch with a callback
    from celery import group

    from tests.celery.appmod import done, work
    from tracker.celery import dispatch

    worker_process(concurrency=2)
    sid = dispatch(group(work.s(i) for i in range(40)), canvas_path="pre.canvas", on_complete=done.s())

    # Then the session ends with every node counted once, the writers' batches having carried
    # each node's start with its result, and the callback (sent from a pool child's writer
    # thread) ran exactly once
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
