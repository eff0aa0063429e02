"""Cancel and resume a dispatched session."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

from celery import Celery, Signature, chain, chord, group

from tracker import validation
from tracker.celery.callbacks import send_completion
from tracker.celery.children import tell_parent
from tracker.celery.dispatch import tag
from tracker.celery.origin import dispatching_app
from tracker.errors import (
    InvalidStateTransitionError,
    ResumeNotPossibleError,
    SessionNotFoundError,
    TrackerValidationError,
)
from tracker.manager import SessionManager, nodes_of
from tracker.models import NodeSpec, SessionInfo
from tracker.states import NodeStatus, SessionStatus, failure_type
from tracker.storage.base import ResumePlanChanged
from tracker.structure import RESULT_NOT_STORED, Tree, parts_of, resume_plan

logger = logging.getLogger("tracker.celery")


def cancel_session(
    session_id: str,
    *,
    app: Celery | None = None,
    manager: SessionManager | None = None,
    terminate: bool = False,
) -> SessionInfo:
    """Cancel a session: status ``cancelled``, unfinished nodes ``cancelled``, their tasks revoked,
    and so for each of its child sessions still open, down the tree.

    The status moves first (one atomic step), so a result arriving meanwhile is recorded without
    moving the status. Tasks already running keep running unless ``terminate`` is True.

    Args:
        app: The Celery app to revoke through; default the one that dispatched the session
            (imported by the path it recorded), else Celery's current app. Either must publish to
            the broker the session was dispatched through.

    Raises:
        SessionNotFoundError, InvalidStateTransitionError, TrackerValidationError.
        WrongCeleryAppError: the app publishes to another broker (nothing changed).
    """
    validation.flag(terminate, "terminate")
    manager = manager or SessionManager.get_instance()
    app = dispatching_app(session_id, manager.sync.get_session(session_id).metadata, app)
    outcome = manager.sync._transition(session_id, SessionStatus.CANCELLED)
    task_ids = [n.task_id for n in nodes_of(manager, session_id, NodeStatus.CANCELLED) if n.task_id]
    if task_ids:
        app.control.revoke(task_ids, terminate=terminate)
    send_completion(app, outcome)
    logger.info("tracker: session %s cancelled; %d task(s) revoked", session_id, len(task_ids))
    # The whole tree: each child session still open is cancelled too (and so on down); then a
    # cancelled child's end is told to its parent's node.
    for child in manager.sync.get_children(session_id):
        if child.status == "open":
            with contextlib.suppress(InvalidStateTransitionError, SessionNotFoundError):
                cancel_session(child.session_id, app=app, manager=manager, terminate=terminate)
    tell_parent(app, manager, outcome.session)
    return outcome.session


def resume_session(
    session_id: str,
    *,
    app: Celery | None = None,
    manager: SessionManager | None = None,
    retry_failed: bool = True,
    nodes: Sequence[str] | None = None,
    error_type: str | None = None,
) -> int:
    """Re-send what did not complete of a session, with its structure, under the same session id.

    Completed nodes are never re-run. A session dispatched with a structure (a chain, a chord, a
    nested canvas) is re-sent as Celery would have run it: a failed chain link with the rest of its
    chain and the result its parent produced, a chord's failed header tasks and then its body with
    every header result in order (those that completed given back from the store). Each re-sent
    node gets a fresh task id and the session's stamps, so it is counted against the same node.

    Args:
        app: The Celery app to send through; default the one that dispatched the session, as for
            :func:`cancel_session`.
        retry_failed: Re-send failed nodes too (otherwise only the unfinished ones, and nothing
            that needs a failed node's result).
        nodes: Re-send only these nodes (none of them completed), with what did not complete of
            what runs after them (the rest of their chain, their chord's body); every other node
            keeps its result.
        error_type: Re-send only the nodes failed (or lost: ``lost``) with this cause, as
            :meth:`SessionManager.get_failures` groups them, as ``nodes`` would (with ``nodes``:
            those too).

    Returns:
        How many nodes were re-sent. Nodes without a stored signature (a session created by hand,
        not by :func:`tracker.celery.dispatch`) are reset but cannot be re-sent; they are logged.

    Raises:
        SessionNotFoundError, InvalidStateTransitionError (a completed session), TrackerValidationError.
        TrackerValidationError: ``nodes`` is not a list of node ids (nothing changed).
        ResumeNotPossibleError: ``nodes`` names a node the session does not have or one that
            completed, or ``error_type`` is no failed node's cause; a re-sent part needs a
            completed node's result that was not stored; or a chosen node cannot run again without
            one that is not chosen (nothing changed).
        WrongCeleryAppError: the app publishes to another broker (nothing changed).
    """
    validation.flag(retry_failed, "retry_failed")
    manager = manager or SessionManager.get_instance()
    app = dispatching_app(session_id, manager.sync.get_session(session_id).metadata, app)
    for _ in range(_PLAN_ATTEMPTS):
        tree = manager.sync.get_structure(session_id)
        states = _node_states(manager, session_id)
        chosen = _chosen(session_id, states, nodes, error_type)
        plan = None
        if tree is not None:
            seen = {node: (state.status, state.result, state.stored) for node, state in states.items()}
            plan = resume_plan(tree, seen, retry_failed, session_id, None if chosen is None else set(chosen))
        try:
            reset = chosen if plan is None else plan.reset
            outcome = manager.sync._reopen_session(session_id, retry_failed=retry_failed, nodes=reset)
        except ResumePlanChanged:
            continue  # a node it meant to re-send completed meanwhile: plan again
        if plan is None:
            sent = sum(_send(_task(app, session_id, node)) for node in outcome.nodes)
            break
        if plan.tree is not None:
            specs = {node.node_id: node for node in outcome.nodes}
            canvas = _canvas(plan.tree, specs, plan.values, app, session_id)
            if canvas is not None:
                canvas.apply_async()
        sent = len(plan.reset)
        break
    else:
        raise ResumeNotPossibleError(
            session_id, "its nodes kept completing while the resume was planned", "resume it again: nothing was sent"
        )
    logger.info("tracker: session %s resumed; %d node(s) re-sent", session_id, sent)
    return sent


#: How many times a resume plans again when a node it meant to re-send completed meanwhile.
_PLAN_ATTEMPTS = 5


class _NodeState(NamedTuple):
    """What a resume plan reads of a node (the first three), and its failure's cause."""

    status: NodeStatus
    result: Any
    stored: bool
    cause: str | None


def _node_states(manager: SessionManager, session_id: str) -> dict[str, _NodeState]:
    """Every node's status, result, whether that result was stored, and its failure's cause."""
    return {
        node.node_id: _NodeState(
            node.status,
            node.result,
            not (node.reason or "").startswith(RESULT_NOT_STORED),
            failure_type(node.status, node.error.type if node.error else None),
        )
        for node in nodes_of(manager, session_id)
    }


#: What a resume of chosen nodes can name instead of a node it refused.
_CHOOSE = "choose among the nodes that did not complete: the session's failed, lost, cancelled or pending ones"


def _chosen(
    session_id: str, states: dict[str, _NodeState], nodes: Sequence[str] | None, error_type: str | None
) -> list[str] | None:
    """The nodes a resume of a subset re-sends (None: no subset): ``nodes`` and those failed with
    ``error_type``, checked before anything changes.

    Raises:
        TrackerValidationError: ``nodes`` is not a list of node ids, or ``error_type`` not a string.
        ResumeNotPossibleError: a node the session does not have, a completed node, or a cause none
            of its nodes failed with.
    """
    if nodes is None and error_type is None:
        return None
    if nodes is not None and (isinstance(nodes, str) or not isinstance(nodes, Sequence) or not nodes):
        raise TrackerValidationError("nodes", nodes, "expected a non-empty list of node ids", session_id)
    if error_type is not None and (not isinstance(error_type, str) or not error_type):
        raise TrackerValidationError("error_type", error_type, "expected an error type, e.g. TimeoutError", session_id)
    chosen = list(dict.fromkeys(validation.node_id(node, session_id) for node in nodes or ()))
    for node in chosen:
        if node not in states:
            raise ResumeNotPossibleError(session_id, f"node {node} is not a node of the session", _CHOOSE)
        if states[node].status is NodeStatus.COMPLETED:
            raise ResumeNotPossibleError(
                session_id, f"node {node} completed, and a completed node is never re-run", _CHOOSE
            )
    if error_type is not None:
        found = sorted(node for node, state in states.items() if state.cause == error_type)
        if not found:
            causes = sorted({state.cause for state in states.values() if state.cause})
            known = f"its causes are {', '.join(causes)}" if causes else "it has no failed node"
            hint = "choose one of those causes (the session's failures by cause), or resume without one"
            raise ResumeNotPossibleError(session_id, f"no node failed with {error_type} ({known})", hint)
        chosen += [node for node in found if node not in chosen]
    return chosen


def _task(app: Celery, session_id: str, node: NodeSpec) -> Signature | None:
    """Node ``node``'s stored signature, tagged with its new task id; None (logged) without one."""
    if node.signature is None or node.task_id is None:
        logger.warning("tracker: node %s of session %s has no stored signature", node.node_id, session_id)
        return None
    sig = Signature.from_dict(node.signature, app=app)
    tag(sig, session_id, node.node_id, node.task_id)
    return sig


def _send(sig: Signature | None) -> bool:
    if sig is None:
        return False
    sig.apply_async()
    return True


def _canvas(
    tree: Tree, specs: dict[str, NodeSpec], values: dict[str, Any], app: Celery, session_id: str
) -> Signature | None:
    """The Celery canvas of a resume plan's tree (None when none of its tasks can be sent)."""
    sig: Signature | None
    if "n" in tree:
        sig = _task(app, session_id, specs[tree["n"]]) if tree["n"] in specs else None
    elif "v" in tree:
        # A completed node's stored result, given back where the re-sent part needs it: Celery's
        # own accumulate task returns its argument (immutable: it takes nothing from before).
        sig = app.signature("celery.accumulate", args=(values[tree["v"]],), kwargs={"index": 0}, immutable=True)
    else:
        parts = [p for p in (_canvas(t, specs, values, app, session_id) for t in parts_of(tree)) if p is not None]
        if not parts:
            return None
        if "chain" in tree:
            sig = chain(*parts, app=app)
        elif "group" in tree:
            sig = group(parts, app=app)
        else:
            body = parts.pop()
            sig = chord(group(parts, app=app), body, app=app)
    if sig is not None:
        for errback in tree.get("e", ()):
            callback = _canvas(errback, specs, values, app, session_id)
            if callback is not None:
                sig.link_error(callback)
    return sig
