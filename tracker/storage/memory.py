"""In-process storage: one lock, plain dicts. For tests, the demo and single-process apps."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tracker import errors, models, states
from tracker.states import NodeStatus, SessionStatus
from tracker.storage import base
from tracker.storage.aio import ThreadedAsyncStore
from tracker.structure import ERRBACK_NOT_NEEDED, Links, Tree, grown, links, skips
from tracker.validation import is_worker_id, worker_id

#: Events kept per session when no cap is given.
DEFAULT_EVENTS_MAXLEN = 1000


@dataclass
class _Entry:
    info: models.SessionInfo
    nodes: dict[str, models.NodeResult] = field(default_factory=dict)
    signatures: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: Counter[NodeStatus] = field(default_factory=Counter)
    events: deque[models.SessionEvent] = field(default_factory=deque)
    last_event_ms: int = 0
    last_event_seq: int = 0
    #: The callbacks told already (each to exactly one caller in the session's life).
    success_told: bool = False
    failure_told: bool = False
    #: When a heartbeat last said one of its nodes still runs on a live worker (keeps it from expiring).
    alive_at: datetime | None = None
    #: The canvas tree it was created with, and the links read from it (see tracker.structure).
    structure: Tree | None = None
    links: Links | None = None
    #: The skipped error callbacks nothing needed (they do not keep a session from completing).
    unneeded: set[str] = field(default_factory=set)
    #: The running nodes' reported progress, summed in ``states.PROGRESS_UNITS``.
    partial: int = 0
    #: Child sessions (as ``record_nodes.lua`` keeps them): child id -> [node, attempt, policy,
    #: state], and node -> [attempt, open, failed child] of that node's latest attempt.
    children: dict[str, list[Any]] = field(default_factory=dict)
    node_children: dict[str, list[Any]] = field(default_factory=dict)
    #: Failures by cause (as ``common.lua`` keeps them): error type -> [count, first message,
    #: first at, last at, the first few node ids].
    failures: dict[str, list[Any]] = field(default_factory=dict)
    #: The recent rate of finishing nodes (``common.lua``: rate_window).
    rate: states.RateWindow | None = None


class InMemoryStorageAdapter:
    """Sessions in a dict, guarded by one lock. Thread-safe; every method holds the lock briefly.

    Args:
        events_maxlen: Events kept per session (oldest dropped first).
    """

    def __init__(self, events_maxlen: int = DEFAULT_EVENTS_MAXLEN) -> None:
        self._sessions: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._events_maxlen = events_maxlen
        self._workers: dict[str, datetime] = {}
        self._held: dict[str, set[tuple[str, str]]] = {}
        # The reaper's memory between passes (see storage.base.silent_workers).
        self._suspects: dict[str, int] = {}
        self._alive = True
        self._reaped_at: datetime | None = None
        # Child sessions whose end was not told to their parent yet, oldest first.
        self._watched: dict[base.ChildWatch, None] = {}

    # -- helpers (call with the lock held) ---------------------------------------------------

    def _entry(self, session_id: str) -> _Entry:
        entry = self._sessions.get(session_id)
        if entry is None:
            raise errors.SessionNotFoundError(session_id)
        return entry

    def _emit(self, entry: _Entry, kind: str, now: datetime, node: models.NodeResult | None = None) -> None:
        # Ids mimic Redis stream ids (<ms>-<seq>) so callers treat both stores alike.
        now_ms = max(int(now.timestamp() * 1000), entry.last_event_ms)
        entry.last_event_seq = entry.last_event_seq + 1 if now_ms == entry.last_event_ms else 0
        entry.last_event_ms = now_ms
        info = entry.info
        entry.events.append(
            models.SessionEvent(
                id=f"{now_ms}-{entry.last_event_seq}",
                type=kind,
                status=info.status,
                progress_percent=info.progress_percent,
                completed_nodes=info.completed_nodes,
                failed_nodes=info.failed_nodes,
                node_id=node.node_id if node else None,
                node_status=node.status if node else None,
                at=now,
            )
        )
        while len(entry.events) > self._events_maxlen:
            entry.events.popleft()
        self._changed.notify_all()

    @staticmethod
    def _set_node(entry: _Entry, node: models.NodeResult) -> None:
        old = entry.nodes.get(node.node_id)
        if old is not None:
            entry.counts[old.status] -= 1
            if old.status is NodeStatus.RUNNING:
                entry.partial -= states.progress_units(old.progress)
        entry.counts[node.status] += 1
        if node.status is NodeStatus.RUNNING:
            entry.partial += states.progress_units(node.progress)
        entry.nodes[node.node_id] = node
        _regroup(entry.failures, old, node)
        if node.status is NodeStatus.SKIPPED and node.reason == ERRBACK_NOT_NEEDED:
            entry.unneeded.add(node.node_id)
        else:
            entry.unneeded.discard(node.node_id)

    @staticmethod
    def _recount(entry: _Entry, now: datetime) -> models.SessionInfo:
        """The session's counters (and the progress they drive) from the node status counts."""
        counts = entry.counts
        failed = counts[NodeStatus.FAILED] + counts[NodeStatus.LOST]
        finished = counts[NodeStatus.COMPLETED] + failed + counts[NodeStatus.CANCELLED] + counts[NodeStatus.SKIPPED]
        return entry.info.model_copy(
            update={
                "completed_nodes": counts[NodeStatus.COMPLETED],
                "failed_nodes": failed,
                "running_nodes": counts[NodeStatus.RUNNING],
                "retrying_nodes": counts[NodeStatus.RETRYING],
                "lost_nodes": counts[NodeStatus.LOST],
                "cancelled_nodes": counts[NodeStatus.CANCELLED],
                "skipped_nodes": counts[NodeStatus.SKIPPED],
                "progress_percent": states.progress_from_counts(finished, entry.info.node_count, entry.partial),
                "updated_at": max(now, entry.info.updated_at),
                "failure_types": len(entry.failures),
            }
        )

    @staticmethod
    def _settle(entry: _Entry, info: models.SessionInfo) -> models.SessionInfo:
        """``info`` as the operation leaves it, with its rate window moved (``common.lua``: save_session)."""
        if info.started_at is not None:
            window = entry.rate or states.RateWindow.starting(_ms(info.started_at), 0)
            entry.rate = window.moved(_finished(info), _ms(info.updated_at))
        entry.info = info.model_copy(update=models.rate_and_eta(entry.rate, info.node_count, info.finished_at))
        return entry.info

    @staticmethod
    def _move(info: models.SessionInfo, target: SessionStatus, now: datetime) -> models.SessionInfo:
        # updated_at never goes back (a caller with an older clock must not make a session look idle)
        update: dict[str, Any] = {"status": target, "updated_at": max(now, info.updated_at)}
        if target is SessionStatus.RUNNING:
            update["finished_at"] = None
            if info.started_at is None:
                update["started_at"] = now
        elif target.is_terminal:
            update["finished_at"] = now
        return info.model_copy(update=update)

    # -- the protocol ------------------------------------------------------------------------

    def create(self, session: models.SessionInfo, nodes: base.NewNodes = base.NO_NODES) -> None:
        with self._lock:
            if session.session_id in self._sessions:
                raise errors.SessionExistsError(session.session_id)
            entry = _Entry(info=session, structure=nodes.tree, links=links(nodes.tree) if nodes.tree else None)
            self._add_pending(entry, nodes.specs)
            self._sessions[session.session_id] = entry
            if session.parent_session_id and session.parent_node_id:
                self._watched[
                    base.ChildWatch(session.session_id, session.parent_session_id, session.parent_node_id)
                ] = None
            self._emit(entry, "created", session.created_at)

    def add_nodes(self, session_id: str, nodes: base.NewNodes, max_node_count: int, now: datetime) -> models.AddOutcome:
        specs = nodes.specs
        with self._lock:
            entry = self._entry(session_id)
            known = [spec.node_id for spec in specs if spec.node_id in entry.nodes]
            if len(known) == len(specs):
                pending = [n for n in known if entry.nodes[n].status is NodeStatus.PENDING]
                return models.AddOutcome(session=entry.info, added=False, pending=pending)
            if known:
                raise errors.TrackerValidationError("nodes", known[0], "already a node of the session", session_id)
            info = entry.info
            if info.status.is_terminal:
                raise errors.InvalidStateTransitionError(
                    session_id, info.status, "running", "the session has ended: nodes can no longer be added"
                )
            if info.node_count + len(specs) > max_node_count:
                raise errors.TrackerValidationError(
                    "nodes", len(specs), f"more than {max_node_count} nodes in all (TRACKER_MAX_NODE_COUNT)", session_id
                )
            tree = grown(entry.structure, nodes.tree, list(entry.nodes), [spec.node_id for spec in specs])
            if tree is not None:
                entry.structure, entry.links = tree, links(tree)
            self._add_pending(entry, specs)
            entry.info = info.model_copy(update={"node_count": info.node_count + len(specs)})
            self._settle(entry, self._recount(entry, now))
            self._emit(entry, "added", now)
            return models.AddOutcome(session=entry.info, added=True, pending=[spec.node_id for spec in specs])

    def _add_pending(self, entry: _Entry, specs: Sequence[models.NodeSpec]) -> None:
        """New nodes, each ``pending``, with the signatures resume re-sends them by."""
        for spec in specs:
            self._set_node(
                entry, models.NodeResult(node_id=spec.node_id, status=NodeStatus.PENDING, task_id=spec.task_id)
            )
            if spec.signature is not None:
                entry.signatures[spec.node_id] = spec.signature

    def get(self, session_id: str) -> models.SessionInfo | None:
        with self._lock:
            entry = self._sessions.get(session_id)
            return entry.info if entry else None

    def get_structure(self, session_id: str) -> Tree | None:
        with self._lock:
            entry = self._sessions.get(session_id)
            return entry.structure if entry else None

    def transition(
        self, session_id: str, target: SessionStatus, allowed_from: frozenset[SessionStatus], now: datetime
    ) -> models.TransitionOutcome:
        with self._lock:
            entry = self._entry(session_id)
            previous = entry.info.status
            if previous not in allowed_from:
                raise errors.InvalidStateTransitionError(session_id, previous, target)
            if target is SessionStatus.CANCELLED:
                for node in list(entry.nodes.values()):
                    if not node.status.is_terminal:
                        cancelled = {
                            "status": NodeStatus.CANCELLED,
                            "finished_at": now,
                            "result": None,
                            "error": None,
                            "reason": "session cancelled",
                        }
                        self._set_node(entry, node.model_copy(update=cancelled))
                entry.info = self._recount(entry, now)
            self._settle(entry, self._move(entry.info, target, now))
            self._emit(entry, "status", now)
            return models.TransitionOutcome(session=entry.info, previous_status=previous)

    def resume(
        self, session_id: str, choice: base.ResumeChoice, allowed_from: frozenset[SessionStatus], now: datetime
    ) -> models.ResumeOutcome:
        nodes, retry_failed = choice.nodes, choice.retry_failed
        with self._lock:
            entry = self._entry(session_id)
            previous = entry.info.status
            if previous not in allowed_from:
                raise errors.InvalidStateTransitionError(session_id, previous, SessionStatus.RUNNING, "cannot resume")
            if nodes is not None:
                chosen = set(nodes)
                if any(entry.nodes[n].status is NodeStatus.COMPLETED for n in chosen if n in entry.nodes):
                    raise base.ResumePlanChanged(session_id)
            reset: list[models.NodeSpec] = []
            for node_id, node in list(entry.nodes.items()):
                if nodes is not None:
                    if node_id not in chosen:
                        continue
                elif node.status is NodeStatus.COMPLETED or (node.status is NodeStatus.FAILED and not retry_failed):
                    continue
                task_id = f"{choice.task_id_base}{len(reset) + 1:012x}"
                self._set_node(
                    entry,
                    models.NodeResult(
                        node_id=node_id, status=NodeStatus.PENDING, attempts=node.attempts, task_id=task_id
                    ),
                )
                entry.node_children.pop(node_id, None)  # its run again waits only for the children it opens
                reset.append(models.NodeSpec(node_id=node_id, task_id=task_id, signature=entry.signatures.get(node_id)))
            info = self._recount(entry, now)
            counts = _counts(entry, info)
            ended = None if reset else states.finish_status(*counts)
            if ended is not None:
                # Nothing to re-send and every node has a result: the session ends at once so.
                info = self._move(info, ended, now)
            else:
                info = self._move(info, SessionStatus.RUNNING, now).model_copy(update={"run": info.run + 1})
                entry.rate = states.RateWindow.starting(_ms(now), _finished(info))
            self._settle(entry, info)
            self._emit(entry, "status", now)
            return models.ResumeOutcome(session=entry.info, previous_status=previous, nodes=reset)

    def set_progress(self, session_id: str, progress_percent: float, now: datetime) -> models.SessionInfo:
        with self._lock:
            entry = self._entry(session_id)
            status = entry.info.status
            if status.is_terminal:
                raise errors.InvalidStateTransitionError(
                    session_id, status, status, "progress of an ended session is final"
                )
            updated_at = max(now, entry.info.updated_at)
            entry.info = entry.info.model_copy(update={"progress_percent": progress_percent, "updated_at": updated_at})
            self._emit(entry, "progress", now)
            return entry.info

    def record_node(self, session_id: str, event: base.NodeEvent, now: datetime) -> models.NodeOutcome:
        with self._lock:
            return self._apply(session_id, self._recording(session_id, [event]), event, now)

    def record_nodes(
        self, session_id: str, events: Sequence[base.NodeEvent], now: datetime, request_id: str | None = None
    ) -> models.BatchOutcome:
        with self._lock:
            entry = self._recording(session_id, events)
            finished: SessionStatus | None = None
            succeeded, first_failure = False, None
            for event in events:
                outcome = self._apply(session_id, entry, event, now)
                finished = outcome.finished or finished
                succeeded = succeeded or outcome.succeeded
                first_failure = first_failure or outcome.first_failure
            return models.BatchOutcome.of(
                entry.info, finished=finished, succeeded=succeeded, first_failure=first_failure
            )

    def _recording(self, session_id: str, events: Sequence[base.NodeEvent]) -> _Entry:
        """The session ``events`` are recorded in, once they fit in it. One that is gone (removed,
        expired) has no node a worker process runs: they are taken out of the holder registry."""
        entry = self._sessions.get(session_id)
        if entry is None:
            for event in events:
                if event.worker is not None:
                    self._held.get(event.worker, set()).discard((session_id, event.node_id))
            raise errors.SessionNotFoundError(session_id)
        self._check_limit(session_id, entry, events)
        return entry

    @staticmethod
    def _check_limit(session_id: str, entry: _Entry, events: Sequence[base.NodeEvent]) -> None:
        # All or nothing: a call with more distinct nodes than the session has room for changes nothing.
        fresh: set[str] = set()
        for event in events:
            if event.node_id not in entry.nodes and event.node_id not in fresh:
                fresh.add(event.node_id)
                if len(entry.nodes) + len(fresh) > entry.info.node_count:
                    raise errors.NodeLimitError(session_id, event.node_id, entry.info.node_count)

    def _apply(self, session_id: str, entry: _Entry, event: base.NodeEvent, now: datetime) -> models.NodeOutcome:
        at = event.at or now
        old = entry.nodes.get(event.node_id)
        if event.child is not None or event.status is NodeStatus.COMPLETED:
            what, changed = self._with_children(entry, old, event)
            if what != "event":
                return self._child_step(session_id, entry, old, changed, what, at)
            event = changed
        if event.progress is not None:
            return self._progress(entry, old, event, at)
        node = old
        if event.started_at is not None and event.status.is_terminal:
            # A start and its result folded into one event: the start first, as two calls would.
            start = base.NodeEvent(
                node_id=event.node_id,
                status=NodeStatus.RUNNING,
                attempt=event.attempt,
                task_id=event.task_id,
                worker=event.worker,
            )
            node = _merge_node(node, start, event.started_at)
        node = _merge_node(node, event, at)
        self._set_node(entry, node)
        self._register(session_id, node, event.worker, at)
        skipped = self._skip_after(entry, node, old, at)
        entry.info = self._recount(entry, at)
        info = entry.info
        finished: SessionStatus | None = None
        counts = _counts(entry, info)
        if info.status is SessionStatus.PENDING:
            info = self._move(info, SessionStatus.RUNNING, at)
        rederived = None
        if info.status is SessionStatus.RUNNING:
            finished = states.finish_status(*counts)
            if finished is not None:
                info = self._move(info, finished, at)
        elif info.status.is_terminal and (target := states.rederived_status(info.status, *counts)) is not info.status:
            info = rederived = self._move(info, target, at)
        info = self._settle(entry, info)
        self._emit(entry, "node", at, node)
        for skipped_node in skipped:
            self._emit(entry, "node", at, skipped_node)
        if rederived is not None:
            self._emit(entry, "status", at)
        succeeded = info.status is SessionStatus.COMPLETED and not entry.success_told
        entry.success_told = entry.success_told or succeeded
        failing = node.status in states.FAILED_NODE_STATUSES and (
            old is None or old.status not in states.FAILED_NODE_STATUSES
        )
        first_failure = node.node_id if failing and not entry.failure_told else None
        entry.failure_told = entry.failure_told or failing
        return models.NodeOutcome(
            node=node,
            session=info,
            previous_node_status=old.status if old else None,
            finished=finished,
            succeeded=succeeded,
            first_failure=first_failure,
        )

    @staticmethod
    def _with_children(
        entry: _Entry, old: models.NodeResult | None, event: base.NodeEvent
    ) -> tuple[str, base.NodeEvent]:
        """What ``event`` means once the node's child sessions are taken into account
        (``record_nodes.lua``: with_children): ``("event", e)`` apply ``e``; ``("wait", e)`` a
        success that waits, running, for open children; ``("bookkeeping", e)`` only the children's
        counters moved."""
        link, node_id = event.child, event.node_id
        info = entry.info
        if link is not None and link.ended is None:
            if link.child_id in entry.children:
                return "bookkeeping", event
            entry.children[link.child_id] = [node_id, link.attempt, link.policy, "open"]
            entry.info = info.model_copy(
                update={"children": info.children + 1, "children_open": info.children_open + 1}
            )
            mine = entry.node_children.get(node_id)
            if mine is None or mine[0] < link.attempt:
                mine = entry.node_children[node_id] = [link.attempt, 0, ""]
            if mine[0] == link.attempt:
                mine[1] += 1
            return "bookkeeping", event
        if link is not None and link.ended is not None:
            kept = entry.children.get(link.child_id)
            if kept is None or kept[3] != "open":
                return "bookkeeping", event
            node_id, attempt, policy, _ = kept
            ended = kept[3] = SessionStatus(link.ended).value
            entry.info = info.model_copy(update={"children_open": info.children_open - 1})
            mine = entry.node_children.get(node_id)
            if mine is None or mine[0] != attempt:
                return "bookkeeping", event
            mine[1] -= 1
            if ended != "completed" and policy != "ignore" and not mine[2]:
                mine[2] = f"{link.child_id} {ended}"
            if mine[1] > 0 or old is None or not old.waiting:
                return "bookkeeping", event
            if mine[2]:  # the node's task succeeded before: it ends now
                return "event", base.NodeEvent(
                    node_id, NodeStatus.FAILED, None, attempt=attempt, reason=_child_failed(mine[2])
                )
            result = None if old.result is None else json.dumps(old.result, separators=(",", ":"))
            return "event", base.NodeEvent(node_id, NodeStatus.COMPLETED, result, attempt=attempt)
        mine = entry.node_children.get(node_id)
        if mine is not None and mine[0] == (event.attempt or (old.attempts if old else 0)):
            if mine[1] > 0:
                return "wait", event
            if mine[2]:
                return "event", event._replace(
                    status=NodeStatus.FAILED, result_json=None, task_id=None, worker=None, reason=_child_failed(mine[2])
                )
        return "event", event

    def _child_step(
        self,
        session_id: str,
        entry: _Entry,
        old: models.NodeResult | None,
        event: base.NodeEvent,
        what: str,
        at: datetime,
    ) -> models.NodeOutcome:
        """A child event that changed no node's status, or a success that waits for children."""
        node = old or models.NodeResult(node_id=event.node_id, status=NodeStatus.PENDING)
        if what == "wait":
            if event.started_at is not None or node.status is NodeStatus.PENDING:
                start = base.NodeEvent(event.node_id, NodeStatus.RUNNING, attempt=event.attempt, task_id=event.task_id)
                node = _merge_node(old, start, event.started_at or at)
            if node.status is NodeStatus.RUNNING:
                result = None if event.result_json is None else json.loads(event.result_json)
                node = node.model_copy(update={"waiting": True, "result": result, "progress": None, "worker": None})
                self._set_node(entry, node)
                self._register(session_id, node, event.worker, at)
                info = self._recount(entry, at)
                if info.status is SessionStatus.PENDING:
                    info = self._move(info, SessionStatus.RUNNING, at)
                self._settle(entry, info)
        else:
            entry.info = entry.info.model_copy(update={"updated_at": max(at, entry.info.updated_at)})
        self._emit(entry, "child", at, node)
        return models.NodeOutcome(node=node, session=entry.info, previous_node_status=old.status if old else None)

    def _progress(
        self, entry: _Entry, old: models.NodeResult | None, event: base.NodeEvent, at: datetime
    ) -> models.NodeOutcome:
        """A running node's progress report: counted only while that attempt of that task runs
        (``record_nodes.lua``: progress_applies); it changes nothing else."""
        applies = (
            old is not None
            and old.status is NodeStatus.RUNNING
            and not old.waiting
            and not (event.task_id and old.task_id and event.task_id != old.task_id)
            and (event.attempt is None or event.attempt >= old.attempts)
        )
        if old is None or not applies:
            return models.NodeOutcome(
                node=old or models.NodeResult(node_id=event.node_id, status=NodeStatus.PENDING), session=entry.info
            )
        node = old.model_copy(update={"progress": event.progress})
        self._set_node(entry, node)
        entry.info = self._recount(entry, at)
        self._emit(entry, "progress", at, node)
        return models.NodeOutcome(node=node, session=entry.info, previous_node_status=old.status)

    def _skip_after(
        self, entry: _Entry, node: models.NodeResult, old: models.NodeResult | None, at: datetime
    ) -> list[models.NodeResult]:
        """Mark ``skipped`` what will never run now that ``node`` ended (see tracker.structure.skips)."""
        found = entry.links
        if found is None or not node.status.is_terminal or (old is not None and old.status is node.status):
            return []

        def status_of(node_id: str) -> NodeStatus | None:
            known = entry.nodes.get(node_id)
            return known.status if known else None

        marked = []
        for node_id, reason in skips(
            lambda n: (found.after.get(n, []), found.errbacks.get(n, [])),
            lambda n: found.handles.get(n, []),
            status_of,
            node.node_id,
            node.status,
        ):
            skipped = entry.nodes[node_id].model_copy(
                update={"status": NodeStatus.SKIPPED, "finished_at": at, "reason": reason}
            )
            self._set_node(entry, skipped)
            marked.append(skipped)
        return marked

    def _register(self, session_id: str, node: models.NodeResult, worker: str | None, now: datetime) -> None:
        # The same holder registry the Redis scripts keep: a start by a worker adds the node to
        # that worker's set (and is a sign of life), any other status takes it out.
        if worker is None or not is_worker_id(worker):
            return
        held = self._held.setdefault(worker, set())
        if node.status is NodeStatus.RUNNING and node.worker == worker:
            held.add((session_id, node.node_id))
            self._workers[worker] = now
        else:
            held.discard((session_id, node.node_id))

    def heartbeat(self, worker: str | None, now: datetime, sessions: Sequence[str] = ()) -> None:
        with self._lock:
            if worker is not None:
                self._workers[worker_id(worker)] = now
            for session_id in sessions:
                entry = self._sessions.get(session_id)
                if entry is not None and not entry.info.status.is_terminal:
                    entry.alive_at = now

    def retire(self, worker: str) -> None:
        with self._lock:
            if not self._held.get(worker):
                self._held.pop(worker, None)
                self._workers.pop(worker, None)
                self._suspects.pop(worker, None)

    def get_children(self, session_id: str) -> list[models.ChildSession]:
        with self._lock:
            entry = self._sessions.get(session_id)
            children = entry.children.items() if entry is not None else []
            return [
                models.ChildSession(session_id=child, node_id=node, attempt=attempt, child_failure=policy, status=state)
                for child, (node, attempt, policy, state) in children
            ]

    def get_failures(self, session_id: str) -> list[models.FailureGroup]:
        with self._lock:
            groups = self._entry(session_id).failures.items()
            return [
                models.FailureGroup(
                    error_type=kind, count=n, first_message=text, first_at=first, last_at=last, node_ids=ids
                )
                for kind, (n, text, first, last, ids) in groups
            ]

    def list_workers(self, limit: int) -> list[models.WorkerInfo]:
        with self._lock:
            # As Redis orders a ZREVRANGE: highest score first, equal scores by member, last first.
            newest = sorted(self._workers.items(), key=lambda item: (item[1], item[0]), reverse=True)[:limit]
            held = {worker: sorted(self._held.get(worker, ())) for worker, _ in newest}
        return [
            models.WorkerInfo(
                worker=worker,
                last_seen_at=seen_at,
                running=len(held[worker]),
                nodes=[
                    models.HeldNode(session_id=sid, node_id=nid) for sid, nid in held[worker][: base.WORKER_NODES_SHOWN]
                ],
            )
            for worker, seen_at in newest
        ]

    def watched_children(self, limit: int) -> list[base.ChildWatch]:
        with self._lock:
            return list(self._watched)[:limit]

    def unwatch_child(self, watch: base.ChildWatch) -> None:
        with self._lock:
            self._watched.pop(watch, None)

    def reap_lost(
        self, now: datetime, stale_after_s: float, max_runtime_s: float | None = None, requeued: bool = False
    ) -> list[models.NodeOutcome]:
        outcomes: list[models.NodeOutcome] = []
        with self._lock:
            seen = {worker: _ms(at) for worker, at in self._workers.items()}
            silent = base.silent_workers(seen, self._suspects, self._alive, _ms(now), round(stale_after_s * 1000))
            self._suspects, self._alive = silent.suspects, silent.alive
            if silent.due:
                self._reaped_at = now
            for worker, seen_at in list(self._workers.items()):
                due = worker in silent.due
                if not due and max_runtime_s is None:
                    continue
                for session_id, node_id in sorted(self._held.get(worker, set())):
                    entry = self._sessions.get(session_id)
                    node = entry.nodes.get(node_id) if entry else None
                    self._held[worker].discard((session_id, node_id))
                    if entry is None or node is None or node.status is not NodeStatus.RUNNING or node.worker != worker:
                        continue
                    status = NodeStatus.LOST
                    if due:
                        reason = base.lost_reason(worker, seen_at, now)
                        if requeued:
                            status, reason = NodeStatus.PENDING, base.requeued_reason(worker, seen_at, now)
                    elif node.started_at is not None and (now - node.started_at).total_seconds() > max_runtime_s:  # type: ignore[operator]
                        reason = f"ran longer than the {max_runtime_s:g} s limit on {worker}"
                    else:
                        self._held[worker].add((session_id, node_id))
                        continue
                    event = base.NodeEvent(node_id=node_id, status=status, reason=reason)
                    outcomes.append(self.record_node(session_id, event, now))
                if due and not self._held.get(worker):
                    self._held.pop(worker, None)
                    self._suspects.pop(worker, None)
                    del self._workers[worker]
        return outcomes

    def get_nodes(
        self, session_id: str, status: NodeStatus | None = None, cursor: str | None = None, limit: int = 100
    ) -> models.NodePage:
        if status is not None:
            after = base.status_cursor(cursor)
            with self._lock:
                every = self._entry(session_id).nodes
                found = sorted(n for n, node in every.items() if node.status is status and n > after)
                page = [every[n] for n in found[:limit]]
            return models.NodePage(nodes=page, next_cursor=found[limit - 1] if len(found) > limit else None)
        with self._lock:
            nodes = list(self._entry(session_id).nodes.values())
        start = base.offset_cursor(cursor)
        end = start + limit
        return models.NodePage(nodes=nodes[start:end], next_cursor=str(end) if end < len(nodes) else None)

    def get_node(self, session_id: str, node_id: str) -> models.NodeResult:
        with self._lock:
            node = self._entry(session_id).nodes.get(node_id)
        if node is None:
            raise errors.NodeNotFoundError(session_id, node_id)
        return node

    def list_sessions(
        self, where: base.SessionFilter = base.EVERY_SESSION, cursor: str | None = None, limit: int = 50
    ) -> models.SessionPage:
        tag, path = where.tag, where.path
        with self._lock:
            infos = sorted(
                (e.info for e in self._sessions.values()), key=lambda i: (i.created_at, i.session_id), reverse=True
            )
        # As the Redis store reads one index (a tag's, the paths', or all) and sifts the rest.
        if tag is not None:
            infos = [i for i in infos if tag in i.tags]
        elif path is not None:  # by path, then newest first (the paths index's order)
            infos = sorted((i for i in infos if i.canvas_path.startswith(path)), key=lambda i: i.canvas_path)
        start = base.offset_cursor(cursor)
        end = start + limit
        page = [i for i in infos[start:end] if where.matches(i)]
        return models.SessionPage(sessions=page, next_cursor=str(end) if end < len(infos) else None)

    def delete(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def remove_expired(self, now: datetime, timeout_s: float, finished_ttl_s: float | None = None) -> int:
        ended_s = timeout_s if finished_ttl_s is None else finished_ttl_s
        with self._lock:
            # The last sign of life: a change, or a heartbeat of a worker running one of its nodes.
            expired = [
                sid
                for sid, e in self._sessions.items()
                if (now - max(e.info.updated_at, e.alive_at or e.info.updated_at)).total_seconds()
                > (ended_s if e.info.status.is_terminal else timeout_s)
            ]
            for sid in expired:
                del self._sessions[sid]
            return len(expired)

    def end_stalled(self, now: datetime, stalled_after_s: float, reason: str) -> list[models.BatchOutcome]:
        outcomes: list[models.BatchOutcome] = []
        with self._lock:
            reaped_at = self._reaped_at
            if reaped_at is None:
                return outcomes
            for entry in self._sessions.values():
                info = entry.info
                last = max(info.updated_at, entry.alive_at or info.updated_at)
                if (
                    info.status.is_terminal
                    or info.running_nodes + info.retrying_nodes
                    or info.created_at >= reaped_at
                    or (now - last).total_seconds() <= stalled_after_s
                ):
                    continue
                waiting = [node for node in entry.nodes.values() if not node.status.is_terminal]
                if not waiting:
                    continue  # its missing nodes were never recorded
                for node in waiting:
                    lost = {"status": NodeStatus.LOST, "finished_at": now, "result": None, "reason": reason}
                    self._set_node(entry, node.model_copy(update=lost))
                info = self._recount(entry, now)
                if info.status is SessionStatus.PENDING:
                    info = self._move(info, SessionStatus.RUNNING, now)
                counts = _counts(entry, info)
                finished = states.finish_status(*counts)
                self._settle(entry, self._move(info, finished, now) if finished is not None else info)
                self._emit(entry, "status", now)
                first_failure = None if entry.failure_told else waiting[0].node_id
                entry.failure_told = True
                outcomes.append(models.BatchOutcome.of(entry.info, finished=finished, first_failure=first_failure))
        return outcomes

    def read_events(
        self, session_id: str, after: str | None = None, limit: int = 100, block_ms: int | None = None
    ) -> list[models.SessionEvent]:
        after_key = _event_key(after) if after else (-1, -1)
        deadline = time.monotonic() + (block_ms or 0) / 1000.0
        with self._lock:
            while True:
                events = [ev for ev in self._entry(session_id).events if _event_key(ev.id) > after_key][:limit]
                remaining = deadline - time.monotonic()
                if events or not block_ms or remaining <= 0:
                    return events
                self._changed.wait(remaining)

    def asynchronous(self) -> ThreadedAsyncStore:
        return ThreadedAsyncStore(self, inline=True)

    def close(self) -> None:
        with self._lock:
            self._changed.notify_all()


def _counts(entry: _Entry, info: models.SessionInfo) -> tuple[int, int, int, int, int, int]:
    """The arguments of :func:`states.finish_status` for ``info`` (the counters of ``entry``)."""
    counts = (info.completed_nodes, info.failed_nodes, info.cancelled_nodes, info.node_count, info.skipped_nodes)
    return (*counts, len(entry.unneeded))


def _finished(info: models.SessionInfo) -> int:
    """How many of the session's nodes have a result."""
    return info.completed_nodes + info.failed_nodes + info.cancelled_nodes + info.skipped_nodes


def _regroup(failures: dict[str, list[Any]], old: models.NodeResult | None, node: models.NodeResult) -> None:
    """Move a node between the failure groups as its status changes (``common.lua``: regroup)."""
    was = None if old is None else states.failure_type(old.status, old.error.type if old.error else None)
    now = states.failure_type(node.status, node.error.type if node.error else None)
    if was == now:
        return
    if was is not None and was in failures:
        group = failures[was]
        group[0] -= 1
        if group[0] <= 0:
            del failures[was]
        elif node.node_id in group[4]:
            group[4].remove(node.node_id)
    if now is not None:
        at = node.finished_at or node.started_at
        assert at is not None
        joined = failures.get(now)
        if joined is None:
            message = node.error.message if node.error else (node.reason or "")
            failures[now] = [1, message, at, at, [node.node_id]]
        else:
            joined[0] += 1
            joined[3] = max(joined[3], at)
            if len(joined[4]) < states.FAILURE_SAMPLE:
                joined[4].append(node.node_id)


def _ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def _event_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def _child_failed(failed: str) -> str:
    """The reason of a node whose child session did not complete (``failed``: its id and end)."""
    return f"child session {failed}"


def _merge_node(old: models.NodeResult | None, event: base.NodeEvent, now: datetime) -> models.NodeResult:
    """The node after ``event``: the rule of :func:`tracker.states.merge_node_status`, plus details."""
    status = states.merge_node_status(old.status if old else None, event.status)
    if old is not None and states.is_stale_report(event.status, event.task_id, old.task_id):
        status = old.status
    before = old or models.NodeResult(node_id=event.node_id, status=NodeStatus.PENDING)
    attempts = before.attempts
    if event.attempt is not None:
        attempts = max(attempts, event.attempt)
    elif event.status is NodeStatus.RUNNING and status is NodeStatus.RUNNING:
        attempts += 1
    if status is not NodeStatus.PENDING:
        attempts = max(attempts, 1)
    if status is not event.status or before.status is NodeStatus.COMPLETED:
        # A start after a terminal result, or a duplicate success: only the attempt count moves.
        return before.model_copy(update={"attempts": attempts})
    update: dict[str, Any] = {
        "status": status, "attempts": attempts, "error": event.error, "reason": event.reason, "progress": None,
        "waiting": False,
    }  # fmt: skip
    if event.task_id is not None:
        update["task_id"] = event.task_id
    if event.worker is not None:
        update["worker"] = event.worker
    if status is NodeStatus.RUNNING:
        update.update(started_at=now, finished_at=None)
    elif status.is_terminal:
        update["finished_at"] = now
        update["result"] = json.loads(event.result_json) if event.result_json is not None else None
    return before.model_copy(update=update)
