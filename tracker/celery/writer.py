"""The writer: one per process that records node events; it writes them and the process's heartbeat.

A task's outcome is written by :meth:`Writer.write` in the task's own thread, before its handler
returns (and so before Celery acknowledges the message); a start waits in the writer's queue for its
outcome, or for the writer's thread to write it once it has waited a whole ``flush_interval_s``. When
the store fails, the writer keeps the events (bounded by ``BACKLOG_SIZE``) and retries them, as they
were, before anything else. When the thread wakes, writes and beats is decided by
:mod:`tracker.celery.flush_policy` on the time of the writer's clock: the thread only applies it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple, Protocol

from tracker.celery import process
from tracker.celery.flush_policy import (
    FIRST_BEAT,
    IDLE,
    RETRY_BACKOFF_S,
    STORE_DOWN_HOLD_S,
    UP,
    Backoff,
    FlushPolicy,
    Ticks,
)
from tracker.errors import NodeLimitError, StorageUnavailableError, TrackerError
from tracker.manager import SessionManager
from tracker.models import BatchOutcome
from tracker.states import NodeStatus
from tracker.storage.base import NodeEvent, new_request_id

__all__ = [
    "BACKLOG_SIZE",
    "MAX_BATCH",
    "RETRY_BACKOFF_S",
    "RUNNING_SIZE",
    "STORE_DOWN_HOLD_S",
    "RawEvent",
    "Writer",
    "WriterOwner",
]

logger = logging.getLogger("tracker.celery")

#: Events one process keeps while the store is unreachable; past this, the oldest are dropped.
BACKLOG_SIZE = 10_000

#: Most events in one store call; a queue this long is written at once.
MAX_BATCH = 1_000

#: Running nodes one process remembers for its heartbeat; past this, the oldest are forgotten
#: (outcomes another process reported, a revoke, never come back here to remove theirs).
RUNNING_SIZE = 10_000


class RawEvent(NamedTuple):
    """A node event as a handler saw it, kept as it came: validated and built in the writer's
    flush, in batches (see :meth:`WriterOwner.events`)."""

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
    #: A running task's fraction done (``report_progress``); kept once per node until the next
    #: flush, the latest replacing the one before.
    progress: float | None = None


class WriterOwner(Protocol):
    """What a writer needs of the recorder it writes for."""

    @property
    def manager(self) -> SessionManager:
        """The manager to write to (looked up at each use)."""
        ...

    def events(self, queued: Sequence[RawEvent]) -> list[tuple[str, NodeEvent]]:
        """The queued events validated and built, in order, each with its session id."""
        ...

    def callbacks(self, outcome: BatchOutcome) -> None:
        """Send the callbacks of what a store call of the writer told it."""
        ...


@dataclass
class _Call:
    """One store call to make: a session's events, under one request id kept across retries (the
    store answers a retry of the call that ended the session as the first attempt, so the
    completion callback is sent once)."""

    session_id: str
    events: list[NodeEvent]
    request_id: str


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

    Args:
        recorder: What it writes for (its manager, how queued events are built, where outcomes go).
        worker: The ``<hostname>:<pid>`` its heartbeat names.
        clock: The time its rules are applied on, in seconds (only differences count). The thread
            runs each round of its loop (what :meth:`step` runs) when the rules say; whoever drives
            a writer without starting its thread calls :meth:`step` with the clock's time itself.
    """

    def __init__(self, recorder: WriterOwner, worker: str, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name=f"tracker-writer-{worker}", daemon=True)
        self.recorder = recorder
        self.worker = worker
        self.pid = process.pid
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Appended to by the handlers without a lock (deque appends and pops are atomic).
        self._queue: deque[RawEvent] = deque()
        # Replaced whole under the lock (read without it by the handlers): idle, the thread sleeps
        # until its next heartbeat and the next start wakes it; else when it next ticks.
        self._ticks: Ticks = IDLE
        self._kept = False  # a start came since the last tick
        self._waited: RawEvent | None = None  # the oldest start waiting at the last tick
        self._held: list[_Call] = []  # calls the store refused, retried first, as they were
        self._sending = 0  # events of the flush under way: out of the queue, not in the store yet
        self._flushing = threading.Lock()  # one flush at a time: this thread, a task's outcome, shutdown
        # Replaced whole, only by a flush (under _flushing): read without a lock by store_down.
        self._backoff: Backoff = UP
        # A task found a flush under way for longer than a store call should take (the store
        # hangs): until a flush goes through, tasks do not wait on the store either.
        self._stuck = False
        self._next_beat = FIRST_BEAT  # only the thread (or whoever steps the writer) uses it
        # The nodes running in this process, (session, node), oldest first: the heartbeat keeps
        # their sessions alive, however long they run.
        self._running: dict[tuple[str, str], None] = {}
        # The latest progress report of each node with one in the queue (see report).
        self._reports: dict[tuple[str, str], RawEvent] = {}
        self._warned = False
        self._dropped = 0
        self._stopped = False

    def _policy(self) -> FlushPolicy:
        """The rules for the manager's settings as they are now."""
        settings = self.recorder.manager.settings
        return FlushPolicy(settings.flush_interval_s, settings.heartbeat_interval_s)

    # -- queueing (any thread) ------------------------------------------------------------------

    def keep(self, raw: RawEvent) -> None:
        """Queue an event (a start) to be written with its outcome, or by the thread's tick once it
        has waited a whole ``flush_interval_s`` (so within two)."""
        self._queue.append(raw)
        self._queued()

    def report(self, raw: RawEvent) -> None:
        """Queue a running task's progress (``raw.progress``) as :meth:`keep` does, once per node
        until the next flush: a later report of the same node replaces the one waiting."""
        node = (raw.session_id, raw.node_id)
        with self._lock:
            fresh = node not in self._reports
            self._reports[node] = raw
            if fresh:
                self._queue.append(raw)  # where it goes in order; the flush takes the latest report
        if fresh:
            self._queued()

    def _queued(self) -> None:
        queue = self._queue
        self._kept = True
        if self._ticks.idle:
            with self._wake:
                if self._ticks.idle:
                    self._ticks = self._policy().woken(self._clock())
                    self._wake.notify()  # asleep until its next heartbeat: it ticks from now on
        if len(queue) > BACKLOG_SIZE:
            with self._lock:
                self._drop(queue.popleft().session_id)

    def write(self, raw: RawEvent) -> None:
        """Write an outcome now, with what waits (its start among it), in one store call per session.

        While the store is down (a call failed, or hung, and no retry went through yet), the
        outcome is queued for the thread's next try instead: a task does not wait on a store that
        failed. Nor behind a flush under way for longer than one socket timeout (a call that hangs).
        """
        if self.store_down:
            self.keep(raw)
            return
        self._queue.append(raw)
        # A flush under way (the thread's) that takes longer than one socket timeout is a store
        # call that hangs: the outcome stays queued for the thread rather than wait behind it.
        if not self._flushing.acquire(timeout=self.recorder.manager.settings.redis_socket_timeout_s):
            self._stuck = True
            self._queued()
            return
        try:
            self._flush_locked()
        finally:
            self._flushing.release()

    def runs(self, node: tuple[str, str]) -> None:
        """Note a node this process started: its session is kept alive until :meth:`ran`."""
        running = self._running
        running[node] = None
        if len(running) > RUNNING_SIZE:
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
        """The last store call failed, or one hangs, and no retry went through yet: do not make a
        task wait on it."""
        return self._backoff.down or self._stuck

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
            if self._reports:
                reports, self._reports = self._reports, {}
                queued = [
                    reports.get((raw.session_id, raw.node_id), raw) if raw.progress is not None else raw
                    for raw in queued
                ]
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
        self._backoff, self._warned, self._dropped, self._stuck = UP, False, 0, False
        return outcomes

    def _send(self, call: _Call) -> list[BatchOutcome]:
        sync = self.recorder.manager.sync
        try:
            outcomes = [sync._record_nodes(call.session_id, call.events, request_id=call.request_id, trusted=True)]
        except StorageUnavailableError:
            raise
        except NodeLimitError:
            # More distinct nodes than the session has: record the others one by one.
            outcomes = self._one_by_one(call)
        except TrackerError as exc:
            # Not transient (unknown or expired session...): retrying cannot help.
            logger.warning(
                "tracker: %d node event(s) of session %s not recorded: %s", len(call.events), call.session_id, exc
            )
            return []
        except Exception:
            logger.exception("tracker: unexpected error recording node events of session %s", call.session_id)
            # One event the store cannot take must not take the others of its batch with it.
            outcomes = self._one_by_one(call) if len(call.events) > 1 else []
        for outcome in outcomes:
            self.recorder.callbacks(outcome)
        return outcomes

    def _one_by_one(self, call: _Call) -> list[BatchOutcome]:
        """Record ``call``'s events one store call each, skipping (logged) those the store refuses."""
        sync = self.recorder.manager.sync
        outcomes = []
        for event in call.events:
            try:
                outcomes.append(sync._record_nodes(call.session_id, [event], trusted=True))
            except StorageUnavailableError:
                raise
            except Exception as exc:
                logger.warning("tracker: node %s of session %s not recorded: %s", event.node_id, call.session_id, exc)
        return outcomes

    def _hold(self, calls: list[_Call], exc: StorageUnavailableError) -> None:
        policy = self._policy()
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
            backoff = self._backoff = policy.failed(self._backoff, self._clock())
            self._wake.notify()  # the thread retries at backoff.retry_at
        if policy.holding(backoff) and not self._warned:
            self._warned = True
            logger.warning(
                "tracker: could not record node events of session %s after %d tries: %s; "
                "holding this process's events to replay when the store is back",
                calls[0].session_id, backoff.failures, exc,
            )  # fmt: skip

    # -- the thread -----------------------------------------------------------------------------

    def _next_round(self) -> float:
        """When the thread next has something to do (lock held)."""
        return FlushPolicy.next_round(self._ticks, self._backoff, self._next_beat, held=bool(self._held))

    def _flush_due(self, now: float) -> bool:
        """Whether a flush is due at ``now`` (lock held)."""
        return now >= FlushPolicy.flush_due(self._ticks, self._backoff, held=bool(self._held))

    def run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped:
                    now = self._clock()
                    wait = self._next_round() - now
                    if wait <= 0:
                        break
                    self._wake.wait(wait)
                if self._stopped:
                    return
                flush_now = self._flush_due(now)
            self._round(now, flush_now)

    def step(self, now: float) -> float:
        """One round of the thread's loop at ``now`` (the writer's clock): the heartbeat if it is due,
        then the tick if it is due. Returns when the next round is due (infinity: not before a
        start wakes the writer). The thread runs it when that time comes; a writer driven by hand
        (its thread not started) runs it when its caller says."""
        with self._lock:
            flush_now = self._flush_due(now)
        self._round(now, flush_now)
        with self._lock:
            return self._next_round()

    def _round(self, now: float, flush_now: bool) -> None:
        policy = self._policy()
        if policy.beat_due(now, self._next_beat):
            self._beat()
            self._next_beat = policy.next_beat(now)
        if flush_now:
            self._tick()

    def _tick(self) -> None:
        """Write what waits if a start has waited since the last tick (a younger one most likely
        goes with its outcome); tick again an interval later, unless no start came since the last."""
        kept, self._kept = self._kept, False
        try:
            oldest: RawEvent | None = self._queue[0]
        except IndexError:  # empty, or emptied meanwhile by an outcome's write
            oldest = None
        policy = self._policy()
        if policy.tick_flushes(held=bool(self._held), oldest_waited=oldest is not None and oldest is self._waited):
            self.flush()
            oldest = None
        self._waited = oldest
        with self._wake:
            now = self._clock()
            idle = policy.goes_idle(started=kept, waiting=bool(self._queue or self._held))
            self._ticks = policy.ticked(self._ticks, now, goes_idle=idle)
            if idle and self._queue:
                # A start queued while this decided saw the thread ticking, and did not wake it.
                self._ticks = policy.woken(now)

    def _beat(self) -> None:
        try:
            self.recorder.manager.sync._heartbeat(self.worker, sessions=self.running_sessions)
        except TrackerError as exc:
            logger.warning("tracker: heartbeat of %s not written: %s", self.worker, exc)
        except Exception:
            logger.exception("tracker: heartbeat of %s failed", self.worker)

    def stop(self) -> None:
        """Stop the thread, then write what is still queued (one try: the process is ending)."""
        if process.pid != self.pid or self._stopped:
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
