"""The Celery app of the reliability scenarios, configured from the environment.

Workers run it as ``celery -A tests.reliability.appmod worker`` in subprocesses (real prefork
pools, SIGKILL-able), where the module installs the tracker (``TRACKER_REL_WORKER=1``); the test
process, which only publishes, installs it with a fixture of its own (tests/reliability/conftest.py)
for as long as the reliability tests run.

Broker settings follow the redelivery scenario: ``task_acks_late``, a ``visibility_timeout`` from
``TRACKER_REL_VISIBILITY`` and restore sweeps every second (kombu's default sweep runs every
100 s), so a message held by a dead worker comes back a few seconds after the timeout.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery, group

from tracker.celery import add_nodes, dispatch, install

BROKER = os.environ.get("TRACKER_REL_BROKER", "memory://")

app = Celery("tracker_reliability", set_as_current=False)
app.conf.update(
    broker_url=BROKER,
    result_backend=BROKER if BROKER.startswith("redis") else "cache+memory://",
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=os.environ.get("TRACKER_REL_QUEUE", "tracker-reliability"),
    broker_transport_options={
        "visibility_timeout": int(os.environ.get("TRACKER_REL_VISIBILITY", "3600")),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
        # A worker killed while it sweeps holds the restore lock this long (kombu's default: 300 s).
        "unacked_mutex_expire": 3,
    },
    broker_connection_retry_on_startup=True,
)
if os.environ.get("TRACKER_REL_WORKER") == "1":
    install(app)


@app.task(name="rel.step")  # type: ignore[untyped-decorator]
def step(i: int, sleep_s: float = 0.0) -> dict[str, Any]:
    """Sleep, then report which node ran, where and when it finished (epoch seconds)."""
    if sleep_s:
        time.sleep(sleep_s)
    return {"i": i, "doubled": 2 * i, "pid": os.getpid(), "done_at": time.time()}


@app.task(name="rel.mark")  # type: ignore[untyped-decorator]
def mark(path: str) -> str:
    """Create ``path``: proof that a message ran."""
    Path(path).write_text("ran")
    return path


@app.task(name="rel.big")  # type: ignore[untyped-decorator]
def big(size: int) -> str:
    """Return a string of ``size`` characters (over the result cap when large)."""
    return "x" * size


#: The Redis list where :func:`completion` records its calls for session ``<id>``.
CALLBACKS_KEY = "crash:callbacks:{}"


@app.task(name="rel.completion")  # type: ignore[untyped-decorator]
def completion(status: dict[str, Any]) -> None:
    """An ``on_complete`` callback that records each call: RPUSHes its argument (JSON) to
    ``crash:callbacks:<session id>`` in the store's redis-server (``TRACKER_REDIS_URL``)."""
    client = redis.Redis.from_url(os.environ["TRACKER_REDIS_URL"])
    try:
        client.rpush(CALLBACKS_KEY.format(status["session_id"]), json.dumps(status))
    finally:
        client.close()


@app.task(name="rel.fan")  # type: ignore[untyped-decorator]
def fan(count: int, runs_key: str, die_on_first_run: bool = False, sleep_s: float = 0.0) -> int:
    """Add ``count`` ``rel.step`` nodes (each sleeping ``sleep_s``) to its own session (a crawler
    finding more work); counts its runs in ``runs_key`` (the store's redis-server); on its first
    run, then SIGKILLs its own process after the nodes were added and sent, before it returns."""
    time.sleep(sleep_s)
    add_nodes(group(step.s(i, sleep_s) for i in range(count)))
    _count_run(runs_key, die_on_first_run)
    return count


@app.task(name="rel.parent")  # type: ignore[untyped-decorator]
def parent(count: int, runs_key: str, die_on_first_run: bool = False, sleep_s: float = 0.05) -> int:
    """Dispatch a child session of ``count`` ``rel.step`` tasks (each sleeping ``sleep_s``); counts
    its runs in ``runs_key``; on its first run, then SIGKILLs its own process after the child was
    dispatched, before it returns."""
    time.sleep(sleep_s)
    dispatch(group(step.s(i, sleep_s) for i in range(count)), canvas_path="child.canvas")
    _count_run(runs_key, die_on_first_run)
    return count


def _count_run(runs_key: str, die_on_first_run: bool) -> None:
    """Count a run in ``runs_key`` (the store's redis-server); on the first, when asked, SIGKILL
    this very process (after what the task did so far, before it returns)."""
    client = redis.Redis.from_url(os.environ["TRACKER_REDIS_URL"])
    try:
        runs = int(client.incr(runs_key))
    finally:
        client.close()
    if die_on_first_run and runs == 1:
        os.kill(os.getpid(), signal.SIGKILL)
