"""Item 1's breakdown: what the tracker's own code costs inside a real prefork worker, per task.

:func:`instrument` runs in the benchmark worker (``benchmarks.app`` calls it, before it installs the
tracker, when ``TRACKER_BENCH_INWORKER`` names a directory). It wraps the recorder's per-task
handlers (``task_received`` in the main process, ``task_prerun`` and ``task_success`` in the pool
children) and its writer's ``flush`` so that each call reads its thread's CPU clock before and after.
A task's outcome is written by ``task_success`` itself, in the task's thread (its start folded in):
that flush is inside the handler's figure, and is also shown apart. The writer thread's own flushes
(starts of tasks still running after ``flush_interval_s``) are counted apart, and its whole CPU time
(those flushes, wake-ups, heartbeats) is read when the process stops. Each process writes what it
measured to ``<directory>/<pid>.json`` when it stops: a pool child on ``worker_process_shutdown``,
the main process at exit. :func:`collect` sums them up for the driver.

The same wrappers time the handlers of untracked tasks (their stamps are looked for, nothing else),
so the wrappers' own clock reads are in both figures and their difference is the tracker's. Unlike
row 7's tight loop, these calls run between Celery's own work in processes that share two cores
with the broker, the store and the sender: what tracking costs where it runs.
"""

from __future__ import annotations

import atexit
import json
import os
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import signals

from tracker.celery.handlers import Recorder, Writer
from tracker.celery.stamps import ids_of

#: Handler name -> where its task's request is, among the signal's arguments.
_REQUEST_OF: dict[str, Callable[[dict[str, Any]], Any]] = {
    "on_received": lambda kwargs: kwargs.get("request"),
    "on_prerun": lambda kwargs: getattr(kwargs.get("task"), "request", None),
    "on_success": lambda kwargs: getattr(kwargs.get("sender"), "request", None),
}


def instrument(directory: str) -> None:
    """Time this process's tracker handlers and flushes; write them to ``directory`` at exit."""
    #: "<handler>:tracked" / "<handler>:untracked" -> CPU ns per call; "flush:task" (an outcome's
    #: write, in the task's thread) / "flush:writer" (the writer thread's) -> [CPU ns, events queued,
    #: store calls made].
    calls: dict[str, list[Any]] = defaultdict(list)
    clock = time.thread_time_ns

    def timed_handler(name: str) -> Callable[..., None]:
        handler = getattr(Recorder, name)
        request_of = _REQUEST_OF[name]

        def wrapper(self: Recorder, *args: Any, **kwargs: Any) -> None:
            start = clock()
            handler(self, *args, **kwargs)
            spent = clock() - start
            kind = "untracked" if ids_of(request_of(kwargs)) is None else "tracked"
            calls[f"{name}:{kind}"].append(spent)

        return wrapper

    for name in _REQUEST_OF:
        setattr(Recorder, name, timed_handler(name))
    flush = Writer.flush

    def timed_flush(self: Writer) -> Any:
        queued = len(self._queue)
        start = clock()
        outcomes = flush(self)
        where = "writer" if threading.current_thread() is self else "task"
        calls[f"flush:{where}"].append([clock() - start, queued, len(outcomes)])
        return outcomes

    Writer.flush = timed_flush  # type: ignore[method-assign]
    writers: list[Writer] = []
    run = Writer.run

    def noted_run(self: Writer) -> None:
        writers.append(self)
        run(self)

    Writer.run = noted_run  # type: ignore[method-assign]

    def dump(**_: Any) -> None:
        # Connected before the tracker's own handlers: its writer still runs.
        for writer in writers:
            if writer.ident is not None and writer.is_alive():
                calls["writer_thread"].append(time.clock_gettime_ns(time.pthread_getcpuclockid(writer.ident)))
        if calls:
            (Path(directory) / f"{os.getpid()}.json").write_text(json.dumps(calls))

    signals.worker_process_shutdown.connect(dump, weak=False)
    atexit.register(dump)


def collect(directory: Path) -> dict[str, Any]:
    """The per-task figures of every process that wrote to ``directory`` (µs of CPU)."""
    merged: dict[str, list[Any]] = defaultdict(list)
    for path in directory.glob("*.json"):
        for key, values in json.loads(path.read_text()).items():
            merged[key] += values

    def median_us(key: str) -> float:
        values = merged.get(key)
        return statistics.median(values) / 1000 if values else float("nan")

    tracked_tasks = len(merged.get("on_prerun:tracked", []))

    def per_task(value: float) -> float:
        return value / tracked_tasks if tracked_tasks else float("nan")

    task_flushes = [spent for spent, _, _ in merged.get("flush:task", [])]
    task_events = [queued for _, queued, _ in merged.get("flush:task", [])]
    task_calls = sum(made for _, _, made in merged.get("flush:task", []))
    writer_flushes = [spent for spent, _, made in merged.get("flush:writer", []) if made]
    return {
        "tracked_tasks": tracked_tasks,
        "untracked_tasks": len(merged.get("on_prerun:untracked", [])),
        # task_success's figure includes its write (the flush below).
        "handlers_us": {
            kind: median_us(f"on_prerun:{kind}") + median_us(f"on_success:{kind}") for kind in ("tracked", "untracked")
        },
        "received_us": {kind: median_us(f"on_received:{kind}") for kind in ("tracked", "untracked")},
        # An outcome's write in the task's thread: its CPU (median) and the events it found queued
        # (its start and itself: 2, written as one event).
        "outcome_write_median_us": statistics.median(task_flushes) / 1000 if task_flushes else float("nan"),
        "outcome_store_calls_per_100_tasks": 100 * per_task(task_calls),
        "events_per_outcome_write_median": statistics.median(task_events) if task_events else float("nan"),
        # The writer thread: its whole CPU time, and its flushes that made a store call (starts alone).
        "writer_thread_us_per_task": per_task(sum(merged.get("writer_thread", [])) / 1000),
        "writer_flush_us_per_task": per_task(sum(writer_flushes) / 1000),
        "writer_flushes_per_100_tasks": 100 * per_task(len(writer_flushes)),
    }
