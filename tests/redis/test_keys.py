"""The Redis key layout, pinned: exact key strings, one hash slot per session, nothing else written.

A change to any key name breaks every session stored by an older version, so it must show up
here as a failing test, not as a silent migration.
"""

from __future__ import annotations

from datetime import UTC, datetime

import redis
from redis.crc import key_slot

from tests.redis.conftest import ManagerFactory
from tracker import NodeSpec, SessionInfo
from tracker.storage.base import ChildLink, NewNodes
from tracker.storage.keys import KeySpace

SID = "0b7c6f2e-3f4a-4d8e-9a61-2c5b8e7d9f10"


def test_exact_key_strings() -> None:
    keys = KeySpace().session(SID)
    assert keys.session == "tracker:{0b7c6f2e-3f4a-4d8e-9a61-2c5b8e7d9f10}:session"
    assert keys.nodes == "tracker:{0b7c6f2e-3f4a-4d8e-9a61-2c5b8e7d9f10}:nodes"
    assert keys.sigs == "tracker:{0b7c6f2e-3f4a-4d8e-9a61-2c5b8e7d9f10}:sigs"
    assert keys.events == "tracker:{0b7c6f2e-3f4a-4d8e-9a61-2c5b8e7d9f10}:events"
    assert keys.by_status == "tracker:{0b7c6f2e-3f4a-4d8e-9a61-2c5b8e7d9f10}:by_status"
    assert keys.children == "tracker:{0b7c6f2e-3f4a-4d8e-9a61-2c5b8e7d9f10}:children"
    assert keys.failures == "tracker:{0b7c6f2e-3f4a-4d8e-9a61-2c5b8e7d9f10}:failures"
    assert keys.all() == [
        keys.session, keys.nodes, keys.sigs, keys.events, keys.by_status, keys.children, keys.failures
    ]  # fmt: skip
    assert KeySpace().created_index == "tracker:index:created"
    assert KeySpace().expiry_index == "tracker:index:expiry"
    assert KeySpace().tag_index("customer:42") == "tracker:index:tag:customer:42"
    assert KeySpace().path_index == "tracker:index:paths"
    assert KeySpace().filed_index == "tracker:index:filed"
    assert KeySpace("acme.prod").session(SID).session == "acme.prod:{0b7c6f2e-3f4a-4d8e-9a61-2c5b8e7d9f10}:session"


def test_all_keys_of_a_session_share_one_hash_slot() -> None:
    slots = {key_slot(key.encode()) for key in KeySpace("x").session(SID).all()}
    assert slots == {key_slot(SID.encode())}


def test_the_adapter_writes_exactly_these_keys(
    make_manager: ManagerFactory, key_prefix: str, redis_client: redis.Redis
) -> None:
    # Given a tagged session with a signature, a child session, a node result, a failure, a progress
    # update and a transition
    manager = make_manager()
    nodes = [NodeSpec(node_id="a", signature={"task": "t"})]
    sid = manager.sync.create_session("jobs/k.canvas", 3, nodes=nodes, tags=["nightly"])
    child = ChildLink("5d2f8a2e-7c1b-4d0e-9a57-3f4b6c8e1d20")
    manager.sync._record_nodes(sid, [manager.operations.child_event(sid, "b", child)])
    manager.sync.add_node_result(sid, "a", {"ok": 1})
    manager.sync.add_node_result(sid, "c", status="failed", error=TimeoutError("slow"))
    manager.sync.update_progress(sid, 60)
    manager.sync.update_status(sid, "cancelled")

    # When we list every key under the test's prefix
    found = {key.decode() for key in redis_client.scan_iter(match=f"{key_prefix}:*", count=1000)}

    # Then they are the seven session keys and the indexes (all, cleanup, its tag, the paths),
    # named as pinned above
    space = KeySpace(key_prefix)
    filters = {space.tag_index("nightly"), space.path_index}
    filed = {space.filed_index}
    assert found == {*space.session(sid).all(), space.created_index, space.expiry_index, *filters, *filed}
    assert found == {
        f"{key_prefix}:{{{sid}}}:session",
        f"{key_prefix}:{{{sid}}}:nodes",
        f"{key_prefix}:{{{sid}}}:sigs",
        f"{key_prefix}:{{{sid}}}:events",
        f"{key_prefix}:{{{sid}}}:by_status",
        f"{key_prefix}:{{{sid}}}:children",
        f"{key_prefix}:{{{sid}}}:failures",
        f"{key_prefix}:index:created",
        f"{key_prefix}:index:expiry",
        f"{key_prefix}:index:tag:nightly",
        f"{key_prefix}:index:paths",
        f"{key_prefix}:index:filed",
    }
    types = {key: redis_client.type(key) for key in found}
    assert types == {
        f"{key_prefix}:{{{sid}}}:session": b"hash",
        f"{key_prefix}:{{{sid}}}:nodes": b"hash",
        f"{key_prefix}:{{{sid}}}:sigs": b"hash",
        f"{key_prefix}:{{{sid}}}:events": b"stream",
        f"{key_prefix}:{{{sid}}}:by_status": b"zset",
        f"{key_prefix}:{{{sid}}}:children": b"hash",
        f"{key_prefix}:{{{sid}}}:failures": b"hash",
        **{key: b"zset" for key in (space.created_index, space.expiry_index, *filters)},
        space.filed_index: b"hash",
    }


def test_the_session_hash_holds_every_state_field_after_each_write(
    make_manager: ManagerFactory, key_prefix: str, redis_client: redis.Redis
) -> None:
    # A write sends only the state fields that changed: what the hash holds must still be the
    # whole state, and a field missing from an older hash is written by the next write.
    manager = make_manager()
    sid = manager.sync.create_session("k.canvas", 3)
    key = KeySpace(key_prefix).session(sid).session
    redis_client.hdel(key, "lost", "finished_ms")  # as a hash written without them would be

    manager.sync._record_node(sid, "a", "running")
    manager.sync.add_node_result(sid, "b", {"ok": 1})
    manager.sync.add_node_result(sid, "a", status="failed", error=RuntimeError("boom"))
    held = {k.decode(): v.decode() for k, v in redis_client.hgetall(key).items()}
    status = manager.sync.get_session_status(sid)
    assert {f: held[f] for f in ("status", "completed", "failed", "running", "lost", "cancelled", "finished_ms")} == {
        "status": "running", "completed": "1", "failed": "1", "running": "0", "lost": "0", "cancelled": "0",
        "finished_ms": "",
    }  # fmt: skip
    assert status["progress_percent"] == float(held["progress"]) == 66.67
    assert held["started_ms"] != ""

    manager.sync.add_node_result(sid, "c", {"ok": 2})
    held = {k.decode(): v.decode() for k, v in redis_client.hgetall(key).items()}
    assert (held["status"], held["completed"], held["progress"]) == ("partial_failure", "2", "100")
    assert held["finished_ms"] != "" and int(held["updated_ms"]) >= int(held["finished_ms"])


def test_a_store_called_without_the_managers_texts_encodes_signatures_the_same(
    make_manager: ManagerFactory, key_prefix: str, redis_client: redis.Redis
) -> None:
    # Given the same nodes created through the manager (which hands the store the texts it
    # checked) and straight through the store (NewNodes.of encodes them)
    manager = make_manager()
    nodes = [NodeSpec(node_id="a", task_id="t-a", signature={"task": "t", "args": [1, "é"], "kwargs": {}}),
             NodeSpec(node_id="b", task_id="t-b")]  # fmt: skip
    managed = manager.sync.create_session("m.canvas", 2, nodes=nodes)
    now = datetime.now(UTC)
    direct = SessionInfo(session_id=SID, canvas_path="d.canvas", node_count=2, created_at=now, updated_at=now)
    manager.storage.create(direct, NewNodes.of(nodes))

    # Then both keep the same signature text and the same node records
    space = KeySpace(key_prefix)
    for part in ("sigs", "nodes"):
        kept = [redis_client.hgetall(getattr(space.session(sid), part)) for sid in (managed, SID)]
        assert kept[0] == kept[1]
    assert redis_client.hgetall(space.session(SID).sigs) == {b"a": '{"task":"t","args":[1,"é"],"kwargs":{}}'.encode()}
