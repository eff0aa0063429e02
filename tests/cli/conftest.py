"""CLI fixtures: click's CliRunner on the tests' own Redis, sessions made directly, and real workers."""

from __future__ import annotations

import importlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner, Result

from tests.cli.apps import worker_app
from tracker import SessionManager, TrackerSettings
from tracker.celery import install, uninstall
from tracker.cli import main
from tracker.storage.redis import RedisStorageAdapter

# The node task `tracker run` sends (a shared task): registered on the test app before any worker starts.
importlib.import_module("workers.tasks")

#: The Celery app the CLI is pointed at in these tests.
TEST_APP = "tests.cli.apps:worker_app"


@pytest.fixture(scope="package", autouse=True)
def worker_app_queue(redis_url: str) -> Iterator[str]:
    """Configure the test app (the tests' Redis, a queue of its own) and track it, for this package only.

    Signal receivers are process-wide: the recorder is disconnected when the package ends, so
    nothing of this app is connected while other packages run.
    """
    queue = f"tracker-cli-tests-{uuid.uuid4().hex[:8]}"
    worker_app.conf.update(broker_url=redis_url, task_default_queue=queue)
    install(worker_app, beat=False)
    yield queue
    uninstall(worker_app)


@pytest.fixture
def tracked(redis_url: str, key_prefix: str) -> Iterator[SessionManager]:
    """A Redis-backed manager made the process-wide one (what the worker's signal handlers use)."""
    settings = TrackerSettings(redis_url=redis_url, key_prefix=key_prefix)
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    SessionManager.set_instance(manager)
    yield manager
    SessionManager.reset_instance()
    worker_app.control.purge()  # nothing this test left queued reaches the next one


@pytest.fixture
def thread_worker(tracked: SessionManager) -> Iterator[None]:
    """A real Celery worker (threads pool) in a thread, consuming the test app's queue."""
    with start_worker(worker_app, pool="threads", concurrency=4, perform_ping_check=False, loglevel="WARNING"):
        yield


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 50 ms until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Cli:
    """Runs ``tracker ARGS`` in-process with an environment of its own.

    Args:
        env: TRACKER_* variables for every call (None values unset a variable).
        fresh: Forget the process-wide manager before and after each call, so each call builds its
            own from ``env``, as a new process would. False keeps the one a fixture installed.
    """

    env: dict[str, str | None]
    fresh: bool = True
    runner: CliRunner = field(default_factory=CliRunner)

    def __call__(self, *args: str, env: dict[str, str | None] | None = None) -> Result:
        if self.fresh:
            SessionManager.reset_instance()
        try:
            return self.runner.invoke(main, list(args), env={**self.env, **(env or {})}, catch_exceptions=False)
        finally:
            if self.fresh:
                SessionManager.reset_instance()

    def json(self, *args: str) -> Any:
        result = self(*args)
        return json.loads(result.stdout)


@pytest.fixture
def cli_env(redis_url: str, key_prefix: str) -> dict[str, str | None]:
    """The tests' Redis under this test's own key prefix; wide output; no inherited debug switch."""
    return {"TRACKER_REDIS_URL": redis_url, "TRACKER_KEY_PREFIX": key_prefix, "TRACKER_DEBUG": None, "COLUMNS": "200"}


@pytest.fixture
def cli(cli_env: dict[str, str | None]) -> Cli:
    """``tracker`` as a fresh process would run it, on the tests' Redis."""
    return Cli(cli_env)


@pytest.fixture
def store_manager(redis_url: str, key_prefix: str) -> Iterator[SessionManager]:
    """A manager on the same Redis and prefix as the CLI, to make and inspect sessions directly."""
    settings = TrackerSettings(redis_url=redis_url, key_prefix=key_prefix)
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    yield manager
    manager.storage.close()


@pytest.fixture
def canvas_file(tmp_path: Path) -> Callable[..., Path]:
    """Write a JSON Canvas file of text nodes (``texts``: one text per node) and return its path."""

    def write(*texts: str, name: str = "batch.canvas") -> Path:
        nodes = [
            {"id": f"n{i}", "type": "text", "x": 0, "y": i * 120, "width": 300, "height": 100, "text": text}
            for i, text in enumerate(texts, 1)
        ]
        path = tmp_path / name
        path.write_text(json.dumps({"nodes": nodes, "edges": []}), encoding="utf-8")
        return path

    return write
