"""Item 4: single-client write throughput, ``add_node_result`` vs a plain redis-py ``HSET`` loop.

Both loops share one client (the adapter's own redis-py connection pool, so one connection) on a
private redis-server and run in alternating blocks, so that both see the same machine. The
``HSET`` writes what a node record looks like into a plain hash: the least a store could do per
result. The API has no batched ``add_node_result``; for what batching could buy, the same
``record_node`` script is also timed through a pipeline (beside pipelined ``HSET``), outside the API.
"""

from __future__ import annotations

import time

from benchmarks._redis import redis_server
from benchmarks._store import node_results
from benchmarks.report import Row, Section, Target, median
from tracker import SessionManager, TrackerSettings
from tracker.storage.redis import RedisStorageAdapter

#: What the HSET baseline writes: a node record of the same shape and size as the tracker's.
RECORD = 'completed|1|1767225600000|1767225600001|0b7c1c3e-8f0e-4a55-9d61-1f4bb5b4f1a2||{"result":{"ok":true}}'


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
        sid = manager.sync.create_session("bench.canvas", total * 4)
        add = manager.sync.add_node_result
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

        # Pipelined, outside the API: the record_node script vs HSET, 100 per round trip.
        batch = 100
        piped_ours: list[float] = []
        piped_plain: list[float] = []
        scripts = store._scripts["record_node"]
        for b in range(blocks):
            batch_ids = [f"p{b}-{i}" for i in range(block)]
            prepared = list(node_results(manager, store, sid, batch_ids, {"ok": True}))
            start = time.perf_counter()
            for i in range(0, block, batch):
                pipe = client.pipeline(transaction=False)
                for script in prepared[i : i + batch]:
                    scripts(keys=script.keys, args=script.args, client=pipe)
                pipe.execute()
            piped_ours.append(block / (time.perf_counter() - start))
            start = time.perf_counter()
            for i in range(0, block, batch):
                pipe = client.pipeline(transaction=False)
                for node_id in batch_ids[i : i + batch]:
                    pipe.hset("plain:piped", node_id, RECORD)
                pipe.execute()
            piped_plain.append(block / (time.perf_counter() - start))
        status = manager.sync.get_session_status(sid)
        store.close()

    expected = 200 + total + blocks * block
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
        Row("batched add_node_result", "writes/s", None, note="not offered by the API"),
        Row(
            f"record_node script vs HSET, pipelined by {batch} (no public API)",
            "writes/s",
            median(piped_ours),
            median(piped_plain),
            median(piped_ours) / median(piped_plain),
            baseline_name="HSET",
        ),
    ]
    section.details = {
        "block": block,
        "blocks": blocks,
        "ours_per_s": ours,
        "hset_per_s": plain,
        "block_ratios": ratios,
        "pipelined": {"batch": batch, "ours_per_s": piped_ours, "hset_per_s": piped_plain},
        "hset_record": RECORD,
    }
    return section
