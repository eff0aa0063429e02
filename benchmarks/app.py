"""The Celery app the worker benchmarks run: the project's own settings (``celeryconfig``) and their tasks.

Configured from the environment so that the driver and the worker subprocess
(``celery -A benchmarks.app worker``) share it:

- ``TRACKER_BENCH_BROKER``: broker and result backend URL (one private redis-server);
- ``TRACKER_BENCH_QUEUE``: the queue name;
- ``TRACKER_REDIS_URL``: the tracker's store (another private redis-server), read by the tracker;
- ``TRACKER_BENCH_TRACK=0``: leave the tracker out of the worker (what dispatch and the stamps cost
  alone, without the worker's side of tracking);
- ``TRACKER_BENCH_INWORKER``: a directory; time the tracker's handlers and flushes in each worker
  process and write them there (:mod:`benchmarks.inworker`);
- ``TRACKER_BENCH_WRITE_BEHIND=1``: emulate the tracker's former write-behind (:mod:`benchmarks.durable`):
  a task's outcome is queued like its start, and the writer thread writes it within
  ``flush_interval_s``, instead of being written before the handler returns (before the ack).
"""

from __future__ import annotations

import os
import time

from celery import Celery

from tracker.celery import install
from tracker.celery.writer import Writer

app = Celery("tracker_bench")
# The settings the project recommends (JSON only, acks_late, prefetch 1): what users run.
app.config_from_object("celeryconfig")
app.conf.update(
    broker_url=os.environ.get("TRACKER_BENCH_BROKER", "memory://"),
    result_backend=os.environ.get("TRACKER_BENCH_BROKER", "cache+memory://"),
    task_default_queue=os.environ.get("TRACKER_BENCH_QUEUE", "tracker-bench"),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
if os.environ.get("TRACKER_BENCH_INWORKER"):
    from benchmarks.inworker import instrument

    instrument(os.environ["TRACKER_BENCH_INWORKER"])
if os.environ.get("TRACKER_BENCH_WRITE_BEHIND") == "1":
    Writer.write = Writer.keep  # type: ignore[method-assign]
if os.environ.get("TRACKER_BENCH_TRACK", "1") != "0":
    install(app, beat=False)


@app.task(name="bench.noop")  # type: ignore[untyped-decorator]
def noop() -> None:
    """Do nothing: what is left of a task is the cost of running it (and of tracking it)."""
    return None


@app.task(name="bench.sleep")  # type: ignore[untyped-decorator]
def sleep(seconds: float) -> None:
    """Sleep ``seconds``: a task that takes some time, as real ones do (the sender chooses whether
    its result is stored, with the ``ignore_result`` option)."""
    time.sleep(seconds)
