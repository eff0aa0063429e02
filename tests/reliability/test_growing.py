"""Sessions that grow while they run, on real prefork workers and both brokers: a task adds nodes
to its own session (``add_nodes``), and its process is SIGKILLed after it added them."""

from __future__ import annotations

import pytest
import redis
from celery import group

from tests.reliability import appmod
from tests.reliability.conftest import BROKERS, MakeWorker
from tests.reliability.helpers import TERMINAL, all_nodes, wait_for
from tracker import NodeStatus, SessionManager, TrackerSettings
from tracker.celery import dispatch
from tracker.storage.redis import RedisStorageAdapter


@pytest.mark.timeout(180)
@pytest.mark.parametrize("rel_broker_url", BROKERS, indirect=True)
def test_a_task_redelivered_after_sigkill_adds_its_nodes_once(
    rel_broker_url: str, make_worker: MakeWorker, redis_url: str, key_prefix: str, rel_queue: str
) -> None:
    settings = TrackerSettings(redis_url=redis_url, key_prefix=key_prefix)
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    store = redis.Redis.from_url(redis_url)
    runs_key = f"{key_prefix}:fan-runs"
    # Given a prefork worker, and a batch of one task that adds 5 nodes to its own session, then
    # dies by SIGKILL on its first run (after adding and sending them, before returning)
    make_worker(redis_url, concurrency=2, broker_url=rel_broker_url).wait_ready()
    fan = appmod.fan.s(5, runs_key, die_on_first_run=True).set(queue=rel_queue)
    sid = dispatch(group([fan]), canvas_path="fan.canvas", app=appmod.app, manager=manager, node_ids=["fan"])

    # When the broker delivers it again and it runs to its end
    wait_for(lambda: int(store.get(runs_key) or 0) >= 2, 120, "the task's second run")
    wait_for(
        lambda: (
            manager.sync.get_session_status(sid)["status"] in TERMINAL
            and manager.sync.get_session_status(sid)["completed_nodes"] == 6
        ),
        120,
        "the session to end with every node completed",
    )

    # Then the second run added nothing: 6 nodes, each counted once, the session completed
    status = manager.sync.get_session_status(sid)
    assert (status["status"], status["node_count"], status["completed_nodes"]) == ("completed", 6, 6)
    assert (status["failed_nodes"], status["running_nodes"], status["pending_nodes"]) == (0, 0, 0)
    nodes = all_nodes(manager, sid)
    assert nodes["fan"].status is NodeStatus.COMPLETED and nodes["fan"].result == 5
    added = sorted((node.result["i"], node.status) for nid, node in nodes.items() if nid != "fan")
    assert added == [(i, NodeStatus.COMPLETED) for i in range(5)]
    assert [e.type for e in manager.sync.read_events(sid, limit=1000)].count("added") == 1
    store.close()
    manager.storage.close()
