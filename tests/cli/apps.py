"""Celery apps the CLI tests point ``--app`` / ``celery -A`` at."""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

from tests.servers import free_port
from tracker.celery import install

#: The app the CLI tests' thread worker runs. Its broker and queue are set, and the tracker's
#: handlers installed, by a package fixture (tests/cli/conftest.py) before anything sends with it.
worker_app = Celery("tracker_cli_tests", set_as_current=False)
worker_app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

#: Texts of the nodes whose first run :func:`fail_once` failed (the thread worker runs in this process).
_failed_once: set[str] = set()
_failed_once_lock = threading.Lock()


@worker_app.task(name="tests.fail_once", shared=False)  # type: ignore[untyped-decorator]
def fail_once(node: dict[str, Any]) -> str:
    """A node whose text holds ``#flaky`` fails its first run and completes the next (a resume's);
    other nodes complete. Make each flaky text unique per test."""
    text = str(node.get("text", ""))
    with _failed_once_lock:
        first = "#flaky" in text and text not in _failed_once
        _failed_once.add(text)
    if first:
        raise RuntimeError(f"node {node.get('id')}: first run fails")
    return text


#: Nothing listens on its broker port: publishing fails after kombu's short retry policy.
UNREACHABLE_BROKER = f"redis://127.0.0.1:{free_port()}/0"

unreachable = Celery("unreachable", set_as_current=False)
unreachable.conf.update(
    broker_url=UNREACHABLE_BROKER,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=False,
    broker_connection_timeout=1,
)
install(unreachable, beat=False)

#: An app of the same project on another broker (its URL set by the test that uses it): where no
#: worker of the tests' sessions listens.
other_broker = Celery("other_broker", set_as_current=False)
other_broker.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=False)
install(other_broker, beat=False)

#: A Celery app the tracker is not installed in (``dispatch`` refuses it).
not_installed = Celery("not_installed", broker="memory://", set_as_current=False)

#: Not a Celery app: ``--app tests.cli.apps:not_an_app`` is refused.
not_an_app = object()
