"""Scenario 2, redelivery: a prefork worker SIGKILLed mid-batch; the broker gives its tasks to the next one.

``task_acks_late`` keeps a message unacknowledged until its task has run; the Redis broker puts
back a message left unacknowledged longer than ``visibility_timeout`` (2 s here) when a consumer
sweeps (every second here, see :mod:`tests.reliability.appmod`). No resume: recovery is by
redelivery alone, and every node must be counted exactly once.
"""

from __future__ import annotations

import time

import pytest
from celery import group

from tests.reliability import appmod
from tests.reliability.conftest import MakeWorker
from tests.reliability.helpers import TERMINAL, all_nodes, wait_for
from tracker import NodeStatus, SessionManager, TrackerSettings
from tracker.celery import dispatch
from tracker.storage.redis import RedisStorageAdapter

NODES = 30


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tasks_of_a_sigkilled_worker_are_redelivered_and_every_node_counts_once(
    make_worker: MakeWorker, redis_url: str, key_prefix: str, rel_queue: str
) -> None:
    settings = TrackerSettings(redis_url=redis_url, key_prefix=key_prefix)
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    # Given a prefork worker (acks_late, 2 s visibility timeout) running a batch of slow nodes
    first = make_worker(redis_url, concurrency=2, visibility_s=2)
    first.wait_ready()
    calls = [appmod.step.s(i, sleep_s=0.3).set(queue=rel_queue) for i in range(NODES)]
    sid = dispatch(group(calls), canvas_path="redelivery.canvas", app=appmod.app, manager=manager,
                   node_ids=[f"n{i}" for i in range(NODES)])  # fmt: skip
    wait_for(lambda: manager.sync.get_session_status(sid)["completed_nodes"] >= 4, 60, "first results")
    wait_for(lambda: manager.sync.get_session_status(sid)["running_nodes"] >= 1, 30, "a node running")

    # When the worker and its pool children are SIGKILLed mid-batch (nothing acks, nothing reports)
    first.kill()
    killed_at = time.monotonic()
    stalled = manager.sync.get_session_status(sid)
    held = {nid for nid, node in all_nodes(manager, sid).items() if node.status is NodeStatus.RUNNING}
    assert stalled["status"] == "running" and stalled["completed_nodes"] < NODES
    assert held, "the killed worker must have been running nodes"
    # and another worker starts: it gets the queued tasks, and the dead one's once the timeout passed
    second = make_worker(redis_url, concurrency=2, visibility_s=2)

    # Then the session completes by itself, every node counted exactly once
    wait_for(lambda: manager.sync.get_session_status(sid)["status"] in TERMINAL, 180, "the session to end")
    recovered_s = time.monotonic() - killed_at
    status = manager.sync.get_session_status(sid)
    assert (status["status"], status["completed_nodes"], status["failed_nodes"]) == ("completed", NODES, 0)
    assert (status["running_nodes"], status["lost_nodes"], status["cancelled_nodes"]) == (0, 0, 0)
    nodes = all_nodes(manager, sid)
    assert len(nodes) == NODES
    assert all(node.result["doubled"] == 2 * int(nid[1:]) for nid, node in nodes.items())
    # and the nodes the dead worker held were run again, by the new worker (redelivered, not resumed)
    second_host = second.name.split("@", 1)[0]
    for nid in held:
        assert (nodes[nid].worker or "").startswith(second_host + "@"), nodes[nid]
    assert {event.type for event in manager.sync.read_events(sid, limit=1000)} == {"created", "node"}  # no resume
    print(f"\nredelivery: {len(held)} node(s) held by the killed worker redelivered; {NODES}/{NODES} counted once; "
          f"completed {recovered_s:.1f} s after the kill")  # fmt: skip
    manager.storage.close()
