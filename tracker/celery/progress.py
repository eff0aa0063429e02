"""Progress from inside a long task: ``report_progress(done, total)``."""

from __future__ import annotations

import logging

from tracker import validation
from tracker.celery.current import running_node
from tracker.celery.handlers import Recorder
from tracker.celery.origin import real_app

logger = logging.getLogger("tracker.celery")


def report_progress(done: float, total: float | None = None) -> bool:
    """Say how far the running tracked task is: ``done`` of ``total`` (``report_progress(40, 200)``),
    or ``done`` as a fraction within 0..1 when ``total`` is None (``report_progress(0.2)``).

    The node's progress, and the session's ``progress_percent`` (which counts each running node's
    fraction), follow within ``flush_interval_s``: the report waits in the worker process's writer
    and its thread writes it, so calling this costs the task no round trip. Reports of one node
    between two writes are written once, the latest. Call it as often as is convenient.

    Returns:
        True when the report was queued; False outside a task, or in a task that is not a node of
        a tracked session (so the same task code runs untracked).

    Raises:
        TrackerValidationError: ``done`` or ``total`` not finite numbers, ``total`` not above 0,
            ``done`` outside ``0..total`` (``0..1`` without ``total``).
    """
    fraction = validation.fraction(done, total)
    node = running_node()
    if node is None:
        return False
    recorder: Recorder | None = getattr(real_app(node.task.app), "_tracker_recorder", None)
    if recorder is None or not recorder.mine(node.task):
        return False
    try:
        recorder.report(node.request, (node.session_id, node.node_id), fraction)
    except Exception:  # tracking never breaks the user's task
        logger.exception("tracker: progress of node %s (session %s) not kept", node.node_id, node.session_id)
        return False
    return True
