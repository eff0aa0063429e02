"""Item 1's breakdown: what the tracker's own code costs inside a real prefork worker, per task.

:func:`instrument` runs in the benchmark worker (``benchmarks.app`` calls it, before it installs the
tracker, when ``TRACKER_BENCH_INWORKER`` names a directory). It wraps the recorder's per-task
handlers (``task_received`` in the main process, ``task_prerun`` and ``task_success`` in the pool
children) and its writer's ``flush`` so that each call reads its thread's CPU clock before and after;
the writer thread's whole CPU time (flushes, wake-ups, heartbeats) is read when the process stops.
Each process writes what it measured to ``<directory>/<pid>.json`` when it stops: a pool child on
``worker_process_shutdown``, the main process at exit. :func:`collect` sums them up for the driver.

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
    #: "<handler>:tracked" / "<handler>:untracked" -> CPU ns per call; "flush" -> [CPU ns, events].
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
        calls["flush"].append([clock() - start, queued])
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
    flushes = [spent for spent, _ in merged.get("flush", [])]
    events = [queued for _, queued in merged.get("flush", []) if queued]
    return {
        "tracked_tasks": tracked_tasks,
        "untracked_tasks": len(merged.get("on_prerun:untracked", [])),
        "handlers_us": {
            kind: median_us(f"on_prerun:{kind}") + median_us(f"on_success:{kind}") for kind in ("tracked", "untracked")
        },
        "received_us": {kind: median_us(f"on_received:{kind}") for kind in ("tracked", "untracked")},
        "writer_thread_us_per_task": sum(merged.get("writer_thread", [])) / 1000 / tracked_tasks
        if tracked_tasks
        else float("nan"),
        "flush_us_per_task": sum(flushes) / 1000 / tracked_tasks if tracked_tasks else float("nan"),
        "flushes_per_100_tasks": 100 * len(events) / tracked_tasks if tracked_tasks else float("nan"),
        "flush_median_us": statistics.median(flushes) / 1000 if flushes else float("nan"),
        # A task's start and result are two events, written as one when they meet in a flush.
        "events_per_flush_median": statistics.median(events) if events else float("nan"),
    }
