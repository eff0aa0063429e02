"""Celery signal handlers: task lifecycle events become node events.

**Durable before acknowledged.** A task's outcome (success, failure, retry, revoke, loss) is written
to the store by its handler, in the thread that ran the task, before the handler returns. Celery
sends those signals before it acknowledges the message (with ``task_acks_late``, the pool child
reports the task's end to the worker's main process only after them), so a process killed at any
moment either recorded the outcome or leaves the message unacknowledged for the broker to
redeliver. A start is not worth a round trip of its own: it waits in the process's :class:`Writer`
and goes with its outcome (one event, one store call) or, for a task still running after
``flush_interval_s``, from the writer's thread. ``docs/reliability.md`` says why this holds.

Handlers never raise into the user's task (Celery would only log it anyway). When the store fails,
the writer keeps the events (bounded) and retries with backoff, then says once that it holds them,
and replays them when the store is back: every write is an idempotent upsert, so nothing counts
twice. Untracked tasks (no stamps) cost nothing but two dict lookups.

This module maps the signals to events; :mod:`tracker.celery.writer` writes them (on the timing
rules of :mod:`tracker.celery.flush_policy`) and :mod:`tracker.celery.callbacks` sends the
session callbacks that what it wrote calls for.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Celery, bootsteps
from celery.exceptions import Ignore, Reject

from tracker import validation
from tracker.celery import process
from tracker.celery.callbacks import send_completion
from tracker.celery.children import tell_parent
from tracker.celery.stamps import NODE_STAMP, SESSION_STAMP, ids_of, ids_of_headers
from tracker.celery.writer import RawEvent, Writer
from tracker.errors import TrackerError
from tracker.manager import SessionManager
from tracker.models import BatchOutcome, NodeOutcome, TransitionOutcome
from tracker.states import NodeStatus
from tracker.storage.base import NodeEvent
from tracker.structure import RESULT_NOT_STORED

logger = logging.getLogger("tracker.celery")

#: Task ids remembered by a worker's main process (received -> stamps), for the failure signals
#: Celery sends there (hard time limit) without the task's request.
RECEIVED_CACHE_SIZE = 10_000


class _Stamped:
    """The ids of a received task, shaped like a request for :func:`ids_of`."""

    def __init__(self, stamps: dict[str, Any]) -> None:
        self.stamps = stamps


class Recorder:
    """Turns one app's Celery task events into node events, queued in the process's :class:`Writer`.

    Args:
        app: The Celery app whose tasks are tracked.
        manager: The manager to write to; None: ``SessionManager.get_instance()`` resolved in each
            process on first use (after fork, so each pool child opens its own connections).
    """

    def __init__(self, app: Celery, manager: SessionManager | None = None) -> None:
        self.app = app
        self._manager = manager
        self.worker_name = ""
        self._received: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._received_lock = threading.Lock()
        self._writer: Writer | None = None
        self._writer_lock = threading.Lock()

    @property
    def manager(self) -> SessionManager:
        return self._manager or SessionManager.get_instance()

    def worker_id(self, hostname: str | None) -> str:
        """``<hostname>:<pid>``: which worker process holds a node."""
        return f"{hostname or self.worker_name or 'worker'}:{process.pid}"

    # -- recording --------------------------------------------------------------------------

    def writer(self, hostname: str | None = None) -> Writer:
        """This process's writer, started on first use (a forked child gets its own)."""
        writer = self._writer
        if writer is not None and writer.pid == process.pid:
            return writer
        with self._writer_lock:
            writer = self._writer
            if writer is None or writer.pid != process.pid:
                # A child never touches its parent's writer: its locks may have been held at the fork.
                writer = self._writer = self.new_writer(self.worker_id(hostname))
        return writer

    def new_writer(self, worker: str) -> Writer:
        """A writer for this process (``worker``: its ``<hostname>:<pid>``), its thread started and
        its stop registered for the process's exit. A subclass may make it otherwise (the tests
        drive one by hand, on a clock of their own, without its thread)."""
        writer = Writer(self, worker)
        writer.start()
        atexit.register(writer.stop)
        return writer

    def submit(
        self,
        request: Any,
        status: NodeStatus,
        *,
        result: Any = None,
        error: BaseException | None = None,
        attempt: int | None = None,
        task_id: str | None = None,
        worker: str | None = None,
        reason: str | None = None,
        ids: tuple[str, str] | None = None,
    ) -> None:
        """Record one node event of a tracked request (untracked ones are ignored; ``ids``: its
        stamps, when the caller read them already): an outcome before this returns, a start
        within ``flush_interval_s`` (at once with ``flush_interval_s = 0``) or with its outcome."""
        ids = ids or ids_of(request)
        if ids is None:
            return
        writer = self.writer(getattr(request, "hostname", None))
        manager = self.manager
        result_json = None
        if result is not None:
            try:
                result_json = validation.json_text(result, "result", manager.settings.max_result_bytes, ids[0])
            except Exception as exc:  # not JSON, over the cap, too deep: the node still completed
                logger.warning("tracker: result of node %s (session %s) not stored: %s", ids[1], ids[0], exc)
                reason = f"{RESULT_NOT_STORED}: {exc}"
        raw = RawEvent(*ids, status, result_json, error, attempt, task_id, worker, reason, manager.clock(), None)
        if status is NodeStatus.RUNNING:
            writer.runs(ids)
            writer.keep(raw)
            if manager.settings.flush_interval_s == 0 and not writer.store_down:
                writer.flush()
            return
        writer.ran(ids)
        writer.write(raw)  # before the handler returns: before Celery acknowledges the message

    def report(self, request: Any, ids: tuple[str, str], fraction: float) -> None:
        """Queue how far the running task of ``request`` (node ``ids``) is: written behind, by the
        writer's thread, with the next flush (see :meth:`Writer.report`)."""
        writer = self.writer(getattr(request, "hostname", None))
        attempt = int(getattr(request, "retries", 0) or 0) + 1
        task_id = getattr(request, "id", None)
        writer.report(
            RawEvent(*ids, NodeStatus.RUNNING, None, None, attempt, task_id, None, None, self.manager.clock(), fraction)
        )

    def events(self, queued: Sequence[RawEvent]) -> list[tuple[str, NodeEvent]]:
        """The queued events validated and built, in order (a bad one is logged and dropped).

        A start followed by its task's result, with no other event of that node between them, is
        written with the result as one event (what the two leave, without the ``running`` state in
        between). A progress report is left out when its node's task ended in the same batch (the
        store would ignore it). Each node's events keep their order.
        """
        manager = self.manager
        starts: dict[tuple[str, str], RawEvent] = {}  # node -> its latest event, a start, held back
        events: list[tuple[str, NodeEvent]] = []
        if any(raw.progress is not None for raw in queued):
            ended = {(raw.session_id, raw.node_id) for raw in queued if raw.status is not NodeStatus.RUNNING}
            queued = [raw for raw in queued if raw.progress is None or (raw.session_id, raw.node_id) not in ended]

        def add(raw: RawEvent, started_at: datetime | None = None) -> None:
            event = self._event(manager, raw, started_at)
            if event is not None:
                events.append((raw.session_id, event))

        for raw in queued:
            node = (raw.session_id, raw.node_id)
            start = starts.pop(node, None)
            if start is not None and raw.status.is_terminal and raw.task_id and raw.task_id == start.task_id:
                if raw.attempt is None or raw.worker is None:  # a failure reported without them
                    raw = raw._replace(attempt=raw.attempt or start.attempt, worker=raw.worker or start.worker)
                add(raw, start.at)
                continue
            if start is not None:  # anything else comes after the start, as it came
                add(start)
            if raw.status is NodeStatus.RUNNING and raw.task_id and raw.progress is None:
                starts[node] = raw
            else:
                add(raw)
        # Starts whose result has not come yet (each its node's last event here).
        for start in starts.values():
            add(start)
        return events

    @staticmethod
    def _event(manager: SessionManager, raw: RawEvent, started_at: datetime | None) -> NodeEvent | None:
        """The validated event, or None (logged) when its ids are bad."""
        session_id, node_id, status, result_json, error, attempt, task_id, worker, reason, at, progress = raw
        try:
            # The result was checked when it was encoded (see submit): it is taken as it is.
            return manager.operations.event(
                validation.session_id(session_id), node_id, status, result_json, error=error, attempt=attempt,
                task_id=task_id, worker=worker, reason=reason, at=at, started_at=started_at, progress=progress,
            )  # fmt: skip
        except TrackerError as exc:
            logger.warning("tracker: node %s of session %s not recorded: %s", node_id, session_id, exc)
            return None

    def flush(self) -> list[BatchOutcome]:
        """Write this process's queued events now (see :meth:`Writer.flush`)."""
        return self.writer().flush()

    @property
    def held_events(self) -> int:
        """Events of this process not in the store yet (queued, or held while it is down)."""
        writer = self._writer
        return writer.waiting if writer is not None and writer.pid == process.pid else 0

    def callbacks(self, outcome: BatchOutcome | NodeOutcome | TransitionOutcome) -> None:
        """What the writer does with each outcome of its store calls: send the session's callbacks
        it tells of (see :func:`~tracker.celery.callbacks.send_completion`), and tell a child
        session's end to its parent (:func:`~tracker.celery.children.tell_parent`). A subclass may
        note the outcomes as well (the reliability tests count the session ends the writer saw)."""
        send_completion(self.app, outcome)
        if not isinstance(outcome, TransitionOutcome) and outcome.finished is not None:
            tell_parent(self.app, self.manager, outcome.session)

    # -- the signals ------------------------------------------------------------------------

    def mine(self, task: Any) -> bool:
        """True for a task of this recorder's app (signals are process-wide; apps are not)."""
        return getattr(task, "app", self.app) is self.app

    def on_prerun(self, sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        request: Any = getattr(task, "request", None)
        ids = ids_of(request)
        if ids is None or not self.mine(task):
            return
        # Kept as it came: most tasks end before the next flush, and then their result carries it.
        attempt, worker = int(request.retries or 0) + 1, self.worker_id(request.hostname)
        self.submit(request, NodeStatus.RUNNING, attempt=attempt, task_id=task_id, worker=worker, ids=ids)

    def on_success(self, sender: Any = None, result: Any = None, **_: Any) -> None:
        request: Any = getattr(sender, "request", None)
        ids = ids_of(request)
        if ids is None or not self.mine(sender):
            return
        attempt, worker = int(request.retries or 0) + 1, self.worker_id(request.hostname)
        self.submit(
            request, NodeStatus.COMPLETED, result=result, attempt=attempt, task_id=request.id, worker=worker, ids=ids
        )

    def on_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        """Main process: remember a tracked task's ids by task id (bounded), for a failure reported
        there without the task's request."""
        ids = ids_of(request)
        if ids is None or not self.mine(sender):
            return
        received = self._received
        with self._received_lock:
            received[request.id] = ids
            if len(received) > RECEIVED_CACHE_SIZE:
                received.popitem(last=False)

    def on_failure(
        self, sender: Any = None, task_id: str | None = None, exception: BaseException | None = None, **_: Any
    ) -> None:
        if isinstance(exception, Ignore | Reject) or not self.mine(sender):
            return
        request = sender.request if sender is not None else None
        retries = int(getattr(request, "retries", 0) or 0)
        worker: str | None = None
        if ids_of(request) is None and task_id is not None:
            # The main process sends task_failure for a hard time limit without the task's
            # request: find the task's stamps from when it was received.
            with self._received_lock:
                ids = self._received.get(task_id)
            request = _Stamped({SESSION_STAMP: ids[0], NODE_STAMP: ids[1]}) if ids else None
        elif request is not None and getattr(request, "hostname", None):
            worker = self.worker_id(request.hostname)  # sent by the process that ran it
        if request is None:
            return
        if isinstance(exception, WorkerLostError):
            # The process running the node died (SIGKILL, out of memory): nothing will report it.
            self.submit(request, NodeStatus.LOST, reason=f"worker process lost: {exception}", task_id=task_id)
            return
        self.submit(request, NodeStatus.FAILED, error=exception, attempt=retries + 1, task_id=task_id, worker=worker)

    def on_retry(self, sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
        if request is None or not self.mine(sender):
            return
        error = reason if isinstance(reason, BaseException) else None
        self.submit(
            request,
            NodeStatus.RETRYING,
            error=error,
            reason=None if error else str(reason),
            attempt=int(getattr(request, "retries", 0) or 0) + 1,
            task_id=getattr(request, "id", None),
        )

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
        self.submit(request, NodeStatus.CANCELLED, reason=why, task_id=getattr(request, "id", None))

    def on_unknown(
        self, sender: Any = None, message: Any = None, name: str | None = None, id: str | None = None, **_: Any
    ) -> None:
        """Main process: a message for a task this worker does not know (a rolling deploy: an old
        worker got a new task). Celery drops it, so the node will never run: it failed."""
        self._refused(sender, message, id, f"task {name!r} is not registered on worker {self._hostname(sender)}")

    def on_rejected(self, sender: Any = None, message: Any = None, exc: Any = None, **_: Any) -> None:
        """Main process: a message Celery rejected as invalid (not a task it can read). Dropped."""
        why = f": {exc}" if exc else ""
        self._refused(sender, message, None, f"message rejected by worker {self._hostname(sender)}{why}")

    def on_undecodable(self, consumer: Any, message: Any, exc: BaseException) -> None:
        """Main process: a message whose body the worker cannot decode. Celery logs it and drops it
        (no signal: :class:`UndecodableMessages` calls this), so the node will never run: it failed."""
        self._refused(
            consumer, message, None, f"message could not be decoded by worker {self._hostname(consumer)}: {exc}"
        )

    def _refused(self, consumer: Any, message: Any, task_id: str | None, reason: str) -> None:
        if getattr(consumer, "app", self.app) is not self.app:
            return
        headers = getattr(message, "headers", None) or {}
        ids = ids_of_headers(headers)
        if ids is None:
            return
        task_id = task_id or (headers.get("id") if isinstance(headers.get("id"), str) else None)
        self.submit(None, NodeStatus.FAILED, reason=reason, task_id=task_id, ids=ids)

    def _hostname(self, consumer: Any) -> str:
        return str(getattr(consumer, "hostname", None) or self.worker_name or "worker")

    # -- process lifecycle ----------------------------------------------------------------------

    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        """Main process, before the pool forks: learn the node name the requests will carry."""
        self.worker_name = getattr(sender, "hostname", None) or self.worker_name

    def start_writer(self, sender: Any = None, **_: Any) -> None:
        """In each process that runs tasks: start its writer (and so its heartbeat).

        Connected to ``worker_process_init`` (whose sender is the node name); any other process
        starts its writer with its first tracked event.
        """
        if isinstance(sender, str) and sender:
            self.worker_name = sender
        self.writer()

    def stop_writer(self, **_: Any) -> None:
        """Write what this process still holds and stop its writer (process or worker shutdown)."""
        writer = self._writer
        if writer is not None and writer.pid == process.pid:
            self._writer = None
            writer.stop()
            if not writer.waiting:
                self._retire(writer.worker)

    def _retire(self, worker: str) -> None:
        # A process that stops cleanly (a warm shutdown, a pool child recycled after
        # max_tasks_per_child) lost nothing: it leaves the registry rather than be reaped as dead,
        # which would end sessions whose messages still wait in the queue as lost.
        try:
            self.manager.sync._retire(worker)
        except TrackerError as exc:
            logger.warning("tracker: %s not taken out of the worker registry: %s", worker, exc)
        except Exception:  # tracking never breaks the worker
            logger.exception("tracker: %s not taken out of the worker registry", worker)


class UndecodableMessages(bootsteps.Step):  # type: ignore[misc]
    """A worker consumer step: a tracked message whose body cannot be decoded fails its node.

    Celery has no signal for it: its consumer logs the error and acknowledges the message. This
    step wraps that callback of each consumer of an app :func:`tracker.celery.install` set up.
    """

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        recorder: Recorder | None = getattr(parent.app, "_tracker_recorder", None)
        logged = getattr(parent, "on_decode_error", None)
        if recorder is None or logged is None:
            return

        def on_decode_error(message: Any, exc: BaseException) -> None:
            try:
                recorder.on_undecodable(parent, message, exc)
            except Exception:  # tracking never breaks the worker
                logger.exception("tracker: could not record an undecodable message")
            logged(message, exc)

        parent.on_decode_error = on_decode_error
