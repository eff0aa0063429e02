"""Many OS processes on one session: counts stay exact, one finish, one transition winner.

Each worker is a separate OS process with its own :class:`RedisStorageAdapter` and
:class:`SessionManager`, as Celery pool children have (``spawn`` for the hammer, so nothing is
inherited; ``fork`` for the transition race, whose eight workers then start in milliseconds).
They start each round together (a barrier) and report what they saw through a queue. The
expected counters and status are computed from the events sent, so any lost, doubled or
misplaced count fails the test.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.context import ForkProcess, SpawnProcess
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest

from tracker import InvalidStateTransitionError, NodeStatus, SessionManager, SessionStatus, TrackerSettings
from tracker.storage.redis import RedisStorageAdapter

#: Worker processes per test.
PROCESSES = 4
#: Distinct nodes per hammered session (5 kinds of node, 9 events per 5 nodes: 540 events per process).
NODES = 1200
#: Sessions hammered one after another by the same processes.
ROUNDS = 3

SPAWN = multiprocessing.get_context("spawn")

Event = tuple[str, str]
"""(node_id, node status) as one worker sends it."""


def node_events(node: int) -> list[Event]:
    """The events of one node, by its kind: plain, started, duplicated, failed then completed, failed twice."""
    nid = f"n{node}"
    kind = node % 5
    statuses = [
        ["completed"],
        ["running", "completed"],
        ["completed", "completed"],  # the same success delivered twice (acks_late redelivery)
        ["failed", "completed"],  # failed, then succeeded on a retry or resume
        ["failed", "failed"],  # the same failure delivered twice
    ][kind]
    return [(nid, status) for status in statuses]


@dataclass(frozen=True)
class Expected:
    completed: int
    failed: int
    status: SessionStatus
    node_statuses: dict[str, NodeStatus]


def expected_from(events: list[Event]) -> Expected:
    """What the session must show after ``events``, in whatever order they arrive.

    A node with a ``completed`` event ends completed (completed is final and replaces a failure);
    otherwise it ends failed. The session finishes when the last node gets its first result: nodes
    that only ever fail are failed then, nodes that only ever complete are completed then, so with
    both kinds present the finish is ``partial_failure`` whatever the order.
    """
    seen: dict[str, set[str]] = {}
    for nid, status in events:
        seen.setdefault(nid, set()).add(status)
    final = {nid: NodeStatus.COMPLETED if "completed" in s else NodeStatus.FAILED for nid, s in seen.items()}
    only_completed = sum(1 for s in seen.values() if s & {"completed", "failed"} == {"completed"})
    only_failed = sum(1 for s in seen.values() if s & {"completed", "failed"} == {"failed"})
    assert only_completed and only_failed, "the plan must make the finish status order-independent"
    counts = Counter(final.values())
    return Expected(counts[NodeStatus.COMPLETED], counts[NodeStatus.FAILED], SessionStatus.PARTIAL_FAILURE, final)


def deal(events: list[Event], seed: int, hands: int) -> list[list[Event]]:
    """Shuffle ``events`` and deal them round-robin into ``hands`` lists (duplicates land in different hands)."""
    shuffled = list(events)
    random.Random(seed).shuffle(shuffled)
    return [shuffled[i::hands] for i in range(hands)]


def open_manager(url: str, key_prefix: str) -> tuple[SessionManager, RedisStorageAdapter]:
    settings = TrackerSettings(redis_url=url, key_prefix=key_prefix)
    store = RedisStorageAdapter.from_settings(settings)
    return SessionManager(storage=store, settings=settings), store


def hammer_worker(url: str, key_prefix: str, rounds: list[tuple[str, list[Event]]], start: Barrier, out: Any) -> None:
    """In a child process: send each round's events, report ``(pid, sid, sent, finished statuses)``."""
    try:
        manager, store = open_manager(url, key_prefix)
        for sid, events in rounds:
            finished: list[str] = []
            start.wait(timeout=60)
            for nid, status in events:
                if status == "completed":
                    outcome = manager.sync._record_node(sid, nid, status, result={"ok": 1}, worker=f"w{os.getpid()}")
                elif status == "failed":
                    outcome = manager.sync._record_node(sid, nid, status, error=RuntimeError("boom"))
                else:
                    outcome = manager.sync._record_node(sid, nid, status)
                if outcome.finished is not None:
                    finished.append(outcome.finished.value)
            out.put((os.getpid(), sid, len(events), finished))
        store.close()
    except BaseException as exc:  # reported, so the parent fails with the cause instead of a timeout
        out.put((os.getpid(), "error", repr(exc), []))
        raise


def race_worker(url: str, key_prefix: str, sids: list[str], target: str, start: Barrier, out: Any) -> None:
    """In a child process: ask each session to move to ``target`` at once with the others."""
    try:
        manager, store = open_manager(url, key_prefix)
        for sid in sids:
            start.wait(timeout=60)
            try:
                manager.sync.update_status(sid, target)
                out.put((sid, target, "won", ""))
            except InvalidStateTransitionError as exc:
                out.put((sid, target, "lost", f"{exc.from_status}->{exc.to_status}"))
        store.close()
    except BaseException as exc:
        out.put(("error", target, repr(exc), ""))
        raise


@pytest.fixture
def processes() -> Iterator[list[SpawnProcess | ForkProcess]]:
    """Worker processes a test starts; any still alive at the end are terminated."""
    started: list[SpawnProcess | ForkProcess] = []
    yield started
    for process in started:
        if process.is_alive():
            process.terminate()
        process.join(timeout=10)


def collect(out: Any, count: int) -> list[tuple[Any, ...]]:
    """``count`` reports from the workers; a worker's error fails the test with its cause."""
    reports: list[tuple[Any, ...]] = []
    for _ in range(count):
        try:
            report = out.get(timeout=120)
        except queue.Empty:
            pytest.fail(f"workers reported {len(reports)} of {count} results in time")
        assert report[1] != "error" and report[0] != "error", f"a worker failed: {report}"
        reports.append(report)
    return reports


def test_processes_hammering_one_session_keep_exact_counts(
    redis_url: str, key_prefix: str, processes: list[SpawnProcess | ForkProcess]
) -> None:
    # Given ROUNDS sessions of NODES nodes and, for each, events with duplicates and rewrites dealt
    # to PROCESSES workers
    manager, store = open_manager(redis_url, key_prefix)
    events = [event for node in range(NODES) for event in node_events(node)]
    expected = expected_from(events)
    sids = [manager.sync.create_session("hammer.canvas", NODES) for _ in range(ROUNDS)]
    hands = [deal(events, seed=round_, hands=PROCESSES) for round_ in range(ROUNDS)]
    assert all(len(hand) >= 500 for round_hands in hands for hand in round_hands)

    # When the workers send them, all starting each round at once
    start, out = SPAWN.Barrier(PROCESSES), SPAWN.Queue()
    for worker in range(PROCESSES):
        rounds = [(sids[r], hands[r][worker]) for r in range(ROUNDS)]
        args = (redis_url, key_prefix, rounds, start, out)
        process: SpawnProcess | ForkProcess = SPAWN.Process(target=hammer_worker, args=args)
        processes.append(process)
        process.start()
    reports = collect(out, PROCESSES * ROUNDS)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    # Then every session shows exactly what was sent, and exactly one worker saw it finish
    assert sum(report[2] for report in reports) == len(events) * ROUNDS
    assert len({report[0] for report in reports}) == PROCESSES
    for sid in sids:
        status = manager.sync.get_session_status(sid)
        assert (status["completed_nodes"], status["failed_nodes"]) == (expected.completed, expected.failed)
        assert (status["running_nodes"], status["lost_nodes"], status["cancelled_nodes"]) == (0, 0, 0)
        assert status["status"] == expected.status.value
        assert status["progress_percent"] == 100
        assert status["finished_at"] is not None
        finishes = [finished for report in reports if report[1] == sid for finished in report[3]]
        assert finishes == [expected.status.value]
        nodes, cursor = {}, None
        while True:
            page = manager.sync.get_nodes(sid, cursor=cursor, limit=1000)
            nodes.update({node.node_id: node.status for node in page.nodes})
            if (cursor := page.next_cursor) is None:
                break
        assert nodes == expected.node_statuses
    store.close()


def test_concurrent_transitions_from_many_processes_have_one_winner(
    redis_url: str, key_prefix: str, processes: list[SpawnProcess | ForkProcess]
) -> None:
    # Given running sessions, and one process per terminal target (two per target)
    manager, store = open_manager(redis_url, key_prefix)
    sids = []
    for _ in range(10):
        sid = manager.sync.create_session("race.canvas", 2)
        manager.sync.update_status(sid, "running")
        sids.append(sid)
    targets = [s.value for s in (SessionStatus.COMPLETED, SessionStatus.PARTIAL_FAILURE, SessionStatus.FAILED,
                                 SessionStatus.CANCELLED)] * 2  # fmt: skip

    # When all processes ask each session to move at the same moment
    # Spawned, not forked: a child forked while one of the test process's threads (a writer, a web
    # server of an earlier test) held a lock could hang on it, and break the barrier for all.
    start, out = SPAWN.Barrier(len(targets)), SPAWN.Queue()
    for target in targets:
        args = (redis_url, key_prefix, sids, target, start, out)
        process: SpawnProcess | ForkProcess = SPAWN.Process(target=race_worker, args=args)
        processes.append(process)
        process.start()
    reports = collect(out, len(targets) * len(sids))
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    # Then each session has exactly one winner; every other caller got InvalidStateTransitionError
    # naming the winner's status as the one it could not leave
    for sid in sids:
        mine = [r for r in reports if r[0] == sid]
        winners = [target for _, target, result, _ in mine if result == "won"]
        assert len(winners) == 1, mine
        assert manager.sync.get_session_status(sid)["status"] == winners[0]
        losers = sorted(detail for _, _, result, detail in mine if result == "lost")
        expected_losers = sorted(f"{winners[0]}->{t}" for t in targets)
        expected_losers.remove(f"{winners[0]}->{winners[0]}")
        assert losers == expected_losers
    store.close()
