"""Pydantic v2 models: what a session, a node and an event look like to callers.

``to_dict()`` always returns JSON-safe values (ISO-8601 UTC datetimes, plain strings for enums).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, computed_field

from tracker.states import NodeStatus, RateWindow, SessionStatus

JsonValue = Any
"""Any value ``json.dumps`` accepts without a custom encoder."""


#: Epoch milliseconds count from here.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utc_from_ms(ms: int | None) -> datetime | None:
    """Epoch milliseconds (as stored) to an aware UTC datetime, exactly (``ms / 1000`` as a float
    would give stray microseconds after about the year 2300)."""
    return None if ms is None else _EPOCH + timedelta(milliseconds=ms)


def ms_from_utc(moment: datetime | None) -> int | None:
    """An aware datetime to epoch milliseconds (as stored)."""
    return None if moment is None else round(moment.timestamp() * 1000)


class _Model(BaseModel):
    # Field docstrings are the fields' descriptions in the HTTP API's OpenAPI document.
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False, use_attribute_docstrings=True)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (datetimes as ISO-8601 UTC strings, enums as their values)."""
        return self.model_dump(mode="json", by_alias=True)


class NodeError(_Model):
    """Why a node failed. Only names and text: never a type to import or instantiate."""

    type: str
    """The exception's class name, e.g. ``"ValueError"``."""
    message: str = ""
    """``str(exception)``, shortened to the configured cap."""


class NodeResult(_Model):
    """The latest known state of one node of a session."""

    node_id: str
    status: NodeStatus = NodeStatus.COMPLETED
    result: JsonValue = None
    """The task's return value (JSON), when it completed."""
    error: NodeError | None = None
    attempts: int = 0
    """How many times the node started (Celery's ``request.retries + 1`` of the latest attempt)."""
    task_id: str | None = None
    worker: str | None = None
    """Worker host name and process id that ran (or runs) it, e.g. ``"celery@host:1234"``."""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    reason: str | None = None
    """Why a node is ``lost``, ``cancelled`` or ``skipped`` (for ``skipped``: the node whose end caused it)."""
    progress: float | None = None
    """How far a running node's task says it is (0..1, ``tracker.celery.report_progress``); None when it reported
    nothing, or once the node stopped running."""
    waiting: bool = False
    """Its task succeeded (``result`` holds what it returned) and it waits, ``running``, for the child sessions the task
    opened."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def execution_time_ms(self) -> float | None:
        """Wall time of the latest attempt in milliseconds, when it started and finished."""
        if self.started_at is None or self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at).total_seconds() * 1000.0, 3)


class SessionInfo(_Model):
    """Everything a status read returns: metadata and counters, never the node list."""

    session_id: str
    """The session id (UUID4)."""
    status: SessionStatus = SessionStatus.PENDING
    """Where the session is: ``pending`` and ``running`` until it ends, then how it ended."""
    progress_percent: float = Field(default=0.0, ge=0.0, le=100.0)
    """Nodes with a result, plus the fractions running nodes reported, over ``node_count`` (0 to 100);
    or what ``update_progress`` set."""
    completed_nodes: int = 0
    """Nodes whose latest result is ``completed``."""
    failed_nodes: int = 0
    """Nodes whose latest result is ``failed`` or ``lost``."""
    running_nodes: int = 0
    """Nodes running now."""
    retrying_nodes: int = 0
    """Nodes that failed an attempt and wait for Celery's retry (``task.retry``; not in ``running_nodes``)."""
    lost_nodes: int = 0
    """Of ``failed_nodes``, how many were lost (their worker vanished)."""
    cancelled_nodes: int = 0
    """Nodes revoked, or outstanding when the session was cancelled (not in ``failed_nodes``)."""
    skipped_nodes: int = 0
    """Nodes Celery will never run because a node they depend on did not complete."""
    canvas_path: str
    """What was dispatched: the JSON Canvas file's path, or the name given to ``dispatch``."""
    node_count: int = Field(ge=0)
    """How many nodes the session has."""
    created_at: datetime
    """When it was created (at dispatch)."""
    updated_at: datetime
    """Its last change."""
    started_at: datetime | None = None
    """When its first node started."""
    finished_at: datetime | None = None
    """When it ended (None while it runs, and again once resumed)."""
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    """What was given at dispatch, and ``dispatched_by`` (the Celery app that sent it)."""
    run: int = Field(default=1, ge=1)
    """Which run of the session this is: 1 from dispatch, one more for each resume that re-sent nodes."""
    children: int = 0
    """Child sessions its nodes' tasks opened (``dispatch`` inside a tracked task)."""
    children_open: int = 0
    """Of those, the ones that have not ended."""
    parent_session_id: str | None = None
    """For a child session: its parent session."""
    parent_node_id: str | None = None
    """For a child session: the parent's node whose task opened it (that node ends with it)."""
    failure_types: int = 0
    """How many causes (error types) its failed and lost nodes have (``get_failures`` lists them)."""
    tags: list[str] = Field(default_factory=list)
    """Labels given at dispatch (``list_sessions(tag=...)`` finds the session by them)."""
    rate_per_s: float | None = None
    """Nodes finished per second over the last 30 to 60 s up to the last one (None: too early)."""
    eta_at: datetime | None = None
    """When the last node should finish at that rate (an ended session: when it ended)."""
    eta_s: float | None = None
    """Seconds from the read until ``eta_at`` (0 once ended); None when unknown or overdue. A manager's
    reads fill it in with its clock."""

    def seen_at(self, now: datetime) -> SessionInfo:
        """This session as read at ``now``: with ``eta_s``."""
        if self.status.is_terminal:
            eta_s: float | None = 0.0
        elif self.eta_at is None or self.eta_at < now:
            eta_s = None
        else:
            eta_s = round((self.eta_at - now).total_seconds(), 3)
        return self if eta_s == self.eta_s else self.model_copy(update={"eta_s": eta_s})

    @computed_field  # type: ignore[prop-decorator]
    @property
    def pending_nodes(self) -> int:
        """Nodes with no terminal result that are not running."""
        finished = self.completed_nodes + self.failed_nodes + self.cancelled_nodes + self.skipped_nodes
        return max(0, self.node_count - finished - self.running_nodes - self.retrying_nodes)


def rate_and_eta(window: RateWindow | None, node_count: int, finished_at: datetime | None) -> dict[str, Any]:
    """A session's ``rate_per_s``, ``eta_at`` and ``eta_s`` as its store knows them, from its rate
    window: an ended one's ``eta_at`` is when it ended, and its ``eta_s`` 0; a running one's
    ``eta_s`` needs a clock (:meth:`SessionInfo.seen_at`)."""
    rate = None if window is None else window.rate_per_s()
    if finished_at is not None:
        return {"rate_per_s": rate, "eta_at": finished_at, "eta_s": 0.0}
    eta_ms = None if window is None else window.eta_ms(node_count)
    return {"rate_per_s": rate, "eta_at": utc_from_ms(eta_ms), "eta_s": None}


class ParallelTaskStatus(SessionInfo):
    """The seed OpenAPI's status schema (``GET /api/v1/parallel/status/{task_id}``): a session, its id
    named ``task_id``, with a hint when it looks stuck."""

    # Lenient, unlike the models callers build: a client reading a newer server's answer keeps working.
    # Every field is in every answer, so the answer's schema requires them all.
    model_config = ConfigDict(extra="ignore", json_schema_serialization_defaults_required=True)

    session_id: str = Field(
        serialization_alias="task_id",
        validation_alias=AliasChoices("task_id", "session_id"),
        description="The session id (UUID4).",
    )
    hint: str | None = None
    """Advice for a session that looks stuck, e.g. pending while no worker has picked up any node."""

    @property
    def task_id(self) -> str:
        """The session id, by the seed's name."""
        return self.session_id

    @classmethod
    def from_session(cls, info: SessionInfo, hint: str | None = None) -> ParallelTaskStatus:
        """The API view of a session, with ``hint`` (see :mod:`tracker.hints`) when there is one."""
        return cls(**dict(info), hint=hint)


class SessionEvent(_Model):
    """One change of a session, as kept in its event stream (and sent as one SSE event)."""

    id: str
    """Stream entry id (``<ms>-<seq>``), monotonic per session; the SSE ``id``."""
    type: str
    """``created``, ``status``, ``progress`` (an explicit progress, or a running node's report: with its node),
    ``node``, ``reset``, ``added`` (nodes added while it runs) or ``child`` (a child session of the node opened or
    ended, or its task succeeded and it waits for them)."""
    status: SessionStatus
    progress_percent: float
    completed_nodes: int
    failed_nodes: int
    node_id: str | None = None
    node_status: NodeStatus | None = None
    at: datetime


class NodeSpec(_Model):
    """A node known at dispatch: its id, task id and the signature that re-sends it on resume."""

    node_id: str
    task_id: str | None = None
    signature: dict[str, JsonValue] | None = None
    """The Celery signature as a JSON dict (``dict(signature)``), None when unknown."""


class SessionPage(_Model):
    """One page of a session listing."""

    sessions: list[SessionInfo]
    next_cursor: str | None = None
    """Pass back as ``cursor`` for the next page; None on the last page."""


class NodePage(_Model):
    """One page of a session's node results."""

    nodes: list[NodeResult]
    next_cursor: str | None = None


class NodeOutcome(_Model):
    """What recording one node event did."""

    node: NodeResult
    session: SessionInfo
    previous_node_status: NodeStatus | None = None
    """The node's status before the event (None when it was new)."""
    finished: SessionStatus | None = None
    """Set when this very event finished the session (exactly one caller sees it)."""
    succeeded: bool = False
    """This event made the session ``completed`` for the first time in its life (exactly one caller)."""
    first_failure: str | None = None
    """The node whose failure was the session's first for good, told to exactly one caller."""


@dataclass(frozen=True, eq=False)
class BatchOutcome:
    """What recording a batch of node events (one store call) did.

    The session after the call is read (from the store's reply) when :attr:`session` is first
    asked for: a task's handler asks only when its call ended the session or told it to send a
    callback, and most calls do neither.
    """

    #: Reads the session after the call; :attr:`session` calls it once.
    read_session: Callable[[], SessionInfo] = field(repr=False)
    #: Set when this very call finished the session (exactly one caller sees it).
    finished: SessionStatus | None = None
    #: This call made the session ``completed`` for the first time in its life (exactly one caller).
    succeeded: bool = False
    #: The node whose failure was the session's first for good, told to exactly one caller.
    first_failure: str | None = None

    @classmethod
    def of(
        cls,
        session: SessionInfo,
        finished: SessionStatus | None = None,
        succeeded: bool = False,
        first_failure: str | None = None,
    ) -> BatchOutcome:
        """The outcome of a call whose session is known already (the memory store's)."""
        return cls(lambda: session, finished, succeeded, first_failure)

    @functools.cached_property
    def session(self) -> SessionInfo:
        """The session after the call."""
        return self.read_session()


class FailureGroup(_Model):
    """The failed (and lost) nodes of a session with one cause, as ``get_failures`` lists them."""

    error_type: str
    """The error's class name (``TimeoutError``), ``lost`` (its worker vanished) or ``unknown``."""
    count: int
    """How many of the session's nodes are failed or lost with it now."""
    first_message: str = ""
    """The message of the first node that failed with it."""
    first_at: datetime
    last_at: datetime
    node_ids: list[str] = Field(default_factory=list)
    """The first few of those nodes (``states.FAILURE_SAMPLE``); ``get_nodes`` pages through all."""


class HeldNode(_Model):
    """A node a worker process runs now, as its heartbeat registry holds it."""

    session_id: str
    node_id: str


class WorkerInfo(_Model):
    """A worker process as its heartbeats tell it (``list_workers``): when it was last seen and the
    nodes it runs now. Made by the stores from the registry the reaper reads, so what an operator
    sees is what decides whether its nodes are reaped."""

    worker: str
    """The worker process, ``hostname:pid`` (``celery@host:1234``)."""
    last_seen_at: datetime
    """Its last heartbeat (or the last start of a node on it)."""
    running: int = 0
    """How many nodes it runs now."""
    nodes: list[HeldNode] = Field(default_factory=list)
    """Up to 20 of those nodes (``storage.base.WORKER_NODES_SHOWN``; all when it runs no more), sorted."""

    def seen_at(self, now: datetime, stale_after_s: float) -> WorkerStatus:
        """This worker as read at ``now``: how long ago it was seen, and whether that is within
        ``stale_after_s`` (``TRACKER_WORKER_STALE_AFTER_S``), the reaper's rule, so that a worker
        shown silent is one whose nodes a reaper will take."""
        # Never below 0: the heartbeat comes from another host's clock.
        ago_s = max(0.0, round((now - self.last_seen_at).total_seconds(), 3))
        return WorkerStatus(
            worker=self.worker,
            last_seen_at=self.last_seen_at,
            running=self.running,
            nodes=self.nodes,
            seen_s_ago=ago_s,
            alive=ago_s <= stale_after_s,
        )


class WorkerStatus(WorkerInfo):
    """A worker process as read at one moment (:meth:`WorkerInfo.seen_at`): what the web API and
    ``tracker workers --json`` answer."""

    seen_s_ago: float = Field(ge=0.0)
    """Seconds from its last heartbeat to the read."""
    alive: bool
    """Seen within ``TRACKER_WORKER_STALE_AFTER_S`` seconds: not (yet) a reaper's suspect."""


class ResumeOutcome(_Model):
    """What a resume did: the session after it, and the nodes reset to ``pending`` to re-send."""

    session: SessionInfo
    previous_status: SessionStatus
    nodes: list[NodeSpec]


class ChildSession(_Model):
    """A child session a node's task opened (``dispatch`` inside a tracked task), as its parent keeps it."""

    session_id: str
    node_id: str
    """The parent's node whose task opened it, and that task's attempt."""
    attempt: int = 1
    child_failure: str = "fail"
    """``fail`` (the node fails when the child does not complete) or ``ignore``."""
    status: str = "open"
    """``open`` until it ended, then the status it ended with."""


class AddOutcome(_Model):
    """What adding nodes to a running session did (``add_nodes``)."""

    session: SessionInfo
    added: bool
    """False when every node was in the session already (the same call made again): nothing changed."""
    pending: list[str]
    """Of the nodes asked for, those not started yet: all of them when ``added``."""


class TransitionOutcome(_Model):
    """What a session transition did."""

    session: SessionInfo
    previous_status: SessionStatus
