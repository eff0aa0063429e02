"""Scenarios 3 and 4: the store's redis-server restarted mid-batch, then unreachable for a whole batch.

The store is a redis-server of the test's own with the append-only file on (its data survives a
stop), separate from the broker's, so the tasks keep flowing while it is down. Real prefork
workers run the batch; their signal handlers retry a failed write with backoff (redis-py's own
retries, then ``RETRY_BACKOFF_S``) and then log it and let the task go on.
"""

from __future__ import annotations

import time

import pytest
import redis
from celery import group

from tests.reliability import appmod
from tests.reliability.conftest import MakeWorker, StartRedis
from tests.reliability.helpers import TERMINAL, Reaper, all_nodes, wait_for
from tracker import SessionManager, StorageUnavailableError, TrackerSettings
from tracker.celery import dispatch
from tracker.celery.handlers import Recorder
from tracker.storage.redis import RedisStorageAdapter

GIVE_UP = "tracker: could not record node"


def store_manager(url: str, key_prefix: str) -> SessionManager:
    settings = TrackerSettings(redis_url=url, key_prefix=key_prefix)
    return SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_store_restarted_mid_batch_converges_to_exact_counts(
    start_redis: StartRedis, make_worker: MakeWorker, key_prefix: str, rel_queue: str
) -> None:
    # Given a batch of 40 slow nodes running on a prefork worker, its store a redis-server with AOF
    store = start_redis("--appendonly", "yes")
    manager = store_manager(store.url, key_prefix)
    worker = make_worker(store.url, concurrency=2)
    worker.wait_ready()
    calls = [appmod.step.s(i, sleep_s=0.15).set(queue=rel_queue) for i in range(40)]
    sid = dispatch(group(calls), canvas_path="restart.canvas", app=appmod.app, manager=manager,
                   node_ids=[f"n{i}" for i in range(40)])  # fmt: skip
    wait_for(lambda: manager.sync.get_session_status(sid)["completed_nodes"] >= 6, 60, "first results")

    # When the store is stopped mid-batch and started again on the same port 1.5 s later
    down_at = time.time()
    store.stop()
    time.sleep(1.5)  # the outage itself (tasks keep running meanwhile)
    store.start()
    up_at = time.time()

    # Then every task succeeded, the handlers' retries got every event in, and the counts are exact
    wait_for(lambda: manager.sync.get_session_status(sid)["status"] in TERMINAL, 120, "the session to end")
    status = manager.sync.get_session_status(sid)
    assert (status["status"], status["completed_nodes"], status["failed_nodes"]) == ("completed", 40, 0)
    assert (status["running_nodes"], status["lost_nodes"], status["pending_nodes"]) == (0, 0, 0)
    nodes = all_nodes(manager, sid)
    assert all(node.result["doubled"] == 2 * int(nid[1:]) for nid, node in nodes.items())
    assert all(appmod.app.AsyncResult(node.task_id).state == "SUCCESS" for node in nodes.values())
    during = [nid for nid, node in nodes.items() if down_at <= node.result["done_at"] <= up_at]
    assert during, "some tasks must have finished while the store was down (their results were retried in)"
    assert GIVE_UP not in worker.output
    print(f"\nrestart: store down {up_at - down_at:.1f} s; {len(during)} results sent meanwhile, all retried in; "
          "40/40 exact")  # fmt: skip
    manager.storage.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_store_unreachable_for_a_whole_batch_never_breaks_a_task_nor_lies(
    start_redis: StartRedis, make_worker: MakeWorker, key_prefix: str, rel_queue: str, rel_broker: str
) -> None:
    # Given a batch of 4 nodes dispatched (the session is stored as pending) and the store then down
    store = start_redis("--appendonly", "yes")
    manager = store_manager(store.url, key_prefix)
    calls = [appmod.step.s(i).set(queue=rel_queue) for i in range(4)]
    sid = dispatch(group(calls), canvas_path="down.canvas", app=appmod.app, manager=manager)
    task_ids = [node.task_id for node in all_nodes(manager, sid).values()]
    store.stop()

    # When a worker runs the whole batch while the store stays unreachable
    started = time.monotonic()
    worker = make_worker(store.url, concurrency=4)

    # Then every task succeeded with its own result: nothing was raised into it
    results = [appmod.app.AsyncResult(t).get(timeout=60) for t in task_ids]
    ran_s = time.monotonic() - started
    assert sorted(r["i"] for r in results) == [0, 1, 2, 3]
    assert all(r["doubled"] == 2 * r["i"] for r in results)
    # and each worker process said once, clearly, that it holds its events for later
    wait_for(lambda: GIVE_UP in worker.output, 30, "the store-unreachable warning")
    assert "Redis is unreachable" in worker.output and "holding this process's events" in worker.output
    warnings = worker.output.count(GIVE_UP)
    assert 1 <= warnings <= 8
    assert "unexpected error" not in worker.output and "Traceback" not in worker.output
    # while the store is down nothing claims progress it cannot know
    store.start()
    status = manager.sync.get_session_status(sid)
    assert status["completed_nodes"] in range(5) and status["failed_nodes"] == 0

    # When the store is back (its data from before the outage intact: AOF)
    # Then the worker replays what it held, and every node counts exactly once, without a resume
    wait_for(lambda: manager.sync.get_session_status(sid)["status"] in TERMINAL, 60, "held events replayed")
    status = manager.sync.get_session_status(sid)
    assert (status["status"], status["completed_nodes"], status["failed_nodes"]) == ("completed", 4, 0)
    assert "replayed" in worker.output
    nodes = all_nodes(manager, sid)
    assert all(n.attempts == 1 and n.result is not None for n in nodes.values())
    print(f"\nunreachable: 4/4 tasks succeeded in {ran_s:.1f} s, {warnings} warning(s); "
          "after restart: held events replayed -> 4/4 exact")  # fmt: skip
    manager.storage.close()


def test_dispatch_with_the_store_down_refuses_and_sends_nothing(
    start_redis: StartRedis, key_prefix: str, rel_queue: str, rel_broker: str
) -> None:
    # Given a store that is down
    store = start_redis()
    manager = store_manager(store.url, key_prefix)
    store.stop()
    # When a batch is dispatched, Then it is refused with the store's error and no task was sent
    with pytest.raises(StorageUnavailableError):
        dispatch(group(appmod.step.s(i).set(queue=rel_queue) for i in range(3)), canvas_path="x.canvas",
                 app=appmod.app, manager=manager)  # fmt: skip
    assert redis.Redis.from_url(rel_broker).llen(rel_queue) == 0
    manager.storage.close()


@pytest.mark.timeout(240)
def test_an_outage_twice_the_stale_limit_never_makes_a_live_workers_nodes_lost(
    start_redis: StartRedis, make_worker: MakeWorker, key_prefix: str, rel_queue: str
) -> None:
    # Given nodes running on a live worker (heartbeat every 0.3 s, stale after 2 s), and a reaper
    # running every 0.2 s from beat's task, as beat would, the whole time
    store = start_redis("--appendonly", "yes")
    manager = store_manager(store.url, key_prefix)
    manager.settings.worker_stale_after_s = 2.0
    fast = {"TRACKER_HEARTBEAT_INTERVAL_S": "0.3", "TRACKER_WORKER_STALE_AFTER_S": "2"}
    worker = make_worker(store.url, concurrency=4, env_extra=fast)
    worker.wait_ready()
    calls = [appmod.step.s(i, sleep_s=3.0 if i < 4 else 0.05).set(queue=rel_queue) for i in range(12)]
    sid = dispatch(group(calls), canvas_path="outage.canvas", app=appmod.app, manager=manager,
                   node_ids=[f"n{i}" for i in range(12)])  # fmt: skip
    reaper = Reaper(Recorder(appmod.app, manager), 0.2)  # its calls fail while the store is down
    reaper.start()
    wait_for(lambda: manager.sync.get_session_status(sid)["running_nodes"] >= 3, 30, "slow nodes running")

    # When the store is down for 4 s (twice the stale limit) while they run and finish
    store.stop()
    time.sleep(4.0)
    store.start()

    # Then the session completes with every node counted once, and no node was ever lost or reset
    wait_for(lambda: manager.sync.get_session_status(sid)["status"] in TERMINAL, 60, "the session to end")
    reaper.stop()
    status = manager.sync.get_session_status(sid)
    assert (status["status"], status["completed_nodes"], status["lost_nodes"]) == ("completed", 12, 0)
    seen = {(e.node_id, e.node_status) for e in manager.sync.read_events(sid, limit=1000) if e.type == "node"}
    assert not {s for _, s in seen} & {"lost", "pending"}, seen
    assert all(node.attempts == 1 for node in all_nodes(manager, sid).values())
    manager.storage.close()
