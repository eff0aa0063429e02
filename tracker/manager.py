"""SessionManager: the seed's API over any storage adapter.

Every operation is written once, as a pure *plan* (validate the input, build the one store call,
say how to read its answer). :class:`SessionManager` runs plans against the awaitable store;
:class:`SyncSessionManager` (``manager.sync``) runs the same plans against the blocking store, for
Celery signal handlers. Neither holds session state: the store is the only truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

from tracker import states, validation
from tracker.config import TrackerSettings
from tracker.errors import SessionNotFoundError, TrackerValidationError
from tracker.models import (
    BatchOutcome,
    NodeError,
    NodeOutcome,
    NodePage,
    NodeResult,
    NodeSpec,
    SessionEvent,
    SessionInfo,
    SessionPage,
    TransitionOutcome,
)
from tracker.states import TERMINAL_NODE_STATUSES, NodeStatus, SessionStatus
from tracker.storage.base import AsyncSessionStorageAdapter, NodeEvent, ResumeOutcome, SessionStorageAdapter
from tracker.structure import Tree, check_tree

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

Clock = Callable[[], datetime]
"""Returns the current time as an aware UTC datetime. Tests replace it."""


def utc_now() -> datetime:
    """The real clock."""
    return datetime.now(UTC)


def _same(value: Any) -> Any:
    return value


class _Plan(NamedTuple, Generic[T]):
    """One store call (a method name shared by both adapter flavours) and how to read its answer."""

    method: str
    args: tuple[Any, ...]
    then: Callable[[Any], T] = _same


class _Plans:
    """The logic of every operation, free of I/O. Both managers run these plans."""

    def __init__(self, settings: TrackerSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock

    def create_session(
        self,
        canvas_path: str,
        node_count: int,
        metadata: dict[str, Any] | None = None,
        nodes: Sequence[NodeSpec] = (),
        session_id: str | None = None,
        structure: Tree | None = None,
    ) -> _Plan[str]:
        path = validation.canvas_path(canvas_path)
        count = validation.node_count(node_count, self.settings.max_node_count)
        meta = validation.metadata(metadata)
        sid = validation.session_id(session_id) if session_id is not None else str(uuid.uuid4())
        signatures: list[str | None] = []  # encoded once: checked here, stored as they are
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
        if len(set(node_ids)) != len(node_ids) or len(node_ids) > count:
            raise TrackerValidationError(
                "nodes", len(node_ids), f"node ids must be distinct and at most node_count ({count})", sid
            )
        if structure is not None:
            structure = check_tree(structure, node_ids, self.settings.max_canvas_depth)
            if len(node_ids) != count:
                raise TrackerValidationError("nodes", len(node_ids), f"a structure needs all {count} nodes", sid)
        now = self.clock()
        info = SessionInfo(
            session_id=sid, canvas_path=path, node_count=count, created_at=now, updated_at=now, metadata=meta
        )
        return _Plan("create", (info, tuple(nodes), signatures, structure), lambda _: sid)

    def update_status(self, session_id: str, status: SessionStatus | str) -> _Plan[TransitionOutcome]:
        sid = validation.session_id(session_id)
        target = validation.member(SessionStatus, status, "status", sid)
        return _Plan("transition", (sid, target, states.allowed_from(target), self.clock()))

    def resume(self, session_id: str, retry_failed: bool, nodes: Sequence[str] | None = None) -> _Plan[ResumeOutcome]:
        sid = validation.session_id(session_id)
        chosen = None if nodes is None else list(dict.fromkeys(validation.node_id(node, sid) for node in nodes))
        # Resume is the one way out of an ended session; a stalled running or pending one may be
        # resumed too (its unfinished nodes are re-sent). Only a completed session is final.
        allowed = states.allowed_from(SessionStatus.RUNNING, resume=True) | {SessionStatus.RUNNING}
        task_id_base = str(uuid.uuid4())[:24]  # reset nodes get <base><12 hex digits>: valid UUID strings
        return _Plan("resume", (sid, frozenset(allowed), retry_failed, task_id_base, self.clock(), chosen))

    def get_structure(self, session_id: str) -> _Plan[Tree | None]:
        return _Plan("get_structure", (validation.session_id(session_id),))

    def update_progress(self, session_id: str, progress_percent: float) -> _Plan[SessionInfo]:
        sid = validation.session_id(session_id)
        value = validation.progress(progress_percent, sid)
        return _Plan("set_progress", (sid, value, self.clock()))

    def node_event(
        self,
        session_id: str,
        node_id: str,
        status: NodeStatus | str,
        result: Any = None,
        *,
        error: NodeError | BaseException | None = None,
        attempt: int | None = None,
        task_id: str | None = None,
        worker: str | None = None,
        reason: str | None = None,
        request_id: str | None = None,
        at: datetime | None = None,
        started_at: datetime | None = None,
    ) -> tuple[str, NodeEvent]:
        sid = validation.session_id(session_id)
        node_status = validation.member(NodeStatus, status, "status", sid)
        result_json = None
        if result is not None and node_status in TERMINAL_NODE_STATUSES:
            result_json = validation.json_text(result, "result", self.settings.max_result_bytes, sid)
        return sid, self.event(sid, node_id, node_status, result_json, error, attempt, task_id, worker, reason,
                               request_id, at, started_at)  # fmt: skip

    def event(
        self,
        sid: str,
        node_id: str,
        status: NodeStatus,
        result_json: str | None,
        error: NodeError | BaseException | None,
        attempt: int | None,
        task_id: str | None,
        worker: str | None,
        reason: str | None,
        request_id: str | None,
        at: datetime | None,
        started_at: datetime | None,
    ) -> NodeEvent:
        """:meth:`node_event` once the session id and the status are checked and the result is
        encoded (``result_json``, from :func:`validation.json_text`, is taken as it is)."""
        if (
            error is None and attempt is None and task_id is None and worker is None and reason is None
            and request_id is None and at is None and started_at is None
        ):  # fmt: skip
            return NodeEvent(validation.node_id(node_id, sid), status, result_json)  # nothing else to check
        if reason is not None:
            reason = validation.optional_text(reason, "reason", self.settings.max_error_chars, sid) or None
        return NodeEvent(
            validation.node_id(node_id, sid),
            status,
            result_json,
            None if error is None else self._error(error, sid),
            validation.attempt(attempt, sid),
            validation.label(task_id, "task_id", sid),
            validation.label(worker, "worker", sid),
            reason,
            validation.label(request_id, "request_id", sid),
            validation.moment(at, "at", sid),
            validation.moment(started_at, "started_at", sid),
        )

    def record_node(
        self, session_id: str, node_id: str, status: NodeStatus | str, result: Any = None, **details: Any
    ) -> _Plan[NodeOutcome]:
        sid, event = self.node_event(session_id, node_id, status, result, **details)
        return _Plan("record_node", (sid, event, self.clock()))

    def record_nodes(
        self, session_id: str, events: Sequence[NodeEvent], request_id: str | None = None, trusted: bool = False
    ) -> _Plan[BatchOutcome]:
        sid = validation.session_id(session_id)
        request_id = validation.label(request_id, "request_id", sid)
        if isinstance(events, str | bytes) or not isinstance(events, Sequence):
            raise TrackerValidationError("events", events, "expected a sequence of NodeEvent", sid)
        if not trusted:
            for event in events:
                self._check_event(event, sid)
        return _Plan("record_nodes", (sid, list(events), self.clock(), request_id))

    def _check_event(self, event: object, sid: str) -> None:
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
        cap = self.settings.max_error_chars
        if event.reason is not None and (not isinstance(event.reason, str) or len(event.reason) > cap):
            raise TrackerValidationError("reason", event.reason, f"expected a string of at most {cap} characters", sid)
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

    def node_result(
        self,
        session_id: str,
        node_id: str,
        result: Any,
        status: NodeStatus | str,
        error: NodeError | BaseException | None,
        task_id: str | None,
        worker: str | None,
        attempt: int | None,
    ) -> _Plan[dict[str, Any]]:
        # One result, recorded as a batch of one: the reply carries the session, not the node.
        if isinstance(result, NodeResult):
            sid, event = self.node_event(session_id, **self.node_result_details(result))
        else:
            sid, event = self.node_event(
                session_id, node_id, status, result, error=error, task_id=task_id, worker=worker, attempt=attempt
            )
        return _Plan("record_status", (sid, [event], self.clock()))

    def node_results(self, session_id: str, results: Mapping[str, Any] | Iterable[NodeResult]) -> _Plan[dict[str, Any]]:
        if isinstance(results, Mapping):
            events = [
                self.node_event(session_id, nid, NodeStatus.COMPLETED, result)[1] for nid, result in results.items()
            ]
        elif isinstance(results, str | bytes) or not isinstance(results, Iterable):
            raise TrackerValidationError("results", results, "expected {node_id: result} or NodeResult items")
        else:
            events = []
            for node in results:
                if not isinstance(node, NodeResult):
                    raise TrackerValidationError("results", node, "expected NodeResult items", session_id)
                events.append(self.node_event(session_id, **self.node_result_details(node))[1])
        sid = validation.session_id(session_id)
        return _Plan("record_status", (sid, events, self.clock()))

    @staticmethod
    def node_result_details(node: NodeResult) -> dict[str, Any]:
        """The :meth:`node_event` arguments a :class:`NodeResult` stands for."""
        return {
            "node_id": node.node_id,
            "status": node.status,
            "result": node.result,
            "error": node.error,
            "task_id": node.task_id,
            "worker": node.worker,
            "attempt": node.attempts or None,
        }

    def _error(self, error: NodeError | BaseException | None, sid: str) -> NodeError | None:
        cap = self.settings.max_error_chars
        if error is None:
            return None
        if isinstance(error, NodeError):
            if len(error.type) <= validation.MAX_LABEL_CHARS and len(error.message) <= cap:
                return error
            return NodeError(type=error.type[: validation.MAX_LABEL_CHARS], message=error.message[:cap])
        if not isinstance(error, BaseException):
            raise TrackerValidationError("error", error, "expected an exception or a NodeError", sid)
        # Only the class name and the text are kept: nothing that could be imported back.
        return NodeError(type=type(error).__name__, message=str(error)[:cap])

    def heartbeat(self, worker: str, sessions: Sequence[str] = ()) -> _Plan[None]:
        sids = [validation.session_id(sid) for sid in sessions]
        return _Plan("heartbeat", (validation.worker_id(worker), self.clock(), sids))

    def reap_lost(self, requeued: bool = False) -> _Plan[list[NodeOutcome]]:
        s = self.settings
        return _Plan("reap_lost", (self.clock(), s.worker_stale_after, s.node_max_runtime, requeued))

    def get(self, session_id: str) -> _Plan[SessionInfo]:
        sid = validation.session_id(session_id)
        return _Plan("get", (sid,), lambda info: _found(sid, info))

    def get_session_status(self, session_id: str) -> _Plan[dict[str, Any]]:
        sid = validation.session_id(session_id)
        return _Plan("get", (sid,), lambda info: _found(sid, info).to_dict())

    def is_session_expired(self, session_id: str) -> _Plan[bool]:
        sid = validation.session_id(session_id)
        timeout_s = self.settings.session_timeout
        now = self.clock()
        return _Plan("get", (sid,), lambda info: (now - _found(sid, info).updated_at).total_seconds() > timeout_s)

    def end_stalled(self, stalled_after_s: float) -> _Plan[list[BatchOutcome]]:
        limit = validation.positive_seconds(stalled_after_s, "stalled_after_s")
        reason = (
            f"never ran: nothing of its session ran or changed for {limit:g} s after a worker died "
            "(its message was lost with the worker, or is still queued: it is counted if it runs)"
        )
        return _Plan("end_stalled", (self.clock(), limit, reason))

    def cleanup_expired_sessions(self) -> _Plan[int]:
        return _Plan("remove_expired", (self.clock(), self.settings.session_timeout))

    def get_nodes(
        self, session_id: str, status: NodeStatus | str | None = None, cursor: str | None = None, limit: int = 100
    ) -> _Plan[NodePage]:
        sid = validation.session_id(session_id)
        node_status = None if status is None else validation.member(NodeStatus, status, "status", sid)
        return _Plan("get_nodes", (sid, node_status, validation.cursor(cursor), _limit(limit)))

    def list_sessions(
        self, status: SessionStatus | str | None = None, cursor: str | None = None, limit: int = 50
    ) -> _Plan[SessionPage]:
        session_status = None if status is None else validation.member(SessionStatus, status, "status")
        return _Plan("list_sessions", (session_status, validation.cursor(cursor), _limit(limit)))

    def read_events(
        self, session_id: str, after: str | None = None, limit: int = 100, block_ms: int | None = None
    ) -> _Plan[list[SessionEvent]]:
        sid = validation.session_id(session_id)
        if after is not None:
            validation.event_id(after)
        wait_ms = validation.block_ms(block_ms, sid)
        if wait_ms is not None:
            # A blocking read must end well before the store's socket timeout would cut it.
            wait_ms = min(wait_ms, max(0, round(self.settings.redis_socket_timeout * 1000) - 250))
        return _Plan("read_events", (sid, after, _limit(limit), wait_ms))

    def delete(self, session_id: str) -> _Plan[bool]:
        return _Plan("delete", (validation.session_id(session_id),))


def _found(session_id: str, info: SessionInfo | None) -> SessionInfo:
    if info is None:
        raise SessionNotFoundError(session_id)
    return info


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise TrackerValidationError("limit", limit, "expected a whole number within 1..1000")
    return limit


def default_storage(settings: TrackerSettings) -> SessionStorageAdapter:
    """Redis when ``TRACKER_REDIS_URL`` is set, else an in-memory store (one process only)."""
    if settings.redis_url:
        from tracker.storage.redis import RedisStorageAdapter

        return RedisStorageAdapter.from_settings(settings)
    from tracker.storage.memory import InMemoryStorageAdapter

    return InMemoryStorageAdapter(events_maxlen=settings.events_maxlen)


class SessionManager:
    """Tracks batch sessions: create, move through the state machine, record node results, expire.

    One instance per process is the usual use (:meth:`get_instance`); constructing one directly
    with an explicit store and clock is how tests and embedded apps use it.

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
        self._astorage: AsyncSessionStorageAdapter | None = None
        self._plans = _Plans(self.settings, clock)
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
        return self._plans.clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        self._plans.clock = clock

    @property
    def astorage(self) -> AsyncSessionStorageAdapter:
        """The store's awaitable flavour (created on first use, in the running loop)."""
        if self._astorage is None:
            self._astorage = self.storage.asynchronous()
        return self._astorage

    async def _run(self, plan: _Plan[T]) -> T:
        method: Callable[..., Awaitable[Any]] = getattr(self.astorage, plan.method)
        return plan.then(await method(*plan.args))

    # -- the seed's API ---------------------------------------------------------------------

    async def create_session(
        self,
        canvas_path: str,
        node_count: int,
        metadata: dict[str, Any] | None = None,
        nodes: Sequence[NodeSpec] = (),
        session_id: str | None = None,
        structure: Tree | None = None,
    ) -> str:
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

        Raises:
            TrackerValidationError: bad input; nothing was stored.
            SessionExistsError: ``session_id`` is taken.
        """
        plan = self._plans.create_session(canvas_path, node_count, metadata, nodes, session_id, structure)
        return await self._run(plan)

    async def update_status(self, session_id: str, status: SessionStatus | str) -> dict[str, Any]:
        """Move the session to ``status`` if the state machine allows it; return the new status dict.

        Raises:
            SessionNotFoundError, InvalidStateTransitionError, TrackerValidationError.
        """
        outcome = await self._run(self._plans.update_status(session_id, status))
        return outcome.session.to_dict()

    async def update_progress(self, session_id: str, progress_percent: float) -> dict[str, Any]:
        """Set an explicit progress (0..100) on a session that has not ended.

        Raises:
            TrackerValidationError: NaN, infinite, below 0 or above 100.
            SessionNotFoundError, InvalidStateTransitionError: unknown or ended session.
        """
        return (await self._run(self._plans.update_progress(session_id, progress_percent))).to_dict()

    async def add_node_result(
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
    ) -> dict[str, Any]:
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
        plan = self._plans.node_result(session_id, node_id, result, status, error, task_id, worker, attempt)
        return await self._run(plan)

    async def add_node_results(
        self, session_id: str, results: Mapping[str, Any] | Iterable[NodeResult]
    ) -> dict[str, Any]:
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
        return await self._run(self._plans.node_results(session_id, results))

    def node_event(
        self,
        session_id: str,
        node_id: str,
        status: NodeStatus | str,
        result: Any = None,
        *,
        error: NodeError | BaseException | None = None,
        attempt: int | None = None,
        task_id: str | None = None,
        worker: str | None = None,
        reason: str | None = None,
        request_id: str | None = None,
        at: datetime | None = None,
        started_at: datetime | None = None,
    ) -> NodeEvent:
        """A validated node event for :meth:`record_nodes` (no I/O).

        Details as :meth:`record_node`, plus ``at`` (when it happened; default: when it is recorded)
        and ``started_at`` (with a result: the node's start, recorded with it).

        Raises:
            TrackerValidationError: a bad id, status, detail, or a result that is not JSON or too big.
        """
        return self._plans.node_event(
            session_id,
            node_id,
            status,
            result,
            error=error,
            attempt=attempt,
            task_id=task_id,
            worker=worker,
            reason=reason,
            request_id=request_id,
            at=at,
            started_at=started_at,
        )[1]

    async def record_nodes(
        self, session_id: str, events: Sequence[NodeEvent], *, request_id: str | None = None
    ) -> BatchOutcome:
        """Record node events (from :meth:`node_event`) of one session in one store call, in order.

        ``request_id``: the same id on every retry of one call (see :meth:`record_node`).
        """
        return await self._run(self._plans.record_nodes(session_id, events, request_id))

    async def record_node(self, session_id: str, node_id: str, status: NodeStatus | str, **details: Any) -> NodeOutcome:
        """Record any node event (running, retrying, completed, failed, cancelled, lost) in full.

        Keyword details: ``result``, ``error``, ``attempt``, ``task_id``, ``worker``, ``reason``, and
        ``request_id``: the same id on every retry of one event tells the store it is that call again
        (so the retry that ends the session still gets ``finished``, exactly once).
        """
        return await self._run(self._plans.record_node(session_id, node_id, status, **details))

    async def get_session(self, session_id: str) -> SessionInfo:
        """The session as a model. Raises SessionNotFoundError."""
        return await self._run(self._plans.get(session_id))

    async def get_session_status(self, session_id: str) -> dict[str, Any]:
        """The session's full state as a JSON-safe dict (one store read, O(1) in the node count).

        Raises:
            SessionNotFoundError: unknown, expired or removed.
            TrackerValidationError: not a UUID.
        """
        return await self._run(self._plans.get_session_status(session_id))

    async def get_nodes(
        self, session_id: str, status: NodeStatus | str | None = None, cursor: str | None = None, limit: int = 100
    ) -> NodePage:
        """A page of the session's node results."""
        return await self._run(self._plans.get_nodes(session_id, status, cursor, limit))

    async def list_sessions(
        self, status: SessionStatus | str | None = None, cursor: str | None = None, limit: int = 50
    ) -> SessionPage:
        """A page of sessions, newest first."""
        return await self._run(self._plans.list_sessions(status, cursor, limit))

    async def read_events(
        self, session_id: str, after: str | None = None, limit: int = 100, block_ms: int | None = None
    ) -> list[SessionEvent]:
        """Events of the session after the event id ``after``, waiting up to ``block_ms`` for one.

        The wait is capped 250 ms below ``redis_socket_timeout``, so that the store never cuts it.
        """
        return await self._run(self._plans.read_events(session_id, after, limit, block_ms))

    async def resume_session(
        self, session_id: str, retry_failed: bool = True, nodes: Sequence[str] | None = None
    ) -> ResumeOutcome:
        """Take a session back to ``running`` and reset its unfinished nodes (store side only).

        :func:`tracker.celery.resume_session` also re-sends the reset nodes' tasks, with the
        session's structure.

        Args:
            retry_failed: Reset failed nodes too.
            nodes: Reset exactly these nodes instead (a plan made from the session's structure).

        Raises:
            ResumePlanChanged: one of ``nodes`` completed meanwhile; nothing changed.
        """
        return await self._run(self._plans.resume(session_id, retry_failed, nodes))

    async def get_structure(self, session_id: str) -> Tree | None:
        """The canvas tree the session was dispatched with (see :mod:`tracker.structure`), or None."""
        return await self._run(self._plans.get_structure(session_id))

    async def delete_session(self, session_id: str) -> bool:
        """Remove a session now; False when it did not exist."""
        return await self._run(self._plans.delete(session_id))

    async def is_session_expired(self, session_id: str) -> bool:
        """True when the session was last updated more than ``session_timeout`` seconds ago.

        Raises:
            SessionNotFoundError: the session is gone (already removed or expired in the store).
        """
        return await self._run(self._plans.is_session_expired(session_id))

    async def cleanup_expired_sessions(self) -> int:
        """Remove every expired session; return how many were removed."""
        removed = await self._run(self._plans.cleanup_expired_sessions())
        if removed:
            logger.info("removed %d expired session(s)", removed)
        return removed

    async def heartbeat(self, worker: str, sessions: Sequence[str] = ()) -> None:
        """Note that worker process ``worker`` (``hostname:pid``) is alive now, and keep the
        ``sessions`` it runs nodes of from expiring (however long their nodes run)."""
        await self._run(self._plans.heartbeat(worker, sessions))

    async def reap_lost_nodes(self, requeued: bool = False) -> list[NodeOutcome]:
        """Mark ``lost`` the running nodes of worker processes silent for ``worker_stale_after`` s,
        once a reaper has seen them silent that long again (a live worker back from a store outage
        beats meanwhile), and nodes running longer than ``node_max_runtime``, when set.

        Args:
            requeued: The dead workers' messages come back from the broker (``task_acks_late``):
                their nodes go back to ``pending`` instead, counted when their tasks run again.

        Returns:
            What was marked.
        """
        return await self._run(self._plans.reap_lost(requeued))

    async def end_stalled_sessions(self, stalled_after_s: float) -> list[BatchOutcome]:
        """End the sessions a message lost with a dead worker left waiting: see
        :meth:`SessionStorageAdapter.end_stalled`. Their unfinished nodes become ``lost``.

        Args:
            stalled_after_s: How long nothing of such a session may run or change first; longer
                than the broker takes to redeliver a dead worker's messages
                (:func:`tracker.celery.maintain` derives it from the app's broker settings).

        Returns:
            One outcome per session ended.
        """
        return await self._run(self._plans.end_stalled(stalled_after_s))

    # -- background cleanup -----------------------------------------------------------------

    def start_cleanup_scheduler(self, interval_s: float | None = None) -> None:
        """Run :meth:`cleanup_expired_sessions` every ``interval_s`` (default from settings) in this loop."""
        if self._cleanup_task is not None and not self._cleanup_task.done():
            return
        interval = interval_s if interval_s is not None else self.settings.cleanup_interval
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


class SyncSessionManager:
    """The blocking form of :class:`SessionManager` (``manager.sync``), for Celery signal handlers.

    Same operations, same plans, same semantics; each call is one blocking store call.
    """

    def __init__(self, manager: SessionManager) -> None:
        self._manager = manager

    def _run(self, plan: _Plan[T]) -> T:
        method: Callable[..., Any] = getattr(self._manager.storage, plan.method)
        return plan.then(method(*plan.args))

    @property
    def _plans(self) -> _Plans:
        return self._manager._plans

    def create_session(
        self,
        canvas_path: str,
        node_count: int,
        metadata: dict[str, Any] | None = None,
        nodes: Sequence[NodeSpec] = (),
        session_id: str | None = None,
        structure: Tree | None = None,
    ) -> str:
        """See :meth:`SessionManager.create_session`."""
        return self._run(self._plans.create_session(canvas_path, node_count, metadata, nodes, session_id, structure))

    def update_status(self, session_id: str, status: SessionStatus | str) -> dict[str, Any]:
        """See :meth:`SessionManager.update_status`."""
        return self._run(self._plans.update_status(session_id, status)).session.to_dict()

    def transition(self, session_id: str, status: SessionStatus | str) -> TransitionOutcome:
        """Like :meth:`update_status`, returning the previous status too."""
        return self._run(self._plans.update_status(session_id, status))

    def update_progress(self, session_id: str, progress_percent: float) -> dict[str, Any]:
        """See :meth:`SessionManager.update_progress`."""
        return self._run(self._plans.update_progress(session_id, progress_percent)).to_dict()

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
    ) -> dict[str, Any]:
        """See :meth:`SessionManager.add_node_result`."""
        plan = self._plans.node_result(session_id, node_id, result, status, error, task_id, worker, attempt)
        return self._run(plan)

    def record_node(self, session_id: str, node_id: str, status: NodeStatus | str, **details: Any) -> NodeOutcome:
        """See :meth:`SessionManager.record_node`."""
        return self._run(self._plans.record_node(session_id, node_id, status, **details))

    def add_node_results(self, session_id: str, results: Mapping[str, Any] | Iterable[NodeResult]) -> dict[str, Any]:
        """See :meth:`SessionManager.add_node_results`."""
        return self._run(self._plans.node_results(session_id, results))

    def record_nodes(
        self, session_id: str, events: Sequence[NodeEvent], *, request_id: str | None = None, trusted: bool = False
    ) -> BatchOutcome:
        """See :meth:`SessionManager.record_nodes`. ``trusted``: every event comes as :meth:`node_event`
        built it (the signal handlers' writer), so it is not checked a second time."""
        return self._run(self._plans.record_nodes(session_id, events, request_id, trusted))

    def get_session(self, session_id: str) -> SessionInfo:
        """See :meth:`SessionManager.get_session`."""
        return self._run(self._plans.get(session_id))

    def get_session_status(self, session_id: str) -> dict[str, Any]:
        """See :meth:`SessionManager.get_session_status`."""
        return self._run(self._plans.get_session_status(session_id))

    def get_nodes(
        self, session_id: str, status: NodeStatus | str | None = None, cursor: str | None = None, limit: int = 100
    ) -> NodePage:
        """See :meth:`SessionManager.get_nodes`."""
        return self._run(self._plans.get_nodes(session_id, status, cursor, limit))

    def list_sessions(
        self, status: SessionStatus | str | None = None, cursor: str | None = None, limit: int = 50
    ) -> SessionPage:
        """See :meth:`SessionManager.list_sessions`."""
        return self._run(self._plans.list_sessions(status, cursor, limit))

    def read_events(
        self, session_id: str, after: str | None = None, limit: int = 100, block_ms: int | None = None
    ) -> list[SessionEvent]:
        """See :meth:`SessionManager.read_events`."""
        return self._run(self._plans.read_events(session_id, after, limit, block_ms))

    def resume_session(
        self, session_id: str, retry_failed: bool = True, nodes: Sequence[str] | None = None
    ) -> ResumeOutcome:
        """See :meth:`SessionManager.resume_session`."""
        return self._run(self._plans.resume(session_id, retry_failed, nodes))

    def get_structure(self, session_id: str) -> Tree | None:
        """See :meth:`SessionManager.get_structure`."""
        return self._run(self._plans.get_structure(session_id))

    def delete_session(self, session_id: str) -> bool:
        """See :meth:`SessionManager.delete_session`."""
        return self._run(self._plans.delete(session_id))

    def is_session_expired(self, session_id: str) -> bool:
        """See :meth:`SessionManager.is_session_expired`."""
        return self._run(self._plans.is_session_expired(session_id))

    def heartbeat(self, worker: str, sessions: Sequence[str] = ()) -> None:
        """See :meth:`SessionManager.heartbeat`."""
        self._run(self._plans.heartbeat(worker, sessions))

    def reap_lost_nodes(self, requeued: bool = False) -> list[NodeOutcome]:
        """See :meth:`SessionManager.reap_lost_nodes`."""
        return self._run(self._plans.reap_lost(requeued))

    def end_stalled_sessions(self, stalled_after_s: float) -> list[BatchOutcome]:
        """See :meth:`SessionManager.end_stalled_sessions`."""
        return self._run(self._plans.end_stalled(stalled_after_s))

    def cleanup_expired_sessions(self) -> int:
        """See :meth:`SessionManager.cleanup_expired_sessions`."""
        removed = self._run(self._plans.cleanup_expired_sessions())
        if removed:
            logger.info("removed %d expired session(s)", removed)
        return removed
