"""Celery signal handlers: each task lifecycle event becomes one store call.

Handlers never raise into the user's task (Celery would only log it anyway): a store failure is
retried with backoff, then logged with the session and node ids. Untracked tasks (no stamps)
cost nothing but two dict lookups.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Celery, Signature
from celery.exceptions import Ignore, Reject

from tracker.celery.dispatch import ON_COMPLETE_KEY
from tracker.celery.stamps import ids_of
from tracker.errors import StorageUnavailableError, TrackerError, TrackerValidationError
from tracker.manager import SessionManager
from tracker.models import NodeOutcome, SessionInfo
from tracker.states import NodeStatus

logger = logging.getLogger("tracker.celery")

#: Seconds slept before each retry of a failed store write (then the event is logged as lost).
RETRY_BACKOFF_S: tuple[float, ...] = (0.05, 0.2, 0.5)

#: Events one process holds while the store is unreachable, replayed in order once it is back
#: (every write is an idempotent upsert, so a replay counts once). Past this, the oldest are dropped.
BACKLOG_SIZE = 10_000

#: After the store failed, events are held at once (no retries, no delay to the task) for this long;
#: then a handler tries again. The heartbeat thread replays the held events as soon as it can.
STORE_DOWN_HOLD_S = 5.0

#: Task ids remembered by a worker's main process (received -> stamps), for the failure signals
#: Celery sends there (hard time limit) without the task's request.
RECEIVED_CACHE_SIZE = 10_000


class _Stamped:
    """The ids of a received task, shaped like a request for :func:`ids_of`."""

    def __init__(self, stamps: dict[str, Any]) -> None:
        self.stamps = stamps


class Recorder:
    """Turns Celery events into ``manager.sync.record_node`` calls for one app.

    Args:
        app: The Celery app whose tasks are tracked.
        manager: The manager to write to; None: ``SessionManager.get_instance()`` resolved in each
            process on first use (after fork, so each pool child opens its own connections).
    """

    def __init__(self, app: Celery, manager: SessionManager | None = None) -> None:
        self.app = app
        self._manager = manager
        self.worker_name = ""
        self._received: OrderedDict[str, _Stamped] = OrderedDict()
        self._received_lock = threading.Lock()
        self._heartbeat: Heartbeat | None = None
        self._backlog: deque[tuple[str, str, Callable[[], NodeOutcome]]] = deque()
        self._backlog_lock = threading.Lock()
        self._store_down_until = 0.0

    @property
    def manager(self) -> SessionManager:
        return self._manager or SessionManager.get_instance()

    def worker_id(self, hostname: str | None) -> str:
        """``<hostname>:<pid>``: which worker process holds a node."""
        return f"{hostname or self.worker_name or 'worker'}:{os.getpid()}"

    def record(self, request: Any, status: NodeStatus, **details: Any) -> NodeOutcome | None:
        """Record one node event for a tracked request; None for untracked ones or after a failure."""
        ids = ids_of(request)
        if ids is None:
            return None
        session_id, node_id = ids
        # One id for this event across the retries below: the store answers a retry of the call that
        # ended the session (its reply lost) as the first attempt, so the callback is sent once.
        details.setdefault("request_id", uuid.uuid4().hex)

        def call() -> NodeOutcome:
            try:
                return self.manager.sync.record_node(session_id, node_id, status, **details)
            except TrackerValidationError as exc:
                if details.get("result") is None:
                    raise
                # The return value is not JSON or is over the cap: the node still completed.
                logger.warning("tracker: result of node %s (session %s) not stored: %s", node_id, session_id, exc)
                details.update(result=None, reason=f"result not stored: {exc}")
                return self.manager.sync.record_node(session_id, node_id, status, **details)

        outcome = self._write(session_id, node_id, call)
        if outcome is not None and outcome.finished is not None:
            self.completed(outcome.session)
        return outcome

    def _write(self, session_id: str, node_id: str, call: Callable[[], NodeOutcome]) -> NodeOutcome | None:
        if time.monotonic() < self._store_down_until:
            # The store failed moments ago: hold the event without making the task wait.
            self._hold(session_id, node_id, call)
            return None
        for attempt, pause_s in enumerate((*RETRY_BACKOFF_S, None)):
            try:
                outcome = call()
            except StorageUnavailableError as exc:
                if pause_s is None:
                    logger.warning(
                        "tracker: could not record node %s of session %s after %d tries: %s; "
                        "holding this process's events to replay when the store is back",
                        node_id, session_id, attempt + 1, exc,
                    )  # fmt: skip
                    self._store_down_until = time.monotonic() + STORE_DOWN_HOLD_S
                    self._hold(session_id, node_id, call)
                    return None
                time.sleep(pause_s)
                continue
            except TrackerError as exc:
                # Not transient (unknown session, node limit...): retrying cannot help.
                logger.warning("tracker: node %s of session %s not recorded: %s", node_id, session_id, exc)
                return None
            except Exception:
                logger.exception("tracker: unexpected error recording node %s of session %s", node_id, session_id)
                return None
            if self._backlog and (self._heartbeat is None or not self._heartbeat.is_alive()):
                self.replay()  # no heartbeat thread in this process to do it
            return outcome
        return None

    def _hold(self, session_id: str, node_id: str, call: Callable[[], NodeOutcome]) -> None:
        with self._backlog_lock:
            if len(self._backlog) >= BACKLOG_SIZE:
                dropped_session, dropped_node, _ = self._backlog.popleft()
                logger.warning(
                    "tracker: %d events held already; dropped the oldest (node %s of session %s)",
                    BACKLOG_SIZE, dropped_node, dropped_session,
                )  # fmt: skip
            self._backlog.append((session_id, node_id, call))

    @property
    def held_events(self) -> int:
        """Events waiting for the store to come back."""
        return len(self._backlog)

    def replay(self) -> int:
        """Send the held events, oldest first; stop at the first store failure. Returns how many went."""
        sent = 0
        while True:
            with self._backlog_lock:
                if not self._backlog:
                    break
                session_id, node_id, call = self._backlog[0]
            try:
                outcome: NodeOutcome | None = call()
            except StorageUnavailableError:
                self._store_down_until = time.monotonic() + STORE_DOWN_HOLD_S
                break
            except TrackerError as exc:
                logger.warning("tracker: held event of node %s (session %s) dropped: %s", node_id, session_id, exc)
                outcome = None
            with self._backlog_lock:
                self._backlog.popleft()
            sent += 1
            if outcome is not None and outcome.finished is not None:
                self.completed(outcome.session)
        if sent:
            logger.warning("tracker: the store is back; replayed %d held event(s)", sent)
        if not self._backlog:
            self._store_down_until = 0.0
        return sent

    def completed(self, session: SessionInfo) -> None:
        """Send the session's completion callback, if it has one (called once per terminal transition)."""
        callback = session.metadata.get(ON_COMPLETE_KEY)
        if not callback:
            return
        try:
            sig = Signature.from_dict(callback, app=self.app)
            sig.apply_async(args=(session.to_dict(),))
        except Exception:
            logger.exception("tracker: completion callback of session %s could not be sent", session.session_id)

    # -- the signals ------------------------------------------------------------------------

    def mine(self, task: Any) -> bool:
        """True for a task of this recorder's app (signals are process-wide; apps are not)."""
        return getattr(task, "app", self.app) is self.app

    def on_prerun(self, sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        if not self.mine(task):
            return
        request = task.request if task is not None else None
        if request is None or ids_of(request) is None:
            return
        if self._heartbeat is None or self._heartbeat.pid != os.getpid():
            self.start_heartbeat(sender=request.hostname)
        self.record(
            request,
            NodeStatus.RUNNING,
            attempt=int(request.retries or 0) + 1,
            task_id=task_id,
            worker=self.worker_id(request.hostname),
        )

    def on_success(self, sender: Any = None, result: Any = None, **_: Any) -> None:
        if not self.mine(sender):
            return
        request = sender.request if sender is not None else None
        if request is None or ids_of(request) is None:
            return
        self.record(
            request, NodeStatus.COMPLETED, result=result, attempt=int(request.retries or 0) + 1, task_id=request.id
        )

    def on_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        """Main process: remember a tracked task's stamps by task id (bounded)."""
        if not self.mine(sender):
            return
        ids = ids_of(request)
        if ids is None or request is None:
            return
        with self._received_lock:
            self._received[request.id] = _Stamped(dict(request.stamps))
            while len(self._received) > RECEIVED_CACHE_SIZE:
                self._received.popitem(last=False)

    def on_failure(
        self, sender: Any = None, task_id: str | None = None, exception: BaseException | None = None, **_: Any
    ) -> None:
        if isinstance(exception, Ignore | Reject) or not self.mine(sender):
            return
        request = sender.request if sender is not None else None
        retries = int(getattr(request, "retries", 0) or 0)
        if ids_of(request) is None and task_id is not None:
            # The main process sends task_failure for a hard time limit without the task's
            # request: find the task's stamps from when it was received.
            with self._received_lock:
                request = self._received.get(task_id)
        if request is None:
            return
        if isinstance(exception, WorkerLostError):
            # The process running the node died (SIGKILL, out of memory): nothing will report it.
            self.record(request, NodeStatus.LOST, reason=f"worker process lost: {exception}", task_id=task_id)
            return
        self.record(request, NodeStatus.FAILED, error=exception, attempt=retries + 1, task_id=task_id)

    def on_retry(self, sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
        if request is None or not self.mine(sender):
            return
        error = reason if isinstance(reason, BaseException) else None
        self.record(
            request,
            NodeStatus.RETRYING,
            error=error,
            reason=None if error else str(reason),
            attempt=int(getattr(request, "retries", 0) or 0) + 1,
        )

    # -- liveness -----------------------------------------------------------------------------

    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        """Main process, before the pool forks: learn the node name the requests will carry."""
        self.worker_name = getattr(sender, "hostname", None) or self.worker_name

    def start_heartbeat(self, sender: Any = None, **_: Any) -> None:
        """In each process that runs tasks: keep this process's heartbeat fresh.

        Connected to ``worker_process_init`` (whose sender is the node name) and called on the
        first tracked task of any other process (solo and threads pools).
        """
        if isinstance(sender, str) and sender:
            self.worker_name = sender
        if self._heartbeat is not None and self._heartbeat.pid == os.getpid():
            return
        self._heartbeat = Heartbeat(self, self.worker_id(None))
        self._heartbeat.start()

    def stop_heartbeat(self, **_: Any) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    def on_revoked(
        self,
        sender: Any = None,
        request: Any = None,
        terminated: bool = False,
        signum: Any = None,
        expired: bool = False,
        **_: Any,
    ) -> None:
        if not self.mine(sender):
            return
        why = "expired" if expired else f"terminated (signal {signum})" if terminated else "revoked"
        # The task id lets the store ignore a revoke of a task that a resume has since replaced.
        self.record(request, NodeStatus.CANCELLED, reason=why, task_id=getattr(request, "id", None))


class Heartbeat(threading.Thread):
    """A daemon thread writing one worker process's heartbeat every ``heartbeat_interval`` seconds.

    One per process, not per task: the reaper marks the running nodes of a process whose
    heartbeat lapsed as ``lost``.
    """

    def __init__(self, recorder: Recorder, worker: str) -> None:
        super().__init__(name=f"tracker-heartbeat-{worker}", daemon=True)
        self.recorder = recorder
        self.worker = worker
        self.pid = os.getpid()
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            manager = self.recorder.manager
            try:
                manager.sync.heartbeat(self.worker)
                if self.recorder.held_events:
                    self.recorder.replay()
            except TrackerError as exc:
                logger.warning("tracker: heartbeat of %s not written: %s", self.worker, exc)
            except Exception:
                logger.exception("tracker: heartbeat of %s failed", self.worker)
            self._stopped.wait(manager.settings.heartbeat_interval)

    def stop(self) -> None:
        self._stopped.set()
