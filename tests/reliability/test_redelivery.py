"""Scenario 2, redelivery: a prefork worker SIGKILLed mid-batch; the broker gives its tasks to the next one.

``task_acks_late`` keeps a message unacknowledged until its task has run; the Redis broker puts
back a message left unacknowledged longer than ``visibility_timeout`` (2 s here) when a consumer
sweeps (every second here, see :mod:`tests.reliability.appmod`). No resume: recovery is by
redelivery alone, and every node must be counted exactly once.
"""

from __future__ import annotations

import json
import time

import pytest
import redis
from celery import group

from tests.reliability import appmod
from tests.reliability.conftest import MakeWorker
from tests.reliability.helpers import TERMINAL, Reaper, all_nodes, wait_for
from tracker import NodeStatus, SessionManager, TrackerSettings
from tracker.celery import dispatch
from tracker.celery.handlers import Recorder
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


@pytest.mark.timeout(240)
def test_a_message_lost_with_a_dead_worker_does_not_leave_its_session_waiting(
    make_worker: MakeWorker, redis_url: str, key_prefix: str, rel_queue: str, rel_broker: str
) -> None:
    # Given a worker that dies (SIGKILL), and a batch of 8 whose message for n3 died with it: kombu's
    # Redis transport pops a message before it records it as unacknowledged, so a worker killed in
    # between takes it along (done here by taking it out of the queue, deterministically)
    fast = {"TRACKER_HEARTBEAT_INTERVAL_S": "0.5", "TRACKER_WORKER_STALE_AFTER_S": "2"}
    settings = TrackerSettings(redis_url=redis_url, key_prefix=key_prefix, worker_stale_after_s=2)
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    first = make_worker(redis_url, concurrency=2, visibility_s=2, env_extra=fast)
    first.wait_ready()
    store = redis.Redis.from_url(redis_url)
    wait_for(lambda: store.zcard(f"{key_prefix}:workers") >= 2, 30, "the pool children's heartbeats")
    first.kill()
    calls = [appmod.step.s(i).set(queue=rel_queue) for i in range(8)]
    sid = dispatch(
        group(calls),
        canvas_path="gone.canvas",
        app=appmod.app,
        manager=manager,
        node_ids=[f"n{i}" for i in range(8)],
        on_complete=appmod.completion.s().set(queue=rel_queue),
    )
    broker = redis.Redis.from_url(rel_broker)
    gone_task = next(n.task_id for n in all_nodes(manager, sid).values() if n.node_id == "n3")
    (message,) = [m for m in broker.lrange(rel_queue, 0, -1) if gone_task and gone_task.encode() in m]
    assert broker.lrem(rel_queue, 1, message) == 1
    # When another worker runs the rest, and the reaper runs every 0.5 s (beat's task, sped up), with
    # the workers' broker settings (the message could come back within 2 + 1 s: visibility, sweep)
    make_worker(redis_url, concurrency=2, visibility_s=2, env_extra=fast)
    options = dict(appmod.app.conf.broker_transport_options)
    appmod.app.conf.broker_transport_options = {**options, "visibility_timeout": 2}
    reaper = Reaper(Recorder(appmod.app, manager), 0.5)
    reaper.start()
    try:
        # Then the session ends by itself: n3 lost ("never ran"), every other node completed once
        wait_for(lambda: manager.sync.get_session_status(sid)["status"] in TERMINAL, 90, "the session to end")
    finally:
        reaper.stop()
        appmod.app.conf.broker_transport_options = options
    assert reaper.errors == []
    status = manager.sync.get_session_status(sid)
    assert (status["status"], status["completed_nodes"], status["lost_nodes"]) == ("partial_failure", 7, 1)
    n3 = all_nodes(manager, sid)["n3"]
    assert n3.status is NodeStatus.LOST and n3.reason is not None and "never ran" in n3.reason
    # and on_complete said so, once
    wait_for(lambda: store.llen(appmod.CALLBACKS_KEY.format(sid)) >= 1, 30, "the on_complete callback")
    time.sleep(1.0)  # room for a second call to show
    (said,) = [json.loads(raw) for raw in store.lrange(appmod.CALLBACKS_KEY.format(sid), 0, -1)]
    assert (said["status"], said["completed_nodes"]) == ("partial_failure", 7)
    store.close()
    broker.close()
    manager.storage.close()
