"""The storage seam: what the manager asks of a store, in verbs of the domain.

Each method is one atomic step where the data lives (one lock in memory, one Lua script in
Redis). Check-and-set is always one method, never a get followed by a set. The manager holds no
state of its own, so any number of processes sharing a store see the same sessions.

One Protocol, :class:`SessionStorageAdapter`, carries the verbs (blocking, for Celery signal
handlers and scripts). Its awaitable flavour (:meth:`SessionStorageAdapter.asynchronous`, for
asyncio callers) runs the same verbs as :class:`StoreCall` values, so each verb is declared once.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Concatenate, Generic, NamedTuple, ParamSpec, Protocol, TypeVar, runtime_checkable

from tracker import errors, models, validation
from tracker.states import NodeStatus, SessionStatus
from tracker.structure import Tree

T = TypeVar("T")
P = ParamSpec("P")

_request_prefix = os.urandom(8).hex()
_request_numbers = itertools.count()


def _new_prefix() -> None:
    global _request_prefix
    _request_prefix = os.urandom(8).hex()  # a forked child must not repeat its parent's ids


os.register_at_fork(after_in_child=_new_prefix)


def new_request_id() -> str:
    """A fresh id for one store call (kept across its retries): a random prefix per process and a
    counter, so that no system call is made per call."""
    return f"{_request_prefix}{next(_request_numbers):x}"


class ChildWatch(NamedTuple):
    """A child session whose end has not been told to its parent yet
    (:meth:`SessionStorageAdapter.watched_children`)."""

    child_id: str
    parent_session_id: str
    parent_node_id: str


#: Nodes :meth:`SessionStorageAdapter.list_workers` names per worker (``running`` counts them all):
#: enough to recognise what a worker is busy with, few enough that a page of workers stays small.
WORKER_NODES_SHOWN = 20

#: What a child session that did not complete does to its parent node: fail it, or nothing.
CHILD_POLICIES = ("fail", "ignore")


class ChildLink(NamedTuple):
    """A child session, as its parent's node event tells it (:attr:`NodeEvent.child`)."""

    child_id: str
    #: None: the node's task opened it (told before the child is created); else how it ended.
    ended: SessionStatus | None = None
    #: The attempt of the node's task that opened it: only the latest attempt's children count.
    attempt: int = 1
    #: ``fail``: the node fails when the child did not complete; ``ignore``: it completes anyway.
    policy: str = "fail"


class NodeEvent(NamedTuple):
    """One thing that happened to a node, as a store records it.

    Built by ``SessionManager.node_event``, which validates every field. A named tuple: immutable,
    and cheap to build, as one is made for every task.
    ``result_json`` is already-validated JSON text.
    """

    node_id: str
    status: NodeStatus
    result_json: str | None = None
    error: models.NodeError | None = None
    #: The attempt number this event belongs to (1 = first run); None: the store counts starts.
    attempt: int | None = None
    task_id: str | None = None
    worker: str | None = None
    reason: str | None = None
    #: Names one logical call across its retries (a store that may lose replies answers a retry of
    #: the call that ended the session as the first attempt would have); None: the store picks one.
    request_id: str | None = None
    #: When it happened; None: the time of the store call (a buffered event carries its own).
    at: datetime | None = None
    #: With a result: when the node started, for a start and its result recorded as one event (a
    #: handlers' writer folds a waiting start into its task's outcome).
    started_at: datetime | None = None
    #: A running node's progress (0..1) as its task reports it (``status`` is ``running``): the
    #: event changes nothing else, and counts only while that attempt of that task runs.
    progress: float | None = None
    #: A child session of the node opened or ended (``status`` is ``running``, and ignored): the
    #: node waits for its open children; the end of the last one ends a node whose task succeeded.
    child: ChildLink | None = None


@dataclass(frozen=True)
class NewNodes:
    """Nodes a session gains, when it is created (:meth:`SessionStorageAdapter.create`) or while it
    runs (:meth:`SessionStorageAdapter.add_nodes`), as the manager checked them."""

    specs: Sequence[models.NodeSpec] = ()
    #: Each spec's signature as the compact JSON text the manager checked (None: the node has
    #: none), so that a store keeping text need not encode it again.
    signatures: Sequence[str | None] = ()
    #: Which of them feeds which (:mod:`tracker.structure`), checked by the manager.
    tree: Tree | None = None

    def __post_init__(self) -> None:
        if len(self.signatures) != len(self.specs):
            raise errors.TrackerValidationError(
                "signatures", len(self.signatures), f"expected one per node ({len(self.specs)})"
            )

    @classmethod
    def of(cls, specs: Sequence[models.NodeSpec], tree: Tree | None = None) -> NewNodes:
        """``specs`` with their signatures encoded here (for callers other than the manager)."""
        signatures = [None if spec.signature is None else validation.compact_json(spec.signature) for spec in specs]
        return cls(tuple(specs), tuple(signatures), tree)


#: No nodes yet: a session created by hand, whose nodes are added as they come.
NO_NODES = NewNodes()


@dataclass(frozen=True)
class SessionFilter:
    """Which sessions :meth:`SessionStorageAdapter.list_sessions` lists; every one by default."""

    status: SessionStatus | None = None
    tag: str | None = None
    #: A prefix of their canvas path.
    path: str | None = None

    def matches(self, info: models.SessionInfo) -> bool:
        """True when a listed session passes this filter."""
        if self.status is not None and info.status is not self.status:
            return False
        if self.tag is not None and self.tag not in info.tags:
            return False
        return self.path is None or info.canvas_path.startswith(self.path)


#: Every session.
EVERY_SESSION = SessionFilter()


@dataclass(frozen=True)
class ResumeChoice:
    """Which nodes :meth:`SessionStorageAdapter.resume` resets, and the task ids they get."""

    #: Reset failed nodes too, not only those without a result.
    retry_failed: bool
    #: The first 24 characters of each reset node's new task id; a 12-hex-digit counter from 1
    #: follows, so that each is a valid UUID string.
    task_id_base: str
    #: Reset exactly these nodes instead (a plan made from the session's structure;
    #: ``retry_failed`` is then not consulted).
    nodes: Sequence[str] | None = None


class ResumePlanChanged(errors.TrackerError):
    """A node a resume plan meant to re-send completed meanwhile: nothing changed; plan again."""


class SilentWorkers(NamedTuple):
    """What a reaper pass decides about silent worker processes (see :func:`silent_workers`)."""

    #: Worker processes whose nodes are reaped now -> when each was last seen (ms).
    due: dict[str, int]
    #: Every silent worker process -> when a reaper first found it silent (ms): what to keep.
    suspects: dict[str, int]
    #: Some worker process was seen alive within the stale window (what the next pass compares).
    alive: bool


def silent_workers(
    seen: dict[str, int], suspects: dict[str, int], alive_before: bool, now_ms: int, stale_after_ms: int
) -> SilentWorkers:
    """Which silent worker processes to reap now, with a grace that no store outage can cut short.

    A worker process silent for ``stale_after_ms`` becomes a suspect; it is reaped once it has
    been a suspect for ``stale_after_ms`` more, time in which a live one beats again. A store
    outage silences every worker at once and a reaper may run before any of them is back: when
    no worker at all was seen alive since the last pass, every suspect's grace starts again now.
    When they all really died, the next passes find none alive again and the grace runs out.

    Args:
        seen: Worker process -> its last heartbeat (ms).
        suspects: What the last pass kept (worker -> first found silent, ms).
        alive_before: The last pass saw a live worker (True when no pass ran yet).
        now_ms: Now.
        stale_after_ms: The silence that makes a worker process a suspect, and its grace.
    """
    stale = {worker: ms for worker, ms in seen.items() if ms < now_ms - stale_after_ms}
    alive = len(stale) < len(seen) if seen else alive_before
    restart = alive_before and not alive
    marks = {worker: now_ms if restart else suspects.get(worker, now_ms) for worker in stale}
    due = {worker: stale[worker] for worker, mark in marks.items() if now_ms - mark >= stale_after_ms}
    return SilentWorkers(due=due, suspects=marks, alive=alive)


def requeued_reason(worker: str, last_seen: datetime, now: datetime) -> str:
    """The reason recorded on a node sent back to ``pending`` because its worker died (late acks)."""
    return f"{lost_reason(worker, last_seen, now)}; waiting for the broker to redeliver its task"


def offset_cursor(cursor: str | None) -> int:
    """The position at which a page of a scan or an index starts (0 for the first page).

    Raises:
        TrackerValidationError: not a position a page handed out.
    """
    if not cursor:
        return 0
    if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 18:
        raise errors.TrackerValidationError("cursor", cursor, "expected the next_cursor of a previous page")
    return int(cursor)


def status_cursor(cursor: str | None) -> str:
    """The node id after which a page of nodes by status starts ('' for the first page).

    Raises:
        TrackerValidationError: not a node id (so not a cursor a page handed out).
    """
    if not cursor:
        return ""
    try:
        return validation.node_id(cursor)
    except errors.TrackerValidationError:
        raise errors.TrackerValidationError("cursor", cursor, "expected the next_cursor of a previous page") from None


def lost_reason(worker: str, last_seen: datetime, now: datetime) -> str:
    """The reason recorded on a node whose worker process went silent."""
    return f"worker {worker} last seen {(now - last_seen).total_seconds():.0f} s ago ({last_seen.isoformat()})"


@runtime_checkable
class SessionStorageAdapter(Protocol):
    """A blocking store of sessions. Implementations must be safe to share between threads."""

    def create(self, session: models.SessionInfo, nodes: NewNodes = NO_NODES) -> None:
        """Store a new session (and its known nodes as ``pending``).

        The nodes' tree, when given, says which node feeds which: from then on a node's end marks
        ``skipped`` what will never run (:func:`tracker.structure.skips`).

        Raises:
            SessionExistsError: the id is taken.
        """

    def add_nodes(self, session_id: str, nodes: NewNodes, max_node_count: int, now: datetime) -> models.AddOutcome:
        """Grow a session that has not ended by ``nodes`` (new, ``pending``), in one atomic step:
        ``node_count`` grows with them, so no result can end the session in between. Their tree is
        given only when it has links; the session's tree grows as :func:`tracker.structure.grown`
        says. When every node is in the session already, nothing changes (``added`` False).

        Raises:
            SessionNotFoundError: no such session.
            InvalidStateTransitionError: the session has ended.
            TrackerValidationError: some of the nodes (not all) are in the session already, or it
                would have more than ``max_node_count`` nodes.
        """

    def get(self, session_id: str) -> models.SessionInfo | None:
        """The session's metadata and counters, or None. Cost does not grow with the node count."""

    def get_structure(self, session_id: str) -> Tree | None:
        """The canvas tree the session was created with, or None (none given, or no such session)."""

    def transition(
        self, session_id: str, target: SessionStatus, allowed_from: frozenset[SessionStatus], now: datetime
    ) -> models.TransitionOutcome:
        """Compare-and-set the status. Cancelling also marks every unfinished node ``cancelled``.

        Raises:
            SessionNotFoundError: no such session.
            InvalidStateTransitionError: the current status is not in ``allowed_from``.
        """

    def resume(
        self, session_id: str, choice: ResumeChoice, allowed_from: frozenset[SessionStatus], now: datetime
    ) -> models.ResumeOutcome:
        """Take the session back to ``running``; reset unfinished (and, as ``choice`` says, failed)
        nodes to ``pending``.

        Completed nodes are never reset. Each reset node gets a fresh task id from
        ``choice.task_id_base``. Returns the reset nodes, with their new task ids and the
        signatures stored at dispatch.

        When ``choice`` names the nodes to reset and one of them has completed since, nothing
        changes and :class:`ResumePlanChanged` is raised, so that the plan is made again.

        Raises:
            SessionNotFoundError: no such session.
            InvalidStateTransitionError: the current status is not in ``allowed_from``.
            ResumePlanChanged: see ``choice``.
        """

    def set_progress(self, session_id: str, progress_percent: float, now: datetime) -> models.SessionInfo:
        """Set an explicit progress on a session that has not ended.

        Raises:
            SessionNotFoundError: no such session.
            InvalidStateTransitionError: the session has ended.
        """

    def record_node(self, session_id: str, event: NodeEvent, now: datetime) -> models.NodeOutcome:
        """Upsert one node event, move the counters, and finish the session when it is done.

        Idempotent per (session, node, status): the same event twice changes nothing the second
        time. ``pending`` sessions move to ``running`` on the first node event; ended sessions
        record the node but keep their status.

        Raises:
            SessionNotFoundError: no such session.
            NodeLimitError: the node is new and the session has ``node_count`` nodes already.
        """

    def record_nodes(
        self, session_id: str, events: Sequence[NodeEvent], now: datetime, request_id: str | None = None
    ) -> models.BatchOutcome:
        """Apply ``events`` in order, as that many :meth:`record_node` calls would, in one atomic step.

        ``request_id`` names the call across its retries (see ``NodeEvent.request_id``).

        Raises:
            SessionNotFoundError: no such session.
            NodeLimitError: the events bring more distinct nodes than ``node_count``; nothing changed.
        """

    def heartbeat(self, worker: str | None, now: datetime, sessions: Sequence[str] = ()) -> None:
        """Note that worker process ``worker`` is alive at ``now`` (called every few seconds), and
        keep ``sessions`` (those it runs nodes of) from expiring while they have not ended.
        ``worker`` None: only keep the sessions alive (parents waiting for their children)."""

    def retire(self, worker: str) -> None:
        """Worker process ``worker`` stopped cleanly, having written what it ran: it leaves the
        registry, so that no reaper takes it for dead (and ends sessions whose queued messages it
        would then think lost). One that still holds nodes stays, for the reaper to decide."""

    def get_children(self, session_id: str) -> list[models.ChildSession]:
        """The child sessions the session's nodes' tasks opened, in any order (empty: none, or no such session)."""

    def get_failures(self, session_id: str) -> list[models.FailureGroup]:
        """The session's failed and lost nodes grouped by cause (:func:`tracker.states.failure_type`),
        in any order, kept with its counters: a node joins its group when it fails or is lost, and
        leaves it when it is not any more (a late success, a resume).

        Raises:
            SessionNotFoundError: no such session.
        """

    def list_workers(self, limit: int) -> list[models.WorkerInfo]:
        """At most ``limit`` worker processes from the heartbeat registry, newest heartbeat first
        (equal ones by name, last first), each with how many nodes it runs now and, sorted, up to
        :data:`WORKER_NODES_SHOWN` of them (all when it runs no more). Costs the workers listed,
        never their nodes.

        Workers stay listed until a reaper takes a dead one out (once its nodes are reaped), so a
        silent one shows until then: the reader compares ``last_seen_at`` with its clock.
        """

    def watched_children(self, limit: int) -> list[ChildWatch]:
        """At most ``limit`` child sessions whose end was not told to their parent yet, oldest first:
        every session created with a parent is watched until :meth:`unwatch_child`."""

    def unwatch_child(self, watch: ChildWatch) -> None:
        """Stop watching a child whose end was told to its parent."""

    def reap_lost(
        self, now: datetime, stale_after_s: float, max_runtime_s: float | None = None, requeued: bool = False
    ) -> list[models.NodeOutcome]:
        """Mark ``lost`` every running node whose worker process went silent (or that ran too long).

        A worker process is silent when it has not been seen for ``stale_after_s`` seconds; its
        nodes are reaped once a reaper has found it silent for ``stale_after_s`` more (the grace:
        a live worker coming back from a store outage beats within it). When no worker at all was
        seen alive since the last pass (the store was down, or every worker died), the grace
        starts again for every silent worker, so that an outage of any length never costs a live
        worker its nodes. With ``max_runtime_s``, a node that started longer ago than that is lost
        at once. With ``requeued`` (the app acknowledges late: a dead worker's messages come back
        from the broker), a silent worker's nodes go back to ``pending`` instead, to be counted when
        their redelivered tasks run. Each node is marked once even when two reapers run at the same
        time. Cost: the running nodes of the workers checked, never a scan of all nodes.

        Returns:
            The outcome of each node marked (``finished`` set where that ended its session).
        """

    def get_nodes(
        self, session_id: str, status: NodeStatus | None = None, cursor: str | None = None, limit: int = 100
    ) -> models.NodePage:
        """A page of the session's nodes, optionally only those in ``status``.

        With a status, the page holds ``limit`` nodes whenever that many are in it after the
        cursor (node id order; the cursor is the last node id of the page before), and costs the
        page, not the session's size. Without one, nodes come in the store's order.

        Raises:
            SessionNotFoundError: no such session.
            TrackerValidationError: a cursor no page handed out.
        """

    def get_node(self, session_id: str, node_id: str) -> models.NodeResult:
        """One node's latest record, read in one step with the session's existence (O(1)).

        Raises:
            SessionNotFoundError: no such session.
            NodeNotFoundError: the session has no record of the node.
        """

    def list_sessions(
        self, where: SessionFilter = EVERY_SESSION, cursor: str | None = None, limit: int = 50
    ) -> models.SessionPage:
        """A page of the sessions ``where`` lets through: newest first, but by canvas path (then
        newest first) with a path alone. A tag or a path prefix is read from its own index (the
        page costs the page); a status, and a path given with a tag, sift that page (it may be
        short)."""

    def delete(self, session_id: str) -> bool:
        """Remove a session and everything it holds; False when it did not exist."""

    def remove_expired(self, now: datetime, timeout_s: float, finished_ttl_s: float | None = None) -> int:
        """Remove the sessions that outlived their retention; return how many. A session that has
        not ended is kept ``timeout_s`` after its last change or heartbeat, an ended one
        ``finished_ttl_s`` (None: ``timeout_s``) after its last change. Costs the sessions removed,
        not those kept."""

    def end_stalled(self, now: datetime, stalled_after_s: float, reason: str) -> list[models.BatchOutcome]:
        """End the sessions a lost message left waiting: not ended, existing when a dead worker
        process was last reaped, nothing of them running, and no write nor heartbeat for
        ``stalled_after_s``. Their nodes without a result become ``lost`` (with ``reason``).

        Only the sessions of the window after a reaping are looked at (by last known update, as
        cleanup does), so a store where no worker died does nothing.

        Returns:
            One outcome per session ended (``finished``, ``first_failure`` as for node events).
        """

    def read_events(
        self, session_id: str, after: str | None = None, limit: int = 100, block_ms: int | None = None
    ) -> list[models.SessionEvent]:
        """Events after id ``after`` (from the start when None), waiting up to ``block_ms`` for one."""

    def asynchronous(self) -> AsyncStore:
        """The same store for asyncio callers: it runs these verbs as :class:`StoreCall` values
        (a store without an asyncio client returns ``tracker.storage.aio.ThreadedAsyncStore(self)``)."""

    def close(self) -> None:
        """Release connections."""


class StoreCall(NamedTuple, Generic[T]):
    """One verb of :class:`SessionStorageAdapter` with its arguments, as the manager's operations
    build it: the blocking flavour runs it with :meth:`run`, the awaitable one with
    :meth:`AsyncStore.run`. Built by :func:`store_call`, which mypy checks against the verb."""

    verb: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def run(self, store: SessionStorageAdapter) -> T:
        """Call the verb on a blocking store."""
        result: T = getattr(store, self.verb)(*self.args, **self.kwargs)
        return result


def store_call(
    verb: Callable[Concatenate[SessionStorageAdapter, P], T], /, *args: P.args, **kwargs: P.kwargs
) -> StoreCall[T]:
    """``verb`` (a method of :class:`SessionStorageAdapter`, e.g. ``SessionStorageAdapter.get``)
    applied to ``args``: its arguments and result are typed by the Protocol's signature."""
    return StoreCall(verb.__name__, args, kwargs)


@runtime_checkable
class AsyncStore(Protocol):
    """The awaitable flavour of a store (:meth:`SessionStorageAdapter.asynchronous`): the same
    verbs, run as :class:`StoreCall` values, without waiting in the event loop."""

    async def run(self, call: StoreCall[T]) -> T:
        """Run one verb of the store."""

    async def close(self) -> None:
        """Release the running loop's connections."""
