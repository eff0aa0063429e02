"""Item 5: Redis memory per node, for a small result.

A session of N nodes on a private redis-server, each node recorded as the signal handlers record
it (started, then completed with ``{"ok": true}``, with its task id and worker), then
``MEMORY USAGE <key> SAMPLES 0`` (exact) of each of the session's keys. The event stream is
capped (``events_maxlen``), so it is reported apart: its size does not grow with the node count.
A dispatched session also keeps each node's Celery signature (for resume): reported apart too,
for a no-op task, kept as dispatch keeps it.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Signature

from benchmarks._redis import redis_server
from benchmarks._store import node_events, send_pipelined
from benchmarks.report import Row, Section, Target
from tracker import SessionManager, TrackerSettings
from tracker.celery.dispatch import node_spec
from tracker.storage.redis import RedisStorageAdapter

WORKER = "celery@bench-host:12345"


def _usage(store: RedisStorageAdapter, session_id: str) -> dict[str, int]:
    keys = store.programs.keys.session(session_id)
    sizes = {}
    parts = (("session", keys.session), ("nodes", keys.nodes), ("sigs", keys.sigs), ("events", keys.events),
             ("by_status", keys.by_status))  # fmt: skip
    for part, key in parts:
        sizes[part] = int(store.client.memory_usage(key, samples=0) or 0)
    return sizes


def run(quick: bool) -> Section:
    n = 1_000 if quick else 10_000
    section = Section("5", "Memory per node")
    with redis_server() as server:
        settings = TrackerSettings(redis_url=server.url)
        store = RedisStorageAdapter.from_url(server.url, settings)
        manager = SessionManager(storage=store, settings=settings)

        # add_node_result / signal handler path: no signatures kept.
        sid = manager.sync.create_session("bench.canvas", n)
        task_ids = [str(uuid.uuid4()) for _ in range(n)]
        events: list[tuple[str, str, dict[str, Any]]] = []
        for i, tid in enumerate(task_ids):
            events.append((f"node-{i}", "running", {"attempt": 1, "task_id": tid, "worker": WORKER}))
            events.append((f"node-{i}", "completed", {"attempt": 1, "task_id": tid, "result": {"ok": True}}))
        send_pipelined(store, node_events(manager, store, sid, events))
        status = manager.sync.get_session_status(sid)
        if status["completed_nodes"] != n:
            raise RuntimeError(f"{status['completed_nodes']} of {n} nodes recorded")
        plain = _usage(store, sid)

        # A dispatched session: the same, plus each node's signature (what resume re-sends), kept
        # by dispatch's own step.
        dispatched = str(uuid.uuid4())
        specs = [node_spec(Signature("bench.noop"), dispatched, f"node-{i}", tid) for i, tid in enumerate(task_ids)]
        manager.sync.create_session("bench.canvas", n, nodes=specs, session_id=dispatched)
        with_sigs = _usage(store, dispatched)
        store.close()

    per_node = (plain["session"] + plain["nodes"] + plain["by_status"]) / n
    section.rows += [
        Row(f"bytes per node, small result ({n:,} nodes; session + node hashes + status index)", "B", per_node,
            target=Target("ours", "<=", 300)),
        Row("of which the status index (pages of nodes by status)", "B", plain["by_status"] / n),
        Row("event stream (capped, whole session)", "B", float(plain["events"]),
            note=f"per node at this size: {plain['events'] / n:.0f} B"),
        Row("bytes per node incl. the event stream", "B", per_node + plain["events"] / n),
        Row("signature kept per dispatched node (for resume)", "B", with_sigs["sigs"] / n),
    ]  # fmt: skip
    section.details = {"nodes": n, "bytes": plain, "dispatched_bytes": with_sigs, "worker": WORKER}
    return section
