"""The Celery app the tests run: real tasks, configured from the environment so that a worker
in a subprocess (``celery -A tests.celery.appmod worker``) and one in a thread share it."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery, Task, group
from celery.worker.request import Request

from tracker import TrackerValidationError
from tracker.celery import add_nodes, dispatch, install, report_progress

app = Celery("tracker_tests")
app.conf.update(
    broker_url=os.environ.get("TRACKER_TEST_BROKER", "memory://"),
    result_backend=os.environ.get("TRACKER_TEST_BROKER", "cache+memory://"),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=os.environ.get("TRACKER_TEST_REJECT_ON_LOST", "1") == "1",
    worker_prefetch_multiplier=1,
    task_default_queue=os.environ.get("TRACKER_TEST_QUEUE", "tracker-tests"),
    broker_transport_options={
        "visibility_timeout": int(os.environ.get("TRACKER_TEST_VISIBILITY", "3600")),
        # A worker waits this long on an empty queue (kombu's default 1 s) before it sees that it
        # should stop: a test's thread worker then stops within 0.1 s.
        "polling_interval": 0.1,
    },
    # Celery's Redis result backend subscribes the sending process to each task's result; results
    # dropped after the test's redis-server stopped would each retry for seconds to unsubscribe.
    result_backend_transport_options={"retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.1}},
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
recorder = install(app)


@app.task(name="t.work")
def work(i: int, fail: bool = False, sleep: float = 0.0) -> int:
    """Double ``i``; fail on purpose when asked; sleep first when asked."""
    if sleep:
        time.sleep(sleep)
    if fail:
        raise ValueError(f"node {i} failed on purpose")
    return i * 2


@app.task(bind=True, name="t.flaky", max_retries=3)
def flaky(self: Any, fail_times: int) -> int:
    """Fail (and retry) ``fail_times`` times, then succeed."""
    if self.request.retries < fail_times:
        raise self.retry(countdown=0.05, exc=RuntimeError(f"flaky attempt {self.request.retries + 1}"))
    return int(self.request.retries)


@app.task(name="t.limited", time_limit=1)
def limited(sleep: float) -> str:
    """A task with a 1 s hard time limit."""
    time.sleep(sleep)
    return "finished"


@app.task(name="t.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="t.total")
def total(values: list[int]) -> int:
    return sum(values)


@app.task(name="t.unjsonable")
def unjsonable() -> str:
    return "x" * (128 * 1024)


@app.task(name="t.deep", ignore_result=True)
def deep(depth: int) -> dict[str, Any]:
    """A result nested ``depth`` levels deep (deeper than the recursion limit when large)."""
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@app.task(name="t.slow_ok")
def slow_ok(sleep: float) -> str:
    time.sleep(sleep)
    return "ok"


@app.task(name="t.steps")
def steps(count: int, gate: str) -> int:
    """Report progress after each of ``count`` steps; step ``i`` waits until the broker's Redis
    counter ``gate`` reaches ``i`` (the test moves it), so the test knows where the task is."""
    client = redis.Redis.from_url(os.environ["TRACKER_TEST_BROKER"])
    for step in range(1, count + 1):
        while int(client.get(gate) or 0) < step:
            time.sleep(0.01)
        report_progress(step, count)
    client.close()
    return count


@app.task(name="t.crawl")
def crawl(found: int) -> int:
    """Add ``found`` ``t.work`` nodes to its own session (a crawler finding more pages), then return."""
    add_nodes(group(work.s(i) for i in range(found)))
    return found


@app.task(name="t.parent")
def parent(
    count: int, fail_child: bool = False, child_failure: str = "fail", sleep: float = 0.0, unrelated: bool = False
) -> str:
    """Dispatch a child session of ``count`` ``t.work`` tasks (the last failing when asked), then
    return; ``unrelated``: an unrelated session instead (``parent=None``)."""
    dispatch(
        group(work.s(i, fail=fail_child and i == count - 1, sleep=sleep) for i in range(count)),
        canvas_path="child.canvas",
        child_failure=child_failure,
        **({"parent": None} if unrelated else {}),  # type: ignore[arg-type]
    )
    return "parent done"


@app.task(name="t.parent_of_flaky")
def parent_of_flaky(key: str) -> str:
    """Dispatch a child session of one ``t.fails_once`` task for ``key`` (it fails its first run)."""
    dispatch(group([fails_once.s(key)]), canvas_path="flaky-child.canvas")
    return "parent done"


@app.task(name="t.bad_child")
def bad_child() -> str:
    """Dispatch a child batch the tracker refuses (an empty canvas path), catch the error, return."""
    try:
        dispatch(group([work.s(1)]), canvas_path="")
    except TrackerValidationError:
        return "refused"
    return "sent"


@app.task(name="t.nest")
def nest(depth: int) -> int:
    """A session of one task that, ``depth`` times down, dispatches a child session of the same."""
    if depth > 0:
        dispatch(group([nest.s(depth - 1)]), canvas_path=f"level-{depth - 1}.canvas")
    return depth


@app.task(name="t.fails_once")
def fails_once(key: str) -> str:
    """Fail the first time it runs for ``key`` (a Redis counter on the broker), succeed after."""
    client = redis.Redis.from_url(os.environ["TRACKER_TEST_BROKER"])
    runs = int(client.incr(key))
    client.close()
    if runs == 1:
        raise ValueError(f"first run of {key}")
    return "ok"


@app.task(name="t.undecodable")
def undecodable() -> None:
    """Fail as a task does on a file name ``os.listdir`` could not decode (a lone surrogate)."""
    name = os.fsdecode(b"report-\xff.csv")  # 'report-\udcff.csv', as os.listdir gives it
    raise FileNotFoundError(f"no such file: '{name}'")


@app.task(name="t.fails_as")
def fails_as(key: str, cause: str) -> str:
    """Fail the first time it runs for ``key`` with ``TimeoutError`` or ``ValueError`` (``cause``),
    succeed after; every run is counted in the broker's Redis under ``key``."""
    client = redis.Redis.from_url(os.environ["TRACKER_TEST_BROKER"])
    runs = int(client.incr(key))
    client.close()
    if runs == 1:
        raise {"TimeoutError": TimeoutError, "ValueError": ValueError}[cause](f"{cause} in {key}")
    return "ok"


class CustomRequest(Request):  # type: ignore[misc]
    """A user's own Request class (main process): notes each failure it handles in the broker's Redis."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        client = redis.Redis.from_url(os.environ["TRACKER_TEST_BROKER"])
        client.rpush(f"custom-request:{self.id}", type(exc_info.exception).__name__)
        client.close()
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


class CustomTask(Task):  # type: ignore[misc]
    """A user's own Task base class with its own hook and Request class."""

    Request = CustomRequest

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        client = redis.Redis.from_url(os.environ["TRACKER_TEST_BROKER"])
        client.rpush(f"custom-task:{task_id}", json.dumps(retval))
        client.close()


@app.task(name="t.custom", base=CustomTask)
def custom(i: int) -> int:
    if i == 3:
        raise ValueError("three")
    return i * 10


@app.task(name="t.done")
def done(status: dict[str, Any], *rest: Any, kind: str = "done") -> None:
    """A callback: append ``<status>`` (``<status> <run> <rest...>`` for other kinds) to the Redis
    list ``<kind>:<session id>`` the test reads."""
    client = redis.Redis.from_url(os.environ["TRACKER_TEST_BROKER"])
    entry = status["status"] if kind == "done" else " ".join([status["status"], str(status["run"]), *map(str, rest)])
    client.rpush(f"{kind}:{status['session_id']}", entry)
    client.close()


@app.task(name="t.op")
def op(*inputs: Any, tag: str, fail: str = "", log: str = "") -> list[Any]:
    """A canvas step whose result shows everything it was given: ``[tag, [inputs...]]``.

    With ``log``, notes its run (``tag``) in the broker's Redis list ``log``. With ``fail``, fails
    the first time it runs for the Redis key ``fail`` (the run of a resume succeeds).
    """
    client = redis.Redis.from_url(os.environ["TRACKER_TEST_BROKER"])
    try:
        if log:
            client.rpush(log, tag)
        if fail and int(client.incr(fail)) == 1:
            raise ValueError(f"{tag} fails on purpose")
    finally:
        client.close()
    return [tag, list(inputs)]


@app.task(name="t.on_error")
def on_error(task_id: str, tag: str = "") -> str:
    """An error callback, run as a task of its own (it takes only the failed task's id)."""
    return f"handled {tag}"


@app.task(name="t.on_error_inline")
def on_error_inline(request: Any, exc: Any, traceback: Any) -> None:
    """An error callback Celery calls inside the failing worker (it takes the request): notes it."""
    client = redis.Redis.from_url(os.environ["TRACKER_TEST_BROKER"])
    client.rpush(f"inline-errback:{request.id}", type(exc).__name__)
    client.close()
