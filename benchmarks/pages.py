"""Item 9: listing a session's nodes by status, as its size grows, beside a scan of every node.

Two sessions on one private redis-server, of 20 000 and 200 000 nodes, each with the same 1 400
failed nodes spread among completed ones. Collecting every failed node a page of 100 at a time
(``manager.sync.get_nodes(sid, "failed", cursor=..., limit=100)``) is timed on both, alternating,
and the medians compared. Beside it, what listing by status cost before the status index and what a
client without it must do: scan every node (``HSCAN`` pages of 1 000) and keep the failed ones.
"""

from __future__ import annotations

import time

from benchmarks._redis import redis_server
from benchmarks._store import node_events, send_pipelined
from benchmarks.report import Row, Section, Target, median, quantile
from tracker import NodeStatus, SessionManager, TrackerSettings
from tracker.storage.keys import KeySpace
from tracker.storage.redis import RedisStorageAdapter

PAGE = 100


def _session(manager: SessionManager, store: RedisStorageAdapter, nodes: int, failed: int) -> str:
    """A session of ``nodes`` nodes, ``failed`` of them failed (every ``nodes // failed``-th)."""
    sid = manager.sync.create_session("bench.canvas", nodes)
    step = nodes // failed
    events = (
        (f"n{i:06d}", "failed", {"error": RuntimeError("boom")})
        if i % step == 0 and i // step < failed
        else (f"n{i:06d}", "completed", {"result": {"ok": True}})
        for i in range(nodes)
    )
    ok = send_pipelined(store, node_events(manager, store, sid, events))
    status = manager.sync.get_session_status(sid)
    if ok != nodes or status["failed_nodes"] != failed:
        raise RuntimeError(f"session of {nodes} nodes: {ok} events stored, status {status}")
    return sid


def _by_status(manager: SessionManager, sid: str) -> tuple[int, int]:
    """Every failed node, page after page: (nodes found, requests made)."""
    found, requests, cursor = 0, 0, None
    while True:
        page = manager.sync.get_nodes(sid, NodeStatus.FAILED, cursor=cursor, limit=PAGE)
        found, requests, cursor = found + len(page.nodes), requests + 1, page.next_cursor
        if cursor is None:
            return found, requests


def _scan(store: RedisStorageAdapter, key: str) -> tuple[int, int]:
    """Every failed node by a scan of all nodes: (nodes found, requests made)."""
    found, requests, cursor = 0, 0, 0
    while True:
        cursor, fields = store.client.hscan(key, cursor, count=1000)
        found += sum(1 for record in fields.values() if record.startswith(b"failed|"))
        requests += 1
        if cursor == 0:
            return found, requests


def _timed(call: object) -> tuple[float, tuple[int, int]]:
    start = time.perf_counter()
    result = call()  # type: ignore[operator]
    return time.perf_counter() - start, result


def run(quick: bool) -> Section:
    small, large, failed = (2_000, 20_000, 140) if quick else (20_000, 200_000, 1_400)
    rounds = 5 if quick else 30
    section = Section("9", "Nodes by status: exact pages vs session size")
    with redis_server() as server:
        settings = TrackerSettings(redis_url=server.url)
        store = RedisStorageAdapter.from_url(server.url, settings)
        manager = SessionManager(storage=store, settings=settings)
        small_sid = _session(manager, store, small, failed)
        large_sid = _session(manager, store, large, failed)
        nodes_key = KeySpace(settings.key_prefix).session(large_sid).nodes
        for _ in range(3):  # warm up
            _by_status(manager, small_sid)
            _by_status(manager, large_sid)
        small_s: list[float] = []
        large_s: list[float] = []
        scan_s: list[float] = []
        for i in range(rounds):
            # Rotate which goes first, so that none always follows another.
            calls = [
                (small_s, lambda: _by_status(manager, small_sid)),
                (large_s, lambda: _by_status(manager, large_sid)),
                (scan_s, lambda: _scan(store, nodes_key)),
            ]
            for times, call in calls[i % 3 :] + calls[: i % 3]:
                elapsed, (found, _) = _timed(call)
                if found != failed:
                    raise RuntimeError(f"found {found} failed nodes, expected {failed}")
                times.append(elapsed)
        pages = _by_status(manager, large_sid)[1]
        scans = _scan(store, nodes_key)[1]
        store.close()

    ours_small, ours_large, scan = median(small_s), median(large_s), median(scan_s)
    section.rows += [
        Row(
            f"every failed node ({failed:,}), pages of {PAGE}: {large:,} nodes vs {small:,} (median of {rounds})",
            "ms",
            ours_large * 1e3,
            ours_small * 1e3,
            ours_large / ours_small,
            baseline_name=f"{small:,} nodes",
            target=Target("ratio", "<=", 1.2),
        ),
        Row(
            f"the same at {large:,} nodes vs a scan of every node keeping the failed ones",
            "ms",
            ours_large * 1e3,
            scan * 1e3,
            ours_large / scan,
            baseline_name="scan",
        ),
        Row("requests for them: pages by status vs scan", "requests", pages, scans, pages / scans, "scan"),
    ]
    section.details = {
        "nodes": {"small": small, "large": large, "failed": failed, "page": PAGE},
        "rounds": rounds,
        "ms": {
            name: {"median": median(times) * 1e3, "p95": quantile(times, 0.95) * 1e3}
            for name, times in (("small", small_s), ("large", large_s), ("scan", scan_s))
        },
    }
    return section
