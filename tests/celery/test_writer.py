"""The handlers' writer: outcomes written before the handler returns, each with its start; starts behind.

The handlers run for stand-in tasks (the request Celery gives: id, retries, hostname, stamps)
against a real Redis store; what reaches the store is read back through the manager and the
session's event stream. The writer's thread is not started unless a test is about it: the test moves
the writer's clock by hand and runs each round of the thread's loop itself (``at``), so every count
is exact whatever the machine's speed. Times are picked so that the sums the writer makes of them are
exact in binary floating point.
"""

from __future__ import annotations

import logging
import re
import threading
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
from tracker import NodeStatus, SessionManager, StorageUnavailableError, TrackerSettings
from tracker.celery import writer
from tracker.celery.handlers import Recorder
from tracker.celery.stamps import NODE_STAMP, SESSION_STAMP
from tracker.celery.writer import Writer
from tracker.storage.keys import KeySpace
from tracker.storage.redis import RedisStorageAdapter

HOST = "celery@writer-test"


class Calls:
    """Counts the store calls a manager makes for node events (wraps the store's own method); while
    ``down``, each fails as an unreachable store's would."""

    def __init__(self, manager: SessionManager) -> None:
        self.count = 0
        self.down = False
        store = manager.storage
        real = store.record_nodes

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            if self.down:
                raise StorageUnavailableError("the store is down (test)")
            return real(*args, **kwargs)

        store.record_nodes = counted  # type: ignore[method-assign]


class Beats:
    """Counts the heartbeats a manager writes (wraps the store's own method)."""

    def __init__(self, manager: SessionManager) -> None:
        self.count = 0
        store = manager.storage
        real = store.heartbeat

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return real(*args, **kwargs)

        store.heartbeat = counted  # type: ignore[method-assign]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class HandDriven(Recorder):
    """A recorder whose writer runs on the test's clock and never starts its thread: the test runs
    the thread's rounds itself (see :func:`at`)."""

    def __init__(self, app: Celery, manager: SessionManager) -> None:
        super().__init__(app, manager)
        self.clock = Clock()

    def new_writer(self, worker: str) -> Writer:
        return Writer(self, worker, clock=self.clock)


def at(recorder: Any, now: float) -> float:
    """Move the writer's clock to ``now`` and run the round its thread would run then; returns when
    the next round is due."""
    recorder.clock.now = now
    return float(recorder.writer(HOST).step(now))


@pytest.fixture
def make(redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Recorders on the test store whose writer ticks every ``flush_interval_s`` (a minute unless a
    test says otherwise): driven by hand on the test's clock (:class:`HandDriven`), or with its real
    thread (``threaded``)."""
    made: list[tuple[Recorder, SessionManager]] = []

    def build(
        flush_interval_s: float = 60.0, url: str | None = None, threaded: bool = False
    ) -> tuple[Any, SessionManager]:
        settings = TrackerSettings(redis_url=url or redis_url, key_prefix=key_prefix, flush_interval_s=flush_interval_s,
                                   redis_retries=0, redis_socket_timeout_s=1)  # fmt: skip
        manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
        app = Celery("writer-test", set_as_current=False)
        recorder = Recorder(app, manager) if threaded else HandDriven(app, manager)
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
    # Given a writer that ticks every minute
    recorder, manager = make()
    calls = Calls(manager)
    sid = manager.sync.create_session("w.canvas", 3)
    t = task(recorder, sid, "a")

    # When a task starts (its start waits: the writer's rounds up to its second tick write nothing)
    start(recorder, t)
    assert at(recorder, 0.0) == 5.0  # the heartbeat (every 5 s) before the first tick (at 60 s)
    assert at(recorder, 60.0) == 65.0  # the first tick: the start has not waited an interval yet
    assert at(recorder, 119.5) == 120.0
    assert (status_of(manager, sid, "a"), calls.count, recorder.held_events) == (None, 0, 1)
    # and succeeds
    succeed(recorder, t, {"rows": 1})

    # Then, as the success handler returns (before Celery would acknowledge the message), one
    # store call has written the node as started, then completed, and one node event
    a = node(manager, sid, "a")
    assert (a.status, a.attempts, a.task_id, a.result) == (NodeStatus.COMPLETED, 1, t.request.id, {"rows": 1})
    assert a.worker is not None and a.worker.startswith(HOST)
    assert a.started_at is not None and a.finished_at is not None and a.finished_at >= a.started_at
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


def test_a_start_is_written_at_the_second_tick_after_it(make: Any) -> None:
    # Given a writer ticking every 0.25 s, idle (nothing woke it yet)
    recorder, manager = make(flush_interval_s=0.25)
    calls = Calls(manager)
    sid = manager.sync.create_session("w.canvas", 2)
    assert at(recorder, 0.0) == 5.0  # only its heartbeat is due

    # When a task starts at 1.0 s and runs on
    recorder.clock.now = 1.0
    start(recorder, task(recorder, sid, "long"))

    # Then the writer ticks at 1.25 s (the start has not waited a whole interval: nothing written)
    assert at(recorder, 1.0) == 1.25
    assert at(recorder, 1.25) == 1.5
    assert (status_of(manager, sid, "long"), calls.count) == (None, 0)
    # and writes the start at the next tick, in one store call, then goes idle (only its heartbeat is due)
    assert at(recorder, 1.5) == 5.0
    assert (status_of(manager, sid, "long"), calls.count, recorder.held_events) == (NodeStatus.RUNNING, 1, 0)


def test_the_writer_thread_writes_a_long_tasks_start_by_itself(make: Any) -> None:
    # Given a writer with its real thread, ticking every 0.05 s
    recorder, manager = make(flush_interval_s=0.05, threaded=True)
    sid = manager.sync.create_session("w.canvas", 2)
    # When a task starts and runs on, Then the thread writes the start (not the task's outcome)
    start(recorder, task(recorder, sid, "long"))
    wait_for(lambda: status_of(manager, sid, "long") is NodeStatus.RUNNING, 10, "the start written")
    wait_for(lambda: recorder.held_events == 0, 10, "nothing left waiting")


def test_each_outcome_is_one_store_call_however_busy_the_process(make: Any) -> None:
    # Given a writer ticking every 0.25 s, and tasks that start and succeed one after the other,
    # a new one every 0.125 s (each start waits for its outcome, the writer's ticks run between them)
    recorder, manager = make(flush_interval_s=0.25)
    calls = Calls(manager)
    sid = manager.sync.create_session("w.canvas", 1000)
    for i in range(150):
        t = task(recorder, sid, f"n{i}")
        recorder.clock.now = i * 0.125
        start(recorder, t)
        at(recorder, i * 0.125)
        succeed(recorder, t, i)
    # Then every result is in the store already, one store call a task (never one per event: no
    # tick found a start that had waited a whole interval)
    assert manager.sync.get_session_status(sid)["completed_nodes"] == 150
    assert calls.count == 150 and recorder.held_events == 0


def test_an_event_the_store_cannot_take_does_not_take_its_batch_with_it(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a store that fails, unexpectedly, on any write that holds node "bad"
    recorder, manager = make()
    store = manager.storage
    real = store.record_nodes

    def fails_on_bad(session_id: str, events: Any, *args: Any, **kwargs: Any) -> Any:
        if any(event.node_id == "bad" for event in events):
            raise RuntimeError("cannot encode this event (test)")
        return real(session_id, events, *args, **kwargs)

    store.record_nodes = fails_on_bad  # type: ignore[method-assign]
    sid = manager.sync.create_session("w.canvas", 3)
    # When three starts held by the writer, "bad" between the others, are written in one batch
    for nid in ("a", "bad", "c"):
        start(recorder, task(recorder, sid, nid))
    assert recorder.held_events == 3
    with caplog.at_level(logging.WARNING, logger="tracker"):
        recorder.flush()
    # Then the others are recorded, and the one that failed is named in the log
    assert [status_of(manager, sid, nid) for nid in ("a", "bad", "c")] == [NodeStatus.RUNNING, None, NodeStatus.RUNNING]
    assert "unexpected error recording node events" in caplog.text
    assert "node bad of session" in caplog.text and "cannot encode this event (test)" in caplog.text


def test_stopping_the_writer_writes_what_it_holds(make: Any) -> None:
    recorder, manager = make()
    sid = manager.sync.create_session("w.canvas", 1)
    start(recorder, task(recorder, sid, "a"))
    assert recorder.held_events == 1
    recorder.stop_writer()  # worker_process_shutdown / worker_shutdown
    assert node(manager, sid, "a").status is NodeStatus.RUNNING


def test_a_store_that_stays_down_holds_a_bounded_backlog(
    make: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a store nobody listens on, and a backlog bound of 20 events
    monkeypatch.setattr(writer, "BACKLOG_SIZE", 20)
    recorder, manager = make(url=f"redis://127.0.0.1:{free_port()}/0")
    calls = Calls(manager)
    sid = str(uuid.uuid4())
    caplog.set_level(logging.WARNING, logger="tracker.celery")

    # When 30 tasks end (60 events) and the writer fails to write them: the first outcome's write
    # fails, the others are queued at once (its retry is not due: the clock stands still), and each
    # flush by hand tries once more
    for i in range(30):
        t = task(recorder, sid, f"n{i}")
        start(recorder, t)
        succeed(recorder, t, i)
        recorder.flush()

    # Then it holds the newest 20, said once that it is dropping the oldest, and once that it holds
    # the events; the store was tried once by the first outcome and once by each flush
    assert recorder.held_events == 20
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "dropping the oldest" in m]) == 1
    assert len([m for m in messages if "holding this process's events" in m]) == 1
    assert calls.count == 31


def test_after_a_failed_write_no_task_waits_on_the_store_until_a_retry_goes_through(make: Any) -> None:
    # Given a writer whose store failed a task's outcome at 0 s (a store that hangs costs a try its
    # socket timeout, several times over)
    recorder, manager = make()
    calls = Calls(manager)
    sid = manager.sync.create_session("w.canvas", 3)
    assert at(recorder, 0.0) == 5.0
    calls.down = True
    a = task(recorder, sid, "a")
    start(recorder, a)
    succeed(recorder, a, 1)
    assert calls.count == 1

    # When other tasks end after its retry was due, before the writer's thread made it
    for when, name in ((0.3, "b"), (4.0, "c")):
        recorder.clock.now = when
        other = task(recorder, sid, name)
        start(recorder, other)
        succeed(recorder, other, 2)

    # Then none of them tried the store itself: their starts and outcomes wait for the thread's retry
    assert (calls.count, recorder.held_events) == (1, 5)
    assert recorder.writer(HOST).store_down
    # and once a retry goes through, every outcome is in, and tasks write their own again
    calls.down = False
    at(recorder, 4.0)
    assert recorder.held_events == 0
    assert not recorder.writer(HOST).store_down
    assert {status_of(manager, sid, n) for n in "abc"} == {NodeStatus.COMPLETED}


def test_a_failed_write_is_retried_with_backoff_then_held_until_the_store_is_back(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a writer whose store refuses every node event (its first round ran at 0 s: it beat)
    recorder, manager = make()
    calls = Calls(manager)
    sid = manager.sync.create_session("w.canvas", 2)
    caplog.set_level(logging.WARNING, logger="tracker.celery")
    assert at(recorder, 0.0) == 5.0
    calls.down = True

    # When a task's outcome is written at 0 s (its write fails: the writer holds it)
    a = task(recorder, sid, "a")
    start(recorder, a)
    succeed(recorder, a, 1)
    assert (calls.count, recorder.held_events) == (1, 1)  # its start and result, as one event
    # Then until its retry is due the store counts as down: another task's start and outcome are
    # queued, the task does not wait on the store
    recorder.clock.now = 0.03125
    assert recorder.writer(HOST).store_down
    b = task(recorder, sid, "b")
    start(recorder, b)
    succeed(recorder, b, 2)
    assert (calls.count, recorder.held_events) == (1, 3)
    assert at(recorder, 0.03125) == 0.05  # no try before the retry is due

    # and the writer tries again 0.05 s, 0.2 s, 0.5 s after each failure, then every 5 s (its
    # heartbeat goes at its own times in between, without a try)
    assert at(recorder, 0.05) == 0.25
    assert at(recorder, 0.25) == 0.75
    assert at(recorder, 0.75) == 5.0
    assert calls.count == 4
    assert at(recorder, 5.0) == 5.75
    assert calls.count == 4
    assert at(recorder, 5.75) == 10.0
    assert at(recorder, 10.0) == 10.75
    assert (calls.count, recorder.held_events) == (5, 2)  # each task's start and result, as one event
    # having said once, after the spent retries, that it holds the events
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "holding this process's events" in m]) == 1

    # When the store is back, Then the next retry writes both outcomes, each held call as it was
    # (a's, then b's: two store calls), says so, and the writer goes idle (only its heartbeat is due)
    calls.down = False
    assert at(recorder, 10.75) == 15.0
    assert (calls.count, recorder.held_events) == (7, 0)
    assert (status_of(manager, sid, "a"), status_of(manager, sid, "b")) == (NodeStatus.COMPLETED,) * 2
    assert "tracker: the store is back; replayed the held events" in [r.getMessage() for r in caplog.records]
    assert not recorder.writer(HOST).store_down


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_prefork_pool_records_every_node_and_sends_the_completion_callback_once(
    tracked: SessionManager, worker_process: Any, redis_url: str, celery_env: dict[str, str]
) -> None:
    # Given a prefork worker (each pool child has its own writer), and a batch with a callback
    from celery import group

    from tests.celery.appmod import done, work
    from tracker.celery import dispatch

    worker = worker_process(concurrency=2)
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
    # once the worker stopped (warm: it finishes what runs and gives back what it had not started),
    # no second callback waits in the queue either
    worker.stop()
    assert client.lrange(f"done:{sid}", 0, -1) == [b"completed"]
    assert client.llen(celery_env["TRACKER_TEST_QUEUE"]) == 0


def test_the_heartbeat_names_the_sessions_of_the_nodes_running_in_the_process(make: Any) -> None:
    recorder, manager = make()
    sid = manager.sync.create_session("w.canvas", 2)
    t = task(recorder, sid, "a")
    start(recorder, t)
    writer = recorder.writer(HOST)
    assert writer.running_sessions == [sid]  # kept alive by each heartbeat while "a" runs
    succeed(recorder, t, 1)
    assert writer.running_sessions == []


def test_the_heartbeat_is_written_every_heartbeat_interval(make: Any) -> None:
    # Given a writer (heartbeat every 5 s) and a task running in its process
    recorder, manager = make()
    beats = Beats(manager)
    sid = manager.sync.create_session("w.canvas", 2)
    t = task(recorder, sid, "a")
    start(recorder, t)
    # When its rounds run, Then it beats at the first, then at the first round 5 s or more after
    # each beat (the task's outcome does not change when)
    assert [at(recorder, now) for now in (0.0, 4.5, 5.0, 9.75, 10.5)] == [5.0, 5.0, 10.0, 10.0, 15.5]
    assert beats.count == 3
    succeed(recorder, t, 1)
    assert [at(recorder, now) for now in (15.0, 15.5)] == [15.5, 20.5]
    assert beats.count == 4


def counted_wakes(recorder: Recorder) -> list[int]:
    """The writer's wake-ups (notifications of its thread), counted in a one-item list."""
    wake = recorder.writer(HOST)._wake
    notify = wake.notify
    wakes = [0]

    def counted(n: int = 1) -> None:
        wakes[0] += 1
        notify(n)

    wake.notify = counted  # type: ignore[method-assign]
    return wakes


def test_a_busy_process_wakes_its_writer_thread_once_not_once_per_task(make: Any) -> None:
    # Given a writer whose thread, once woken, ticks only a minute later, and its wake-ups counted
    recorder, manager = make()
    sid = manager.sync.create_session("w.canvas", 1000)
    wakes = counted_wakes(recorder)
    # When 100 tasks start and succeed
    sent = busy_stretch_of(recorder, sid, 100)
    # Then only the first start woke the thread (it ticks from then on); every result is written
    assert wakes == [1]
    assert manager.sync.get_session_status(sid)["completed_nodes"] == sent


def test_an_idle_writer_is_woken_again_by_the_next_start(make: Any) -> None:
    # Given a writer ticking every 0.25 s, which wrote a long task's start and then went idle
    recorder, manager = make(flush_interval_s=0.25)
    sid = manager.sync.create_session("w.canvas", 2)
    wakes = counted_wakes(recorder)
    start(recorder, task(recorder, sid, "first"))
    assert [at(recorder, now) for now in (0.0, 0.25)] == [0.25, 0.5]
    # (written at its second tick, which had no start since the tick before: idle, only the
    # heartbeat is due)
    assert at(recorder, 0.5) == 5.0
    assert status_of(manager, sid, "first") is NodeStatus.RUNNING
    assert at(recorder, 2.0) == 5.0
    assert wakes == [1]

    # When another long task starts at 3 s, Then it wakes the writer, which ticks again and writes
    # it at its second tick (not at the next heartbeat)
    recorder.clock.now = 3.0
    start(recorder, task(recorder, sid, "second"))
    assert wakes == [2]
    assert [at(recorder, now) for now in (3.0, 3.25)] == [3.25, 3.5]
    assert status_of(manager, sid, "second") is None
    assert at(recorder, 3.5) == 5.0
    assert status_of(manager, sid, "second") is NodeStatus.RUNNING


# -- progress reports (tracker.celery.report_progress) ----------------------------------------


def report(recorder: Any, t: Any, fraction: float) -> None:
    recorder.report(t.request, (t.request.stamps["tracker_session_id"], t.request.stamps["tracker_node_id"]), fraction)


def test_reports_are_written_behind_once_per_node_per_flush(make: Any) -> None:
    # Given a writer that ticks every minute and a task that started (its start waits)
    recorder, manager = make()
    calls = Calls(manager)
    sid = manager.sync.create_session("p.canvas", 2)
    t = task(recorder, sid, "a")
    start(recorder, t)
    at(recorder, 0.0)

    # When the task reports five times before the writer writes
    for done in (0.1, 0.2, 0.3, 0.4, 0.5):
        report(recorder, t, done)

    # Then nothing was written from the task's thread; the writer holds the start and one report
    assert (calls.count, recorder.held_events) == (0, 2)
    # and its thread writes both, in one store call, once they have waited a whole interval
    at(recorder, 60.0)
    at(recorder, 120.0)
    assert (calls.count, recorder.held_events) == (1, 0)
    a = node(manager, sid, "a")
    assert (a.status, a.progress) == (NodeStatus.RUNNING, 0.5)
    assert manager.sync.get_session_status(sid)["progress_percent"] == 25.0
    events = [(e.type, e.node_id, e.node_status) for e in manager.sync.read_events(sid) if e.node_id]
    assert events == [("node", "a", NodeStatus.RUNNING), ("progress", "a", NodeStatus.RUNNING)]  # one report

    # When it reports again and ends before the next flush
    report(recorder, t, 0.9)
    succeed(recorder, t, "ok")
    # Then its outcome went at once, without the report the store would have ignored
    assert (calls.count, recorder.held_events) == (2, 0)
    a = node(manager, sid, "a")
    assert (a.status, a.progress) == (NodeStatus.COMPLETED, None)
    assert manager.sync.get_session_status(sid)["progress_percent"] == 50.0
    assert len([e for e in manager.sync.read_events(sid) if e.node_id]) == 3


def test_a_report_of_zero_is_written(make: Any) -> None:
    recorder, manager = make()
    sid = manager.sync.create_session("p.canvas", 1)
    t = task(recorder, sid, "a")
    start(recorder, t)
    report(recorder, t, 0.6)
    recorder.flush()
    report(recorder, t, 0.0)  # back to the start of a second pass, say
    recorder.flush()
    assert node(manager, sid, "a").progress == 0.0


def test_a_task_does_not_wait_behind_a_store_call_that_hangs(make: Any) -> None:
    # Given a writer whose own flush is stuck in a store call that hangs (a frozen server answers
    # nothing, and each try lasts its socket timeout: 1 s here)
    recorder, manager = make()
    sid = manager.sync.create_session("w.canvas", 3)
    writer = recorder.writer(HOST)
    store = manager.storage
    real = store.record_nodes
    hanging, answer = threading.Event(), threading.Event()
    calls: list[Any] = []

    def record(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            hanging.set()
            answer.wait(5)
        return real(*args, **kwargs)

    store.record_nodes = record  # type: ignore[method-assign]
    a = task(recorder, sid, "a")
    start(recorder, a)
    flushing = threading.Thread(target=writer.flush)
    flushing.start()
    assert hanging.wait(10)

    # When two tasks end meanwhile
    b, c = task(recorder, sid, "b"), task(recorder, sid, "c")
    start(recorder, b)
    succeed(recorder, b, 2)  # waits at most one socket timeout for the flush under way
    assert writer.store_down
    start(recorder, c)
    succeed(recorder, c, 3)  # does not wait at all

    # Then neither waited for the hung call to end, nor made a store call of its own
    assert not answer.is_set() and len(calls) == 1
    # and once the store answers, every outcome is written, and tasks write their own again
    answer.set()
    flushing.join(10)
    writer.flush()
    assert not writer.store_down
    running, completed = NodeStatus.RUNNING, NodeStatus.COMPLETED
    assert [status_of(manager, sid, n) for n in "abc"] == [running, completed, completed]
