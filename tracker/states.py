"""The session and node state machines: pure rules, no I/O.

Every storage adapter takes its rules from here. The Redis scripts receive the allowed
from-states as arguments, and the adapter contract suite checks that both adapters apply
:func:`finish_status` and :func:`merge_node_status` identically.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import NamedTuple


class SessionStatus(StrEnum):
    """Where a session is in its life."""

    #: Created; no node has started yet.
    PENDING = "pending"
    #: At least one node started; not every node has a terminal result yet.
    RUNNING = "running"
    #: Every node completed (error callbacks with nothing to handle are ``skipped``).
    COMPLETED = "completed"
    #: Every node has a terminal result; some completed, some did not.
    PARTIAL_FAILURE = "partial_failure"
    #: Every node has a terminal result and none completed (or the batch failed as a whole).
    FAILED = "failed"
    #: Cancelled by a user; outstanding nodes were revoked.
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True once the session has ended (it may still be resumed unless completed)."""
        return self in TERMINAL_STATUSES


class NodeStatus(StrEnum):
    """Where one node (one leaf task of the batch) is."""

    #: Known to the session (dispatched), not started yet.
    PENDING = "pending"
    #: A worker is running it.
    RUNNING = "running"
    #: The task asked Celery to retry it; it will run again.
    RETRYING = "retrying"
    #: Finished successfully. Final: later events for the node change nothing.
    COMPLETED = "completed"
    #: Finished with an error, retries exhausted.
    FAILED = "failed"
    #: Revoked, or outstanding when its session was cancelled.
    CANCELLED = "cancelled"
    #: Its worker vanished (killed, out of memory, hard time limit) without reporting a result.
    LOST = "lost"
    #: Celery will never run it: a node it depends on ended without completing (an earlier chain
    #: link, a chord header task), or it is an error callback and nothing it handles failed.
    SKIPPED = "skipped"

    @property
    def is_terminal(self) -> bool:
        """True for a result that counts towards the session's finish."""
        return self in TERMINAL_NODE_STATUSES


#: The session transitions. Out of an ended session there are two ways: *resume* (to ``running``),
#: and a late result (a slow worker after its node was reaped, a redelivery) that moves a node
#: between counters, after which the ended status is derived again from the counts (see
#: :func:`rederived_status`). Neither is a plain status update: :func:`allowed_from` leaves them out.
VALID_TRANSITIONS: dict[SessionStatus, frozenset[SessionStatus]] = {
    SessionStatus.PENDING: frozenset({SessionStatus.RUNNING, SessionStatus.CANCELLED, SessionStatus.FAILED}),
    SessionStatus.RUNNING: frozenset(
        {
            SessionStatus.COMPLETED,
            SessionStatus.PARTIAL_FAILURE,
            SessionStatus.FAILED,
            SessionStatus.CANCELLED,
        }
    ),
    SessionStatus.PARTIAL_FAILURE: frozenset({SessionStatus.RUNNING, SessionStatus.COMPLETED, SessionStatus.FAILED}),
    SessionStatus.FAILED: frozenset({SessionStatus.RUNNING, SessionStatus.COMPLETED, SessionStatus.PARTIAL_FAILURE}),
    SessionStatus.CANCELLED: frozenset({SessionStatus.RUNNING}),
    SessionStatus.COMPLETED: frozenset(),
}

#: Statuses a session ends in.
TERMINAL_STATUSES: frozenset[SessionStatus] = frozenset(
    {SessionStatus.COMPLETED, SessionStatus.PARTIAL_FAILURE, SessionStatus.FAILED, SessionStatus.CANCELLED}
)

#: Ended sessions that ``resume`` may take back to ``running``.
RESUMABLE_STATUSES: frozenset[SessionStatus] = frozenset(
    s for s, targets in VALID_TRANSITIONS.items() if s in TERMINAL_STATUSES and SessionStatus.RUNNING in targets
)

#: Node results that count towards the finish rule.
TERMINAL_NODE_STATUSES: frozenset[NodeStatus] = frozenset(
    {NodeStatus.COMPLETED, NodeStatus.FAILED, NodeStatus.CANCELLED, NodeStatus.LOST, NodeStatus.SKIPPED}
)

#: Node statuses counted in ``failed_nodes``: the node ran (or was meant to) and did not complete.
FAILED_NODE_STATUSES: frozenset[NodeStatus] = frozenset({NodeStatus.FAILED, NodeStatus.LOST})

#: Node statuses of nodes in flight (``running_nodes`` and ``retrying_nodes``).
ACTIVE_NODE_STATUSES: frozenset[NodeStatus] = frozenset({NodeStatus.RUNNING, NodeStatus.RETRYING})


def is_valid_transition(current: SessionStatus | str, target: SessionStatus | str) -> bool:
    """Tell whether a session may move from ``current`` to ``target``.

    Args:
        current: The session's status now.
        target: The status asked for.

    Returns:
        True when the DESIGN table allows it. Unknown status names are never valid.
    """
    try:
        return SessionStatus(target) in VALID_TRANSITIONS[SessionStatus(current)]
    except ValueError:
        return False


def allowed_from(target: SessionStatus, resume: bool = False) -> frozenset[SessionStatus]:
    """The statuses from which ``target`` may be reached (what a compare-and-set checks).

    Args:
        target: The status asked for.
        resume: Include the resume edges (ended -> running). A plain status update leaves every
            edge out of an ended session: only a resume, which also resets the unfinished nodes,
            may reopen one, and only the counts (a late result) may change an ended status.
    """
    return frozenset(
        s
        for s, targets in VALID_TRANSITIONS.items()
        if target in targets and (s not in TERMINAL_STATUSES or (resume and target is SessionStatus.RUNNING))
    )


def finish_status(
    completed: int, failed: int, cancelled: int, node_count: int, skipped: int = 0, unneeded: int = 0
) -> SessionStatus | None:
    """The status a running session finishes in, or None while results are outstanding.

    Args:
        completed: Nodes whose latest result is ``completed``.
        failed: Nodes whose latest result is ``failed`` or ``lost``.
        cancelled: Nodes whose latest result is ``cancelled`` (revoked one by one).
        node_count: Nodes in the batch.
        skipped: Nodes Celery will never run (``skipped``).
        unneeded: Of ``skipped``, the error callbacks skipped because nothing they handle failed.

    Returns:
        ``completed`` (every node completed, but for error callbacks nothing needed),
        ``cancelled`` (every node revoked, or skipped because of a revoked one), ``failed`` (none
        completed), ``partial_failure`` (some completed), or None while any node has no result.
    """
    if node_count <= 0 or completed + failed + cancelled + skipped < node_count:
        return None
    if completed and completed + unneeded == node_count:
        return SessionStatus.COMPLETED
    if cancelled and cancelled + skipped == node_count:
        return SessionStatus.CANCELLED
    if completed == 0:
        return SessionStatus.FAILED
    return SessionStatus.PARTIAL_FAILURE


def rederived_status(
    current: SessionStatus,
    completed: int,
    failed: int,
    cancelled: int,
    node_count: int,
    skipped: int = 0,
    unneeded: int = 0,
) -> SessionStatus:
    """The status of an ended session after a late result moved a node between counters.

    An ended session's status always agrees with its counts: ``partial_failure`` becomes
    ``completed`` once every node has completed, ``failed`` becomes ``partial_failure`` when one
    completes after all, and so on: only along the edges of :data:`VALID_TRANSITIONS`.
    ``cancelled`` stays ``cancelled`` (a user ended it), ``completed`` is final (completed nodes
    stay completed), and a session that is not ended keeps its status (the finish rule ends it).
    """
    if not current.is_terminal:
        return current
    target = finish_status(completed, failed, cancelled, node_count, skipped, unneeded)
    return target if target in VALID_TRANSITIONS[current] else current


def merge_node_status(current: NodeStatus | None, incoming: NodeStatus) -> NodeStatus:
    """The node status after an event, given the status the node had.

    Events arrive once per attempt, sometimes twice (redelivery) and out of order. The rules:
    ``completed`` is final; another terminal result replaces a non-completed terminal one (a
    failed node that succeeds on resume becomes completed); a start or retry event never
    reopens a terminal node (resume resets nodes to ``pending`` explicitly).

    Args:
        current: The node's status now, None when the session has not seen it.
        incoming: The status the event reports.

    Returns:
        The node's new status (possibly ``current`` unchanged).
    """
    if current is None:
        return incoming
    if current is NodeStatus.COMPLETED:
        return current
    if current.is_terminal and not incoming.is_terminal:
        return current
    return incoming


def is_stale_report(incoming: NodeStatus, task_id: str | None, current_task_id: str | None) -> bool:
    """True for a non-success result reported by a task that is no longer the node's.

    Resume gives a node a fresh task id; the old task may still report (a revoke arriving late, a
    failure of the original run). Such a report must not undo the re-run, so it changes nothing.
    A success counts whichever task sends it: the work was done.
    """
    return (
        incoming in TERMINAL_NODE_STATUSES
        and incoming is not NodeStatus.COMPLETED
        and bool(task_id)
        and bool(current_task_id)
        and task_id != current_task_id
    )


#: A running node's reported progress is counted in these units (a node done is ``PROGRESS_UNITS``):
#: sums of whole numbers stay exact however many reports come. Equal to the 10000 of a percentage
#: with two decimals, which :func:`progress_from_counts` relies on.
PROGRESS_UNITS = 10_000


def progress_units(fraction: float | None) -> int:
    """A running node's reported fraction done (0..1) in :data:`PROGRESS_UNITS`, rounded half up
    (``common.lua``: progress_units)."""
    return 0 if fraction is None else math.floor(fraction * PROGRESS_UNITS + 0.5)


def progress_from_counts(finished: int, node_count: int, running_units: int = 0) -> float:
    """``100 * (finished + the running nodes' fractions) / node_count`` (finished: nodes with a
    result; ``running_units``: the running nodes' reported progress summed in
    :data:`PROGRESS_UNITS`), rounded half up to 2 decimals.

    The Redis scripts compute the same expression (``common.lua``: derived_progress).
    """
    if node_count <= 0:
        return 0.0
    # A node is PROGRESS_UNITS = 10000 units: 10000 * (finished + running_units / 10000) / node_count.
    return math.floor((10000.0 * finished + running_units) / node_count + 0.5) / 100


# -- failures by cause ------------------------------------------------------------------------------

#: How many node ids a failure group keeps (the first that joined it).
FAILURE_SAMPLE = 5


def failure_type(status: NodeStatus, error_type: str | None) -> str | None:
    """The group a node's failure counts in (``common.lua``: failure_of): ``lost`` for a lost node,
    else its error's class name, ``unknown`` without one; None when the node has not failed."""
    if status is NodeStatus.LOST:
        return "lost"
    if status is NodeStatus.FAILED:
        return error_type or "unknown"
    return None


# -- rate and ETA -----------------------------------------------------------------------------------

#: The rate covers the last RATE_HALF_WINDOW_MS to twice that (``common.lua``: rate_window).
RATE_HALF_WINDOW_MS = 30_000


class RateWindow(NamedTuple):
    """The finished count (nodes with a result) at three moments: the window's start, its middle,
    and the last change. The window moves on by half once its middle is ``RATE_HALF_WINDOW_MS``
    old, so that the rate it gives is a recent one. Kept in the store as six numbers."""

    since_ms: int
    since_done: int
    mid_ms: int
    mid_done: int
    last_ms: int
    last_done: int

    @classmethod
    def starting(cls, at_ms: int, done: int) -> RateWindow:
        """A window that starts at ``at_ms`` with ``done`` nodes finished."""
        return cls(at_ms, done, at_ms, done, at_ms, done)

    def moved(self, done: int, now_ms: int) -> RateWindow:
        """The window once ``done`` nodes have finished at ``now_ms`` (unchanged when that is the
        count it has; started again when the count went back: a resume, a node sent back)."""
        window = self
        if done < window.mid_done:
            window = RateWindow.starting(now_ms, done)
        if done == window.last_done:
            return window
        if now_ms - window.mid_ms >= RATE_HALF_WINDOW_MS:
            window = window._replace(since_ms=window.mid_ms, since_done=window.mid_done, mid_ms=now_ms, mid_done=done)
        return window._replace(last_ms=now_ms, last_done=done)

    @classmethod
    def parse(cls, text: str) -> RateWindow | None:
        """The window as the store keeps it (``since_ms|since_done|...``); None for none."""
        parts = text.split("|") if text else []
        return cls(*(int(p) for p in parts)) if len(parts) == 6 else None

    def text(self) -> str:
        """As the store keeps it."""
        return "|".join(str(n) for n in self)

    def rate_per_s(self) -> float | None:
        """Nodes finished per second over the window, up to its last change; None before two
        moments apart saw nodes finish."""
        elapsed_ms = self.last_ms - self.since_ms
        if elapsed_ms <= 0 or self.last_done <= self.since_done:
            return None
        return (self.last_done - self.since_done) * 1000 / elapsed_ms

    def eta_ms(self, node_count: int) -> int | None:
        """When the last node should finish at the window's rate (epoch ms); None when unknown."""
        rate = self.rate_per_s()
        if rate is None:
            return None
        eta_ms = self.last_ms + round(max(0, node_count - self.last_done) * 1000 / rate)
        return eta_ms if eta_ms < _YEAR_9999_MS else None  # past what a datetime holds: not an estimate


_YEAR_9999_MS = 253_370_764_800_000
