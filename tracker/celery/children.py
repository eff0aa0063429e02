"""Child sessions: a batch dispatched from inside a tracked task belongs to that task's node.

A child and its parent live under different hash tags (other slots on a Redis Cluster), so no
script touches both. The link is made and undone in steps, each idempotent, in an order that a
process dying between two of them cannot break:

1. *Opened*: the parent's node is told of the child (``ChildLink``, a node event of the parent's
   own) before the child exists. From then on the node waits for it: its task's success leaves it
   ``running``, holding the result. Dying here, the task is delivered again (``task_acks_late``),
   derives the same child id and opens it again (a no-op), or it failed, and its node with it.
2. *Created*: the child session, naming its parent, and watched in the store's children index
   (outside Cluster in the same script; on Cluster in the next command of the same call).
3. *Ended, then told*: whoever's call ends the child (exactly one caller sees ``finished``) tells
   the parent's node (:func:`tell_parent`), then stops watching the child. The node takes the
   child's outcome once its task succeeded and no child of its attempt is open; if that ends the
   parent session, the same caller tells the grandparent, and so on up.

A process dying between the child's end and the telling leaves the child watched: every
:func:`tracker.celery.maintain` pass (beat) tells the parent of each watched child that has ended,
or is gone, and keeps alive the parents still waiting for a child that runs. Telling twice is
harmless: a child's end counts once.
"""

from __future__ import annotations

import logging

from celery import Celery

from tracker.celery.callbacks import send_completion
from tracker.errors import SessionNotFoundError, StorageUnavailableError, TrackerError
from tracker.manager import SessionManager
from tracker.models import BatchOutcome, SessionInfo
from tracker.states import SessionStatus
from tracker.storage.base import ChildLink, ChildWatch

logger = logging.getLogger("tracker.celery")


def tell_parent(app: Celery, manager: SessionManager, session: SessionInfo) -> None:
    """Tell an ended child session's end to its parent's node, and on up the tree while that ends
    the parent too (sending each ended parent's callbacks). Never raises: what cannot be told now
    stays watched, for the next ``maintain`` pass."""
    while session.parent_session_id and session.parent_node_id and session.status.is_terminal:
        watch = ChildWatch(session.session_id, session.parent_session_id, session.parent_node_id)
        told = _tell(app, manager, watch, session.status)
        if told is None or told.finished is None:
            return
        session = told.session


def settle_children(app: Celery, manager: SessionManager, limit: int = 1000) -> int:
    """One pass over the watched child sessions (``maintain`` runs it): tell the parent of each that
    ended (or is gone: expired or removed, told as ``failed``), and keep alive the parents still
    waiting for one that runs. Returns how many ends it told."""
    sync = manager.sync
    told, waiting = 0, set()
    for watch in sync._watched_children(limit):
        try:
            child = sync.get_session(watch.child_id)
        except SessionNotFoundError:
            child = None
        if child is not None and not child.status.is_terminal:
            waiting.add(watch.parent_session_id)
            continue
        outcome = _tell(app, manager, watch, child.status if child is not None else SessionStatus.FAILED)
        told += 1
        if outcome is not None and outcome.finished is not None:
            tell_parent(app, manager, outcome.session)
    if waiting:
        sync._heartbeat(None, sessions=sorted(waiting))
    return told


def _tell(app: Celery, manager: SessionManager, watch: ChildWatch, ended: SessionStatus) -> BatchOutcome | None:
    """Tell ``watch``'s parent node that the child ended ``ended``, stop watching it, and send the
    parent's callbacks this calls for; returns what the telling did (None: not told)."""
    sync = manager.sync
    try:
        link = ChildLink(watch.child_id, ended)
        event = manager.operations.child_event(watch.parent_session_id, watch.parent_node_id, link)
        outcome = sync._record_nodes(watch.parent_session_id, [event])
    except StorageUnavailableError as exc:
        logger.warning("tracker: the end of child session %s not told yet: %s", watch.child_id, exc)
        return None
    except TrackerError as exc:  # the parent is gone (expired, removed): nothing to tell any more
        logger.warning("tracker: the end of child session %s cannot be told: %s", watch.child_id, exc)
        outcome = None
    try:
        sync._unwatch_child(watch)
    except TrackerError as exc:
        logger.warning("tracker: child session %s stays watched: %s", watch.child_id, exc)
    if outcome is not None:
        send_completion(app, outcome)
    return outcome
