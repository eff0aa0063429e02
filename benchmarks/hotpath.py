"""Item 7: what tracking costs a worker process per task, beyond the store's own work, and where.

The real ``Recorder.on_prerun`` / ``on_success`` run for one task after another (a stand-in task
object carries the request Celery would give: id, retries, hostname, the tracker's stamps),
against a private redis-server. ``on_prerun`` queues the task's start; ``on_success`` writes the
outcome before it returns, in the task's thread, with that start folded in: one ``record_nodes``
script call per task. Interleaved with those tasks (blocks of ``BATCH``, in alternating order), the
very call each task's ``on_success`` makes (same arguments, built beforehand) is sent bare through
the same client: the difference is the library's own cost (queueing the start, building the
event and the call, reading the reply). CPU time of the task's thread is the figure
(``time.thread_time``), as on a worker with every core busy; the wall time the task's thread
spends in them (the store's reply included) is shown too.

pyinstrument then samples the handlers; its time is sorted by where it goes (waiting on the
socket, redis-py, the tracker's own modules...).
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
from tracker.celery.handlers import Recorder
from tracker.celery.stamps import NODE_STAMP, SESSION_STAMP
from tracker.storage.base import new_request_id
from tracker.storage.redis import RedisStorageAdapter

HOSTNAME = "celery@bench-host"
#: Tasks per timed block (each task is one store call; a block's time is divided by this).
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
        # Long intervals keep the writer thread out of the way: each start goes with its outcome, and
        # no heartbeat (a keep-alive script call while a task runs) mixes in with the store calls counted.
        settings = TrackerSettings(redis_url=server.url, flush_interval_s=60, heartbeat_interval_s=3600)
        store = RedisStorageAdapter.from_url(server.url, settings)
        manager = SessionManager(storage=store, settings=settings)
        recorder = Recorder(Celery("tracker_bench_hotpath"), manager)
        app = recorder.app
        sid = manager.sync.create_session("bench.canvas", (rounds + 60) * BATCH * 2)
        writer = recorder.writer(HOSTNAME)
        client = store.client
        script = store._scripts["record_nodes"]

        def handlers(tasks: list[SimpleNamespace]) -> tuple[float, float]:
            """Run both handlers for each task, as Celery would: the task thread's CPU and wall seconds."""
            wall, cpu = time.perf_counter(), time.thread_time()
            for task in tasks:
                recorder.on_prerun(sender=task, task_id=task.request.id, task=task)
                recorder.on_success(sender=task, result=None)
            return time.thread_time() - cpu, time.perf_counter() - wall

        def bare_call(node_id: str) -> list[str | int]:
            """The record_nodes call a fresh task's on_success makes (its start folded in), built beforehand."""
            writer.write = writer.keep  # type: ignore[method-assign]  # the outcome waits in the queue
            try:
                handlers([_task(app, sid, node_id)])
            finally:
                del writer.write
            queued = [writer._queue.popleft() for _ in range(len(writer._queue))]
            events = [event for _, event in recorder.events(queued)]
            if len(events) != 1:
                raise RuntimeError(f"a task's start and outcome made {len(events)} events, expected 1")
            call = store.programs._record_script(sid, events, 0, False, new_request_id())
            return ["EVALSHA", script.sha, len(call.keys), *call.keys, *call.args]

        def store_calls() -> int:
            return int(server.command_calls().get("evalsha", 0))

        for i in range(20):  # warm up: scripts loaded, connection open, code paths hot
            handlers([_task(app, sid, f"w{i}-{j}") for j in range(BATCH)])

        handler_us: list[float] = []
        handler_wall_us: list[float] = []
        bare_us: list[float] = []
        bare_wall_us: list[float] = []
        calls_before = store_calls()
        for r in range(rounds):
            tasks = [_task(app, sid, f"h{r}-{i}") for i in range(BATCH)]
            bare_commands = [bare_call(f"b{r}-{i}") for i in range(BATCH)]
            for kind in ("ours", "bare") if r % 2 == 0 else ("bare", "ours"):
                if kind == "ours":
                    cpu, wall = handlers(tasks)
                    handler_us.append(cpu / BATCH * 1e6)
                    handler_wall_us.append(wall / BATCH * 1e6)
                else:
                    wall, cpu = time.perf_counter(), time.thread_time()
                    for command in bare_commands:
                        client.execute_command(*command)
                    bare_us.append((time.thread_time() - cpu) / BATCH * 1e6)
                    bare_wall_us.append((time.perf_counter() - wall) / BATCH * 1e6)
        calls_per_task = (store_calls() - calls_before) / (2 * rounds * BATCH)
        if round(calls_per_task, 6) != 1:
            raise RuntimeError(f"{calls_per_task} store calls per task, expected 1 (handlers and bare alike)")

        profiler = Profiler(interval=0.0002)
        profiler.start()
        for r in range(rounds // 4):
            handlers([_task(app, sid, f"p{r}-{i}") for i in range(BATCH)])
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
    handler, bare = median(handler_us), median(bare_us)
    handler_wall, bare_wall = median(handler_wall_us), median(bare_wall_us)
    section.rows += [
        Row("a task's handlers (prerun + success, its one store call), vs that call sent bare", "µs CPU", handler,
            bare, handler / bare, baseline_name="bare call",
            note=f"task's thread; beyond the round trip: {handler - bare:.1f} µs per task"),
        Row("the same, wall time in the task's thread (the store's reply included)", "µs", handler_wall, bare_wall,
            handler_wall / bare_wall, baseline_name="bare call",
            note=f"before Celery acks the task; beyond the bare call: {handler_wall - bare_wall:.1f} µs"),
        Row("tracker modules' share of sampled time", "%",
            100 * sum(share for area, share in areas.items() if area.startswith("tracker")) / total,
            note="pyinstrument; the rest is redis-py, the socket and the stdlib"),
    ]  # fmt: skip
    section.details = {
        "rounds": rounds,
        "batch": BATCH,
        "store_calls_per_task": calls_per_task,
        "cpu_us_per_task": {"handlers": handler, "bare_call": bare},
        "wall_us_per_task": {"handlers": handler_wall, "bare_call": bare_wall},
        "profile": {
            "tasks": profiled,
            "per_task_us_by_area": {a: s / profiled * 1e6 for a, s in sorted(areas.items(), key=lambda x: -x[1])},
            "share_by_area": {area: seconds / total for area, seconds in areas.items()},
        },
    }
    return section
