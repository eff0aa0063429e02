"""Scenario 1, the hammer: 8 processes x 1000 events on one session, ``TRACKER_HAMMER_REPEATS`` times
over (8 by default, as CI runs it; 20 or more by hand).

Each repeat is a fresh session. Its 8000 events (starts, retries, duplicate successes, failures,
failed-then-completed rewrites) are shuffled and dealt to 8 OS processes, each with its own
:class:`RedisStorageAdapter`, as Celery pool children have. The processes wait at a barrier and then
send their 1000 events each through ``manager.sync.record_node``, at once, on the same session.

What the session must show is computed from the events with :func:`tracker.states.merge_node_status`
(the documented rules). The plan is built so that the end state does not depend on the order the
events land in (checked by folding them in two orders), so any lost, doubled or misplaced count
fails: counters, every node's status and attempts, the final status, and exactly one ``finished``
outcome per session, seen by exactly one caller.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest

from tests.reliability.helpers import all_nodes
from tracker import NodeStatus, SessionManager, SessionStatus, TrackerSettings
from tracker.states import failure_type, merge_node_status
from tracker.storage.redis import RedisStorageAdapter

PROCESSES = 8
EVENTS_PER_PROCESS = 1000
REPEATS = int(os.environ.get("TRACKER_HAMMER_REPEATS", "2"))

SPAWN = multiprocessing.get_context("spawn")

Event = tuple[str, str, int]
"""(node_id, node status, attempt), as a signal handler sends it."""

#: The life of each kind of node: (status, attempt) in the order a worker would send them.
KINDS: dict[str, list[tuple[str, int]]] = {
    "plain": [("running", 1), ("completed", 1)],
    "redelivered": [("running", 1), ("completed", 1), ("running", 1), ("completed", 1)],
    "retried": [("running", 1), ("retrying", 1), ("running", 2), ("completed", 2)],
    "rewritten": [("running", 1), ("failed", 1), ("running", 2), ("completed", 2)],  # failed, then resumed
    "failed": [("running", 1), ("retrying", 1), ("running", 2), ("failed", 2)],
    "failed_twice": [("running", 1), ("failed", 1), ("failed", 1)],  # the same failure delivered twice
}


#: Lives that all end completed (a session of them ends ``completed``; "rewritten" nodes fail first).
SUCCEEDING = ("plain", "redelivered", "retried", "rewritten")


def plan(seed: int, kinds: Sequence[str] = tuple(KINDS)) -> list[Event]:
    """The 8000 events of one repeat, in a seeded random order (duplicates fill the last slots)."""
    rng = random.Random(seed)
    total = PROCESSES * EVENTS_PER_PROCESS
    events: list[Event] = []
    node = 0
    while True:
        life = KINDS[kinds[node % len(kinds)]]
        if len(events) + len(life) > total:
            break
        events += [(f"n{node}", status, attempt) for status, attempt in life]
        node += 1
    terminal = [e for e in events if e[1] in {"completed", "failed"}]
    events += rng.choices(terminal, k=total - len(events))  # more redeliveries of results
    rng.shuffle(events)
    return events


@dataclass(frozen=True)
class Expected:
    nodes: dict[str, NodeStatus]
    attempts: dict[str, int]
    completed: int
    failed: int


def fold(events: list[Event]) -> dict[str, NodeStatus]:
    statuses: dict[str, NodeStatus] = {}
    for nid, status, _ in events:
        statuses[nid] = merge_node_status(statuses.get(nid), NodeStatus(status))
    return statuses


def expected_from(events: list[Event]) -> Expected:
    """The end state the documented rules give, whatever the order the events land in."""
    nodes = fold(events)
    assert fold(list(reversed(events))) == nodes, "the plan must not depend on the order of arrival"
    attempts: dict[str, int] = {}
    for nid, _, attempt in events:
        attempts[nid] = max(attempts.get(nid, 0), attempt)
    counts = Counter(nodes.values())
    assert set(counts) <= {NodeStatus.COMPLETED, NodeStatus.FAILED}
    return Expected(nodes, attempts, counts[NodeStatus.COMPLETED], counts[NodeStatus.FAILED])


def hammer(url: str, prefix: str, repeats: list[tuple[str, list[Event]]], start: Barrier, out: Any) -> None:
    """In a child process: for each repeat, wait for the others, send this hand, report what it saw."""
    try:
        settings = TrackerSettings(redis_url=url, key_prefix=prefix)
        store = RedisStorageAdapter.from_settings(settings)
        manager = SessionManager(storage=store, settings=settings)
        worker = f"celery@hammer:{os.getpid()}"
        for sid, events in repeats:
            finished: list[str] = []
            told: list[str] = []  # the callbacks this process was told to send
            start.wait(timeout=120)
            for nid, status, attempt in events:
                details: dict[str, Any] = {"attempt": attempt, "task_id": f"task-{nid}"}
                if status == "running":
                    details["worker"] = worker
                elif status == "completed":
                    details["result"] = {"node": nid, "attempt": attempt}
                elif status == "failed":
                    details["error"] = RuntimeError(f"{nid} failed on attempt {attempt}")
                else:
                    details["reason"] = "retry"
                outcome = manager.sync._record_node(sid, nid, status, **details)
                if outcome.finished is not None:
                    finished.append(outcome.finished.value)
                told += ["success"] * outcome.succeeded + ["failure"] * bool(outcome.first_failure)
            out.put((sid, os.getpid(), len(events), finished, told))
        store.close()
    except BaseException as exc:  # reported, so the parent fails with the cause rather than a timeout
        out.put(("error", os.getpid(), repr(exc), [], []))
        raise


@pytest.fixture
def processes() -> Iterator[list[SpawnProcess]]:
    started: list[SpawnProcess] = []
    yield started
    for process in started:
        if process.is_alive():
            process.terminate()
        process.join(timeout=10)


def run_hammer(
    redis_url: str,
    key_prefix: str,
    processes: list[SpawnProcess],
    target: Callable[..., None],
    seeds: range,
    kinds: Sequence[str] = tuple(KINDS),
) -> tuple[SessionManager, list[str], list[Expected], list[tuple[Any, ...]], float]:
    """Fresh sessions, one per seed, each with 8000 planned events dealt to 8 processes running
    ``target``, all starting each repeat together. Returns the manager, the session ids, what each
    session must show, the processes' reports and the seconds the sending took."""
    settings = TrackerSettings(redis_url=redis_url, key_prefix=key_prefix)
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    plans = [plan(seed, kinds) for seed in seeds]
    expected = [expected_from(events) for events in plans]
    sids = [manager.sync.create_session("hammer.canvas", len(e.nodes)) for e in expected]
    hands = [[events[p::PROCESSES] for p in range(PROCESSES)] for events in plans]
    assert all(len(hand) == EVENTS_PER_PROCESS for repeat in hands for hand in repeat)

    start, out = SPAWN.Barrier(PROCESSES), SPAWN.Queue()
    for p in range(PROCESSES):
        repeats = [(sids[r], hands[r][p]) for r in range(len(plans))]
        process = SPAWN.Process(target=target, args=(redis_url, key_prefix, repeats, start, out))
        processes.append(process)
        process.start()
    began = time.monotonic()
    reports: list[tuple[Any, ...]] = []
    while len(reports) < PROCESSES * len(plans):
        try:
            report = out.get(timeout=300)
        except queue.Empty:
            pytest.fail(f"the processes sent {len(reports)} of {PROCESSES * len(plans)} reports in time")
        assert report[0] != "error", f"a process failed: {report}"
        reports.append(report)
    elapsed_s = time.monotonic() - began
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    return manager, sids, expected, reports, elapsed_s


def assert_exact(
    manager: SessionManager,
    sids: list[str],
    expected: list[Expected],
    reports: list[Any],
    end: SessionStatus = SessionStatus.PARTIAL_FAILURE,
) -> int:
    """Every session shows exactly what the rules give, exactly one caller saw it finish, and each
    callback was told to exactly one caller (on_success only when it completed)."""
    exact = 0
    for sid, want in zip(sids, expected, strict=True):
        mine = [r for r in reports if r[0] == sid]
        assert sum(r[2] for r in mine) == PROCESSES * EVENTS_PER_PROCESS
        # One end of the run, seen by one caller (a session of late successes may end partial_failure
        # first, and then follow its counts to completed: not a second end)
        assert len([f for r in mine for f in r[3]]) == 1
        told = Counter(t for r in mine for t in r[4])
        assert told == {"failure": 1, **({"success": 1} if end is SessionStatus.COMPLETED else {})}, told
        status = manager.sync.get_session_status(sid)
        assert status["status"] == end.value
        assert (status["completed_nodes"], status["failed_nodes"]) == (want.completed, want.failed)
        assert (status["running_nodes"], status["lost_nodes"], status["cancelled_nodes"]) == (0, 0, 0)
        assert status["progress_percent"] == 100
        nodes = all_nodes(manager, sid)
        assert {nid: node.status for nid, node in nodes.items()} == want.nodes
        assert {nid: node.attempts for nid, node in nodes.items()} == want.attempts
        # and its failures by cause are exactly its failed nodes', grouped
        causes = Counter(failure_type(n.status, n.error.type if n.error else None) for n in nodes.values())
        del causes[None]
        assert {g.error_type: g.count for g in manager.sync.get_failures(sid)} == causes
        assert status["failure_types"] == len(causes)
        exact += 1
    return exact


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eight_processes_hammering_one_session_keep_exact_counts_again_and_again(
    redis_url: str, key_prefix: str, processes: list[SpawnProcess]
) -> None:
    # Given 20 fresh sessions, each with 8000 planned events dealt to 8 processes,
    # When the 8 processes send them through record_node, all starting each repeat together
    manager, sids, expected, reports, elapsed_s = run_hammer(redis_url, key_prefix, processes, hammer, range(REPEATS))

    # Then every repeat shows exactly what the rules give, and exactly one caller saw it finish
    exact = assert_exact(manager, sids, expected, reports)
    assert exact == REPEATS
    print(f"\nhammer: {exact}/{REPEATS} repeats exact, {PROCESSES}x{EVENTS_PER_PROCESS} events each, {elapsed_s:.1f} s")
    manager.storage.close()


WRITER_REPEATS = 5


def hammer_through_writers(
    url: str, prefix: str, repeats: list[tuple[str, list[Event]]], start: Barrier, out: Any
) -> None:
    """In a child process: the same hands, sent through the Celery signal handlers and their writer
    (starts kept and folded into results, events written behind in batches), as a pool child does."""
    from types import SimpleNamespace

    from celery import Celery

    from tracker.celery.handlers import Recorder
    from tracker.celery.stamps import NODE_STAMP, SESSION_STAMP

    try:
        settings = TrackerSettings(redis_url=url, key_prefix=prefix, flush_interval_s=0.01)
        store = RedisStorageAdapter.from_settings(settings)
        manager = SessionManager(storage=store, settings=settings)
        finished: list[tuple[str, str]] = []
        told: list[tuple[str, str]] = []

        class Counting(Recorder):
            def callbacks(self, outcome: Any) -> None:
                sid = outcome.session.session_id
                if outcome.finished is not None:
                    finished.append((sid, outcome.finished.value))
                told.extend([(sid, "success")] * outcome.succeeded + [(sid, "failure")] * bool(outcome.first_failure))

        recorder = Counting(Celery("hammer", set_as_current=False), manager)
        for sid, events in repeats:
            start.wait(timeout=120)
            for nid, status, attempt in events:
                request = SimpleNamespace(id=f"task-{nid}", retries=attempt - 1, hostname="celery@hammer",
                                          stamps={SESSION_STAMP: sid, NODE_STAMP: nid})  # fmt: skip
                task = SimpleNamespace(app=recorder.app, request=request)
                if status == "running":
                    recorder.on_prerun(sender=task, task_id=request.id, task=task)
                elif status == "completed":
                    recorder.on_success(sender=task, result={"node": nid, "attempt": attempt})
                elif status == "failed":
                    recorder.on_failure(sender=task, task_id=request.id, exception=RuntimeError(f"{nid} failed"))
                else:
                    recorder.on_retry(sender=task, request=request, reason="retry")
            recorder.flush()  # after it, every finish of this session's events has been seen
            out.put((sid, os.getpid(), len(events), [status for done, status in finished if done == sid],
                     [kind for done, kind in told if done == sid]))  # fmt: skip
        recorder.stop_writer()
        store.close()
    except BaseException as exc:
        out.put(("error", os.getpid(), repr(exc), [], []))
        raise


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eight_processes_through_the_handlers_writers_keep_exact_counts(
    redis_url: str, key_prefix: str, processes: list[SpawnProcess]
) -> None:
    # Given 5 fresh sessions, each with 8000 planned events dealt to 8 processes,
    # When each process sends its hand through the signal handlers (its writer batching them behind)
    manager, sids, expected, reports, _ = run_hammer(
        redis_url, key_prefix, processes, hammer_through_writers, range(100, 100 + WRITER_REPEATS)
    )

    # Then every session shows exactly what the rules give, and exactly one flush saw it finish
    assert assert_exact(manager, sids, expected, reports) == WRITER_REPEATS
    manager.storage.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_on_success_and_on_failure_are_told_once_under_hammering(
    redis_url: str, key_prefix: str, processes: list[SpawnProcess]
) -> None:
    # Given 3 sessions whose nodes all end completed (some failing first, some delivered twice),
    # When 8 processes send their hands through the signal handlers at once
    manager, sids, expected, reports, _ = run_hammer(
        redis_url, key_prefix, processes, hammer_through_writers, range(200, 203), SUCCEEDING
    )
    # Then each ends completed, and on_success and on_failure were each told to exactly one writer
    assert assert_exact(manager, sids, expected, reports, SessionStatus.COMPLETED) == 3
    manager.storage.close()
