"""Item 7: what tracking costs a worker process per task, beyond the store's own work, and where.

The real ``Recorder.on_prerun`` / ``on_success`` run for one task after another (a stand-in task
object carries the request Celery would give: id, retries, hostname, the tracker's stamps),
against a private redis-server. Their writer is flushed by hand every ``BATCH`` tasks (what a busy
worker process does within ``flush_interval``), and interleaved with those flushes the very
``record_nodes`` script call each flush makes (same arguments, built beforehand) is sent bare
through the same client: the difference is the writer's own cost (building the call, reading the
reply). CPU time is the figure (``time.thread_time`` for the task's thread, ``process_time`` for a
flush), as on a worker with every core busy.

pyinstrument then samples handlers and flushes; its time is sorted by where it goes (waiting on
the socket, redis-py, the tracker's own modules...).
"""

from __future__ import annotations

import collections
import time
import uuid
from types import SimpleNamespace

from celery import Celery
from pyinstrument import Profiler
from pyinstrument.frame import Frame

from benchmarks._redis import redis_server
from benchmarks.report import Row, Section, median
from tracker import SessionManager, TrackerSettings
from tracker.celery import NODE_STAMP, SESSION_STAMP, Recorder
from tracker.storage.redis import RedisStorageAdapter

HOSTNAME = "celery@bench-host"
#: Tasks per flush: about what one busy worker process finishes within ``flush_interval``.
BATCH = 25
#: Where a sample's time goes, by the file it was taken in (first match wins).
AREAS = (
    ("/tracker/celery/", "tracker.celery (handlers, writer)"),
    ("/tracker/manager.py", "tracker.manager (plans)"),
    ("/tracker/validation.py", "tracker.validation"),
    ("/tracker/storage/", "tracker.storage (programs, reply parsing)"),
    ("/tracker/", "tracker (other)"),
    ("/pydantic", "pydantic (models)"),
    ("/redis/", "redis-py (commands, pool, RESP)"),
    ("/json/", "json"),
)
SOCKET = "socket send/recv (waiting on Redis)"


def _task(app: Celery, session_id: str, node_id: str) -> SimpleNamespace:
    request = SimpleNamespace(
        id=str(uuid.uuid4()), retries=0, hostname=HOSTNAME, stamps={SESSION_STAMP: session_id, NODE_STAMP: node_id}
    )
    return SimpleNamespace(app=app, request=request)


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
    return "other (stdlib)"


def _breakdown(root: Frame) -> dict[str, float]:
    """Self time (s) by area over the whole tree."""
    totals: dict[str, float] = collections.defaultdict(float)
    stack: list[tuple[Frame, str]] = [(root, "other (stdlib)")]
    while stack:
        frame, parent = stack.pop()
        area = _area(frame, parent)
        real_children = [c for c in frame.children if not c.is_synthetic]
        totals[area] += max(0.0, frame.time - sum(c.time for c in real_children))
        stack.extend((child, area) for child in real_children)
    return dict(totals)


def run(quick: bool) -> Section:
    rounds = 40 if quick else 400
    section = Section("7", "Tracking hot path, per task")
    with redis_server() as server:
        # A long flush_interval keeps the writer thread out of the way: this loop flushes by hand.
        settings = TrackerSettings(redis_url=server.url, flush_interval=60)
        store = RedisStorageAdapter.from_url(server.url, settings)
        manager = SessionManager(storage=store, settings=settings)
        recorder = Recorder(Celery("tracker_bench_hotpath"), manager)
        app = recorder.app
        sid = manager.sync.create_session("bench.canvas", (rounds + 60) * BATCH * 2)
        writer = recorder.writer(HOSTNAME)
        client = store.client
        script = store._scripts["record_nodes"]

        def handlers(tasks: list[SimpleNamespace]) -> float:
            """Run both handlers for each task; the task thread's CPU seconds."""
            start = time.thread_time()
            for task in tasks:
                recorder.on_prerun(sender=task, task_id=task.request.id, task=task)
                recorder.on_success(sender=task, result=None)
            return time.thread_time() - start

        def bare_call(prefix: str) -> list[str | int]:
            """The record_nodes call a flush of BATCH fresh tasks makes, built beforehand."""
            tasks = [_task(app, sid, f"{prefix}-{i}") for i in range(BATCH)]
            handlers(tasks)
            queued = [writer._queue.popleft() for _ in range(len(writer._queue))]
            events = [event for _, event in recorder.events(queued)]
            call = store.programs._record_script(sid, events, 0, False, uuid.uuid4().hex)
            return ["EVALSHA", script.sha, len(call.keys), *call.keys, *call.args]

        for i in range(20):  # warm up: scripts loaded, connection open, code paths hot
            handlers([_task(app, sid, f"w{i}-{j}") for j in range(BATCH)])
            recorder.flush()

        handler_us: list[float] = []
        flush_us: list[float] = []
        bare_us: list[float] = []
        for r in range(rounds):
            tasks = [_task(app, sid, f"h{r}-{i}") for i in range(BATCH)]
            bare_command = bare_call(f"b{r}")
            for kind in ("ours", "bare") if r % 2 == 0 else ("bare", "ours"):
                if kind == "ours":
                    handler_us.append(handlers(tasks) / BATCH * 1e6)
                    start = time.process_time()
                    outcomes = recorder.flush()
                    flush_us.append((time.process_time() - start) / BATCH * 1e6)
                    if len(outcomes) != 1:
                        raise RuntimeError(f"a flush made {len(outcomes)} store calls, expected 1")
                else:
                    start = time.process_time()
                    client.execute_command(*bare_command)
                    bare_us.append((time.process_time() - start) / BATCH * 1e6)

        profiler = Profiler(interval=0.0002)
        profiler.start()
        for r in range(rounds // 4):
            handlers([_task(app, sid, f"p{r}-{i}") for i in range(BATCH)])
            recorder.flush()
        profiler.stop()
        recorder.stop_writer()
        status = manager.sync.get_session_status(sid)
        store.close()

    expected = (20 + 2 * rounds + rounds // 4) * BATCH
    if status["completed_nodes"] != expected:
        raise RuntimeError(f"{status['completed_nodes']} nodes completed, expected {expected}")
    root = profiler.last_session.root_frame() if profiler.last_session else None
    areas = _breakdown(root) if root else {}
    total = sum(areas.values()) or 1.0
    profiled = rounds // 4 * BATCH
    handler, flush, bare = median(handler_us), median(flush_us), median(bare_us)
    section.rows += [
        Row("handlers in the task's thread (prerun + success)", "µs CPU", handler,
            note="validate and queue the result; the start waits unvalidated and rides on it"),
        Row(f"writer per task, flushing {BATCH} tasks per store call, vs the bare call", "µs CPU", flush, bare,
            flush / bare, baseline_name="bare call", note=f"beyond the round trip: {flush - bare:.1f} µs per task"),
        Row("tracker modules' share of sampled time", "%",
            100 * sum(share for area, share in areas.items() if area.startswith("tracker")) / total,
            note="pyinstrument; the rest is redis-py, the socket and the stdlib"),
    ]  # fmt: skip
    section.details = {
        "rounds": rounds,
        "batch": BATCH,
        "cpu_us_per_task": {"handlers": handler, "flush": flush, "bare_call": bare},
        "profile": {
            "tasks": profiled,
            "per_task_us_by_area": {a: s / profiled * 1e6 for a, s in sorted(areas.items(), key=lambda x: -x[1])},
            "share_by_area": {area: seconds / total for area, seconds in areas.items()},
        },
    }
    return section
