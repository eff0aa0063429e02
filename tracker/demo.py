"""An embedded default for ``tracker demo``: a Celery app, a worker thread and a store, in this process.

Nothing to install or start: the broker is kombu's in-memory transport and sessions live in an
:class:`~tracker.storage.memory.InMemoryStorageAdapter`. When ``TRACKER_REDIS_URL`` is set, that
Redis is the broker and the store instead (so ``tracker list`` / ``status`` in another shell, or
the dashboard, see the demo's session).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from celery import Celery, signals
from celery.contrib.testing.worker import TestWorkController, setup_app_for_worker
from celery.worker import state as worker_state

from tracker.celery import install
from tracker.config import TrackerSettings
from tracker.manager import SessionManager

#: The sample canvas shipped in the package: 42 text nodes, 4 of them fail on purpose.
SAMPLE_CANVAS = "newsroom.canvas"
#: The task each node runs (``workers.tasks.process_node``, honouring ``#sleep=`` and ``#fail`` tags).
NODE_TASK = "workers.process_node"
#: The queue the demo's tasks go through (on a shared Redis broker, nothing else consumes it).
DEMO_QUEUE = "tracker.demo"
#: Worker threads of the embedded worker.
DEFAULT_CONCURRENCY = 6
#: How often the in-memory broker polls for messages, in seconds (kombu's default is 1 s).
MEMORY_POLL_S = 0.05
#: A no-op task sent at shutdown: the worker's blocking read returns at once instead of after 2 s.
WAKE_TASK = "tracker.demo.wake"
#: Longest wait for the worker thread to stop, in seconds.
SHUTDOWN_TIMEOUT_S = 30.0


@contextlib.contextmanager
def sample_canvas() -> Iterator[Path]:
    """The path of the sample canvas (extracted to a temporary file if the package is zipped)."""
    with resources.as_file(resources.files("tracker") / "samples" / SAMPLE_CANVAS) as path:
        yield path


@dataclass(frozen=True)
class Embedded:
    """A running embedded setup."""

    app: Celery
    manager: SessionManager
    #: The Redis that is broker and store; None: the in-memory broker and store.
    redis_url: str | None
    concurrency: int


def _silence_logging_setup(**_: Any) -> bool:
    """A ``setup_logging`` receiver: its presence stops the embedded worker reconfiguring the root logger."""
    return True


@contextlib.contextmanager
def _quiet_celery(verbose: bool) -> Iterator[None]:
    # Task failures are logged by Celery at ERROR; the demo shows them in its own table instead.
    celery_logger = logging.getLogger("celery")
    level = celery_logger.level
    if not verbose:
        celery_logger.setLevel(logging.CRITICAL)
    signals.setup_logging.connect(_silence_logging_setup, weak=False, dispatch_uid="tracker.demo")
    try:
        yield
    finally:
        signals.setup_logging.disconnect(dispatch_uid="tracker.demo")
        celery_logger.setLevel(level)


def make_app(settings: TrackerSettings, manager: SessionManager) -> Celery:
    """The demo's Celery app: JSON only, Redis broker when configured, else kombu's in-memory one."""
    # Registers the node task (a shared task) on every app; imported by name: workers is an
    # example app on top of the library, not part of its typed surface.
    importlib.import_module("workers.tasks")

    app = Celery("tracker-demo", set_as_current=False)
    memory = not settings.redis_url
    app.conf.update(
        broker_url="memory://" if memory else settings.redis_url,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_default_queue=DEMO_QUEUE,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=False,
        broker_transport_options={"polling_interval": MEMORY_POLL_S} if memory else {},
    )
    install(app, manager, beat=False)
    app.task(name=WAKE_TASK, shared=False)(_wake)
    return app


def _wake() -> None:
    """Nothing: its arrival ends the worker's wait for messages."""


@contextlib.contextmanager
def worker_thread(app: Celery, concurrency: int, loglevel: str) -> Iterator[TestWorkController]:
    """A Celery worker (threads pool) consuming ``app``'s default queue in a thread of this process.

    Like ``celery.contrib.testing.worker.start_worker``, but it stops at once: the blocking loop
    of a memory-transport worker only notices a shutdown after its 2-second reads, so no-op
    messages are sent to end them.
    """
    setup_app_for_worker(app, loglevel, None)
    with app.connection() as connection:  # an unreachable broker fails here, not in the thread
        connection.ensure_connection(max_retries=1)
    worker = TestWorkController(
        app=app,
        concurrency=concurrency,
        hostname=f"tracker-demo-{threading.get_native_id()}@localhost",
        pool="threads",
        loglevel=loglevel,
        logfile=None,
        ready_callback=None,
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
    )
    thread = threading.Thread(target=worker.start, name="tracker-demo-worker", daemon=True)
    thread.start()
    worker.ensure_started()
    try:
        yield worker
    finally:
        worker_state.should_terminate = 0
        # One message ends the read in progress; the loop then runs one more read before it stops.
        for _ in range(2):
            app.send_task(WAKE_TASK)
        thread.join(SHUTDOWN_TIMEOUT_S)
        worker_state.should_terminate = None


@contextlib.contextmanager
def embedded(
    settings: TrackerSettings | None = None,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    verbose: bool = False,
) -> Iterator[Embedded]:
    """Run a Celery worker (threads pool) in this process until the block ends.

    Args:
        settings: Tracker settings; default from the environment (Redis when ``TRACKER_REDIS_URL`` is set).
        concurrency: Worker threads.
        verbose: Let Celery log task failures (normally the demo's own tables show them).

    Yields:
        The app to dispatch with and the manager to follow sessions with.
    """
    settings = settings or TrackerSettings()
    manager = SessionManager(settings=settings)
    try:
        manager.sync.list_sessions(limit=1)  # an unreachable Redis fails here, before a worker starts
        app = make_app(settings, manager)
        with (
            _quiet_celery(verbose),
            worker_thread(app, concurrency, "INFO" if verbose else "WARNING"),
        ):
            yield Embedded(app=app, manager=manager, redis_url=settings.redis_url, concurrency=concurrency)
    finally:
        manager.storage.close()
