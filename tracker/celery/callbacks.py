"""A session's callbacks (``on_complete``, ``on_success``, ``on_failure``), sent for what a store
call told its caller.

The store tells each end of a run, each success and each first failure to exactly one caller (the
one whose call caused it): that caller sends the callbacks, whoever it is (a task's handler, the
writer's thread retrying held events, the upkeep that reaped a dead worker's nodes, a cancel).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Signature

from tracker.celery.dispatch import ON_COMPLETE_KEY, ON_FAILURE_KEY, ON_SUCCESS_KEY
from tracker.models import BatchOutcome, NodeOutcome, SessionInfo, TransitionOutcome

logger = logging.getLogger("tracker.celery")


def send_completion(app: Celery, outcome: BatchOutcome | NodeOutcome | TransitionOutcome) -> None:
    """Send, through ``app``, the callbacks this outcome is the one caller told of (each at most
    once per end).

    ``on_complete`` once per end of a run (the status dict, whose ``run`` says which);
    ``on_success`` once in the session's life, when every node has completed; ``on_failure``
    once, at the first node that failed for good (the status dict and that node's id). A callback
    that cannot be sent is logged, never raised.
    """
    if isinstance(outcome, TransitionOutcome):
        ended = outcome.session.status.is_terminal
        succeeded, first_failure = False, None
    else:
        ended, succeeded, first_failure = outcome.finished is not None, outcome.succeeded, outcome.first_failure
    if not (ended or succeeded or first_failure):
        return  # most calls: the session is not even read
    session = outcome.session
    if not session.metadata:
        return
    if ended:
        _send(app, session, ON_COMPLETE_KEY, (session.to_dict(),))
    if succeeded:
        _send(app, session, ON_SUCCESS_KEY, (session.to_dict(),))
    if first_failure:
        _send(app, session, ON_FAILURE_KEY, (session.to_dict(), first_failure))


def _send(app: Celery, session: SessionInfo, key: str, args: tuple[Any, ...]) -> None:
    callback = session.metadata.get(key)
    if not callback:
        return
    try:
        sig = Signature.from_dict(callback, app=app)
        sig.apply_async(args=args)
    except Exception:
        logger.exception("tracker: %s callback of session %s could not be sent", key, session.session_id)
