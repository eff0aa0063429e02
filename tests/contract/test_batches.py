"""Batches of node events (``record_nodes``, ``add_node_results``), on every adapter.

A batch is one store call that must leave the store exactly as the same events sent one by one
would: the Celery handlers' writer sends each process's events that way, so every count the
tracker shows goes through it.
"""

from __future__ import annotations

import random
import threading
from datetime import timedelta

import pytest

from tests.conftest import FakeClock
from tracker import (
    NodeLimitError,
    NodeResult,
    NodeStatus,
    SessionManager,
    TrackerValidationError,
)
from tracker.storage.base import NodeEvent

STATUSES = ["running", "retrying", "completed", "failed", "cancelled", "lost"]


async def new_session(manager: SessionManager, node_count: int) -> str:
    return await manager.create_session(canvas_path="batch.canvas", node_count=node_count)


async def state(manager: SessionManager, sid: str) -> tuple[dict[str, object], dict[str, tuple[object, ...]]]:
    """The session's counters and status, and every node's status, attempts, task and result."""
    status = await manager.get_session_status(sid)
    session = {k: status[k] for k in ("status", "completed_nodes", "failed_nodes", "running_nodes",
                                      "lost_nodes", "cancelled_nodes", "progress_percent")}  # fmt: skip
    nodes = {
        n.node_id: (n.status, n.attempts, n.task_id, n.result) for n in (await manager.get_nodes(sid, limit=1000)).nodes
    }
    return session, nodes


def random_events(seed: int, nodes: int, count: int) -> list[tuple[str, str, dict[str, object]]]:
    rng = random.Random(seed)
    events = []
    for _ in range(count):
        status = rng.choice(STATUSES)
        details: dict[str, object] = {"attempt": rng.randint(1, 3), "task_id": rng.choice(["t1", "t2"])}
        if status == "completed":
            details["result"] = rng.randint(0, 9)
        events.append((f"n{rng.randrange(nodes)}", status, details))
    return events


@pytest.mark.parametrize("seed", range(8))
async def test_a_batch_leaves_what_the_same_events_one_by_one_leave(manager: SessionManager, seed: int) -> None:
    # Given two sessions and one random sequence of node events (duplicates, late starts, retries)
    events = random_events(seed, nodes=6, count=30)
    one_by_one, batched = await new_session(manager, 6), await new_session(manager, 6)

    # When one session gets them one call each and the other in one call
    for node_id, status, details in events:
        await manager._record_node(one_by_one, node_id, status, **details)
    batch = [manager.operations.node_event(batched, node_id, status, **details) for node_id, status, details in events]
    outcome = await manager._record_nodes(batched, batch)

    # Then both sessions hold the same, and the batch's answer is the session after it
    assert await state(manager, batched) == await state(manager, one_by_one)
    assert outcome.session.to_dict() == await manager.get_session_status(batched)


async def test_a_batchs_session_is_the_one_its_call_left_even_when_read_after_later_calls(
    manager: SessionManager,
) -> None:
    # Given a batch's outcome whose session nobody has read yet
    sid = await new_session(manager, 3)
    first = await manager._record_nodes(sid, [manager.operations.node_event(sid, "a", "completed", 1)])

    # When more results come and end the session before its session is read
    last = await manager._record_nodes(
        sid, [manager.operations.node_event(sid, node, "completed", 1) for node in ("b", "c")]
    )

    # Then it is the session as that call left it, and the last call's is the ended one
    assert (first.session.completed_nodes, first.session.status, first.finished) == (1, "running", None)
    assert (last.session.completed_nodes, last.session.status, last.finished) == (3, "completed", "completed")
    assert first.session is first.session  # read once


async def test_a_folded_start_counts_as_the_start_then_the_result(manager: SessionManager, clock: FakeClock) -> None:
    sid = await new_session(manager, 2)
    started = clock.now
    clock.advance(3)
    folded = manager.operations.node_event(
        sid, "a", "completed", 7, attempt=2, task_id="t", worker="w:1", started_at=started
    )
    outcome = await manager._record_nodes(sid, [folded])
    node = (await manager.get_nodes(sid)).nodes[0]
    assert (node.status, node.attempts, node.task_id, node.worker, node.result) == (
        NodeStatus.COMPLETED,
        2,
        "t",
        "w:1",
        7,
    )
    assert (node.started_at, node.finished_at) == (started, started + timedelta(seconds=3))
    assert outcome.session.running_nodes == 0 and outcome.session.completed_nodes == 1
    assert outcome.session.status.value == "running" and outcome.finished is None


async def test_events_carry_their_own_time(manager: SessionManager, clock: FakeClock) -> None:
    sid = await new_session(manager, 1)
    at = clock.now - timedelta(seconds=5)
    await manager._record_nodes(sid, [manager.operations.node_event(sid, "a", "running", at=at)])
    assert (await manager.get_nodes(sid)).nodes[0].started_at == at


async def test_a_batch_over_the_node_limit_changes_nothing(manager: SessionManager) -> None:
    sid = await new_session(manager, 3)
    await manager.add_node_result(sid, "a", 1)
    before = await state(manager, sid)
    events = [manager.operations.node_event(sid, nid, "completed", 1) for nid in ("b", "a", "c", "d")]
    with pytest.raises(NodeLimitError):
        await manager._record_nodes(sid, events)
    assert await state(manager, sid) == before
    # the same node twice is one node: this batch fits
    status = await manager.add_node_results(sid, {"b": 2, "c": 3})
    assert (status["status"], status["completed_nodes"]) == ("completed", 3)


async def test_add_node_results_takes_a_mapping_or_node_results(manager: SessionManager) -> None:
    sid = await new_session(manager, 4)
    status = await manager.add_node_results(sid, {"a": {"rows": 1}, "b": None})
    assert (status["completed_nodes"], status["progress_percent"]) == (2, 50)
    status = await manager.add_node_results(
        sid,
        [
            NodeResult(node_id="c", status=NodeStatus.FAILED, attempts=2),
            NodeResult(node_id="d", status="completed", result=[1]),
        ],
    )
    assert (status["status"], status["completed_nodes"], status["failed_nodes"]) == ("partial_failure", 3, 1)
    nodes = {n.node_id: n for n in (await manager.get_nodes(sid)).nodes}
    assert nodes["a"].result == {"rows": 1} and nodes["d"].result == [1] and nodes["c"].attempts == 2


@pytest.mark.parametrize(
    "results",
    [
        {"ok": 1, "bad id!": 2},
        {"ok": 1, "big": "x" * 70_000},
        {"ok": 1, "nan": float("nan")},
        ["not a NodeResult"],
        "ab",
        5,
    ],
)
async def test_bad_batch_input_is_refused_and_changes_nothing(manager: SessionManager, results: object) -> None:
    sid = await new_session(manager, 3)
    before = await state(manager, sid)
    with pytest.raises(TrackerValidationError):
        await manager.add_node_results(sid, results)  # type: ignore[arg-type]
    assert await state(manager, sid) == before


async def test_record_nodes_takes_node_events_only(manager: SessionManager) -> None:
    sid = await new_session(manager, 3)
    with pytest.raises(TrackerValidationError):
        await manager._record_nodes(sid, [("a", "completed")])  # type: ignore[list-item]
    with pytest.raises(TrackerValidationError):
        await manager._record_nodes(sid, [NodeEvent(node_id="a b", status=NodeStatus.COMPLETED)])
    with pytest.raises(TrackerValidationError):
        manager.operations.node_event(sid, "a", "completed", at="yesterday")


def test_concurrent_batches_finish_the_session_exactly_once(manager: SessionManager) -> None:
    # Given a session of 400 nodes, and 8 threads each sending 50 of them (and some of the others'
    # again) in batches of 10
    sid = manager.sync.create_session("batch.canvas", 400)
    finishes: list[str] = []
    lock = threading.Lock()

    def send(hand: int) -> None:
        ids = [f"n{hand * 50 + i}" for i in range(50)] + [f"n{(hand * 50 + 77) % 400}"]
        for first in range(0, len(ids), 10):
            events = [manager.operations.node_event(sid, nid, "completed", 1) for nid in ids[first : first + 10]]
            outcome = manager.sync._record_nodes(sid, events)
            if outcome.finished is not None:
                with lock:
                    finishes.append(outcome.finished.value)

    threads = [threading.Thread(target=send, args=(hand,)) for hand in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then every node counts once and exactly one call was told it ended the session
    status = manager.sync.get_session_status(sid)
    assert (status["status"], status["completed_nodes"]) == ("completed", 400)
    assert finishes == ["completed"]
