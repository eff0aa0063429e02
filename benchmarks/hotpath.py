"""Item 7: what the signal handlers spend beyond their Redis round trips, and where.

The real ``Recorder.on_prerun`` / ``on_success`` run for one task after another (a stand-in task
object carries the request Celery would give: id, retries, hostname, the tracker's stamps),
against a private redis-server. Interleaved with each pair, the very two ``record_node`` scripts
the handlers send (same arguments, built beforehand) are sent bare, through the same client: the
difference is the handlers' own cost (validation, building the call, reading the reply into
models). CPU time (``time.process_time``) is the main figure, as on a worker with every core
busy; wall time is given beside it.

pyinstrument then samples a run of handler pairs; its time is sorted by where it goes (waiting on
the socket, redis-py, the tracker's own modules, pydantic...).
"""

from __future__ import annotations

import collections
import itertools
import time
import uuid
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from celery import Celery
from pyinstrument import Profiler
from pyinstrument.frame import Frame

from benchmarks._redis import redis_server
from benchmarks._store import node_events
from benchmarks.report import Row, Section, median
from tracker import SessionManager, TrackerSettings
from tracker.celery import NODE_STAMP, SESSION_STAMP, Recorder
from tracker.storage.redis import RedisStorageAdapter, Script

HOSTNAME = "celery@bench-host"

#: Where a sample's time goes, by the file it was taken in (first match wins).
AREAS = (
    ("/tracker/celery/", "tracker.celery (handlers)"),
    ("/tracker/manager.py", "tracker.manager (plans)"),
    ("/tracker/validation.py", "tracker.validation"),
    ("/tracker/storage/", "tracker.storage (programs, reply parsing)"),
    ("/tracker/", "tracker (other)"),
    ("/pydantic", "pydantic (models)"),
    ("/redis/", "redis-py (commands, pool, RESP)"),
    ("/json/", "json"),
    ("uuid.py", "uuid"),
)
SOCKET = "socket send/recv (waiting on Redis)"


def _task(session_id: str, node_id: str) -> SimpleNamespace:
    request = SimpleNamespace(
        id=str(uuid.uuid4()), retries=0, hostname=HOSTNAME, stamps={SESSION_STAMP: session_id, NODE_STAMP: node_id}
    )
    return SimpleNamespace(request=request)


def _area(frame: Frame, parent: str) -> str:
    path = frame.file_path or ""
    if path.startswith("<built-in>") or not path:
        name = frame.function
        if "recv" in name or "send" in name:
            return SOCKET
        return parent  # a C function: time of the Python code that called it
    for part, area in AREAS:
        if part in path:
            return area
    return "other (celery glue, stdlib)"


def _breakdown(root: Frame) -> dict[str, float]:
    """Self time (s) by area over the whole tree."""
    totals: dict[str, float] = collections.defaultdict(float)
    stack: list[tuple[Frame, str]] = [(root, "other (celery glue, stdlib)")]
    while stack:
        frame, parent = stack.pop()
        area = _area(frame, parent)
        real_children = [c for c in frame.children if not c.is_synthetic]
        totals[area] += max(0.0, frame.time - sum(c.time for c in real_children))
        stack.extend((child, area) for child in real_children)
    return dict(totals)


def _top_functions(root: Frame, prefix: str = "/tracker/", count: int = 12) -> list[tuple[str, float]]:
    """The tracker's functions with the most time of their own (C functions they call included)."""
    totals: dict[str, float] = collections.defaultdict(float)
    stack = [root]
    while stack:
        frame = stack.pop()
        children = [c for c in frame.children if not c.is_synthetic]
        path = frame.file_path or ""
        if prefix in path:
            python_children = sum(c.time for c in children if not (c.file_path or "").startswith("<built-in>"))
            totals[f"{path.split(prefix, 1)[1]}:{frame.function}"] += max(0.0, frame.time - python_children)
        stack.extend(children)
    return sorted(totals.items(), key=lambda item: -item[1])[:count]


def _is_record(batch: list[Any]) -> bool:
    return len(batch) == 1 and isinstance(batch[0], Script) and batch[0].name == "record_node"


def _without_io(store: RedisStorageAdapter, handlers: Callable[[Any], None], task: Any, repeat: int) -> float:
    """CPU µs of one handler pair whose two store calls are answered from replies captured once.

    What is left is the handlers' own work: validating, building the call, reading the reply.
    """
    real = store._execute
    captured: list[list[Any]] = []

    def capture(batch: list[Any]) -> list[Any]:
        replies = real(batch)
        if _is_record(batch):
            captured.append(replies)
        return replies

    store._execute = capture  # type: ignore[method-assign]
    try:
        handlers(task)
    finally:
        store._execute = real  # type: ignore[method-assign]
    if len(captured) != 2:
        raise RuntimeError(f"expected 2 record_node calls per handler pair, saw {len(captured)}")
    replies = itertools.cycle(captured)

    def canned(batch: list[Any]) -> list[Any]:
        return next(replies) if _is_record(batch) else real(batch)

    store._execute = canned  # type: ignore[method-assign]
    try:
        runs = []
        for _ in range(5):
            start = time.process_time()
            for _ in range(repeat // 5):
                handlers(task)
            runs.append((time.process_time() - start) / (repeat // 5))
    finally:
        store._execute = real  # type: ignore[method-assign]
    return min(runs) * 1e6


def run(quick: bool) -> Section:
    n = 500 if quick else 5_000
    profiled = 300 if quick else 3_000
    section = Section("7", "Signal handler hot path")
    with redis_server() as server:
        settings = TrackerSettings(redis_url=server.url)
        store = RedisStorageAdapter.from_url(server.url, settings)
        manager = SessionManager(storage=store, settings=settings)
        recorder = Recorder(Celery("tracker_bench_hotpath"), manager)
        sid = manager.sync.create_session("bench.canvas", 4 * (n + profiled) + 1_000)
        scripts = store._scripts["record_node"]
        worker = recorder.worker_id(HOSTNAME)

        def handlers(task: Any) -> None:
            recorder.on_prerun(sender=task, task_id=task.request.id, task=task)
            recorder.on_success(sender=task, result=None)

        def bare_scripts(node_id: str, task_id: str) -> list[Script]:
            events = [
                (node_id, "running", {"attempt": 1, "task_id": task_id, "worker": worker}),
                (node_id, "completed", {"attempt": 1, "task_id": task_id, "result": None}),
            ]
            return list(node_events(manager, store, sid, events))

        def bare(calls: list[Script]) -> None:
            for script in calls:
                scripts(keys=script.keys, args=script.args)

        for i in range(300):  # warm up
            handlers(_task(sid, f"w{i}"))
            bare(bare_scripts(f"wb{i}", str(uuid.uuid4())))

        cpu = time.process_time
        wall = time.perf_counter
        h_cpu: list[float] = []
        h_wall: list[float] = []
        b_cpu: list[float] = []
        b_wall: list[float] = []
        for i in range(n):
            task = _task(sid, f"h{i}")
            calls = bare_scripts(f"b{i}", task.request.id)
            for kind in ("handlers", "bare") if i % 2 == 0 else ("bare", "handlers"):
                c0, w0 = cpu(), wall()
                if kind == "handlers":
                    handlers(task)
                else:
                    bare(calls)
                c1, w1 = cpu(), wall()
                (h_cpu if kind == "handlers" else b_cpu).append(c1 - c0)
                (h_wall if kind == "handlers" else b_wall).append(w1 - w0)

        own_cpu = _without_io(store, handlers, _task(sid, "canned"), 2_000 if quick else 20_000)

        tasks = [_task(sid, f"p{i}") for i in range(profiled)]
        profiler = Profiler(interval=0.0002)
        profiler.start()
        for task in tasks:
            handlers(task)
        profiler.stop()
        stop = getattr(recorder, "stop_heartbeat", None)
        if stop is not None:
            stop()
        status = manager.sync.get_session_status(sid)
        store.close()

    expected = 2 * 300 + 2 * n + profiled + 1
    if status["completed_nodes"] != expected:
        raise RuntimeError(f"{status['completed_nodes']} nodes completed, expected at least {expected}")
    root = profiler.last_session.root_frame() if profiler.last_session else None
    areas = _breakdown(root) if root else {}
    total = sum(areas.values()) or 1.0
    per_task_us = {area: seconds / profiled * 1e6 for area, seconds in sorted(areas.items(), key=lambda a: -a[1])}
    handler_cpu, bare_cpu = statistics_us(h_cpu), statistics_us(b_cpu)
    section.rows += [
        Row(
            "handlers per task (prerun + success) vs their 2 bare scripts, CPU",
            "µs",
            handler_cpu,
            bare_cpu,
            handler_cpu / bare_cpu,
            baseline_name="bare",
            note=f"beyond the round trips: {handler_cpu - bare_cpu:.0f} µs CPU per task",
        ),
        Row(
            "the same, wall time",
            "µs",
            statistics_us(h_wall),
            statistics_us(b_wall),
            statistics_us(h_wall) / statistics_us(b_wall),
            baseline_name="bare",
        ),
        Row("handlers' own work per task, replies canned (no I/O), CPU", "µs", own_cpu,
            note="validation, building the two calls, reading the replies into models"),
        Row("tracker modules' share of sampled handler time", "%",
            100 * sum(share for area, share in areas.items() if area.startswith("tracker")) / total,
            note="pyinstrument; the rest is redis-py, the socket and the stdlib"),
    ]  # fmt: skip
    section.details = {
        "tasks": n,
        "cpu_us": {"handlers_median": handler_cpu, "bare_median": bare_cpu, "handlers_without_io": own_cpu},
        "wall_us": {"handlers_median": statistics_us(h_wall), "bare_median": statistics_us(b_wall)},
        "profile": {
            "tasks": profiled,
            "per_task_us_by_area": per_task_us,
            "share_by_area": {area: seconds / total for area, seconds in areas.items()},
            "top_tracker_functions_us_per_task": [(name, s / profiled * 1e6) for name, s in _top_functions(root)]
            if root
            else [],
        },
    }
    return section


def statistics_us(values: list[float]) -> float:
    return median(values) * 1e6
