"""Celery apps the CLI tests point ``--app`` / ``celery -A`` at."""

from __future__ import annotations

from celery import Celery

from tests.servers import free_port

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

#: Not a Celery app: ``--app tests.cli.apps:not_an_app`` is refused.
not_an_app = object()
