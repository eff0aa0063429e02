"""The adapter on a real Redis Cluster (3 masters): the contract suite's core cases, sync and async.

The contract tests imported below are collected again in this module, where ``store`` and
``manager`` are overridden to use :class:`RedisStorageAdapter` on redis-py's ``RedisCluster``
(``TrackerSettings(redis_cluster=True)``); their async cases go through ``storage.asynchronous()``,
a ``redis.asyncio`` ``RedisCluster``. The tests written here check what only a cluster shows:
sessions spread over the masters, each session's keys in one slot, the index in another.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.retry import Retry

from tests.conftest import FakeClock
from tests.contract.test_add_nodes import (
    test_a_chain_added_to_a_group_is_followed_and_the_tree_grows,
    test_added_nodes_are_pending_and_the_session_waits_for_them,
    test_the_same_call_again_changes_nothing_and_tells_what_is_pending,
)
from tests.contract.test_batch_insight import (
    test_a_resumed_session_expires_by_the_timeout_again,
    test_an_ended_session_is_kept_the_finished_ttl,
    test_failures_are_grouped_by_cause_with_the_counters,
    test_rate_and_eta_follow_the_finished_nodes,
    test_resumed_nodes_leave_their_groups,
    test_sessions_are_listed_by_tag_and_by_canvas_path,
)
from tests.contract.test_children import (
    test_a_child_is_listed_by_its_parent_and_watched_until_told,
    test_a_child_that_did_not_complete_fails_its_node_unless_ignored,
    test_a_node_waits_for_its_child_and_takes_its_success,
    test_a_resumed_node_waits_only_for_the_children_its_new_run_opens,
)
from tests.contract.test_dashboard_reads import (
    test_a_node_cancelled_while_it_runs_leaves_its_worker_when_the_worker_reports_its_end,
    test_a_node_leaves_its_worker_when_it_stops_running_and_a_heartbeat_moves_it_up,
    test_a_node_of_a_removed_session_leaves_its_worker_when_the_worker_reports_its_end,
    test_a_silent_worker_shows_silent_then_leaves_once_reaped,
    test_a_worker_running_many_nodes_names_twenty_and_counts_them_all,
    test_a_worker_that_stopped_cleanly_leaves_the_registry_unless_it_still_holds_nodes,
    test_get_node_answers_what_the_node_pages_hold,
    test_get_node_tells_an_unknown_session_from_an_unknown_node,
    test_workers_are_listed_newest_heartbeat_first_with_the_nodes_they_run,
)
from tests.contract.test_lost_nodes import (
    test_a_late_result_after_lost_counts_once_and_rederives_the_ended_status,
    test_a_resume_with_nothing_to_resend_ends_at_once,
    test_a_session_left_waiting_by_a_message_lost_with_a_dead_worker_ends,
    test_a_store_outage_of_any_length_never_makes_a_live_worker_lost,
    test_heartbeats_keep_a_long_running_nodes_session_from_expiring,
    test_nodes_of_a_silent_worker_become_lost,
    test_two_reapers_at_once_mark_each_node_once,
    test_with_late_acks_a_dead_workers_nodes_wait_for_redelivery,
)
from tests.contract.test_node_progress import test_running_nodes_fractions_count_in_the_session_progress
from tests.contract.test_storage_contract import (
    test_blocking_event_read_wakes_on_a_write,
    test_cancel_marks_unfinished_nodes,
    test_cleanup_keeps_a_session_updated_since_creation,
    test_completed_is_final_for_a_node,
    test_concurrent_access_with_asyncio_gather,
    test_concurrent_access_with_threads,
    test_concurrent_transitions_have_one_winner,
    test_create_with_an_existing_id_is_refused,
    test_delete_session,
    test_duplicate_results_count_once,
    test_events_record_every_change_in_order,
    test_exactly_one_caller_sees_the_finish,
    test_failed_then_completed_moves_between_counters,
    test_finish_rule,
    test_get_nodes_pages_and_filters,
    test_late_events_after_the_end_are_recorded_without_moving_status,
    test_list_sessions_pages_and_filters,
    test_more_nodes_than_node_count_is_refused,
    test_node_results_drive_progress_and_finish,
    test_progress_of_an_ended_session_is_final,
    test_progress_update_and_retrieval,
    test_resume_resets_only_unfinished_nodes,
    test_resume_without_retry_failed_keeps_failures,
    test_running_then_result_records_times_and_attempts,
    test_session_creation,
    test_session_creation_stores_metadata,
    test_session_ids_are_unique,
    test_session_timeout_and_cleanup,
    test_sync_and_async_forms_agree,
    test_unknown_and_malformed_ids,
    test_update_status_follows_the_table,
)
from tests.servers import RedisClusterProcesses
from tracker import NodeSpec, SessionManager, SessionStatus, TrackerSettings
from tracker.storage.base import ChildLink
from tracker.storage.keys import KeySpace
from tracker.storage.redis import AsyncRedisStore, RedisStorageAdapter


def cluster_settings(cluster: RedisClusterProcesses, key_prefix: str) -> TrackerSettings:
    return TrackerSettings(redis_url=cluster.url, redis_cluster=True, key_prefix=key_prefix)


@pytest.fixture
def store(cluster: RedisClusterProcesses, key_prefix: str) -> Iterator[RedisStorageAdapter]:
    """Overrides the contract suite's ``store``: the Redis adapter on a ``RedisCluster`` client."""
    settings = cluster_settings(cluster, key_prefix)
    adapter = RedisStorageAdapter.from_url(cluster.url, settings)
    assert isinstance(adapter.client, RedisCluster)
    yield adapter
    adapter.close()


@pytest.fixture
async def manager(store: RedisStorageAdapter, clock: FakeClock) -> AsyncIterator[SessionManager]:
    """Overrides the contract suite's ``manager``; closes the async cluster client it may have made."""
    manager = SessionManager(storage=store, settings=TrackerSettings(), clock=clock)
    yield manager
    astorage = manager._astorage
    if astorage is not None:
        assert isinstance(astorage, AsyncRedisStore)
        assert isinstance(astorage.client, redis.asyncio.RedisCluster)
        # A sync test that ran its async part under asyncio.run() left a client of a closed loop.
        with contextlib.suppress(RuntimeError):
            await astorage.close()


def test_the_cluster_has_three_masters_and_requires_a_password(cluster: RedisClusterProcesses) -> None:
    client = RedisCluster.from_url(cluster.url)
    try:
        assert len(client.get_primaries()) == 3  # type: ignore[no-untyped-call]
        assert client.cluster_info()["cluster_state"] == "ok"
    finally:
        client.close()
    anonymous = redis.Redis(port=cluster.nodes[0].port, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    anonymous.close()


def test_sessions_spread_over_masters_with_each_session_in_one_slot(
    store: RedisStorageAdapter, manager: SessionManager, key_prefix: str
) -> None:
    # Given 30 sessions with a signature, a node result and a transition each
    client: RedisCluster = store.client
    ids = []
    for _ in range(30):
        sid = manager.sync.create_session("c.canvas", 2, nodes=[NodeSpec(node_id="a", signature={"task": "t"})])
        manager.sync.add_node_result(sid, "a", 1)
        manager.sync.update_status(sid, "cancelled")
        ids.append(sid)

    # When we ask the cluster where each key lives
    space = KeySpace(key_prefix)
    owners = set()
    for sid in ids:
        keys = space.session(sid).all()
        slots = {key_slot(key.encode()) for key in keys}
        node = client.get_node_from_key(keys[0])  # type: ignore[no-untyped-call]
        owners.add(node.name)
        # Then all five keys exist together on the node that owns their one slot
        assert len(slots) == 1
        assert client.exists(*keys) == 5
        assert client.cluster_countkeysinslot(slots.pop()) >= 5

    # And the sessions are not all on one master (the tag spreads them)
    assert len(owners) >= 2
    assert client.zcard(space.created_index) == 30


async def test_async_flavour_uses_an_asyncio_cluster_client(manager: SessionManager) -> None:
    sid = await manager.create_session("a.canvas", 3)
    results = await asyncio.gather(*(manager.add_node_result(sid, f"n{i}", i) for i in range(3)))
    assert max(r["completed_nodes"] for r in results) == 3
    assert (await manager.get_session_status(sid))["status"] == "completed"
    assert isinstance(manager.astorage, AsyncRedisStore)
    assert isinstance(manager.astorage.client, redis.asyncio.RedisCluster)


async def test_many_concurrent_async_writes_on_a_fresh_cluster_client(manager: SessionManager) -> None:
    # The first calls of a new redis.asyncio RedisCluster used to go to random nodes (MOVED storm,
    # then connections closed under other callers): 200 at once, all must succeed and count.
    ids = await asyncio.gather(*(manager.create_session("burst.canvas", 1) for _ in range(200)))
    statuses = await asyncio.gather(*(manager.add_node_result(sid, "only", 1) for sid in ids))
    assert len(set(ids)) == 200
    assert {s["status"] for s in statuses} == {"completed"}


def test_cleanup_on_the_cluster_deletes_keys_and_index_entries(
    store: RedisStorageAdapter, manager: SessionManager, clock: FakeClock, key_prefix: str
) -> None:
    client: RedisCluster = store.client
    space = KeySpace(key_prefix)
    old = [manager.sync.create_session("old.canvas", 1, nodes=[NodeSpec(node_id="a")]) for _ in range(6)]
    clock.advance(1000)
    fresh = manager.sync.create_session("fresh.canvas", 1)
    clock.advance(801)
    assert manager.sync.cleanup_expired_sessions() == 6
    assert all(client.exists(*space.session(sid).all()) == 0 for sid in old)
    assert client.zrange(space.created_index, 0, -1) == [fresh.encode()]
    assert client.zrange(space.expiry_index, 0, -1) == [fresh.encode()]


async def test_a_parent_and_its_child_in_other_slots_are_linked_by_steps_of_their_own(
    manager: SessionManager, key_prefix: str
) -> None:
    # Given a parent and a child session whose keys hash to other slots (other masters, likely)
    space = KeySpace(key_prefix)
    parent = await manager.create_session("p.canvas", 1, nodes=[NodeSpec(node_id="p")])
    await manager._record_node(parent, "p", "running", task_id="t-p", attempt=1)
    child = next(
        sid for sid in (str(uuid.uuid4()) for _ in range(100))
        if key_slot(space.session(sid).session.encode()) != key_slot(space.session(parent).session.encode())
    )  # fmt: skip
    # When the child is opened on the parent, created, ends, and its end is told (each its own step)
    await manager._record_nodes(parent, [manager.operations.child_event(parent, "p", ChildLink(child))])
    await manager.create_session("c.canvas", 1, session_id=child, parent=(parent, "p"))
    await manager.add_node_result(parent, "p", "mine", task_id="t-p", attempt=1)
    await manager.add_node_result(child, "c0", 1)
    (watch,) = await manager._watched_children()
    await manager._record_nodes(
        parent, [manager.operations.child_event(parent, "p", ChildLink(child, SessionStatus.COMPLETED))]
    )
    await manager._unwatch_child(watch)
    # Then the parent completed with its node's own result, and nothing is left watched
    status = await manager.get_session_status(parent)
    assert (status["status"], status["children"], status["children_open"]) == ("completed", 1, 0)
    assert (await manager.get_nodes(parent)).nodes[0].result == "mine"
    assert await manager._watched_children() == []
