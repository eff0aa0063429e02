"""Measure, on a redis-server of its own: bytes per node in Redis, and the write rate against plain HSET.

Not a test (nothing is asserted; figures vary by machine). Run from the repository root::

    python -m tests.redis.footprint [--nodes 10000] [--repeat 3]

Memory: a session whose ``--nodes`` nodes each got the result ``{"ok": 1}`` through
``manager.sync.add_node_result``; ``MEMORY USAGE <key> SAMPLES 0`` of each of its keys, divided by
the node count, with and without the event stream (capped at ``events_maxlen`` entries).
Rate: one client, one process, the same server and run: ``manager.sync.add_node_result`` calls
per second against a plain redis-py ``HSET`` loop writing the same field values.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import redis

from tests.servers import redis_process
from tracker import SessionManager, TrackerSettings
from tracker.storage.keys import KeySpace
from tracker.storage.redis import RedisStorageAdapter


def memory(manager: SessionManager, client: redis.Redis, prefix: str, nodes: int) -> dict[str, int]:
    """MEMORY USAGE of each key of a session with ``nodes`` completed nodes."""
    sid = manager.sync.create_session("footprint.canvas", nodes)
    for i in range(nodes):
        manager.sync.add_node_result(sid, f"node-{i}", {"ok": 1})
    keys = KeySpace(prefix).session(sid)
    usage = {}
    parts = (("session", keys.session), ("nodes", keys.nodes), ("sigs", keys.sigs), ("events", keys.events),
             ("by_status", keys.by_status))  # fmt: skip
    for name, key in parts:
        usage[name] = int(client.memory_usage(key, samples=0) or 0)
    usage["events_entries"] = int(client.xlen(keys.events))
    return usage


def rates(manager: SessionManager, client: redis.Redis, prefix: str, calls: int) -> tuple[float, float]:
    """(add_node_result per s, HSET per s) over ``calls`` calls each, on fresh keys."""
    sid = manager.sync.create_session("rate.canvas", calls)
    started = time.perf_counter()
    for i in range(calls):
        manager.sync.add_node_result(sid, f"node-{i}", {"ok": 1})
    tracker_s = time.perf_counter() - started
    key = f"{prefix}:plain:{uuid.uuid4()}"
    record = "completed|1|||||" + '{"result":{"ok":1}}'
    started = time.perf_counter()
    for i in range(calls):
        client.hset(key, f"node-{i}", record)
    plain_s = time.perf_counter() - started
    client.delete(key)
    return calls / tracker_s, calls / plain_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, redis_process(Path(directory)) as server:
        prefix = "footprint"
        settings = TrackerSettings(redis_url=server.url, key_prefix=prefix)
        store = RedisStorageAdapter.from_settings(settings)
        manager = SessionManager(storage=store, settings=settings)
        client = redis.Redis.from_url(server.url)
        info = client.info("server")
        print(f"redis-server {info['redis_version']}, redis-py {redis.__version__}, {options.nodes} nodes")

        usage = memory(manager, client, prefix, options.nodes)
        without_events = usage["session"] + usage["nodes"] + usage["sigs"] + usage["by_status"]
        print(
            f"memory: session {usage['session']} B, nodes {usage['nodes']} B, sigs {usage['sigs']} B, "
            f"by_status {usage['by_status']} B, "
            f"events {usage['events']} B ({usage['events_entries']} entries)"
        )
        print(f"bytes per node without events: {without_events / options.nodes:.1f}")
        print(f"bytes per node with events:    {(without_events + usage['events']) / options.nodes:.1f}")

        measured = [rates(manager, client, prefix, options.nodes) for _ in range(options.repeat)]
        tracker_rate = statistics.median(r[0] for r in measured)
        plain_rate = statistics.median(r[1] for r in measured)
        print(f"add_node_result: {tracker_rate:,.0f}/s, plain HSET: {plain_rate:,.0f}/s (median of {options.repeat})")
        print(f"ratio HSET / add_node_result: {plain_rate / tracker_rate:.2f}")
        client.close()
        store.close()


if __name__ == "__main__":
    main()
