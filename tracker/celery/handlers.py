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
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from billiard.exceptions import WorkerLostError
from celery import Celery, Signature, bootsteps
from celery.exceptions import Ignore, Reject

from tracker import validation
from tracker.celery.dispatch import ON_COMPLETE_KEY, ON_FAILURE_KEY, ON_SUCCESS_KEY
from tracker.celery.stamps import NODE_STAMP, SESSION_STAMP, ids_of, ids_of_headers
from tracker.errors import NodeLimitError, StorageUnavailableError, TrackerError
from tracker.manager import SessionManager
from tracker.models import BatchOutcome, NodeOutcome, SessionInfo, TransitionOutcome
from tracker.states import NodeStatus
from tracker.storage.base import NodeEvent, new_request_id
from tracker.structure import RESULT_NOT_STORED

logger = logging.getLogger("tracker.celery")

#: Seconds the writer waits before each retry of a store call that failed; after the last one it
#: says that it holds the events, and tries again every ``STORE_DOWN_HOLD_S``.
RETRY_BACKOFF_S: tuple[float, ...] = (0.05, 0.2, 0.5)

#: While the store is down, outcomes are queued at once (no waiting in the task) and the writer
#: tries the store again this often.
STORE_DOWN_HOLD_S = 5.0

#: Events one process keeps while the store is unreachable; past this, the oldest are dropped.
BACKLOG_SIZE = 10_000

#: Most events in one store call; a queue this long is written at once.
MAX_BATCH = 1_000

#: Task ids remembered by a worker's main process (received -> stamps), for the failure signals
#: Celery sends there (hard time limit) without the task's request.
RECEIVED_CACHE_SIZE = 10_000


#: This process's id: asked once, and again in a forked child (``os.getpid`` is a system call, and
#: the handlers would ask it several times per task).
_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


class _Stamped:
    """The ids of a received task, shaped like a request for :func:`ids_of`."""

    def __init__(self, stamps: dict[str, Any]) -> None:
        self.stamps = stamps


@dataclass
class _Call:
    """One store call to make: a session's events, under one request id kept across retries (the
    store answers a retry of the call that ended the session as the first attempt, so the
    completion callback is sent once)."""

    session_id: str
    events: list[NodeEvent]
    request_id: str


class _Raw(NamedTuple):
    """A node event as a handler saw it, kept as it came: validated and built by the writer, in its
    thread and in batches (see :meth:`Writer.keep`)."""

    session_id: str
    node_id: str
    status: NodeStatus
    #: The result as JSON text, encoded by the handler (the task's return value may change after it).
    result_json: str | None
    error: BaseException | None
    attempt: int | None
    task_id: str | None
    worker: str | None
    reason: str | None
    at: datetime


#: ``_Raw`` from a tuple of its fields (a named tuple's own constructor is a Python function).
_new_raw = _Raw._make


def _calls(queued: Sequence[tuple[str, NodeEvent]]) -> list[_Call]:
    by_session: dict[str, list[NodeEvent]] = {}
    for session_id, event in queued:
        by_session.setdefault(session_id, []).append(event)
    calls = []
    for session_id, events in by_session.items():
        for first in range(0, len(events), MAX_BATCH):
            calls.append(_Call(session_id, events[first : first + MAX_BATCH], new_request_id()))
    return calls


class Writer(threading.Thread):
    """One per process that records node events: writes its queued starts and its heartbeat.

    A task's outcome is written by :meth:`write` in the task's own thread, before the handler
    returns (and so before Celery acknowledges the message); a start waits in the queue for its
    outcome or for the thread's tick. While starts keep coming, the thread ticks every
    ``flush_interval_s`` and writes the starts that already waited at the tick before (tasks running
    longer than an interval); after a tick without any start it sleeps until the next start wakes
    it (so a busy process wakes it once per interval, not once per task). The
    heartbeat (every ``heartbeat_interval_s`` seconds) tells the reaper the process is alive and
    keeps the sessions of its running nodes from expiring.
    """

    def __init__(self, recorder: Recorder, worker: str) -> None:
        super().__init__(name=f"tracker-writer-{worker}", daemon=True)
        self.recorder = recorder
        self.worker = worker
        self.pid = _pid
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Appended to by the handlers without a lock (deque appends and pops are atomic).
        self._queue: deque[_Raw] = deque()
        self._idle = True  # the thread sleeps until its next heartbeat; the next start wakes it
        self._tick_at = 0.0  # while not idle: when the thread next writes what waits (monotonic)
        self._kept = False  # a start came since the last tick
        self._waited: _Raw | None = None  # the oldest start waiting at the last tick
        self._held: list[_Call] = []  # calls the store refused, retried first, as they were
        self._sending = 0  # events of the flush under way: out of the queue, not in the store yet
        self._flushing = threading.Lock()  # one flush at a time: this thread, a task's outcome, shutdown
        # The nodes running in this process, (session, node), oldest first: the heartbeat keeps
        # their sessions alive, however long they run.
        self._running: dict[tuple[str, str], None] = {}
        self._failures = 0
        self._retry_at = 0.0
        self._warned = False
        self._dropped = 0
        self._stopped = False

    # -- queueing (any thread) ------------------------------------------------------------------

    def keep(self, raw: _Raw) -> None:
        """Queue an event (a start) to be written with its outcome, or by the thread's tick once it
        has waited a whole ``flush_interval_s`` (so within two)."""
        queue = self._queue
        queue.append(raw)
        self._kept = True
        if self._idle:
            with self._wake:
                if self._idle:
                    self._idle = False
                    self._tick_at = time.monotonic() + self.recorder.manager.settings.flush_interval_s
                    self._wake.notify()  # asleep until its next heartbeat: it ticks from now on
        if len(queue) > BACKLOG_SIZE:
            with self._lock:
                self._drop(queue.popleft().session_id)

    def write(self, raw: _Raw) -> None:
        """Write an outcome now, with what waits (its start among it), in one store call per session.

        While the store is down (a call failed and its retry is not due), the outcome is queued for
        the thread's next try instead: a task does not wait on a store that just failed.
        """
        if self.store_down:
            self.keep(raw)
            return
        self._queue.append(raw)
        self.flush()

    def runs(self, node: tuple[str, str]) -> None:
        """Note a node this process started: its session is kept alive until :meth:`ran`."""
        running = self._running
        running[node] = None
        if len(running) > RECEIVED_CACHE_SIZE:  # outcomes another process reported (a revoke) never come here
            with self._lock, contextlib.suppress(StopIteration, KeyError, RuntimeError):
                running.pop(next(iter(running)))

    def ran(self, node: tuple[str, str]) -> None:
        """Note a node of this process that has an outcome."""
        self._running.pop(node, None)

    @property
    def running_sessions(self) -> list[str]:
        """The sessions of the nodes running in this process."""
        return sorted({session_id for session_id, _ in list(self._running)})

    def _drop(self, session_id: str) -> None:
        self._dropped += 1
        if self._dropped == 1:
            logger.warning(
                "tracker: %d events held already; dropping the oldest (session %s first)", BACKLOG_SIZE, session_id
            )

    @property
    def waiting(self) -> int:
        """Events queued or held, not yet in the store."""
        with self._lock:
            return len(self._queue) + self._sending + sum(len(call.events) for call in self._held)

    @property
    def store_down(self) -> bool:
        """The last store call failed and its retry is not due yet: do not make a task wait on it."""
        return time.monotonic() < self._retry_at

    # -- writing ----------------------------------------------------------------------------

    def flush(self) -> list[BatchOutcome]:
        """Write the held calls, then every queued event (one call per session). On a store failure
        the rest is held for the next try (with backoff). Returns what each call that went did."""
        with self._flushing:
            return self._flush_locked()

    def _flush_locked(self) -> list[BatchOutcome]:
        # _flushing is held.
        # Every event stays counted in `waiting` until the flush is over (a caller waits on that).
        queue = self._queue
        with self._lock:
            held, self._held = self._held, []
            queued = [queue.popleft() for _ in range(len(queue))]  # a handler may append meanwhile
            self._sending = len(queued) + sum(len(call.events) for call in held)
        calls = held + _calls(self.recorder.events(queued))
        outcomes: list[BatchOutcome] = []
        try:
            for index, call in enumerate(calls):
                try:
                    outcomes += self._send(call)
                except StorageUnavailableError as exc:
                    self._hold(calls[index:], exc)
                    return outcomes
        finally:
            with self._lock:
                self._sending = 0
        if not calls:
            return []
        if self._warned:
            logger.warning("tracker: the store is back; replayed the held events")
        self._failures, self._retry_at, self._warned, self._dropped = 0, 0.0, False, 0
        return outcomes

    def _send(self, call: _Call) -> list[BatchOutcome]:
        sync = self.recorder.manager.sync
        try:
            outcomes = [sync.record_nodes(call.session_id, call.events, request_id=call.request_id, trusted=True)]
        except StorageUnavailableError:
            raise
        except NodeLimitError:
            # More distinct nodes than the session has: record the others one by one.
            outcomes = []
            for event in call.events:
                try:
                    outcomes.append(sync.record_nodes(call.session_id, [event], trusted=True))
                except NodeLimitError as exc:
                    logger.warning("tracker: node %s not recorded: %s", event.node_id, exc)
        except TrackerError as exc:
            # Not transient (unknown or expired session...): retrying cannot help.
            logger.warning(
                "tracker: %d node event(s) of session %s not recorded: %s", len(call.events), call.session_id, exc
            )
            return []
        except Exception:
            logger.exception("tracker: unexpected error recording node events of session %s", call.session_id)
            return []
        for outcome in outcomes:
            self.recorder.callbacks(outcome)
        return outcomes

    def _hold(self, calls: list[_Call], exc: StorageUnavailableError) -> None:
        with self._wake:
            self._held, self._sending = calls, 0
            excess = sum(len(call.events) for call in calls) + len(self._queue) - BACKLOG_SIZE
            while excess > 0 and self._held:
                call = self._held[0]
                call.events.pop(0)
                self._drop(call.session_id)
                excess -= 1
                if not call.events:
                    self._held.pop(0)
            self._failures += 1
            if self._failures <= len(RETRY_BACKOFF_S):
                self._retry_at = time.monotonic() + RETRY_BACKOFF_S[self._failures - 1]
            else:
                self._retry_at = time.monotonic() + STORE_DOWN_HOLD_S
            self._wake.notify()  # the thread retries at _retry_at
        if self._failures > len(RETRY_BACKOFF_S) and not self._warned:
            self._warned = True
            logger.warning(
                "tracker: could not record node events of session %s after %d tries: %s; "
                "holding this process's events to replay when the store is back",
                calls[0].session_id, self._failures, exc,
            )  # fmt: skip

    # -- the thread -----------------------------------------------------------------------------

    def _due(self) -> float:
        """When the next flush is due (monotonic), or infinity (lock held)."""
        if self._held:
            return self._retry_at
        if self._idle:
            return float("inf")
        return max(self._tick_at, self._retry_at)

    def run(self) -> None:
        next_beat = 0.0
        while True:
            with self._wake:
                while not self._stopped:
                    now = time.monotonic()
                    wait = min(next_beat, self._due()) - now
                    if wait <= 0:
                        break
                    self._wake.wait(wait)
                if self._stopped:
                    return
                flush_now = self._due() <= now
            if now >= next_beat:
                self._beat()
                next_beat = now + self.recorder.manager.settings.heartbeat_interval_s
            if flush_now:
                self._tick()

    def _tick(self) -> None:
        """Write what waits if a start has waited since the last tick (a younger one most likely
        goes with its outcome); tick again an interval later, unless no start came since the last."""
        kept, self._kept = self._kept, False
        try:
            oldest: _Raw | None = self._queue[0]
        except IndexError:  # empty, or emptied meanwhile by an outcome's write
            oldest = None
        if self._held or (oldest is not None and oldest is self._waited):
            self.flush()
            oldest = None
        self._waited = oldest
        with self._wake:
            if not (kept or self._queue or self._held):
                self._idle = True
                # A start queued while this decided saw the thread ticking, and did not wake it.
                self._idle = not self._queue
            self._tick_at = time.monotonic() + self.recorder.manager.settings.flush_interval_s

    def _beat(self) -> None:
        try:
            self.recorder.manager.sync.heartbeat(self.worker, sessions=self.running_sessions)
        except TrackerError as exc:
            logger.warning("tracker: heartbeat of %s not written: %s", self.worker, exc)
        except Exception:
            logger.exception("tracker: heartbeat of %s failed", self.worker)

    def stop(self) -> None:
        """Stop the thread, then write what is still queued (one try: the process is ending)."""
        if _pid != self.pid or self._stopped:
            return  # a forked child's copy (registered with atexit before the fork), or stopped already
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5.0)
        # A flush still stuck on an unreachable store must not hold the process's exit for long.
        if self.waiting and self._flushing.acquire(timeout=5.0):
            try:
                self._flush_locked()
            finally:
                self._flushing.release()
        if self.waiting:
            logger.warning("tracker: %d node event(s) not recorded: the store is unreachable", self.waiting)


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
        return f"{hostname or self.worker_name or 'worker'}:{_pid}"

    # -- recording --------------------------------------------------------------------------

    def writer(self, hostname: str | None = None) -> Writer:
        """This process's writer, started on first use (a forked child gets its own)."""
        writer = self._writer
        if writer is not None and writer.pid == _pid:
            return writer
        with self._writer_lock:
            writer = self._writer
            if writer is None or writer.pid != _pid:
                # A child never touches its parent's writer: its locks may have been held at the fork.
                writer = Writer(self, self.worker_id(hostname))
                writer.start()
                atexit.register(writer.stop)
                self._writer = writer
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
        if ids is not None:
            self._keep(request, ids, status, result, error, attempt, task_id, worker, reason)

    def _keep(
        self,
        request: Any,
        ids: tuple[str, str],
        status: NodeStatus,
        result: Any,
        error: BaseException | None,
        attempt: int | None,
        task_id: str | None,
        worker: str | None,
        reason: str | None,
    ) -> None:
        """:meth:`submit` once the ids are read, without keywords (every task's start and result
        come here straight from their handlers)."""
        writer = self._writer
        if writer is None or writer.pid != _pid:
            writer = self.writer(getattr(request, "hostname", None))
        manager = self.manager
        result_json = None
        if result is not None:
            try:
                result_json = validation.json_text(result, "result", manager.settings.max_result_bytes, ids[0])
            except Exception as exc:  # not JSON, over the cap, too deep: the node still completed
                logger.warning("tracker: result of node %s (session %s) not stored: %s", ids[1], ids[0], exc)
                reason = f"{RESULT_NOT_STORED}: {exc}"
        raw = _new_raw((*ids, status, result_json, error, attempt, task_id, worker, reason, manager.clock()))
        if status is NodeStatus.RUNNING:
            writer.runs(ids)
            writer.keep(raw)
            if manager.settings.flush_interval_s == 0 and not writer.store_down:
                writer.flush()
            return
        writer.ran(ids)
        writer.write(raw)  # before the handler returns: before Celery acknowledges the message

    def events(self, queued: Sequence[_Raw]) -> list[tuple[str, NodeEvent]]:
        """The queued events validated and built, in order (a bad one is logged and dropped).

        A start followed by its task's result, with no other event of that node between them, is
        written with the result as one event (what the two leave, without the ``running`` state in
        between). Each node's events keep their order.
        """
        manager = self.manager
        starts: dict[tuple[str, str], _Raw] = {}  # node -> its latest event, a start, held back
        events: list[tuple[str, NodeEvent]] = []

        def add(raw: _Raw, started_at: datetime | None = None) -> None:
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
            if raw.status is NodeStatus.RUNNING and raw.task_id:
                starts[node] = raw
            else:
                add(raw)
        # Starts whose result has not come yet (each its node's last event here).
        for start in starts.values():
            add(start)
        return events

    @staticmethod
    def _event(manager: SessionManager, raw: _Raw, started_at: datetime | None) -> NodeEvent | None:
        """The validated event, or None (logged) when its ids are bad."""
        session_id, node_id, status, result_json, error, attempt, task_id, worker, reason, at = raw
        try:
            # The result was checked when it was encoded (see submit): it is taken as it is.
            return manager._plans.event(
                validation.session_id(session_id), node_id, status, result_json, error, attempt, task_id, worker,
                reason, None, at, started_at,
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
        return writer.waiting if writer is not None and writer.pid == _pid else 0

    def callbacks(self, outcome: BatchOutcome | NodeOutcome | TransitionOutcome) -> None:
        """Send the callbacks this outcome is the one caller told of (each at most once per end).

        ``on_complete`` once per end of a run (the status dict, whose ``run`` says which);
        ``on_success`` once in the session's life, when every node has completed; ``on_failure``
        once, at the first node that failed for good (the status dict and that node's id).
        """
        session = outcome.session
        if isinstance(outcome, TransitionOutcome):
            ended = session.status.is_terminal
            succeeded, first_failure = False, None
        else:
            ended, succeeded, first_failure = outcome.finished is not None, outcome.succeeded, outcome.first_failure
        if not (ended or succeeded or first_failure) or not session.metadata:
            return
        if ended:
            self._send_callback(session, ON_COMPLETE_KEY, (session.to_dict(),))
        if succeeded:
            self._send_callback(session, ON_SUCCESS_KEY, (session.to_dict(),))
        if first_failure:
            self._send_callback(session, ON_FAILURE_KEY, (session.to_dict(), first_failure))

    def _send_callback(self, session: SessionInfo, key: str, args: tuple[Any, ...]) -> None:
        callback = session.metadata.get(key)
        if not callback:
            return
        try:
            sig = Signature.from_dict(callback, app=self.app)
            sig.apply_async(args=args)
        except Exception:
            logger.exception("tracker: %s callback of session %s could not be sent", key, session.session_id)

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
        self._keep(request, ids, NodeStatus.RUNNING, None, None, attempt, task_id, worker, None)

    def on_success(self, sender: Any = None, result: Any = None, **_: Any) -> None:
        request: Any = getattr(sender, "request", None)
        ids = ids_of(request)
        if ids is None or not self.mine(sender):
            return
        attempt, worker = int(request.retries or 0) + 1, self.worker_id(request.hostname)
        self._keep(request, ids, NodeStatus.COMPLETED, result, None, attempt, request.id, worker, None)

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
        if writer is not None and writer.pid == _pid:
            self._writer = None
            writer.stop()


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
