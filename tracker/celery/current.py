"""The tracked node the current thread runs, if any (from its task's stamps)."""

from __future__ import annotations

from typing import Any, NamedTuple

from celery import current_task

from tracker.celery.stamps import ids_of


class RunningNode(NamedTuple):
    """A node of a tracked session whose task runs in this thread."""

    session_id: str
    node_id: str
    task: Any
    request: Any


def running_node() -> RunningNode | None:
    """The tracked node whose task runs in this thread; None outside a task, or in a task that is
    not a node of a tracked session."""
    task = current_task
    request = getattr(task, "request", None) if task else None
    ids = ids_of(request)
    return None if ids is None else RunningNode(ids[0], ids[1], task, request)
