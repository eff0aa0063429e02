"""Nothing outlives a session: TTLs on every key, refreshed by each write, and cleanup.

Every key of a session (session, nodes, sigs, events, ...) lives at least the session timeout after
every kind of write (an ended session's, the finished TTL): a write finding less than that left
sets every key to it plus a step (a tenth of it, at most 60 s), and writes within that step leave
the TTLs alone. Cleanup (with a fake clock) deletes expired sessions with all their keys and index
entries and keeps the ones written since; it also drops the index entries of sessions Redis
already expired by TTL, and reads only the sessions due."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
import redis

from tests.conftest import FakeClock
from tests.redis.conftest import ManagerFactory
from tracker import NodeSpec, SessionManager, SessionNotFoundError
from tracker.storage.base import ChildLink
from tracker.storage.keys import KeySpace

TIMEOUT_S = 900
#: What a refresh gives beyond the timeout (``touch`` in common.lua): a tenth of it, at most 60 s.
STEP_S = min(TIMEOUT_S / 10, 60)
#: How long an ended session's keys live (TRACKER_FINISHED_TTL_S); its step is 60 s.
FINISHED_S = 3600

Write = Callable[[SessionManager, str], object]

#: One call of each kind of write, on a session made by :func:`session_with_every_key`.
WRITES: dict[str, Write] = {
    "add_node_result": lambda m, sid: m.sync.add_node_result(sid, "a", {"ok": 1}),
    "record_node": lambda m, sid: m.sync._record_node(sid, "b", "running", task_id="t-b"),
    "update_progress": lambda m, sid: m.sync.update_progress(sid, 30),
    "update_status": lambda m, sid: m.sync.update_status(sid, "failed"),
    "cancel": lambda m, sid: m.sync.update_status(sid, "cancelled"),
    "failed_node": lambda m, sid: m.sync.add_node_result(sid, "b", None, status="failed", error=RuntimeError("x")),
}
#: The writes that end the session: its keys then live the finished TTL.
ENDING = {"update_status", "cancel"}


def session_with_every_key(manager: SessionManager) -> str:
    """A session whose keys all exist: known nodes, one with a signature, a child session that the
    task of a third node (not recorded yet) opened, and a fourth node that failed."""
    nodes = [NodeSpec(node_id="a", task_id="t-a", signature={"task": "w.t", "args": [1]}), NodeSpec(node_id="b")]
    sid = manager.sync.create_session("ttl.canvas", 4, nodes=nodes)
    manager.sync._record_nodes(sid, [manager.operations.child_event(sid, "c", ChildLink(str(uuid.uuid4())))])
    manager.sync.add_node_result(sid, "d", None, status="failed", error=TimeoutError("slow"))
    return sid


def ttls_ms(client: redis.Redis, keys: list[str]) -> dict[str, int]:
    """PTTL of each key (-2: missing, -1: no TTL)."""
    return {key: int(client.pttl(key)) for key in keys}


def assert_full_ttl(client: redis.Redis, key_prefix: str, sid: str, ttl_s: int = TIMEOUT_S) -> None:
    """Every key of the session exists (its failures' while it has some) and lives at least ``ttl_s``
    more (at most a step more)."""
    space = KeySpace(key_prefix).session(sid)
    keys = [key for key in space.all() if key != space.failures or client.exists(key)]
    ttl = ttls_ms(client, keys)
    step_s = min(ttl_s / 10, 60)
    assert all((ttl_s - 2) * 1000 < ms <= (ttl_s + step_s) * 1000 for ms in ttl.values()), ttl
    # Nothing else of the session's exists without a TTL either.
    tagged = {key.decode() for key in client.scan_iter(match=f"{key_prefix}:{{{sid}}}:*", count=1000)}
    assert tagged == set(keys)


@pytest.mark.parametrize("write", list(WRITES))
def test_every_key_has_the_session_timeout_after_each_kind_of_write(
    make_manager: ManagerFactory, redis_client: redis.Redis, key_prefix: str, write: str
) -> None:
    # Given a new session: its keys expire in the session timeout
    manager = make_manager(session_timeout_s=TIMEOUT_S, finished_ttl_s=FINISHED_S)
    sid = session_with_every_key(manager)
    assert_full_ttl(redis_client, key_prefix, sid)
    manager.sync._record_node(sid, "b", "running")  # so that every write below is allowed

    # When the keys are close to expiring and a write comes
    keys = KeySpace(key_prefix).session(sid).all()
    for key in keys:
        redis_client.expire(key, 5)
    WRITES[write](manager, sid)

    # Then every key has the full timeout again (the finished TTL once the session has ended)
    assert_full_ttl(redis_client, key_prefix, sid, FINISHED_S if write in ENDING else TIMEOUT_S)


def test_resume_refreshes_every_ttl(make_manager: ManagerFactory, redis_client: redis.Redis, key_prefix: str) -> None:
    manager = make_manager(session_timeout_s=TIMEOUT_S, finished_ttl_s=FINISHED_S)
    sid = session_with_every_key(manager)
    manager.sync.add_node_result(sid, "a", None, status="failed")
    manager.sync.update_status(sid, "cancelled")
    assert_full_ttl(redis_client, key_prefix, sid, FINISHED_S)  # ended: kept the finished TTL
    for key in KeySpace(key_prefix).session(sid).all():
        redis_client.expire(key, 5)
    manager.sync._reopen_session(sid)
    assert_full_ttl(redis_client, key_prefix, sid)
    assert manager.sync.get_failures(sid) == []  # the failed nodes were reset: no failure left


def test_a_session_without_nodes_or_signatures_has_ttls_on_the_keys_it_has(
    make_manager: ManagerFactory, redis_client: redis.Redis, key_prefix: str
) -> None:
    manager = make_manager(session_timeout_s=TIMEOUT_S)
    sid = manager.sync.create_session("bare.canvas", 2)
    keys = KeySpace(key_prefix).session(sid)
    assert ttls_ms(redis_client, [keys.nodes, keys.sigs]) == {keys.nodes: -2, keys.sigs: -2}
    manager.sync.add_node_result(sid, "a", 1)
    ttl = ttls_ms(redis_client, [keys.session, keys.nodes, keys.events])
    assert all((TIMEOUT_S - 2) * 1000 < ms <= (TIMEOUT_S + STEP_S) * 1000 for ms in ttl.values()), ttl
    assert int(redis_client.pttl(keys.sigs)) == -2


def test_the_ttl_follows_the_configured_timeout(
    make_manager: ManagerFactory, redis_client: redis.Redis, key_prefix: str
) -> None:
    manager = make_manager(session_timeout_s=42)
    sid = session_with_every_key(manager)
    ttl = ttls_ms(redis_client, KeySpace(key_prefix).session(sid).all())
    assert all(40_000 < ms <= 46_200 for ms in ttl.values()), ttl  # 42 s plus a step of 4.2 s


def test_writes_within_a_step_leave_the_ttls_alone_and_keep_at_least_the_timeout(
    make_manager: ManagerFactory, redis_client: redis.Redis, key_prefix: str
) -> None:
    # Given a session whose keys were just given their TTL (timeout plus a step)
    manager = make_manager(session_timeout_s=TIMEOUT_S)
    sid = session_with_every_key(manager)
    keys = KeySpace(key_prefix).session(sid).all()
    redis_client.config_resetstat()

    # When 50 writes come within the step
    for i in range(50):
        manager.sync._record_node(sid, "a" if i % 2 else "b", "running", attempt=i + 1)

    # Then no write ran an EXPIRE, and every key still has at least the timeout left
    stats = redis_client.info("commandstats")
    assert "cmdstat_pexpire" not in stats and "cmdstat_expire" not in stats, stats.keys()
    assert stats["cmdstat_pttl"]["calls"] == 50
    assert all(ms >= (TIMEOUT_S - 2) * 1000 for ms in ttls_ms(redis_client, keys).values())

    # And once the session hash has less than the timeout left, the next write refreshes every key
    redis_client.pexpire(keys[0], TIMEOUT_S * 1000 - 1)
    manager.sync.update_progress(sid, 10)
    assert int(redis_client.info("commandstats")["cmdstat_pexpire"]["calls"]) == 1 + 7
    assert_full_ttl(redis_client, key_prefix, sid)


def test_cleanup_removes_expired_sessions_and_keeps_refreshed_ones(
    make_manager: ManagerFactory, redis_client: redis.Redis, key_prefix: str
) -> None:
    # Given two sessions created together, one written to 1000 s later
    clock = FakeClock()
    manager = make_manager(clock=clock, session_timeout_s=1800)
    space = KeySpace(key_prefix)
    stale, refreshed = session_with_every_key(manager), session_with_every_key(manager)
    clock.advance(1000)
    manager.sync.add_node_result(refreshed, "a", 1)
    refreshed_ms = int(clock.now.timestamp() * 1000)
    clock.advance(801)  # stale: 1801 s since its last write; refreshed: 801 s

    # When cleanup runs
    removed = manager.sync.cleanup_expired_sessions()

    # Then only the stale session is gone: all its keys and both index entries
    assert removed == 1
    assert redis_client.exists(*space.session(stale).all()) == 0
    with pytest.raises(SessionNotFoundError):
        manager.sync.get_session_status(stale)
    assert redis_client.zscore(space.created_index, stale) is None
    assert redis_client.zscore(space.expiry_index, stale) is None
    # And the refreshed one is whole; its expiry index entry now holds its real last write
    assert redis_client.exists(*space.session(refreshed).all()) == 7
    assert manager.sync.get_session_status(refreshed)["completed_nodes"] == 1
    assert redis_client.zscore(space.expiry_index, refreshed) == refreshed_ms
    assert redis_client.zscore(space.created_index, refreshed) is not None

    # When it is left alone past the timeout too, Then the next cleanup removes it
    assert manager.sync.cleanup_expired_sessions() == 0
    clock.advance(1000)
    assert manager.sync.cleanup_expired_sessions() == 1
    assert redis_client.exists(*space.session(refreshed).all()) == 0
    assert redis_client.zcard(space.created_index) == redis_client.zcard(space.expiry_index) == 0


def test_cleanup_drops_index_entries_of_sessions_redis_expired(
    make_manager: ManagerFactory, redis_client: redis.Redis, key_prefix: str
) -> None:
    # Given a session with a 1 s timeout, expired by Redis (its keys are gone, the index remembers it)
    manager = make_manager(session_timeout_s=1)
    space = KeySpace(key_prefix)
    sid = session_with_every_key(manager)
    assert redis_client.zscore(space.created_index, sid) is not None
    deadline = time.monotonic() + 10
    while redis_client.exists(*space.session(sid).all()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert redis_client.exists(*space.session(sid).all()) == 0
    assert redis_client.zscore(space.created_index, sid) is not None
    assert redis_client.zscore(space.expiry_index, sid) is not None

    # When cleanup runs
    removed = manager.sync.cleanup_expired_sessions()

    # Then the index entries are gone (Redis removed the session, so cleanup counts none)
    assert removed == 0
    assert redis_client.zscore(space.created_index, sid) is None
    assert redis_client.zscore(space.expiry_index, sid) is None
    assert manager.sync.list_sessions().sessions == []


def test_heartbeats_keep_the_keys_of_a_session_with_a_running_node(
    make_manager: ManagerFactory, redis_client: redis.Redis, key_prefix: str
) -> None:
    # Given a 2 s session timeout and a node running on a live worker process
    manager = make_manager(session_timeout_s=2)
    sid = session_with_every_key(manager)
    manager.sync._record_node(sid, "a", "running", worker="celery@h:1")
    keys = KeySpace(key_prefix).session(sid).all()
    # When its worker beats every 0.5 s for twice the timeout, nothing else writing
    until = time.monotonic() + 4
    while time.monotonic() < until:
        manager.sync._heartbeat("celery@h:1", sessions=[sid])
        assert min(ttls_ms(redis_client, keys).values()) > 1000  # never let near its end
        assert manager.sync.cleanup_expired_sessions() == 0
        time.sleep(0.5)
    # Then the node finishes into the intact session
    assert manager.sync._record_node(sid, "a", "completed", result=1, worker="celery@h:1").node.status == "completed"
    assert manager.sync.get_session_status(sid)["completed_nodes"] == 1


def test_cleanup_reads_only_the_sessions_due_whatever_is_kept(
    make_manager: ManagerFactory, redis_client: redis.Redis, key_prefix: str
) -> None:
    # Given 200 ended sessions kept a day and 3 sessions idle past the 60 s timeout
    clock = FakeClock()
    manager = make_manager(clock=clock, session_timeout_s=60, finished_ttl_s=86400)
    kept = [manager.sync.create_session("jobs/kept.canvas", 1, tags=["nightly"]) for _ in range(200)]
    for sid in kept:
        manager.sync.add_node_result(sid, "a", 1)
    idle = [manager.sync.create_session("jobs/idle.canvas", 2, tags=["nightly"]) for _ in range(3)]
    clock.advance(61)

    # When cleanup runs twice
    redis_client.config_resetstat()
    assert manager.sync.cleanup_expired_sessions() == 3
    first = int(redis_client.info("commandstats")["cmdstat_evalsha"]["calls"])
    redis_client.config_resetstat()
    assert manager.sync.cleanup_expired_sessions() == 0

    # Then the first pass looked at each session once (the kept ones moved on to their own expiry)
    # and the second at none: a pass costs the sessions due, not the ones kept
    assert first == 203
    assert "cmdstat_evalsha" not in redis_client.info("commandstats")
    space = KeySpace(key_prefix)
    assert redis_client.zcard(space.expiry_index) == 200
    # And the removed sessions left every index: their tag's and their path's too
    assert redis_client.zcard(space.tag_index("nightly")) == 200
    assert redis_client.zlexcount(space.path_index, "[jobs/idle.canvas", "(jobs/idle.canvas\xff") == 0
    assert redis_client.zcard(space.path_index) == 200
    assert all(redis_client.exists(*space.session(sid).all()) == 0 for sid in idle)

    # And a day after their end, the kept ones go, with their index entries
    clock.advance(86400)
    assert manager.sync.cleanup_expired_sessions() == 200
    assert not list(redis_client.scan_iter(match=f"{key_prefix}:*", count=1000))


def test_a_shorter_finished_ttl_shortens_the_keys_and_a_resume_gives_the_timeout_back(
    make_manager: ManagerFactory, redis_client: redis.Redis, key_prefix: str
) -> None:
    # Given ended sessions kept 60 s, shorter than the 900 s timeout of running ones
    manager = make_manager(session_timeout_s=TIMEOUT_S, finished_ttl_s=60)
    sid = session_with_every_key(manager)
    assert_full_ttl(redis_client, key_prefix, sid)
    # When it ends, its keys live 60 s (and a step); when it is resumed, the timeout again
    manager.sync.update_status(sid, "cancelled")
    assert_full_ttl(redis_client, key_prefix, sid, 60)
    manager.sync._reopen_session(sid)
    assert_full_ttl(redis_client, key_prefix, sid)


def test_index_entries_leave_with_a_session_redis_expired(
    make_manager: ManagerFactory, redis_client: redis.Redis, key_prefix: str
) -> None:
    # Given two tagged sessions with a 1 s timeout, expired by Redis (their keys are gone)
    manager = make_manager(session_timeout_s=1)
    space = KeySpace(key_prefix)
    swept = manager.sync.create_session("jobs/ttl.canvas", 1, tags=["nightly", "customer:7"])
    passed = manager.sync.create_session("jobs/other.canvas", 1, tags=["weekly"])
    deadline = time.monotonic() + 10
    while redis_client.exists(*(space.session(sid).session for sid in (swept, passed))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert redis_client.hlen(space.filed_index) == 2

    # When a listing by tag passes by one, Then it lists nothing and takes it out of every index
    assert manager.sync.list_sessions(tag="weekly").sessions == []
    assert redis_client.hkeys(space.filed_index) == [swept.encode()]
    assert redis_client.exists(space.tag_index("weekly")) == 0
    # When cleanup runs, Then the other leaves every index too: nothing of either is left
    assert manager.sync.cleanup_expired_sessions() == 0
    assert not list(redis_client.scan_iter(match=f"{key_prefix}:*", count=1000))
