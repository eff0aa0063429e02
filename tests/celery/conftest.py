"""Celery fixtures: a real broker (our own redis-server) and real workers (thread or subprocess)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery.contrib.testing.worker import start_worker

from tracker import SessionManager, TrackerSettings
from tracker.storage.redis import RedisStorageAdapter

ROOT = Path(__file__).resolve().parents[2]


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
    SessionManager.reset_instance()
    # Messages this test left queued (e.g. originals of nodes it resumed) must not reach the next test.
    from tests.celery.appmod import app

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


class WorkerProcess:
    """``celery -A tests.celery.appmod worker`` as a subprocess (prefork), killable."""

    def __init__(self, env: dict[str, str], concurrency: int = 2, extra: tuple[str, ...] = ()) -> None:
        self.env = env
        self.concurrency = concurrency
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [sys.executable, "-m", "celery", "-A", "tests.celery.appmod", "worker", "--pool", "prefork",
                "--concurrency", str(self.concurrency), "--loglevel", "INFO", "--without-gossip",
                "--without-mingle", "--without-heartbeat", "-Q", self.env["TRACKER_TEST_QUEUE"],
                "--hostname", f"w{uuid.uuid4().hex[:6]}@%h", *self.extra]  # fmt: skip
        self.proc = subprocess.Popen(args, env=self.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """SIGKILL the whole process group's main process and its pool children."""
        if self.proc is None:
            return
        children = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        self.proc.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None


@pytest.fixture
def worker_process(
    redis_url: str, key_prefix: str, celery_env: dict[str, str]
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start prefork workers in subprocesses sharing this test's Redis key prefix; stopped at the end."""
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
        worker = WorkerProcess(env, concurrency, extra)
        worker.start()
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop()
