"""Celery glue: signals drive sessions; dispatch, cancel and resume batches; beat cleanup.

Only this package imports ``celery``. Typical use::

    from tracker.celery import install, dispatch
    install(app)                                   # once, where the app is defined
    session_id = dispatch(group(...), canvas_path="batch.canvas")
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from celery import Celery, signals

from tracker.celery.callbacks import send_completion
from tracker.celery.children import settle_children, tell_parent
from tracker.celery.control import cancel_session, resume_session
from tracker.celery.dispatch import add_nodes, dispatch
from tracker.celery.handlers import Recorder, UndecodableMessages
from tracker.celery.progress import report_progress
from tracker.config import TrackerSettings
from tracker.errors import TrackerValidationError
from tracker.manager import SessionManager, nodes_of
from tracker.models import BatchOutcome
from tracker.states import NodeStatus
from tracker.storage.memory import InMemoryStorageAdapter
from tracker.structure import RESULT_NOT_STORED

__all__ = [
    "CLEANUP_TASK",
    "add_nodes",
    "cancel_session",
    "dispatch",
    "install",
    "maintain",
    "report_progress",
    "resume_session",
    "uninstall",
]

#: Name of the periodic task that removes expired sessions.
CLEANUP_TASK = "tracker.cleanup_expired_sessions"
#: Beat schedule entry name.
BEAT_ENTRY = "tracker-cleanup-expired-sessions"

#: Pools whose tasks run in this very process (an in-memory store works with them).
_IN_PROCESS_POOLS = {"solo", "threads", "eventlet", "gevent"}


def _pool_name(worker: Any) -> str:
    pool_cls = getattr(worker, "pool_cls", None)
    name = getattr(pool_cls, "__module__", "") + "." + getattr(pool_cls, "__name__", str(pool_cls))
    for pool in _IN_PROCESS_POOLS:
        if pool in name.lower():
            return pool
    return "prefork"


def _connections(recorder: Recorder) -> list[tuple[Any, Any]]:
    """Every (signal, handler) pair :func:`install` connects."""
    return [
        (signals.task_prerun, recorder.on_prerun),
        (signals.task_success, recorder.on_success),
        (signals.task_failure, recorder.on_failure),
        (signals.task_retry, recorder.on_retry),
        (signals.task_revoked, recorder.on_revoked),
        (signals.task_received, recorder.on_received),
        (signals.task_unknown, recorder.on_unknown),
        (signals.task_rejected, recorder.on_rejected),
        (signals.worker_init, recorder.on_worker_init),
        # Each process that runs tasks has a writer (node events, heartbeat): each prefork child
        # from its start, any other process from its first tracked event; both write what they
        # hold when they stop.
        (signals.worker_process_init, recorder.start_writer),
        (signals.worker_process_shutdown, recorder.stop_writer),
        (signals.worker_shutdown, recorder.stop_writer),
    ]


def uninstall(app: Celery) -> None:
    """Disconnect what :func:`install` connected for ``app`` (the cleanup task stays registered)."""
    recorder: Recorder | None = getattr(app, "_tracker_recorder", None)
    if recorder is None:
        return
    uid = f"tracker:{id(app)}"
    for signal, _handler in _connections(recorder):
        signal.disconnect(dispatch_uid=f"{uid}:{signal.name}")
    signals.worker_init.disconnect(dispatch_uid=f"{uid}:check_pool")
    app.steps["consumer"].discard(UndecodableMessages)
    recorder.stop_writer()
    del app._tracker_recorder


logger = logging.getLogger(__name__)

#: Brokers that give a dead worker's unacknowledged messages back only after their
#: ``visibility_timeout`` (kombu's default: an hour); the others (AMQP) at once.
_VISIBILITY_BROKERS = {"redis", "rediss", "sentinel", "sqs"}


def stalled_after_s(app: Celery, settings: TrackerSettings) -> float:
    """How long a session may wait, after a worker died, before its unfinished nodes are presumed
    lost with it: ``TRACKER_STALLED_AFTER_S`` when set, else the longest the app's broker takes to
    redeliver a dead worker's messages (its visibility timeout and restore sweep, and on Redis the
    restore lock a worker killed while sweeping leaves held), plus twice ``worker_stale_after_s``
    (the reaper's own delay)."""
    if settings.stalled_after_s is not None:
        return settings.stalled_after_s
    scheme = urlsplit(str(app.conf.broker_url or "")).scheme.split("+")[0]
    wait_s = 0.0
    if scheme in _VISIBILITY_BROKERS:
        options = app.conf.broker_transport_options or {}
        # kombu's Redis transport looks for messages to restore every interval x throttle seconds.
        interval, throttle = options.get("unacked_restore_interval", 10), options.get("unacked_restore_throttle", 10)
        sweep_s = float(interval) * float(throttle)
        # A worker killed in the middle of a sweep leaves kombu's restore lock held until it
        # expires: no consumer restores anything before then.
        lock_s = float(options.get("unacked_mutex_expire", 300))
        wait_s = float(options.get("visibility_timeout", 3600)) + (sweep_s + lock_s if scheme != "sqs" else 0.0)
    return wait_s + 2 * settings.worker_stale_after_s


def _redelivery_warning(app: Celery, settings: TrackerSettings) -> str | None:
    """What to tell a worker whose broker gives a dead worker's messages back only after its
    sessions would have expired (kombu's default visibility timeout, an hour, against the default
    session timeout of 30 minutes); None when they come back in time."""
    wait_s = stalled_after_s(app, settings)
    if settings.stalled_after_s is not None or wait_s <= settings.session_timeout_s:
        return None
    return (
        f"tracker: this broker gives a dead worker's messages back only after up to {wait_s:.0f} s "
        f"(its visibility_timeout and restore delays), later than TRACKER_SESSION_TIMEOUT_S "
        f"({settings.session_timeout_s:g} s): a session waiting for them would be removed first. "
        f"Raise TRACKER_SESSION_TIMEOUT_S above it, or lower broker_transport_options['visibility_timeout']."
    )


def maintain(app: Celery, manager: SessionManager | None = None) -> dict[str, int]:
    """One round of upkeep, what beat runs every minute: reap the nodes of dead worker processes,
    end the sessions a message lost with a dead worker left waiting, tell parents the ends of child
    sessions not told yet (and keep alive those still waiting), then remove expired sessions. The
    callbacks this causes are sent. Returns ``{"lost": n, "stalled": s, "children": c, "removed":
    m}`` (``lost``: nodes reaped, whether marked ``lost`` or sent back to ``pending``;
    ``children``: child ends told).

    With ``task_acks_late`` a dead worker's messages come back from the broker, so its nodes go
    back to ``pending`` rather than ``lost``: they are counted when the redelivered tasks run.

    Args:
        app: The app whose sessions these are (its broker settings and result backend are read,
            callbacks are sent through it).
        manager: Default: the one ``install(app)`` was given, else the process-wide one.
    """
    if manager is None:
        installed: Recorder | None = getattr(app, "_tracker_recorder", None)
        manager = installed.manager if installed is not None else SessionManager.get_instance()
    sync = manager.sync
    reaped = sync.reap_lost_nodes(requeued=bool(app.conf.task_acks_late))
    stalled = sync.end_stalled_sessions(stalled_after_s(app, manager.settings))
    for outcome in reaped:
        send_completion(app, outcome)
        if outcome.finished is not None:
            tell_parent(app, manager, outcome.session)
    for ended in stalled:
        settled = reconcile(app, manager, ended)
        send_completion(app, settled)
        tell_parent(app, manager, settled.session)
    children = settle_children(app, manager)
    removed = sync.cleanup_expired_sessions()
    return {"lost": len(reaped), "stalled": len(stalled), "children": children, "removed": removed}


def reconcile(app: Celery, manager: SessionManager, ended: BatchOutcome) -> BatchOutcome:
    """Record as ``completed`` the nodes of a stalled session presumed lost whose task the app's
    result backend has as a SUCCESS; returns the outcome to send callbacks for, as things now stand.

    A pool child stores its task's result before Celery sends ``task_success`` (where the tracker
    writes the outcome). When the child dies between the two, the worker finds the stored success
    and acknowledges the message without a signal: no one else will report that node. Without a
    result backend Celery requeues the message instead, and the task runs again.
    """
    sync = manager.sync
    sid = ended.session.session_id
    recovered: set[str] = set()
    for node in nodes_of(manager, sid, NodeStatus.LOST):
        found = _stored_success(app, node.task_id)
        if found is None:
            continue
        try:
            late = sync._record_node(sid, node.node_id, NodeStatus.COMPLETED, result=found[0], task_id=node.task_id)
        except TrackerValidationError as exc:  # not JSON, over the cap: the node completed all the same
            reason = f"{RESULT_NOT_STORED}: {exc}"
            late = sync._record_node(sid, node.node_id, NodeStatus.COMPLETED, task_id=node.task_id, reason=reason)
        send_completion(app, late)
        recovered.add(node.node_id)
    if not recovered:
        return ended
    # The end is told once, with the session as it now stands; a failure that turned out a success
    # is not told at all.
    first_failure = None if ended.first_failure in recovered else ended.first_failure
    return BatchOutcome.of(
        sync.get_session(sid), finished=ended.finished, succeeded=ended.succeeded, first_failure=first_failure
    )


def _stored_success(app: Celery, task_id: str | None) -> tuple[Any] | None:
    """``(result,)`` when the app's result backend holds a SUCCESS for ``task_id``, else None (no
    backend, no such result, or the backend cannot be read)."""
    if not task_id:
        return None
    try:
        result = app.AsyncResult(task_id)
        if result.state != "SUCCESS":
            return None
        return (result.result,)
    except Exception:  # no result backend (DisabledBackend raises), or it is unreachable
        return None


def install(
    app: Celery,
    manager: SessionManager | None = None,
    *,
    beat: bool = True,
    cleanup_interval_s: float | None = None,
) -> Recorder:
    """Track every stamped task of ``app``. Idempotent (handlers connect with a dispatch_uid).

    Args:
        app: The Celery app.
        manager: The manager to record into; None: ``SessionManager.get_instance()`` in each process.
        beat: Register the cleanup task in ``app.conf.beat_schedule``.
        cleanup_interval_s: How often beat runs cleanup; default the manager's ``cleanup_interval_s``.

    Returns:
        The recorder whose methods are connected (a second call returns the first one unchanged).
    """
    installed: Recorder | None = getattr(app, "_tracker_recorder", None)
    if installed is not None:
        return installed
    recorder = Recorder(app, manager)
    app._tracker_recorder = recorder
    uid = f"tracker:{id(app)}"
    for signal, handler in _connections(recorder):
        signal.connect(handler, weak=False, dispatch_uid=f"{uid}:{signal.name}")

    def check_pool(sender: Any = None, **_: Any) -> None:  # connected below
        current = recorder.manager
        if isinstance(current.storage, InMemoryStorageAdapter) and _pool_name(sender) == "prefork":
            message = (
                "tracker: the in-memory store cannot be shared by a prefork pool's processes (each child "
                "would keep its own sessions). Set TRACKER_REDIS_URL, or run the worker with --pool solo/threads."
            )
            raise SystemExit(message)  # a plain exception would only be logged by Celery's signal dispatch

    signals.worker_init.connect(check_pool, weak=False, dispatch_uid=f"{uid}:check_pool")

    def check_redelivery(**_: Any) -> None:  # connected below; the app's settings are final by then
        warning = _redelivery_warning(app, recorder.manager.settings)
        if warning is not None:
            logger.warning(warning)

    signals.worker_init.connect(check_redelivery, weak=False, dispatch_uid=f"{uid}:check_redelivery")
    app.steps["consumer"].add(UndecodableMessages)
    recorder.worker_name = app.main or "worker"

    if not getattr(app, "_tracker_cleanup_registered", False):
        app._tracker_cleanup_registered = True

        @app.task(name=CLEANUP_TASK, shared=False)  # type: ignore[untyped-decorator]
        def cleanup_expired_sessions() -> dict[str, int]:
            """Mark the nodes of dead workers lost, then remove expired sessions (run by beat)."""
            current: Recorder = app._tracker_recorder
            return maintain(app, current.manager)

    if beat:
        # Without a manager, the settings the process-wide one will be made from (the environment).
        interval = cleanup_interval_s or (manager.settings if manager else TrackerSettings()).cleanup_interval_s
        schedule = dict(app.conf.beat_schedule or {})
        schedule[BEAT_ENTRY] = {"task": CLEANUP_TASK, "schedule": interval}
        app.conf.beat_schedule = schedule
    return recorder
