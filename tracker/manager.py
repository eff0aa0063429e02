"""SessionManager: the seed's API over any storage adapter.

Every operation is written once, as a method of :class:`Operations`: it validates the input,
builds the one store call (a :class:`~tracker.storage.base.StoreCall`, typed against the storage
Protocol) and says how to read its answer. :class:`SessionManager` runs operations against the
store's awaitable flavour; :class:`SyncSessionManager` (``manager.sync``) runs the same operations
against the blocking store, for Celery signal handlers. Each manager lists its verbs as
``name = verb(Operations.name)``: same names, same arguments, same answers. Neither manager
holds session state: the store is the only truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import (
    Any,
    ClassVar,
    Concatenate,
    Generic,
    NamedTuple,
    ParamSpec,
    Self,
    TypedDict,
    TypeVar,
    Unpack,
    overload,
)

from tracker import states, validation
from tracker.config import TrackerSettings
from tracker.errors import SessionNotFoundError, TrackerValidationError
from tracker.models import (
    AddOutcome,
    BatchOutcome,
    ChildSession,
    FailureGroup,
    NodeError,
    NodeOutcome,
    NodePage,
    NodeResult,
    NodeSpec,
    ResumeOutcome,
    SessionEvent,
    SessionInfo,
    SessionPage,
    TransitionOutcome,
    WorkerInfo,
)
from tracker.states import TERMINAL_NODE_STATUSES, NodeStatus, SessionStatus
from tracker.storage.base import (
    CHILD_POLICIES,
    AsyncStore,
    ChildLink,
    ChildWatch,
    NewNodes,
    NodeEvent,
    ResumeChoice,
    SessionFilter,
    SessionStorageAdapter,
    StoreCall,
    store_call,
)
from tracker.structure import Tree, check_tree, has_links

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

Clock = Callable[[], datetime]
"""Returns the current time as an aware UTC datetime. Tests replace it."""

Store = SessionStorageAdapter


def utc_now() -> datetime:
    """The real clock."""
    return datetime.now(UTC)


class Plan(NamedTuple, Generic[T]):
    """One store call and how to read its answer."""

    call: StoreCall[Any]
    then: Callable[[Any], T]


def plan(call: StoreCall[R], then: Callable[[R], T]) -> Plan[T]:
    """``call``, its answer read by ``then`` (typed: ``then`` takes what the verb returns)."""
    return Plan(call, then)


def answer(call: StoreCall[T]) -> Plan[T]:
    """``call``, its answer returned as it is."""
    return Plan(call, _same)


def _same(value: T) -> T:
    return value


class NodeDetails(TypedDict, total=False):
    """What a node event may say besides its node, status and result."""

    error: NodeError | BaseException | None
    #: The attempt this event belongs to (1 = first run); None: the store counts starts.
    attempt: int | None
    task_id: str | None
    #: The worker process, ``hostname:pid``.
    worker: str | None
    #: Why a node is ``lost``, ``cancelled`` or ``skipped``.
    reason: str | None
    #: The same id on every retry of one call (see :meth:`Operations.record_node`).
    request_id: str | None
    #: When it happened (default: when it is recorded).
    at: datetime | None
    #: With a result: the node's start, recorded with it.
    started_at: datetime | None
    #: With status ``running``: how far the running task is (0..1); the event changes nothing else.
    progress: float | None


class Operations:
    """The logic of every operation, free of I/O: both managers run these plans.

    Each method's docstring is the documentation of the manager verb of the same name.
    """

    def __init__(self, settings: TrackerSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock

    # -- the seed's verbs ---------------------------------------------------------------------

    def create_session(
        self,
        canvas_path: str,
        node_count: int,
        metadata: dict[str, Any] | None = None,
        nodes: Sequence[NodeSpec] = (),
        session_id: str | None = None,
        structure: Tree | None = None,
        parent: tuple[str, str] | None = None,
        tags: Sequence[str] | None = None,
    ) -> Plan[str]:
        """Create a ``pending`` session and return its id (a UUID4 string, 36 characters).

        Args:
            canvas_path: What the batch is (a canvas file path or any label), 1-1024 characters.
            node_count: How many nodes the batch has (1 to ``TRACKER_MAX_NODE_COUNT``).
            metadata: A JSON object kept with the session (<= 16 KiB).
            nodes: Nodes known up front (ids, task ids, signatures for resume).
            session_id: Use this id instead of a new UUID4 (dispatch stamps it before creating).
            structure: Which node feeds which (a canvas tree, see :mod:`tracker.structure`; every
                node listed in ``nodes``): nodes that will never run are marked ``skipped`` as soon
                as that is known, and resume re-sends with it.
            parent: ``(session_id, node_id)`` of the node whose task opens this session: a child
                session, watched until its end is told to that node (``tracker.celery`` does).
            tags: Labels to find it by (``list_sessions(tag=...)``): at most 10, each 1-64 letters,
                digits or ``_.:@/+=-`` (``["nightly", "customer:42"]``).

        Raises:
            TrackerValidationError: bad input; nothing was stored.
            SessionExistsError: ``session_id`` is taken.
        """
        path = validation.canvas_path(canvas_path)
        count = validation.node_count(node_count, self.settings.max_node_count)
        meta = validation.metadata(metadata)
        sid = validation.session_id(session_id) if session_id is not None else str(uuid.uuid4())
        labels = validation.tags(tags, sid)
        node_ids, signatures = self._specs(nodes, sid)
        if len(node_ids) > count:
            raise TrackerValidationError(
                "nodes", len(node_ids), f"node ids must be distinct and at most node_count ({count})", sid
            )
        if structure is not None:
            structure = check_tree(structure, node_ids, self.settings.max_canvas_depth)
            if len(node_ids) != count:
                raise TrackerValidationError("nodes", len(node_ids), f"a structure needs all {count} nodes", sid)
        parent_sid = parent_node = None
        if parent is not None:
            if not isinstance(parent, tuple) or len(parent) != 2:
                raise TrackerValidationError("parent", parent, "expected (session_id, node_id)", sid)
            parent_sid, parent_node = validation.session_id(parent[0]), validation.node_id(parent[1], sid)
        now = self.clock()
        info = SessionInfo(
            session_id=sid, canvas_path=path, node_count=count, created_at=now, updated_at=now, metadata=meta,
            parent_session_id=parent_sid, parent_node_id=parent_node, tags=labels,
        )  # fmt: skip
        return plan(store_call(Store.create, info, NewNodes(tuple(nodes), signatures, structure)), lambda _: sid)

    def _specs(self, nodes: Sequence[NodeSpec], sid: str) -> tuple[list[str], list[str | None]]:
        """The node ids (distinct) and the signatures (each encoded once: checked here, stored as
        they are) of ``nodes``."""
        if not isinstance(nodes, list | tuple):
            raise TrackerValidationError("nodes", nodes, "expected a list of NodeSpec", sid)
        signatures: list[str | None] = []
        for spec in nodes:
            if not isinstance(spec, NodeSpec):
                raise TrackerValidationError("nodes", spec, "expected NodeSpec items", sid)
            validation.label(spec.task_id, "task_id", sid)
            signatures.append(
                None
                if spec.signature is None
                else validation.json_text(spec.signature, "signature", self.settings.max_result_bytes, sid)
            )
        node_ids = [validation.node_id(spec.node_id, sid) for spec in nodes]
        if len(set(node_ids)) != len(node_ids):
            raise TrackerValidationError("nodes", len(node_ids), "node ids must be distinct", sid)
        return node_ids, signatures

    def add_nodes(self, session_id: str, nodes: Sequence[NodeSpec], structure: Tree | None = None) -> Plan[AddOutcome]:
        """Add ``nodes`` to a session that has not ended, as ``pending``; ``node_count`` grows with
        them in one atomic step, so the session cannot end in between (it waits for them too).

        The same call again (every node in the session already) changes nothing and says which of
        them are still pending: a caller that died before sending them sends those.

        Args:
            nodes: The new nodes (ids, task ids, signatures for resume).
            structure: Which of them feeds which (a canvas tree of exactly these nodes, see
                :mod:`tracker.structure`): the session's structure grows with it.

        Returns:
            The session after it, whether the nodes were added now, and which are pending.

        Raises:
            TrackerValidationError: bad input, some (not all) of the nodes in the session already,
                or more than ``TRACKER_MAX_NODE_COUNT`` nodes in all; nothing changed.
            SessionNotFoundError: no such session.
            InvalidStateTransitionError: the session has ended.
        """
        sid = validation.session_id(session_id)
        node_ids, signatures = self._specs(nodes, sid)
        if not node_ids:
            raise TrackerValidationError("nodes", 0, "expected at least one NodeSpec", sid)
        if structure is not None:
            structure = check_tree(structure, node_ids, self.settings.max_canvas_depth)
        part = structure if structure is not None and has_links(structure) else None
        new = NewNodes(tuple(nodes), signatures, part)
        return answer(store_call(Store.add_nodes, sid, new, self.settings.max_node_count, self.clock()))

    def update_status(self, session_id: str, status: SessionStatus | str) -> Plan[dict[str, Any]]:
        """Move the session to ``status`` if the state machine allows it; return the new status dict.

        Raises:
            SessionNotFoundError, InvalidStateTransitionError, TrackerValidationError.
        """
        return plan(self.transition(session_id, status).call, lambda outcome: _status_after(outcome, self.clock()))

    def update_progress(self, session_id: str, progress_percent: float) -> Plan[dict[str, Any]]:
        """Set an explicit progress (0..100) on a session that has not ended; return its status dict.

        Raises:
            TrackerValidationError: NaN, infinite, below 0 or above 100.
            SessionNotFoundError, InvalidStateTransitionError: unknown or ended session.
        """
        sid = validation.session_id(session_id)
        value = validation.progress(progress_percent, sid)
        now = self.clock()
        return plan(store_call(Store.set_progress, sid, value, now), lambda info: info.seen_at(now).to_dict())

    def add_node_result(
        self,
        session_id: str,
        node_id: str,
        result: Any = None,
        *,
        status: NodeStatus | str = NodeStatus.COMPLETED,
        error: NodeError | BaseException | None = None,
        task_id: str | None = None,
        worker: str | None = None,
        attempt: int | None = None,
    ) -> Plan[dict[str, Any]]:
        """Record a node's result; the session's counters, progress and status follow.

        ``result`` may be a :class:`NodeResult`, whose fields are then used. The same result
        twice counts once; a failed node that later completes moves between the counters.

        Returns:
            The session's status dict after the result.

        Raises:
            TrackerValidationError: a bad id, a result that is not JSON or is over the size cap.
            NodeLimitError: more distinct nodes than ``node_count``.
            SessionNotFoundError: no such session.
        """
        sid = validation.session_id(session_id)
        if isinstance(result, NodeResult):
            event = self.valid_event(sid, **_details(result))
        else:
            event = self.valid_event(
                sid, node_id, status, result, error=error, task_id=task_id, worker=worker, attempt=attempt
            )
        now = self.clock()
        return plan(store_call(Store.record_nodes, sid, [event], now), lambda outcome: _status_after(outcome, now))

    def add_node_results(
        self, session_id: str, results: Mapping[str, Any] | Iterable[NodeResult]
    ) -> Plan[dict[str, Any]]:
        """Record many nodes' results in one store call (one round trip, one atomic step).

        ``results`` is ``{node_id: result}`` (each node completed) or :class:`NodeResult` items (their
        status, error and attempts are used). They are applied in order, as that many
        :meth:`add_node_result` calls would be; keep a call to a few thousand nodes.

        Returns:
            The session's status dict after the results.

        Raises:
            TrackerValidationError: any bad id or result (nothing is recorded).
            NodeLimitError: more distinct nodes than ``node_count`` (nothing is recorded).
            SessionNotFoundError: no such session.
        """
        sid = validation.session_id(session_id)
        if isinstance(results, Mapping):
            events = [self.valid_event(sid, nid, NodeStatus.COMPLETED, result) for nid, result in results.items()]
        elif isinstance(results, str | bytes) or not isinstance(results, Iterable):
            raise TrackerValidationError("results", results, "expected {node_id: result} or NodeResult items")
        else:
            events = []
            for node in results:
                if not isinstance(node, NodeResult):
                    raise TrackerValidationError("results", node, "expected NodeResult items", sid)
                events.append(self.valid_event(sid, **_details(node)))
        now = self.clock()
        return plan(store_call(Store.record_nodes, sid, events, now), lambda outcome: _status_after(outcome, now))

    def get_session(self, session_id: str) -> Plan[SessionInfo]:
        """The session as a model.

        Raises:
            SessionNotFoundError: unknown, expired or removed.
        """
        sid = validation.session_id(session_id)
        now = self.clock()
        return plan(store_call(Store.get, sid), lambda info: _found(sid, info).seen_at(now))

    def get_session_status(self, session_id: str) -> Plan[dict[str, Any]]:
        """The session's full state as a JSON-safe dict (one store read, O(1) in the node count).

        Raises:
            SessionNotFoundError: unknown, expired or removed.
            TrackerValidationError: not a UUID.
        """
        sid = validation.session_id(session_id)
        now = self.clock()
        return plan(store_call(Store.get, sid), lambda info: _found(sid, info).seen_at(now).to_dict())

    def is_session_expired(self, session_id: str) -> Plan[bool]:
        """True when the session was last updated longer ago than it is kept: ``session_timeout_s``
        seconds while it has not ended, ``finished_ttl_s`` once it has.

        Raises:
            SessionNotFoundError: the session is gone (already removed or expired in the store).
        """
        sid = validation.session_id(session_id)
        now = self.clock()
        return plan(store_call(Store.get, sid), lambda info: self._expired(_found(sid, info), now))

    def _expired(self, info: SessionInfo, now: datetime) -> bool:
        s = self.settings
        keep_s = s.finished_ttl_s if info.status.is_terminal else s.session_timeout_s
        return (now - info.updated_at).total_seconds() > keep_s

    def cleanup_expired_sessions(self) -> Plan[int]:
        """Remove every expired session (see :meth:`is_session_expired`); return how many were removed.
        Costs the sessions removed, not those kept."""
        s = self.settings
        call = store_call(Store.remove_expired, self.clock(), s.session_timeout_s, s.finished_ttl_s)
        return plan(call, _log_removed)

    # -- reading ------------------------------------------------------------------------------

    def get_nodes(
        self, session_id: str, status: NodeStatus | str | None = None, cursor: str | None = None, limit: int = 100
    ) -> Plan[NodePage]:
        """A page of the session's nodes, optionally only those in ``status`` (then a full page
        whenever that many are left, costing the page, not the session's size).

        Raises:
            SessionNotFoundError: no such session.
            TrackerValidationError: a bad status, limit, or a cursor no page handed out.
        """
        sid = validation.session_id(session_id)
        node_status = None if status is None else validation.member(NodeStatus, status, "status", sid)
        return answer(store_call(Store.get_nodes, sid, node_status, validation.cursor(cursor), _limit(limit)))

    def get_node(self, session_id: str, node_id: str) -> Plan[NodeResult]:
        """One node of the session: its status, result or error, attempts, worker and times (one
        store read, O(1) in the node count).

        Raises:
            SessionNotFoundError: no such session.
            NodeNotFoundError: the session has no record of the node (not created with it, and no
                event of it recorded yet).
            TrackerValidationError: a bad session or node id.
        """
        sid = validation.session_id(session_id)
        return answer(store_call(Store.get_node, sid, validation.node_id(node_id, sid)))

    def list_sessions(
        self,
        status: SessionStatus | str | None = None,
        cursor: str | None = None,
        limit: int = 50,
        *,
        tag: str | None = None,
        path: str | None = None,
    ) -> Plan[SessionPage]:
        """A page of sessions, newest first, optionally only those in ``status``, with ``tag``, or
        whose canvas path starts with ``path`` (``pipelines/`` finds ``pipelines/etl.canvas`` and
        ``pipelines/nightly/load.canvas``; ``thumbs-2026-`` finds ``thumbs-2026-11-29``). With
        ``path`` alone they come by canvas path, newest first within one.

        A tag or a path prefix reads its own index, which costs the page; ``status`` (and a path
        given with a tag) sifts that page, which may then hold fewer than ``limit`` sessions.

        Raises:
            TrackerValidationError: a bad status, tag, path, cursor or limit.
        """
        where = SessionFilter(
            status=None if status is None else validation.member(SessionStatus, status, "status"),
            tag=None if tag is None else validation.tag(tag),
            path=None if path is None else validation.path_filter(path),
        )
        now = self.clock()
        call = store_call(Store.list_sessions, where, validation.cursor(cursor), _limit(limit))
        return plan(call, lambda page: _seen_page(page, now))

    def read_events(
        self, session_id: str, after: str | None = None, limit: int = 100, block_ms: int | None = None
    ) -> Plan[list[SessionEvent]]:
        """Events of the session after the event id ``after``, waiting up to ``block_ms`` for one.

        The wait is capped 250 ms below ``redis_socket_timeout_s``, so that the store never cuts it.
        """
        sid = validation.session_id(session_id)
        if after is not None:
            validation.event_id(after)
        wait_ms = validation.block_ms(block_ms, sid)
        if wait_ms is not None:
            wait_ms = min(wait_ms, max(0, round(self.settings.redis_socket_timeout_s * 1000) - 250))
        return answer(store_call(Store.read_events, sid, after, _limit(limit), wait_ms))

    def get_structure(self, session_id: str) -> Plan[Tree | None]:
        """The canvas tree the session was dispatched with (see :mod:`tracker.structure`), or None."""
        return answer(store_call(Store.get_structure, validation.session_id(session_id)))

    def delete_session(self, session_id: str) -> Plan[bool]:
        """Remove a session now; False when it did not exist."""
        return answer(store_call(Store.delete, validation.session_id(session_id)))

    # -- maintenance ----------------------------------------------------------------------------

    def reap_lost_nodes(self, requeued: bool = False) -> Plan[list[NodeOutcome]]:
        """Mark ``lost`` the running nodes of worker processes silent for ``worker_stale_after_s`` s,
        once a reaper has seen them silent that long again (a live worker back from a store outage
        beats meanwhile), and nodes running longer than ``node_max_runtime_s``, when set.

        Args:
            requeued: The dead workers' messages come back from the broker (``task_acks_late``):
                their nodes go back to ``pending`` instead, counted when their tasks run again.

        Returns:
            What was marked.
        """
        s = self.settings
        requeued = validation.flag(requeued, "requeued")
        return answer(store_call(Store.reap_lost, self.clock(), s.worker_stale_after_s, s.node_max_runtime_s, requeued))

    def end_stalled_sessions(self, stalled_after_s: float) -> Plan[list[BatchOutcome]]:
        """End the sessions a message lost with a dead worker left waiting: see
        :meth:`SessionStorageAdapter.end_stalled`. Their unfinished nodes become ``lost``.

        Args:
            stalled_after_s: How long nothing of such a session may run or change first; longer
                than the broker takes to redeliver a dead worker's messages
                (:func:`tracker.celery.maintain` derives it from the app's broker settings).

        Returns:
            One outcome per session ended.
        """
        limit = validation.positive_seconds(stalled_after_s, "stalled_after_s")
        reason = (
            f"never ran: nothing of its session ran or changed for {limit:g} s after a worker died "
            "(its message was lost with the worker, or is still queued: it is counted if it runs)"
        )
        return answer(store_call(Store.end_stalled, self.clock(), limit, reason))

    # -- what the Celery glue records (internal) ------------------------------------------------

    def transition(self, session_id: str, status: SessionStatus | str) -> Plan[TransitionOutcome]:
        """:meth:`update_status`, answering the previous status too (what cancel needs)."""
        sid = validation.session_id(session_id)
        target = validation.member(SessionStatus, status, "status", sid)
        return answer(store_call(Store.transition, sid, target, states.allowed_from(target), self.clock()))

    def reopen_session(
        self, session_id: str, retry_failed: bool = True, nodes: Sequence[str] | None = None
    ) -> Plan[ResumeOutcome]:
        """Take a session back to ``running`` and reset its unfinished nodes (the store's side of
        :func:`tracker.celery.resume_session`, which then re-sends the reset nodes' tasks).

        Args:
            retry_failed: Reset failed nodes too.
            nodes: Reset exactly these nodes instead (a plan made from the session's structure).

        Raises:
            ResumePlanChanged: one of ``nodes`` completed meanwhile; nothing changed.
        """
        sid = validation.session_id(session_id)
        retry_failed = validation.flag(retry_failed, "retry_failed")
        chosen = None if nodes is None else list(dict.fromkeys(validation.node_id(node, sid) for node in nodes))
        # Resume is the one way out of an ended session; a stalled running or pending one may be
        # resumed too (its unfinished nodes are re-sent). Only a completed session is final.
        allowed = states.allowed_from(SessionStatus.RUNNING, resume=True) | {SessionStatus.RUNNING}
        choice = ResumeChoice(retry_failed, task_id_base=str(uuid.uuid4())[:24], nodes=chosen)
        return answer(store_call(Store.resume, sid, choice, frozenset(allowed), self.clock()))

    def record_node(
        self,
        session_id: str,
        node_id: str,
        status: NodeStatus | str,
        result: Any = None,
        **details: Unpack[NodeDetails],
    ) -> Plan[NodeOutcome]:
        """Record any node event (running, retrying, completed, failed, cancelled, lost) in full.

        ``request_id``: the same id on every retry of one event tells the store it is that call
        again (so the retry that ends the session still gets ``finished``, exactly once).
        """
        sid = validation.session_id(session_id)
        event = self.valid_event(sid, node_id, status, result, **details)
        return answer(store_call(Store.record_node, sid, event, self.clock()))

    def record_nodes(
        self, session_id: str, events: Sequence[NodeEvent], *, request_id: str | None = None, trusted: bool = False
    ) -> Plan[BatchOutcome]:
        """Record node events (from :meth:`node_event`) of one session in one store call, in order.

        ``request_id``: the same id on every retry of one call (see :meth:`record_node`).
        ``trusted``: every event comes as :meth:`node_event` built it (the signal handlers'
        writer), so it is not checked a second time.
        """
        sid = validation.session_id(session_id)
        request_id = validation.label(request_id, "request_id", sid)
        if isinstance(events, str | bytes) or not isinstance(events, Sequence):
            raise TrackerValidationError("events", events, "expected a sequence of NodeEvent", sid)
        if not trusted:
            for event in events:
                self.check_event(event, sid)
        return answer(store_call(Store.record_nodes, sid, list(events), self.clock(), request_id))

    def heartbeat(self, worker: str | None, sessions: Sequence[str] = ()) -> Plan[None]:
        """Note that worker process ``worker`` (``hostname:pid``) is alive now, and keep the
        ``sessions`` it runs nodes of from expiring (however long their nodes run). ``worker``
        None: only keep the sessions alive (parents waiting for their child sessions)."""
        sids = [validation.session_id(sid) for sid in sessions]
        who = None if worker is None else validation.worker_id(worker)
        return answer(store_call(Store.heartbeat, who, self.clock(), sids))

    def retire(self, worker: str) -> Plan[None]:
        """Worker process ``worker`` (``hostname:pid``) stopped cleanly: see
        :meth:`SessionStorageAdapter.retire`."""
        return answer(store_call(Store.retire, validation.worker_id(worker)))

    def get_children(self, session_id: str) -> Plan[list[ChildSession]]:
        """The child sessions the session's nodes' tasks opened (``dispatch`` inside a tracked
        task), by node: each one's id, node, and status (``open`` until it ended).

        Raises:
            TrackerValidationError: a bad id.
        """
        return plan(store_call(Store.get_children, validation.session_id(session_id)), _by_node)

    def get_failures(self, session_id: str) -> Plan[list[FailureGroup]]:
        """The session's failed and lost nodes grouped by cause, most first: for each error type
        (``lost`` for nodes whose worker vanished, ``unknown`` without an error) how many nodes
        have it now, the first message, when it was first and last seen, and the first few node
        ids. Kept with the counters in the same atomic step: a node that later completes (or is
        resumed) leaves its group. ``resume_session(id, error_type=...)`` re-runs one group.

        Raises:
            SessionNotFoundError: no such session.
            TrackerValidationError: a bad id.
        """
        sid = validation.session_id(session_id)
        return plan(store_call(Store.get_failures, sid), _most_first)

    def list_workers(self, limit: int = 200) -> Plan[list[WorkerInfo]]:
        """The worker processes the tracker has heard from, newest heartbeat first: when each was
        last seen, how many nodes it runs now and up to 20 of them. ``WorkerInfo.seen_at(now,
        worker_stale_after_s)`` tells a live worker from a silent one by the reaper's rule; a dead
        worker stays listed until a reaper has taken its nodes.

        Raises:
            TrackerValidationError: a limit outside 1..1000.
        """
        return answer(store_call(Store.list_workers, _limit(limit)))

    def watched_children(self, limit: int = 1000) -> Plan[list[ChildWatch]]:
        """Child sessions whose end was not told to their parent yet, oldest first (for ``maintain``)."""
        return answer(store_call(Store.watched_children, _limit(limit)))

    def unwatch_child(self, watch: ChildWatch) -> Plan[None]:
        """Stop watching a child whose end was told to its parent."""
        if not isinstance(watch, ChildWatch):
            raise TrackerValidationError("watch", watch, "expected a ChildWatch")
        validation.session_id(watch.child_id)
        validation.session_id(watch.parent_session_id)
        validation.node_id(watch.parent_node_id)
        return answer(store_call(Store.unwatch_child, watch))

    def node_event(
        self,
        session_id: str,
        node_id: str,
        status: NodeStatus | str,
        result: Any = None,
        **details: Unpack[NodeDetails],
    ) -> NodeEvent:
        """A validated node event for :meth:`record_nodes` (no I/O).

        Raises:
            TrackerValidationError: a bad id, status, detail, or a result that is not JSON or too big.
        """
        return self.valid_event(validation.session_id(session_id), node_id, status, result, **details)

    def valid_event(
        self, sid: str, node_id: str, status: NodeStatus | str, result: Any = None, **details: Unpack[NodeDetails]
    ) -> NodeEvent:
        """:meth:`node_event` in a session whose id ``sid`` is checked already."""
        node_status = validation.member(NodeStatus, status, "status", sid)
        result_json = None
        if result is not None and node_status in TERMINAL_NODE_STATUSES:
            result_json = validation.json_text(result, "result", self.settings.max_result_bytes, sid)
        return self.event(sid, node_id, node_status, result_json, **details)

    def event(
        self, sid: str, node_id: str, status: NodeStatus, result_json: str | None, **details: Unpack[NodeDetails]
    ) -> NodeEvent:
        """:meth:`node_event` once the session id and the status are checked and the result is
        encoded (``result_json``, from :func:`validation.json_text`, is taken as it is): the
        signal handlers encode a result in the task's thread, and build the event later."""
        error, reason = details.get("error"), details.get("reason")
        if reason is not None:
            reason = validation.optional_text(reason, "reason", self.settings.max_error_chars, sid) or None
        return NodeEvent(
            validation.node_id(node_id, sid),
            status,
            result_json,
            None if error is None else self._error(error, sid),
            validation.attempt(details.get("attempt"), sid),
            validation.label(details.get("task_id"), "task_id", sid),
            validation.label(details.get("worker"), "worker", sid),
            reason,
            validation.label(details.get("request_id"), "request_id", sid),
            validation.moment(details.get("at"), "at", sid),
            validation.moment(details.get("started_at"), "started_at", sid),
            self._progress(details.get("progress"), status, sid),
        )

    def child_event(self, sid: str, node_id: str, link: ChildLink) -> NodeEvent:
        """The event that tells node ``node_id`` of session ``sid`` (checked already) that a child
        session its task opened was opened, or ended (:class:`ChildLink`)."""
        self._child(link, sid)
        return NodeEvent(validation.node_id(node_id, sid), NodeStatus.RUNNING, child=link)

    @staticmethod
    def _child(link: object, sid: str) -> None:
        if not isinstance(link, ChildLink):
            raise TrackerValidationError("child", link, "expected a ChildLink", sid)
        validation.session_id(link.child_id)
        validation.attempt(link.attempt, sid)
        if link.policy not in CHILD_POLICIES:
            raise TrackerValidationError("child_failure", link.policy, f"expected one of {CHILD_POLICIES}", sid)
        if link.ended is not None and not validation.member(SessionStatus, link.ended, "ended", sid).is_terminal:
            raise TrackerValidationError("ended", link.ended, "expected the status a session ended with", sid)

    @staticmethod
    def _progress(value: object, status: NodeStatus, sid: str) -> float | None:
        if value is None:
            return None
        if status is not NodeStatus.RUNNING:
            raise TrackerValidationError("progress", value, "only a running node reports progress", sid)
        return validation.fraction(value, sid=sid)

    def check_event(self, event: object, sid: str) -> None:
        """Refuse an event :meth:`node_event` would not have built (a NodeEvent made by hand)."""
        if not isinstance(event, NodeEvent):
            raise TrackerValidationError("events", event, "expected NodeEvent items (see node_event)", sid)
        validation.node_id(event.node_id, sid)
        if type(event.status) is not NodeStatus:
            raise TrackerValidationError("status", event.status, "expected a NodeStatus", sid)
        validation.attempt(event.attempt, sid)
        validation.label(event.task_id, "task_id", sid)
        validation.label(event.worker, "worker", sid)
        validation.label(event.request_id, "request_id", sid)
        validation.moment(event.at, "at", sid)
        validation.moment(event.started_at, "started_at", sid)
        if event.child is not None:
            self._child(event.child, sid)
        if event.progress is not None and self._progress(event.progress, event.status, sid) != event.progress:
            raise TrackerValidationError("progress", event.progress, "expected a fraction with at most 4 decimals", sid)
        cap = self.settings.max_error_chars
        if event.reason is not None and (
            not isinstance(event.reason, str) or len(event.reason) > cap or not validation.is_utf8(event.reason)
        ):
            raise TrackerValidationError(
                "reason", event.reason, f"expected a UTF-8 string of at most {cap} characters", sid
            )
        if event.error is not None and self._error(event.error, sid) is not event.error:
            raise TrackerValidationError("error", event.error, "expected a NodeError within the caps", sid)
        if event.result_json is not None:
            if (
                not isinstance(event.result_json, str)
                or len(event.result_json.encode()) > self.settings.max_result_bytes
            ):
                raise TrackerValidationError("result", event.node_id, "expected JSON text within max_result_bytes", sid)
            try:
                json.loads(event.result_json)
            except ValueError:
                raise TrackerValidationError("result", event.result_json[:80], "not JSON text", sid) from None

    def _error(self, error: NodeError | BaseException | None, sid: str) -> NodeError | None:
        cap = self.settings.max_error_chars
        if error is None:
            return None
        if isinstance(error, NodeError):
            kind, message = error.type[: validation.MAX_LABEL_CHARS], error.message[:cap]
            if kind == error.type and message == error.message and validation.is_utf8(kind + message):
                return error
        elif isinstance(error, BaseException):
            # Only the class name and the text are kept: nothing that could be imported back.
            kind, message = type(error).__name__, str(error)[:cap]
        else:
            raise TrackerValidationError("error", error, "expected an exception or a NodeError", sid)
        return NodeError(type=validation.storable_text(kind), message=validation.storable_text(message))


def _details(node: NodeResult) -> dict[str, Any]:
    """The :meth:`Operations.node_event` arguments a :class:`NodeResult` stands for."""
    return {
        "node_id": node.node_id,
        "status": node.status,
        "result": node.result,
        "error": node.error,
        "task_id": node.task_id,
        "worker": node.worker,
        "attempt": node.attempts or None,
    }


def _status_after(outcome: BatchOutcome | TransitionOutcome, now: datetime) -> dict[str, Any]:
    return outcome.session.seen_at(now).to_dict()


def _seen_page(page: SessionPage, now: datetime) -> SessionPage:
    return page.model_copy(update={"sessions": [info.seen_at(now) for info in page.sessions]})


def _most_first(groups: list[FailureGroup]) -> list[FailureGroup]:
    return sorted(groups, key=lambda group: (-group.count, group.first_at, group.error_type))


def nodes_of(manager: SessionManager, session_id: str, status: NodeStatus | None = None) -> Iterator[NodeResult]:
    """Every node of the session (only those in ``status``, when given), read a page at a time as
    they are used (blocking)."""
    cursor: str | None = None
    while True:
        page = manager.sync.get_nodes(session_id, status, cursor=cursor, limit=1000)
        yield from page.nodes
        cursor = page.next_cursor
        if cursor is None:
            return


def _by_node(children: list[ChildSession]) -> list[ChildSession]:
    return sorted(children, key=lambda child: (child.node_id, child.session_id))


def _log_removed(removed: int) -> int:
    if removed:
        logger.info("removed %d expired session(s)", removed)
    return removed


def _found(session_id: str, info: SessionInfo | None) -> SessionInfo:
    if info is None:
        raise SessionNotFoundError(session_id)
    return info


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise TrackerValidationError("limit", limit, "expected a whole number within 1..1000")
    return limit


# -- the managers' verbs --------------------------------------------------------------------------


class _Verb(Generic[P, T]):
    """An operation as a method of both managers: awaited on :class:`SessionManager` (run on the
    store's awaitable flavour), blocking on :class:`SyncSessionManager`. The method is made once
    per manager, on first use, and kept in the manager's ``__dict__`` (as ``cached_property`` does)."""

    def __init__(self, operation: Callable[Concatenate[Operations, P], Plan[T]]) -> None:
        self.operation = operation
        self.__doc__ = operation.__doc__
        signature = inspect.signature(operation)
        self.signature = signature.replace(parameters=list(signature.parameters.values())[1:])  # less `self`

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.name = name

    @overload
    def __get__(self, manager: None, owner: type[Any]) -> Self: ...

    @overload
    def __get__(self, manager: SessionManager, owner: type[Any]) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __get__(self, manager: SyncSessionManager, owner: type[Any]) -> Callable[P, T]: ...

    def __get__(self, manager: SessionManager | SyncSessionManager | None, owner: type[Any]) -> Any:
        if manager is None:
            return self
        operation = self.operation
        verb: Any
        if isinstance(manager, SyncSessionManager):
            sessions = manager.manager

            def blocking(*args: P.args, **kwargs: P.kwargs) -> T:
                step = operation(sessions.operations, *args, **kwargs)
                return step.then(step.call.run(sessions.storage))

            verb = blocking
        else:

            async def awaitable(*args: P.args, **kwargs: P.kwargs) -> T:
                step = operation(manager.operations, *args, **kwargs)
                return step.then(await manager.astorage.run(step.call))

            verb = awaitable
        functools.update_wrapper(verb, operation, updated=())
        del verb.__wrapped__  # its signature is the one below
        verb.__signature__ = self.signature
        verb.__name__ = verb.__qualname__ = self.name
        manager.__dict__[self.name] = verb
        return verb


class _Verbs:
    """The verbs both managers carry, each run from its one :class:`Operations` method."""

    create_session = _Verb(Operations.create_session)
    update_status = _Verb(Operations.update_status)
    update_progress = _Verb(Operations.update_progress)
    add_nodes = _Verb(Operations.add_nodes)
    add_node_result = _Verb(Operations.add_node_result)
    add_node_results = _Verb(Operations.add_node_results)
    get_session = _Verb(Operations.get_session)
    get_session_status = _Verb(Operations.get_session_status)
    is_session_expired = _Verb(Operations.is_session_expired)
    cleanup_expired_sessions = _Verb(Operations.cleanup_expired_sessions)
    get_nodes = _Verb(Operations.get_nodes)
    list_sessions = _Verb(Operations.list_sessions)
    read_events = _Verb(Operations.read_events)
    get_structure = _Verb(Operations.get_structure)
    get_children = _Verb(Operations.get_children)
    get_failures = _Verb(Operations.get_failures)
    get_node = _Verb(Operations.get_node)
    list_workers = _Verb(Operations.list_workers)
    delete_session = _Verb(Operations.delete_session)
    reap_lost_nodes = _Verb(Operations.reap_lost_nodes)
    end_stalled_sessions = _Verb(Operations.end_stalled_sessions)
    # What the Celery glue records: internal.
    _transition = _Verb(Operations.transition)
    _reopen_session = _Verb(Operations.reopen_session)
    _record_node = _Verb(Operations.record_node)
    _record_nodes = _Verb(Operations.record_nodes)
    _heartbeat = _Verb(Operations.heartbeat)
    _retire = _Verb(Operations.retire)
    _watched_children = _Verb(Operations.watched_children)
    _unwatch_child = _Verb(Operations.unwatch_child)


def default_storage(settings: TrackerSettings) -> SessionStorageAdapter:
    """Redis when ``TRACKER_REDIS_URL`` is set, else an in-memory store (one process only)."""
    if settings.redis_url:
        from tracker.storage.redis import RedisStorageAdapter

        return RedisStorageAdapter.from_settings(settings)
    from tracker.storage.memory import InMemoryStorageAdapter

    return InMemoryStorageAdapter(events_maxlen=settings.events_maxlen)


class SessionManager(_Verbs):
    """Tracks batch sessions: create, move through the state machine, record node results, expire.

    One instance per process is the usual use (:meth:`get_instance`); constructing one directly
    with an explicit store and clock is how tests and embedded apps use it. Every verb below is
    also on :attr:`sync`, blocking.

    Args:
        storage: The store; default from settings (Redis when ``TRACKER_REDIS_URL`` is set).
        settings: Configuration; default read from the environment.
        clock: Returns "now" as an aware UTC datetime.
    """

    _instance: ClassVar[SessionManager | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        storage: SessionStorageAdapter | None = None,
        settings: TrackerSettings | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.settings = settings or TrackerSettings()
        self.storage: SessionStorageAdapter = storage if storage is not None else default_storage(self.settings)
        self._astorage: AsyncStore | None = None
        self.operations = Operations(self.settings, clock)
        self.sync = SyncSessionManager(self)
        self._cleanup_task: asyncio.Task[None] | None = None

    # -- singleton --------------------------------------------------------------------------

    @classmethod
    def get_instance(cls) -> SessionManager:
        """The process-wide manager, created on first use from the environment."""
        instance = cls._instance
        if instance is not None:
            return instance  # every signal handler asks: no lock once it exists
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    @classmethod
    def set_instance(cls, manager: SessionManager) -> None:
        """Make ``manager`` the process-wide one (e.g. with an explicit store)."""
        with cls._instance_lock:
            cls._instance = manager

    @classmethod
    def reset_instance(cls) -> None:
        """Forget the process-wide manager (its store is closed); the next get_instance builds anew."""
        with cls._instance_lock:
            instance, cls._instance = cls._instance, None
        if instance is not None:
            instance.storage.close()

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def clock(self) -> Clock:
        """The clock every operation reads."""
        return self.operations.clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        self.operations.clock = clock

    @property
    def astorage(self) -> AsyncStore:
        """The store's awaitable flavour (created on first use)."""
        if self._astorage is None:
            self._astorage = self.storage.asynchronous()
        return self._astorage

    # -- background cleanup -----------------------------------------------------------------

    def start_cleanup_scheduler(self, interval_s: float | None = None) -> None:
        """Run :meth:`cleanup_expired_sessions` every ``interval_s`` (default from settings) in this loop."""
        if self._cleanup_task is not None and not self._cleanup_task.done():
            return
        interval = interval_s if interval_s is not None else self.settings.cleanup_interval_s
        self._cleanup_task = asyncio.get_running_loop().create_task(self._cleanup_loop(interval))

    async def _cleanup_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.cleanup_expired_sessions()
            except Exception:  # a store outage must not end the scheduler
                logger.exception("session cleanup failed; will try again in %.0f s", interval_s)

    async def stop_cleanup_scheduler(self) -> None:
        """Stop the background cleanup (if running) and wait for it to end."""
        task, self._cleanup_task = self._cleanup_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def cleanup_scheduler_running(self) -> bool:
        """True while the background cleanup runs."""
        return self._cleanup_task is not None and not self._cleanup_task.done()

    async def cleanup(self) -> None:
        """Graceful shutdown: stop the scheduler and close the store's connections."""
        await self.stop_cleanup_scheduler()
        if self._astorage is not None:
            await self._astorage.close()
            self._astorage = None
        self.storage.close()


class SyncSessionManager(_Verbs):
    """The blocking form of :class:`SessionManager` (``manager.sync``), for Celery signal handlers
    and scripts: the same verbs, the same operations, each one blocking store call."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
