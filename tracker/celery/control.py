"""Cancel and resume a dispatched session."""

from __future__ import annotations

import logging

from celery import Celery, Signature
from celery import current_app as default_app

from tracker.celery.dispatch import tag
from tracker.celery.handlers import Recorder
from tracker.manager import SessionManager
from tracker.models import SessionInfo
from tracker.states import NodeStatus, SessionStatus

logger = logging.getLogger("tracker.celery")


def cancel_session(
    session_id: str,
    *,
    app: Celery | None = None,
    manager: SessionManager | None = None,
    terminate: bool = False,
) -> SessionInfo:
    """Cancel a session: status ``cancelled``, unfinished nodes ``cancelled``, their tasks revoked.

    The status moves first (one atomic step), so a result arriving meanwhile is recorded without
    moving the status. Tasks already running keep running unless ``terminate`` is True.

    Raises:
        SessionNotFoundError, InvalidStateTransitionError, TrackerValidationError.
    """
    manager = manager or SessionManager.get_instance()
    app = app or default_app
    outcome = manager.sync.transition(session_id, SessionStatus.CANCELLED)
    task_ids: list[str] = []
    cursor: str | None = None
    while True:
        page = manager.sync.get_nodes(session_id, NodeStatus.CANCELLED, cursor=cursor, limit=1000)
        task_ids += [n.task_id for n in page.nodes if n.task_id]
        cursor = page.next_cursor
        if cursor is None:
            break
    if task_ids:
        app.control.revoke(task_ids, terminate=terminate)
    Recorder(app, manager).callbacks(outcome)
    logger.info("tracker: session %s cancelled; %d task(s) revoked", session_id, len(task_ids))
    return outcome.session


def resume_session(
    session_id: str,
    *,
    app: Celery | None = None,
    manager: SessionManager | None = None,
    retry_failed: bool = True,
) -> int:
    """Re-send the unfinished (and, if asked, failed) nodes of a session under the same session id.

    Completed nodes are never re-run. Each re-sent node gets a fresh task id and the session's
    stamps, so the signal handlers count it against the same node, exactly once.

    Returns:
        How many nodes were re-sent. Nodes without a stored signature (a session created by hand,
        not by :func:`tracker.celery.dispatch`) are reset but cannot be re-sent; they are logged.

    Raises:
        SessionNotFoundError, InvalidStateTransitionError (a completed session), TrackerValidationError.
    """
    manager = manager or SessionManager.get_instance()
    app = app or default_app
    outcome = manager.sync.resume_session(session_id, retry_failed=retry_failed)
    sent = 0
    for node in outcome.nodes:
        if node.signature is None or node.task_id is None:
            logger.warning("tracker: node %s of session %s has no stored signature", node.node_id, session_id)
            continue
        sig = Signature.from_dict(node.signature, app=app)
        tag(sig, session_id, node.node_id, node.task_id)
        sig.apply_async()
        sent += 1
    logger.info("tracker: session %s resumed; %d node(s) re-sent", session_id, sent)
    return sent
