"""Scenario 5: connections cut mid-script, through a TCP proxy of the test's own on loopback.

redis-py sends a command again when its connection breaks (``retry_on_error``), even when the
server had already run it and only the reply was lost (redis-py#3554). Each write is one Lua
script, so the server runs it whole or not at all; the tests check that a re-run changes no count,
that a cut request runs nothing, and that the ``finished`` outcome (what sends the completion
callback) still reaches exactly one caller.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from tests.reliability.conftest import StartRedis
from tests.reliability.helpers import all_nodes, command_calls, text
from tests.reliability.proxy import Proxy, tcp_proxy
from tracker import NodeStatus, SessionManager, TrackerSettings
from tracker.celery.handlers import Recorder
from tracker.celery.stamps import NODE_STAMP, SESSION_STAMP
from tracker.models import BatchOutcome, NodeOutcome, TransitionOutcome
from tracker.states import merge_node_status
from tracker.storage.keys import KeySpace
from tracker.storage.redis import RedisStorageAdapter


@pytest.fixture
def cut(start_redis: StartRedis, key_prefix: str) -> Iterator[tuple[SessionManager, Proxy, redis.Redis]]:
    """A manager talking to a private redis-server through the proxy, and a direct client to that server."""
    server = start_redis()
    with tcp_proxy(server.port) as proxy:
        settings = TrackerSettings(redis_url=proxy.url, key_prefix=key_prefix)
        manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
        # Load every script once: a fault must hit a script run, not the NOSCRIPT answer before it.
        warm = manager.sync.create_session("warm.canvas", 1)
        manager.sync.update_progress(warm, 1)
        manager.sync.update_status(warm, "cancelled")
        manager.sync._reopen_session(warm)
        manager.sync._record_node(warm, "w", "completed")
        direct = redis.Redis(port=server.port)
        direct.config_resetstat()
        yield manager, proxy, direct
        direct.close()
        manager.storage.close()


def recount(direct: redis.Redis, key_prefix: str, sid: str) -> tuple[dict[str, int], dict[str, int]]:
    """The session hash's counters, and the same counters recomputed from its node records."""
    keys = KeySpace(key_prefix).session(sid)
    session = {text(k): text(v) for k, v in direct.hgetall(keys.session).items()}
    statuses = Counter(text(raw).split("|", 1)[0] for raw in direct.hvals(keys.nodes))
    stored = {name: int(session[name]) for name in ("completed", "failed", "running", "retrying", "lost", "cancelled")}
    derived = {
        "completed": statuses["completed"],
        "failed": statuses["failed"] + statuses["lost"],
        "running": statuses["running"],
        "retrying": statuses["retrying"],
        "lost": statuses["lost"],
        "cancelled": statuses["cancelled"],
    }
    return stored, derived


def test_a_lost_reply_is_run_again_and_counts_once(
    cut: tuple[SessionManager, Proxy, redis.Redis], key_prefix: str
) -> None:
    manager, proxy, direct = cut
    sid = manager.sync.create_session("cut.canvas", 3)
    manager.sync._record_node(sid, "a", "running", attempt=1)

    # When the reply to a node's success is lost on the way back
    direct.config_resetstat()
    proxy.arm("reply")
    outcome = manager.sync._record_node(sid, "a", "completed", result={"ok": 1}, attempt=1)

    # Then redis-py ran the script a second time, and the node still counts once
    assert proxy.fired["reply"] == 1
    assert command_calls(direct)["evalsha"] == 2
    assert (outcome.session.completed_nodes, outcome.session.running_nodes) == (1, 0)
    assert outcome.node.status is NodeStatus.COMPLETED
    stored, derived = recount(direct, key_prefix, sid)
    assert stored == derived
    assert stored["completed"] == 1


def test_a_cut_request_runs_nothing_and_the_retry_runs_once(
    cut: tuple[SessionManager, Proxy, redis.Redis], key_prefix: str
) -> None:
    manager, proxy, direct = cut
    sid = manager.sync.create_session("cut.canvas", 2)

    # When the connection breaks half-way through sending a script call
    direct.config_resetstat()
    proxy.arm("request")
    outcome = manager.sync._record_node(sid, "a", "failed", error=RuntimeError("boom"), attempt=1)

    # Then the server never ran the half command: the script ran exactly once, on the retry
    assert proxy.fired["request"] == 1
    assert command_calls(direct)["evalsha"] == 1
    assert (outcome.session.failed_nodes, outcome.session.completed_nodes) == (1, 0)
    stored, derived = recount(direct, key_prefix, sid)
    assert stored == derived


def test_the_caller_whose_finishing_reply_was_lost_still_sees_finished(
    cut: tuple[SessionManager, Proxy, redis.Redis],
) -> None:
    manager, proxy, direct = cut
    sid = manager.sync.create_session("cut.canvas", 2)
    manager.sync._record_node(sid, "a", "completed", result=1)

    # When the reply to the result that ends the session is lost, and redis-py runs the script again
    direct.config_resetstat()
    proxy.arm("reply")
    outcome = manager.sync._record_node(sid, "b", "completed", result=2)

    # Then the re-run answers as the first run did: this caller ended the session (it sends the
    # completion callback; nobody else will)
    assert command_calls(direct)["evalsha"] == 2
    assert outcome.session.status.value == "completed"
    assert outcome.finished is not None and outcome.finished.value == "completed"
    # and a later duplicate of the same result (a redelivery: a new call) is not told so again
    again = manager.sync._record_node(sid, "b", "completed", result=2)
    assert again.finished is None
    assert again.session.completed_nodes == 2


def test_a_finishing_batch_retried_by_the_writer_still_reports_finished_once(
    cut: tuple[SessionManager, Proxy, redis.Redis], key_prefix: str
) -> None:
    # Given a session one result away from its end, and the signal handlers' recorder (its writer
    # retried by hand here: a long flush_interval_s keeps its thread out of the way)
    _, proxy, direct = cut
    manager = slow_writer_manager(proxy.url, key_prefix)
    recorder = CountingRecorder(Celery("cut", set_as_current=False), manager)
    sid = manager.sync.create_session("cut.canvas", 2)
    recorder.submit(_Request(sid, "a"), NodeStatus.COMPLETED, result=1)
    assert manager.sync.get_session_status(sid)["completed_nodes"] == 1  # written as the handler returned

    # When the replies of the call with the last result are lost 4 times in a row (redis-py's own
    # retries give up, the writer holds the call)
    direct.config_resetstat()
    proxy.arm("reply", times=4)
    recorder.submit(_Request(sid, "b"), NodeStatus.COMPLETED, result=2)
    assert recorder.held_events == 1 and recorder.finished == []

    # Then its retry (the same call, the same request id) is told it ended the session: the script
    # ran 5 times, counted once, and the completion was seen exactly once
    (outcome,) = recorder.flush()
    assert proxy.fired["reply"] == 4
    assert command_calls(direct)["evalsha"] == 5
    assert outcome.session.completed_nodes == 2
    assert outcome.finished is not None and outcome.finished.value == "completed"
    assert recorder.finished == ["completed"] and recorder.held_events == 0
    recorder.stop_writer()
    manager.storage.close()


def test_an_outcome_counts_as_held_while_its_write_is_under_way(
    cut: tuple[SessionManager, Proxy, redis.Redis], key_prefix: str
) -> None:
    # Given the handlers' recorder, and a store that stalls every write (CLIENT PAUSE WRITE)
    _, proxy, direct = cut
    manager = slow_writer_manager(proxy.url, key_prefix)
    recorder = CountingRecorder(Celery("cut", set_as_current=False), manager)
    sid = manager.sync.create_session("cut.canvas", 1)
    direct.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
    try:
        # When a task's success is being written (its script waits on the server)
        writing = threading.Thread(target=recorder.submit, args=(_Request(sid, "a"), NodeStatus.COMPLETED))
        writing.start()
        deadline = time.monotonic() + 30
        while direct.info("clients")["blocked_clients"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert direct.info("clients")["blocked_clients"] >= 1

        # Then the event counts as held: a caller waiting for held_events to reach 0 (a worker
        # shutting down, a test) does not go on while the store does not have it
        assert recorder.held_events == 1
    finally:
        direct.execute_command("CLIENT", "UNPAUSE")
    writing.join(timeout=30)
    assert recorder.held_events == 0
    assert manager.sync.get_session_status(sid)["status"] == "completed"
    recorder.stop_writer()
    manager.storage.close()


def slow_writer_manager(url: str, key_prefix: str, flush_interval_s: float = 60.0) -> SessionManager:
    settings = TrackerSettings(redis_url=url, key_prefix=key_prefix, flush_interval_s=flush_interval_s)
    return SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)


class CountingRecorder(Recorder):
    """The handlers' recorder, noting each session end it would send a completion callback for."""

    def __init__(self, app: Celery, manager: SessionManager) -> None:
        super().__init__(app, manager)
        self.finished: list[str] = []

    def callbacks(self, outcome: BatchOutcome | NodeOutcome | TransitionOutcome) -> None:
        if isinstance(outcome, BatchOutcome) and outcome.finished is not None:
            self.finished.append(outcome.finished.value)


class _Request:
    """What the signal handlers read from a task request: its stamps."""

    def __init__(self, sid: str, nid: str) -> None:
        self.stamps = {SESSION_STAMP: sid, NODE_STAMP: nid}


@pytest.mark.timeout(180)
def test_connections_dropped_again_and_again_under_concurrent_writes(
    cut: tuple[SessionManager, Proxy, redis.Redis], key_prefix: str
) -> None:
    # Given 4 threads with 875 events each (starts, duplicate results, failed-then-completed) on one
    # session, sent through the signal handlers' own recorder, writing each event before going on
    # (flush_interval_s 0; its writer thread retries, with backoff, what the store refused)
    _, proxy, direct = cut
    manager = slow_writer_manager(proxy.url, key_prefix, flush_interval_s=0)
    recorder = CountingRecorder(Celery("cut", set_as_current=False), manager)
    nodes = 1000
    events: list[tuple[str, str]] = []
    for n in range(nodes):
        life = [["running", "completed"], ["completed", "completed"], ["running", "failed", "completed"],
                ["running", "failed"]][n % 4]  # fmt: skip
        events += [(f"n{n}", status) for status in life]
    random.Random(5).shuffle(events)
    hands = [events[i::4] for i in range(4)]
    want: dict[str, NodeStatus] = {}
    for nid, status in events:
        want[nid] = merge_node_status(want.get(nid), NodeStatus(status))
    sid = manager.sync.create_session("cut.canvas", nodes)

    def send(hand: list[tuple[str, str]]) -> None:
        for nid, status in hand:
            recorder.submit(_Request(sid, nid), NodeStatus(status), attempt=1)

    # When every open connection is cut every 50 ms while they write, and some replies are swallowed
    senders = [threading.Thread(target=send, args=(hand,)) for hand in hands]
    for thread in senders:
        thread.start()
    drops = 0
    while any(thread.is_alive() for thread in senders):
        time.sleep(0.05)
        if proxy.drop_all():
            drops += 1
            if drops % 5 == 0:
                proxy.arm("reply")
    for thread in senders:
        thread.join()
    deadline = time.monotonic() + 60
    while recorder.held_events and time.monotonic() < deadline:
        time.sleep(0.05)

    # Then every write got through, nothing counts twice and exactly one call saw the session end
    assert recorder.held_events == 0
    assert drops >= 10, "the connections must have been cut while the writes ran"
    stored, derived = recount(direct, key_prefix, sid)
    assert stored == derived
    assert {nid: node.status for nid, node in all_nodes(manager, sid).items()} == want
    session = manager.sync.get_session_status(sid)
    counts = Counter(want.values())
    assert session["completed_nodes"] == counts[NodeStatus.COMPLETED]
    assert session["failed_nodes"] == counts[NodeStatus.FAILED]
    assert recorder.finished == ["partial_failure"]
    recorder.stop_writer()
    manager.storage.close()
    print(f"\ncut: {drops} drops, {proxy.fired['reply']} swallowed replies, {proxy.accepted} connections")
