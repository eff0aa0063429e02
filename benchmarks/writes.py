"""Item 4: single-client write throughput, ``add_node_result`` vs a plain redis-py ``HSET`` loop.

Both loops share one client (the adapter's own redis-py connection pool, so one connection) on a
private redis-server and run in alternating blocks, so that both see the same machine. The
``HSET`` writes what a node record looks like into a plain hash: the least a store could do per
result. The batched API (``add_node_results``, one script call for many nodes) is timed beside
``HSET`` sent through a pipeline of the same size.
"""

from __future__ import annotations

import time

from benchmarks._redis import redis_server
from benchmarks.report import Row, Section, Target, interval_row, median
from tracker import SessionManager, TrackerSettings
from tracker.storage.redis import RedisStorageAdapter

#: What the HSET baseline writes: a node record of the same shape and size as the tracker's.
RECORD = 'completed|1|1767225600000|1767225600001|0b7c1c3e-8f0e-4a55-9d61-1f4bb5b4f1a2||{"result":{"ok":true}}'

#: Nodes per batched call, and per pipeline of the baseline.
BATCH = 100


def run(quick: bool) -> Section:
    block = 100 if quick else 200
    blocks = 6 if quick else 30
    section = Section("4", "Write throughput, one client")
    with redis_server() as server:
        settings = TrackerSettings(redis_url=server.url)
        store = RedisStorageAdapter.from_url(server.url, settings)
        manager = SessionManager(storage=store, settings=settings)
        client = store.client
        total = block * blocks
        sid = manager.sync.create_session("bench.canvas", 200 + total + blocks * BATCH * 5)
        add = manager.sync.add_node_result
        add_many = manager.sync.add_node_results
        for i in range(200):  # warm up: scripts loaded, connection open
            add(sid, f"w{i}", {"ok": True})
            client.hset("plain:warm", f"w{i}", RECORD)

        ours: list[float] = []
        plain: list[float] = []
        ratios: list[float] = []
        for b in range(blocks):
            ids = [f"n{b}-{i}" for i in range(block)]
            timings = {}
            for kind in ("ours", "plain") if b % 2 == 0 else ("plain", "ours"):
                start = time.perf_counter()
                if kind == "ours":
                    for node_id in ids:
                        add(sid, node_id, {"ok": True})
                else:
                    for node_id in ids:
                        client.hset("plain:nodes", node_id, RECORD)
                timings[kind] = time.perf_counter() - start
            ours.append(block / timings["ours"])
            plain.append(block / timings["plain"])
            ratios.append(timings["plain"] / timings["ours"])

        # Batched: add_node_results of BATCH nodes per call vs HSET pipelined by BATCH.
        batched_ours: list[float] = []
        batched_plain: list[float] = []
        batched_ratios: list[float] = []
        for b in range(blocks):
            ids = [f"p{b}-{i}" for i in range(BATCH * 5)]
            timings = {}
            for kind in ("ours", "plain") if b % 2 == 0 else ("plain", "ours"):
                start = time.perf_counter()
                for first in range(0, len(ids), BATCH):
                    chunk = ids[first : first + BATCH]
                    if kind == "ours":
                        add_many(sid, {node_id: {"ok": True} for node_id in chunk})
                    else:
                        pipe = client.pipeline(transaction=False)
                        for node_id in chunk:
                            pipe.hset("plain:piped", node_id, RECORD)
                        pipe.execute()
                timings[kind] = time.perf_counter() - start
            batched_ours.append(len(ids) / timings["ours"])
            batched_plain.append(len(ids) / timings["plain"])
            batched_ratios.append(timings["plain"] / timings["ours"])
        status = manager.sync.get_session_status(sid)
        store.close()

    expected = 200 + total + blocks * BATCH * 5
    if status["completed_nodes"] != expected:
        raise RuntimeError(f"{status['completed_nodes']} nodes recorded, expected {expected}")
    section.rows += [
        Row(
            f"add_node_result vs HSET, one client ({total:,} each)",
            "writes/s",
            median(ours),
            median(plain),
            median(ratios),
            baseline_name="HSET",
            target=Target("ratio", ">=", 0.6),
            note="ratio: ours / HSET rate, median of alternating blocks",
        ),
        interval_row(ratios, "blocks"),
        Row(
            f"add_node_results by {BATCH} vs HSET pipelined by {BATCH}",
            "writes/s",
            median(batched_ours),
            median(batched_plain),
            median(batched_ratios),
            baseline_name="HSET",
            note="one script call (one round trip) per batch of nodes",
        ),
    ]
    section.details = {
        "block": block,
        "blocks": blocks,
        "ours_per_s": ours,
        "hset_per_s": plain,
        "block_ratios": ratios,
        "batched": {"batch": BATCH, "ours_per_s": batched_ours, "hset_per_s": batched_plain, "ratios": batched_ratios},
        "hset_record": RECORD,
    }
    return section
