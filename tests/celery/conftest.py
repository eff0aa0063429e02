"""Celery fixtures: a real broker (our own redis-server) and real workers (thread or subprocess)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery.contrib.testing.worker import start_worker

from tests.workers import ROOT, CeleryWorker
from tracker import SessionManager, TrackerSettings
from tracker.storage.redis import RedisStorageAdapter


@pytest.fixture(scope="session")
def celery_env(redis_url: str) -> dict[str, str]:
    """Broker and queue for the test app (set before tests.celery.appmod is configured)."""
    env = {"TRACKER_TEST_BROKER": redis_url, "TRACKER_TEST_QUEUE": f"tracker-tests-{uuid.uuid4().hex[:8]}"}
    os.environ.update(env)
    from tests.celery import appmod

    appmod.app.conf.update(broker_url=redis_url, result_backend=redis_url, task_default_queue=env["TRACKER_TEST_QUEUE"])
    return env


@pytest.fixture
def tracked(redis_url: str, key_prefix: str, celery_env: dict[str, str]) -> Iterator[SessionManager]:
    """A Redis-backed manager made the process-wide one (what the handlers use)."""
    settings = TrackerSettings(redis_url=redis_url, key_prefix=key_prefix)
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    SessionManager.set_instance(manager)
    yield manager
    from tests.celery.appmod import app

    # A thread worker ran tasks in this process: its writer (and heartbeat) must not outlive the
    # test, or it would go on writing into the next test's process-wide manager.
    app._tracker_recorder.stop_writer()
    SessionManager.reset_instance()
    # Messages this test left queued (e.g. originals of nodes it resumed) must not reach the next test.

    app.control.purge()


@pytest.fixture
def thread_worker(tracked: SessionManager, celery_env: dict[str, str]) -> Iterator[None]:
    """A real Celery worker in a thread (threads pool) consuming the test queue."""
    from tests.celery.appmod import app

    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False, loglevel="WARNING",
                      shutdown_timeout=10):  # fmt: skip
        yield


def wait_for(predicate: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def wait_status(manager: SessionManager, sid: str, statuses: set[str], timeout_s: float = 60.0) -> dict[str, object]:
    wait_for(lambda: manager.sync.get_session_status(sid)["status"] in statuses, timeout_s, f"status in {statuses}")
    return manager.sync.get_session_status(sid)


class WorkerProcess(CeleryWorker):
    """``celery -A tests.celery.appmod worker`` (prefork) on the test queue, killable."""

    def __init__(self, env: dict[str, str], log_path: Path, concurrency: int = 2, extra: tuple[str, ...] = ()) -> None:
        super().__init__("tests.celery.appmod", env["TRACKER_TEST_QUEUE"], env, log_path, concurrency, extra)


@pytest.fixture
def worker_process(
    redis_url: str, key_prefix: str, celery_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start prefork workers in subprocesses sharing this test's Redis key prefix; killed at the end."""
    started: list[WorkerProcess] = []

    def make(
        concurrency: int = 2,
        visibility_s: int | None = None,
        extra: tuple[str, ...] = (),
        env_extra: dict[str, str] | None = None,
    ) -> WorkerProcess:
        env = {**os.environ, **celery_env, "TRACKER_REDIS_URL": redis_url, "TRACKER_KEY_PREFIX": key_prefix,
               "PYTHONPATH": str(ROOT), **(env_extra or {})}  # fmt: skip
        if visibility_s is not None:
            env["TRACKER_TEST_VISIBILITY"] = str(visibility_s)
        worker = WorkerProcess(env, tmp_path / f"worker{len(started)}.log", concurrency, extra)
        worker.start()
        started.append(worker)
        return worker

    yield make
    # The test is over and nothing waits on them: SIGKILL (a warm shutdown takes seconds each).
    # What they held comes back to the queue only after the visibility timeout (an hour unless the
    # test passed `visibility_s`), and the queue is this test session's own.
    for worker in started:
        worker.kill()
