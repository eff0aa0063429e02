"""Item 4: single-client write throughput, ``add_node_result`` vs a plain redis-py ``HSET`` loop.

Both loops share one client (the adapter's own redis-py connection pool, so one connection) on a
private redis-server and run in blocks taken in rotation, so that both see the same machine. The
``HSET`` writes what a node record looks like into a plain hash: the least a store could do per
result. Beside them, in the same rotation, the very script call each ``add_node_result`` makes,
built beforehand and sent bare (no checks, no status dict): the floor of any client of that
script, which tells the script's own cost from the library's. The batched API
(``add_node_results``, one script call for many nodes) is timed beside ``HSET`` sent through a
pipeline of the same size.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks._redis import redis_server
from benchmarks._store import first_batch
from benchmarks.report import Row, Section, Target, interval_row, median
from tracker import SessionManager, TrackerSettings
from tracker.states import NodeStatus
from tracker.storage.base import NodeEvent
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
        sid = manager.sync.create_session("bench.canvas", 200 + block + 2 * total + blocks * BATCH * 5)
        add = manager.sync.add_node_result
        add_many = manager.sync.add_node_results
        sha = store._scripts["record_nodes"].sha
        result_json = '{"ok":true}'

        def bare_calls(prefix: str) -> list[list[Any]]:
            """The script call add_node_result makes for each of ``block`` fresh nodes, built beforehand."""
            calls = []
            for i in range(block):
                event = NodeEvent(f"{prefix}-{i}", NodeStatus.COMPLETED, result_json)
                (call,) = first_batch(store.programs.record_nodes(sid, [event], manager.clock()))
                calls.append(["EVALSHA", sha, len(call.keys), *call.keys, *call.args])
            return calls

        for i in range(200):  # warm up: scripts loaded, connection open
            add(sid, f"w{i}", {"ok": True})
            client.hset("plain:warm", f"w{i}", RECORD)
        for command in bare_calls("wb"):
            client.execute_command(*command)
        server.reset_stats()

        ours: list[float] = []
        plain: list[float] = []
        ratios: list[float] = []
        bare_rates: list[float] = []
        bare_ratios: list[float] = []
        kinds = ["ours", "plain", "bare"]
        for b in range(blocks):
            ids = [f"n{b}-{i}" for i in range(block)]
            bare = bare_calls(f"b{b}")
            timings = {}
            for kind in kinds[b % 3 :] + kinds[: b % 3]:  # each kind first, second and last in turn
                start = time.perf_counter()
                if kind == "ours":
                    for node_id in ids:
                        add(sid, node_id, {"ok": True})
                elif kind == "plain":
                    for node_id in ids:
                        client.hset("plain:nodes", node_id, RECORD)
                else:
                    for command in bare:
                        client.execute_command(*command)
                timings[kind] = time.perf_counter() - start
            ours.append(block / timings["ours"])
            plain.append(block / timings["plain"])
            ratios.append(timings["plain"] / timings["ours"])
            bare_rates.append(block / timings["bare"])
            bare_ratios.append(timings["plain"] / timings["bare"])
        # What each call costs inside Redis, over the blocks above (the script ran for "ours" and "bare").
        inside = server.commandstats()
        script_us, hset_us = (float(inside[name]["usec_per_call"]) for name in ("evalsha", "hset"))

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

    expected = 200 + block + 2 * total + blocks * BATCH * 5
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
            note="ratio: ours / HSET rate, median of the blocks",
        ),
        interval_row(ratios, "blocks"),
        Row(
            "the same script call sent bare (built beforehand, reply left raw) vs HSET",
            "writes/s",
            median(bare_rates),
            median(plain),
            median(bare_ratios),
            baseline_name="HSET",
            note="the floor of any client of the script: what is left is the script's own cost",
        ),
        Row(
            "time inside Redis per call: the script vs HSET (INFO commandstats)",
            "µs",
            script_us,
            hset_us,
            script_us / hset_us,
            baseline_name="HSET",
            note="the server's own time, over the blocks above; the rest of a call is the round trip and the client",
        ),
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
        "bare_call_per_s": bare_rates,
        "bare_call_block_ratios": bare_ratios,
        "inside_redis_usec_per_call": {"script": script_us, "hset": hset_us},
        "batched": {"batch": BATCH, "ours_per_s": batched_ours, "hset_per_s": batched_plain, "ratios": batched_ratios},
        "hset_record": RECORD,
    }
    return section
