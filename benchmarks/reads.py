"""Item 3 (and the read half of item 2): status read latency as a batch grows, beside Celery's own count.

Two sessions on one private redis-server, one with 10 nodes and one with 100 000, every node with
a result. ``manager.sync.get_session_status`` is timed on both, alternating, and the medians
compared. Beside it, Celery's ``GroupResult.completed_count()`` over the same number of stored
results (the Redis result backend, fresh ``AsyncResult`` objects for every count, as a web app
restoring a group would have).
"""

from __future__ import annotations

import time
import uuid

from celery import Celery
from celery.result import AsyncResult, GroupResult

from benchmarks._redis import command_log, redis_server
from benchmarks._store import node_results, send_pipelined
from benchmarks.report import Row, Section, Target, median, quantile
from tracker import SessionManager, TrackerSettings
from tracker.storage.redis import RedisStorageAdapter

SMALL = 10


def _session(manager: SessionManager, store: RedisStorageAdapter, nodes: int) -> str:
    sid = manager.sync.create_session("bench.canvas", nodes)
    ok = send_pipelined(store, node_results(manager, store, sid, (f"n{i}" for i in range(nodes)), result={"ok": True}))
    status = manager.sync.get_session_status(sid)
    if ok != nodes or status["completed_nodes"] != nodes:
        raise RuntimeError(f"session of {nodes} nodes: {ok} results stored, status {status}")
    return sid


def _celery_results(app: Celery, size: int) -> list[str]:
    """Store ``size`` SUCCESS results the way the Redis backend does; return their task ids."""
    backend = app.backend
    ids = [str(uuid.uuid4()) for _ in range(size)]
    client = backend.client
    for start in range(0, size, 1000):
        pipe = client.pipeline(transaction=False)
        for tid in ids[start : start + 1000]:
            meta = backend._get_result_meta(result=None, state="SUCCESS", traceback=None, request=None)
            meta["task_id"] = tid
            pipe.set(backend.get_key_for_task(tid), backend.encode(meta))
        pipe.execute()
    return ids


def _completed_count_s(app: Celery, ids: list[str]) -> float:
    group = GroupResult(str(uuid.uuid4()), [AsyncResult(tid, app=app) for tid in ids], app=app)
    start = time.perf_counter()
    count = group.completed_count()
    elapsed = time.perf_counter() - start
    if count != len(ids):
        raise RuntimeError(f"completed_count() = {count}, expected {len(ids)}")
    return elapsed


def run(quick: bool) -> Section:
    large = 2_000 if quick else 100_000
    reads = 200 if quick else 2_000
    celery_budget_s = 5.0 if quick else 40.0
    section = Section("3", "Status read latency vs batch size")
    with redis_server() as server:
        settings = TrackerSettings(redis_url=server.url)
        store = RedisStorageAdapter.from_url(server.url, settings)
        manager = SessionManager(storage=store, settings=settings)
        fill_start = time.perf_counter()
        small_sid = _session(manager, store, SMALL)
        large_sid = _session(manager, store, large)
        fill_s = time.perf_counter() - fill_start

        read = manager.sync.get_session_status
        for _ in range(50):  # warm up
            read(small_sid)
            read(large_sid)
        small_s: list[float] = []
        large_s: list[float] = []
        for i in range(reads):
            # Alternate which goes first, so that neither always follows the other.
            order = (
                ((small_sid, small_s), (large_sid, large_s)) if i % 2 else ((large_sid, large_s), (small_sid, small_s))
            )
            for sid, times in order:
                start = time.perf_counter()
                read(sid)
                times.append(time.perf_counter() - start)

        with command_log(server) as logged:
            for _ in range(100):
                read(large_sid)
        round_trips = sum(1 for c in logged if not c.in_script) / 100

        app = Celery("tracker_bench_reads")
        app.config_from_object("celeryconfig")
        app.conf.update(result_backend=f"redis://127.0.0.1:{server.port}/1")
        celery_small_ids = _celery_results(app, SMALL)
        celery_small = [_completed_count_s(app, celery_small_ids) for _ in range(200)]
        # The largest size that fits the time budget: from 1 000 up by tens to our large session's size
        # (each count is one GET per result, so its time grows with the size: it is predicted first).
        candidate, spent = min(1_000, large), 0.0
        while True:
            ids = _celery_results(app, candidate)
            runs = [_completed_count_s(app, ids) for _ in range(2 if candidate < large else 1)]
            spent += sum(runs)
            size, celery_large_s = candidate, median(runs)
            following = min(large, candidate * 10)
            if candidate >= large or spent + celery_large_s * following / candidate > celery_budget_s:
                break
            candidate = following
        store.close()

    ours_small, ours_large = median(small_s), median(large_s)
    section.rows += [
        Row(
            f"status read, {large:,} nodes vs {SMALL} (median of {reads})",
            "ms",
            ours_large * 1e3,
            ours_small * 1e3,
            ours_large / ours_small,
            baseline_name=f"{SMALL} nodes",
            target=Target("ratio", "<=", 1.2),
        ),
        Row("round trips per status read", "commands", round_trips, target=Target("ours", "<=", 1)),
        Row(
            f"status read vs Celery GroupResult.completed_count(), {size:,} results",
            "ms",
            ours_large * 1e3,
            celery_large_s * 1e3,
            ours_large / celery_large_s,
            baseline_name="Celery",
        ),
        Row(
            f"Celery completed_count(), {size:,} results vs {SMALL}",
            "ms",
            celery_large_s * 1e3,
            median(celery_small) * 1e3,
            celery_large_s / median(celery_small),
            baseline_name=f"{SMALL} results",
        ),
    ]
    section.details = {
        "nodes": {"small": SMALL, "large": large},
        "reads_each": reads,
        "ours_ms": {
            "small": {"median": ours_small * 1e3, "p95": quantile(small_s, 0.95) * 1e3},
            "large": {"median": ours_large * 1e3, "p95": quantile(large_s, 0.95) * 1e3},
        },
        "celery_completed_count_ms": {
            "size": size,
            "large_median": celery_large_s * 1e3,
            "small_median": median(celery_small) * 1e3,
        },
        "fill_s": fill_s,
    }
    return section
