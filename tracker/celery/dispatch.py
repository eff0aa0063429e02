"""Dispatch a Celery canvas as a tracked session."""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, overload

from celery import Celery, Signature, chord, group
from celery.backends.base import DisabledBackend
from celery.canvas import _chain, maybe_signature
from celery.exceptions import NotRegistered
from celery.utils.functional import arity_greater, maybe_list

from tracker import validation
from tracker.celery.current import running_node
from tracker.celery.origin import ORIGIN_KEY, origin, real_app
from tracker.celery.stamps import NODE_STAMP, SESSION_STAMP
from tracker.errors import SessionExistsError, TrackerError, TrackerNotInstalledError, TrackerValidationError
from tracker.manager import SessionManager, nodes_of
from tracker.models import NodeSpec
from tracker.states import NodeStatus, SessionStatus
from tracker.storage.base import CHILD_POLICIES, ChildLink
from tracker.structure import Tree, has_links

#: Metadata keys under which the callbacks' signatures are kept.
ON_COMPLETE_KEY = "on_complete"
ON_SUCCESS_KEY = "on_success"
ON_FAILURE_KEY = "on_failure"


def leaves(canvas: Signature, app: Celery | None = None) -> list[Signature]:
    """Every task of a canvas (signature, group, chain, chord) that is a node, in node order: depth
    first, each part's error callbacks (``link_error``) after it.

    Nested items given as dicts are replaced in place by Signature objects, so what is returned
    is what will be sent.
    """
    walk = _Walk(app, max_depth=None)
    walk.tree(canvas, 0)
    return walk.tasks


class _Walk:
    """Reads a canvas into its tree (see :mod:`tracker.structure`) and its tasks, in node order."""

    def __init__(self, app: Celery | None, max_depth: int | None) -> None:
        self.app = app
        self.max_depth = max_depth
        self.tasks: list[Signature] = []

    def tree(self, canvas: Any, depth: int) -> Tree:
        """The tree of ``canvas``, its tasks' leaves named by their position in :attr:`tasks`."""
        if not isinstance(canvas, Signature):
            raise TrackerValidationError(
                "canvas", canvas, "expected a Celery signature, group, chain or chord (task.s(...)) in every place"
            )
        if not isinstance(canvas.get("task"), str) or not canvas.task:
            raise TrackerValidationError("canvas", canvas, "expected a task name in every signature")
        parts = (canvas.args, canvas.kwargs, canvas.options)
        if not all(isinstance(part, kind) for part, kind in zip(parts, (list | tuple, dict, dict), strict=True)):
            raise TrackerValidationError("canvas", canvas, "expected args, kwargs and options in every signature")
        if self.max_depth is not None and depth > self.max_depth:
            raise TrackerValidationError(
                "canvas", canvas, f"nested deeper than {self.max_depth} levels (TRACKER_MAX_CANVAS_DEPTH)"
            )
        tree: Tree
        if isinstance(canvas, chord):
            header = canvas.tasks
            if not isinstance(header, group):
                header = group(list(header), app=self.app)
                canvas.kwargs["header"] = header
            members = self._parts(header, depth)
            if canvas.body is None:
                tree = {"group": members}
            else:
                body = self._signature(canvas.body)
                canvas.kwargs["body"] = body
                tree = {"chord": members, "body": self.tree(body, depth + 1)}
        elif isinstance(canvas, group | _chain):
            tree = {"chain" if isinstance(canvas, _chain) else "group": self._parts(canvas, depth)}
        else:
            tree = {"n": len(self.tasks)}
            self.tasks.append(canvas)
        errbacks = canvas.options.get("link_error")
        if errbacks:
            callbacks = [self._signature(e) for e in maybe_list(errbacks)]
            canvas.options["link_error"] = callbacks
            sent = [self.tree(callback, depth + 1) for callback in callbacks if _sent_as_task(callback)]
            if sent:
                tree["e"] = sent
        return tree

    def _signature(self, item: Any) -> Any:
        """``item`` as a Signature when it is one or a dict of one; anything else as it is (refused)."""
        return maybe_signature(item, app=self.app) if isinstance(item, dict) else item

    def _parts(self, canvas: group | _chain, depth: int) -> list[Tree]:
        canvas.tasks = [self._signature(t) for t in canvas.tasks]
        if not canvas.tasks:
            kind = "chain" if isinstance(canvas, _chain) else "group"
            raise TrackerValidationError("canvas", canvas, f"holds an empty {kind}: it has no task to run")
        return [self.tree(task, depth + 1) for task in canvas.tasks]


def _sent_as_task(callback: Any) -> bool:
    """Whether Celery sends error callback ``callback`` as a task of its own (then it is a node),
    rather than calling it inside the failing worker: Celery calls a known task in place when it
    takes more than the failed task's id (``request, exc, traceback``), counting only the arguments
    the signature does not bind already (see ``celery.backends.base``)."""
    if not isinstance(callback, Signature) or isinstance(callback, group | _chain | chord):
        return True  # a canvas as error callback is sent (a non-signature is refused by the walk)
    try:
        header = callback.type.__header__
    except (NotRegistered, AttributeError):
        return True
    if isinstance(header, functools.partial):
        return True
    bound = callback.args or callback.kwargs
    if not callback.immutable and bound:
        with contextlib.suppress(TypeError, ValueError):
            return not arity_greater(functools.partial(header, *callback.args, **callback.kwargs), 1)
    return not arity_greater(header, 1)


def _named(tree: Tree, ids: Sequence[str]) -> Tree:
    """``tree`` with each task's position replaced by its node id."""
    named: Tree = {}
    for key, value in tree.items():
        if key == "n":
            named[key] = ids[value]
        elif key == "body":
            named[key] = _named(value, ids)
        else:
            named[key] = [_named(part, ids) for part in value]
    return named


def signature_json(sig: Signature) -> dict[str, Any]:
    """The signature as a plain JSON dict (what ``Signature.from_dict`` takes back)."""
    # A Signature is a dict: these are the items Signature.from_dict takes back.
    return {
        "task": sig["task"],
        "args": list(sig["args"]),
        "kwargs": dict(sig["kwargs"]),
        "options": {k: v for k, v in sig["options"].items() if k not in _NOT_KEPT},
        "subtask_type": sig.get("subtask_type"),
        "immutable": bool(sig.get("immutable", False)),
    }


#: Options a node's stored signature leaves out: resume gives it a fresh task id, and its error
#: callbacks are nodes of their own (resume attaches them again from the session's structure).
_NOT_KEPT = frozenset({"task_id", "link_error"})


def tag(sig: Signature, session_id: str, node_id: str, task_id: str) -> None:
    """Give ``sig`` its task id and the session/node stamps (what the signal handlers read).

    Only ``sig`` itself is stamped, not its callbacks (``Signature.stamp`` would stamp them with
    the same node): an error callback is a node of its own, tagged on its own. Stamps the caller
    set earlier are kept.
    """
    options = sig.options
    earlier = [h for h in options.get("stamped_headers") or () if h not in _STAMPS]
    stamps = {SESSION_STAMP: session_id, NODE_STAMP: node_id}
    options.update(stamps, task_id=task_id, stamped_headers=[*earlier, *_STAMPS])


_STAMPS = (SESSION_STAMP, NODE_STAMP)


def node_spec(sig: Signature, session_id: str, node_id: str, task_id: str) -> NodeSpec:
    """Tag ``sig`` as node ``node_id`` of the session; returns what the session keeps of it.

    The signature is kept as the caller made it (resume tags it afresh): the stamps would only add
    bytes. The node id and the signature's JSON are checked when the session is created, before
    anything is sent.
    """
    validation.node_id(node_id, session_id)
    signature = signature_json(sig)
    tag(sig, session_id, node_id, task_id)
    return NodeSpec(node_id=node_id, task_id=task_id, signature=signature)


#: The namespace of the ids a task derives for what it adds (``uuid5``): the same on every delivery.
DERIVED_IDS = uuid.UUID("5d2f8a2e-7c1b-4d0e-9a57-3f4b6c8e1d20")


def _installed(app: Celery, manager: SessionManager | None) -> tuple[Celery, SessionManager]:
    """The app (``current_app`` resolved) and the manager to use: ``manager``, else the one
    ``install(app)`` was given, else the process-wide one.

    Raises:
        TrackerNotInstalledError: ``install(app)`` was not called for the app.
    """
    app = real_app(app)
    if not isinstance(app, Celery):
        raise TrackerValidationError("app", app, "expected a Celery app")
    if manager is not None and not isinstance(manager, SessionManager):
        raise TrackerValidationError("manager", manager, "expected a SessionManager")
    recorder = getattr(app, "_tracker_recorder", None)
    if recorder is None:
        raise TrackerNotInstalledError(app.main or repr(app))
    return app, manager or recorder.manager


def _walked(
    canvas: Signature, app: Celery, manager: SessionManager, node_ids: Sequence[str] | None
) -> tuple[Tree, list[Signature]]:
    """The canvas's tree and its tasks, in node order (``node_ids``, when given, one per task).

    Raises:
        TrackerValidationError: a canvas Celery cannot send, or ``node_ids`` that do not fit it.
    """
    if node_ids is not None and (isinstance(node_ids, str | bytes) or not isinstance(node_ids, list | tuple)):
        raise TrackerValidationError("node_ids", node_ids, "expected a list of node ids, one per task")
    if isinstance(canvas, chord) and canvas.body is None:
        raise TrackerValidationError("canvas", canvas, "a chord needs a body: chord(header, body)")
    walk = _Walk(app, manager.settings.max_canvas_depth)
    shape = walk.tree(canvas, 0)
    if node_ids is not None and len(node_ids) != len(walk.tasks):
        raise TrackerValidationError(
            "node_ids", len(node_ids), f"expected one id per task, error callbacks included ({len(walk.tasks)})"
        )
    if _runs_a_chord(shape) and isinstance(app.backend, DisabledBackend):
        raise TrackerValidationError(
            "canvas", canvas, "Celery runs a chord (or a group chained into a task) only with a result_backend"
        )
    for sig in walk.tasks:
        validation.label(sig.options.get("task_id"), "task_id")
    return shape, walk.tasks


def _runs_a_chord(tree: Tree) -> bool:
    """Whether Celery runs ``tree`` with a chord: one of its own, or a group a chain goes on from."""
    if "chord" in tree:
        return True
    parts = tree.get("chain") or tree.get("group") or []
    if "chain" in tree and any(_ends_in_group(part) for part in parts[:-1]):
        return True
    return any(_runs_a_chord(part) for part in [*parts, *tree.get("e", [])])


def _ends_in_group(tree: Tree) -> bool:
    """Whether ``tree`` gives a group's results: a group (of more than one task: a group of one is
    sent as that task), or a chain that ends in one."""
    if "chain" in tree:
        return _ends_in_group(tree["chain"][-1])
    return len(tree.get("group", ())) > 1


class _Inherit:
    """The default ``parent`` of :func:`dispatch`: the tracked task running in this thread, if any."""

    def __repr__(self) -> str:
        return "INHERIT"


INHERIT = _Inherit()


def dispatch(
    canvas: Signature,
    *,
    canvas_path: str,
    node_ids: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    on_complete: Signature | None = None,
    manager: SessionManager | None = None,
    app: Celery | None = None,
    on_success: Signature | None = None,
    on_failure: Signature | None = None,
    parent: tuple[str, str] | _Inherit | None = INHERIT,
    child_failure: str = "fail",
    tags: Sequence[str] | None = None,
) -> str:
    """Send ``canvas`` (a signature, group, chord or chain) as one tracked session.

    Every leaf task is a node. The session is created (``pending``, with each node's task id and
    signature, for resume) before anything is sent, so no event can arrive for an unknown session.

    Dispatched from inside a tracked task, the session is a *child* of that task's node: the node
    stays ``running`` until the child has ended, then takes its outcome (``completed``, or
    ``failed`` with a reason naming the child, unless ``child_failure="ignore"``). Its id is derived
    from the parent's session, node, task and attempt (and the call's place in the task), so a task
    delivered again opens no second child (:mod:`tracker.celery.children` says how the link stays
    exact when a process dies midway).

    Args:
        canvas: What to run.
        canvas_path: A label for the batch (usually the ``.canvas`` file it came from).
        node_ids: One id per leaf, in :func:`leaves` order; default: each leaf's task id.
        metadata: A JSON object kept with the session.
        on_complete: Sent once per end of a run (dispatch, then each resume), with the status dict
            as its argument (its ``run`` says which).
        manager: Default: the one ``install(app)`` was given, else ``SessionManager.get_instance()``.
        app: The Celery app; default: the canvas's own.
        on_success: Sent exactly once in the session's life, when every node has completed (after
            a resume or a late result too), with the status dict.
        on_failure: Sent exactly once, at the first node that fails for good (``failed`` or
            ``lost``), with the status dict and that node's id: to alert early.
        parent: ``(session_id, node_id)`` of the node this session is a child of; default: the
            tracked task running in this thread, if any; None: an unrelated session.
        child_failure: ``fail`` (a child that did not complete fails its parent node) or
            ``ignore`` (the node completes whatever its child did, as BullMQ's
            ``ignoreDependencyOnFailure``).
        tags: Labels to find the session by (``tracker list --tag``, ``list_sessions(tag=...)``):
            at most 10, each 1-64 letters, digits or ``_.:@/+=-``, e.g. ``["nightly", "customer:42"]``.

    Returns:
        The session id.

    The session's metadata records the app (:data:`tracker.celery.origin.ORIGIN_KEY`): its import
    path and its broker, which cancel and resume go through.

    Raises:
        TrackerValidationError: bad ids, too few/many node ids, non-JSON arguments or metadata.
        TrackerNotInstalledError: ``install(app)`` was not called for the app (its workers would
            run the tasks and nothing would be recorded).
    """
    if not isinstance(canvas, Signature):
        raise TrackerValidationError(
            "canvas", canvas, "expected a Celery signature, group, chain or chord (task.s(...))"
        )
    app, manager = _installed(app or canvas.app, manager)
    callbacks = {ON_COMPLETE_KEY: on_complete, ON_SUCCESS_KEY: on_success, ON_FAILURE_KEY: on_failure}
    link = _parent_link(parent, child_failure)
    session_id, sends = _create(canvas, canvas_path, node_ids, metadata, callbacks, manager, app, link, tags)
    try:
        for sig in sends:
            sig.apply_async()
    except Exception:
        # Nothing (or not everything) was sent: say so rather than leave a pending session forever.
        with contextlib.suppress(TrackerError):
            manager.sync.update_status(session_id, SessionStatus.FAILED)
        raise
    return session_id


class _ParentLink(NamedTuple):
    """A child session's parent node, and how the child's id is made."""

    session_id: str
    node_id: str
    attempt: int
    child_failure: str
    #: The child's id, derived when the parent is the task running here (the same on every delivery).
    child_id: str | None


def _parent_link(parent: tuple[str, str] | _Inherit | None, child_failure: str) -> _ParentLink | None:
    if child_failure not in CHILD_POLICIES:
        raise TrackerValidationError("child_failure", child_failure, f"expected one of {CHILD_POLICIES}")
    here = running_node()
    if isinstance(parent, _Inherit):
        if here is None:
            return None
        parent = (here.session_id, here.node_id)
    if parent is None:
        return None
    if not isinstance(parent, tuple) or len(parent) != 2:
        raise TrackerValidationError("parent", parent, "expected (session_id, node_id), or None")
    psid, pnode = validation.session_id(parent[0]), validation.node_id(parent[1])
    if here is None or (here.session_id, here.node_id) != (psid, pnode):
        return _ParentLink(psid, pnode, 1, child_failure, None)
    attempt = int(getattr(here.request, "retries", 0) or 0) + 1
    place = getattr(here.request, "_tracker_children", 0) + 1
    here.request._tracker_children = place
    task_id = getattr(here.request, "id", "")
    child_id = str(uuid.uuid5(DERIVED_IDS, f"{psid}/{pnode}/child/{task_id}/{attempt}/{place}"))
    return _ParentLink(psid, pnode, attempt, child_failure, child_id)


def _create(
    canvas: Signature,
    canvas_path: str,
    node_ids: Sequence[str] | None,
    metadata: Mapping[str, Any] | None,
    callbacks: Mapping[str, Signature | None],
    manager: SessionManager,
    app: Celery,
    link: _ParentLink | None = None,
    tags: Sequence[str] | None = None,
) -> tuple[str, list[Signature]]:
    """:func:`dispatch` up to the send: tag every leaf and create the session (a child: opened on
    its parent's node first); returns its id and what to send."""
    shape, nodes = _walked(canvas, app, manager, node_ids)
    session_id = link.child_id if link is not None and link.child_id else str(uuid.uuid4())
    if link is not None and link.child_id:  # derived: a task delivered again sends the same tasks
        task_ids = [sig.options.get("task_id") or str(uuid.uuid5(DERIVED_IDS, f"{session_id}/{i}"))
                    for i, sig in enumerate(nodes)]  # fmt: skip
    else:
        task_ids = [sig.options.get("task_id") or str(uuid.uuid4()) for sig in nodes]
    ids = list(node_ids) if node_ids is not None else task_ids
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TrackerValidationError("metadata", metadata, "expected a JSON object (a dict)")
    for key, callback in callbacks.items():
        if callback is not None and not isinstance(callback, Signature):
            raise TrackerValidationError(key, callback, "expected a Celery signature (task.s(...))")
    meta = dict(metadata or {})
    meta[ORIGIN_KEY] = origin(app)
    for key, callback in callbacks.items():
        if callback is not None:
            meta[key] = signature_json(callback)
    specs = [node_spec(sig, session_id, nid, tid) for sig, nid, tid in zip(nodes, ids, task_ids, strict=True)]
    structure = _named(shape, ids) if has_links(shape) else None  # tasks side by side: nothing to follow
    parent = None if link is None else (link.session_id, link.node_id)
    # Every check first (nothing stored yet): a parent is never told of a child that cannot be created.
    create = manager.operations.create_session(
        canvas_path, len(nodes), meta, specs, session_id=session_id, structure=structure, parent=parent, tags=tags
    )
    if link is not None:
        # Opened on the parent's node before the child exists (see tracker.celery.children).
        opened = ChildLink(session_id, None, link.attempt, link.child_failure)
        manager.sync._record_nodes(
            link.session_id, [manager.operations.child_event(link.session_id, link.node_id, opened)]
        )
    try:
        create.then(create.call.run(manager.storage))
    except SessionExistsError:
        if link is None or not link.child_id:
            raise
        # The same task delivered again: the child exists; send again what has not started.
        pending = {node.node_id for node in nodes_of(manager, session_id, NodeStatus.PENDING)}
        return session_id, _sends_again(canvas, nodes, ids, pending, has_links(shape))
    return session_id, [canvas]


def _sends_again(
    canvas: Signature, nodes: Sequence[Signature], ids: Sequence[str], pending: set[str], linked: bool
) -> list[Signature]:
    """What to send again of a canvas a task delivered again had added or dispatched already:
    all of it while nothing has started; else, for tasks side by side, each one not started (a
    duplicate counts once); else nothing (its messages went, and Celery runs the rest)."""
    if len(pending) == len(ids):
        return [canvas]
    if linked:
        return []
    return [sig for sig, nid in zip(nodes, ids, strict=True) if nid in pending]


@overload
def add_nodes(
    canvas: Signature,
    /,
    *,
    node_ids: Sequence[str] | None = None,
    manager: SessionManager | None = None,
    app: Celery | None = None,
) -> list[str]: ...


@overload
def add_nodes(
    session_id: str,
    canvas: Signature,
    /,
    *,
    node_ids: Sequence[str] | None = None,
    manager: SessionManager | None = None,
    app: Celery | None = None,
) -> list[str]: ...


def add_nodes(
    first: str | Signature,
    canvas: Signature | None = None,
    /,
    *,
    node_ids: Sequence[str] | None = None,
    manager: SessionManager | None = None,
    app: Celery | None = None,
) -> list[str]:
    """Add the tasks of ``canvas`` (a signature, group, chain or chord) to a session that has not
    ended, and send them: ``add_nodes(session_id, canvas)``, or from inside a tracked task
    ``add_nodes(canvas)`` to add to that task's own session.

    The nodes and the larger ``node_count`` are stored in one step before anything is sent, so
    the session cannot end in between: it ends when they have results too. Inside a tracked task,
    the new nodes' ids are derived from the session, the node and the call's place in the task
    (the first ``add_nodes`` of the task, the second...): a task delivered again adds nothing twice,
    and sends again only what it added and nothing has started yet.

    Args:
        node_ids: One id per leaf, in :func:`leaves` order; default: each leaf's task id (derived,
            inside a tracked task).
        manager: Default: the one ``install(app)`` was given, else ``SessionManager.get_instance()``.
        app: The Celery app; default: the canvas's own.

    Returns:
        The new nodes' ids.

    Raises:
        TrackerValidationError: bad input, ids already in the session, no session named outside a
            tracked task; nothing changed.
        SessionNotFoundError: no such session.
        InvalidStateTransitionError: the session has ended (nothing was added or sent).
        TrackerNotInstalledError: ``install(app)`` was not called for the app.
    """
    here = running_node()
    if canvas is None:
        canvas, session_id = first, None
    else:
        session_id = first
    if not isinstance(canvas, Signature):
        raise TrackerValidationError(
            "canvas", canvas, "expected a Celery signature, group, chain or chord (task.s(...))"
        )
    if session_id is None:
        if here is None:
            raise TrackerValidationError(
                "session_id", None, "outside a tracked task, name the session: add_nodes(session_id, canvas)"
            )
        session_id = here.session_id
    app, manager = _installed(app or canvas.app, manager)
    shape, nodes = _walked(canvas, app, manager, node_ids)
    if here is not None and here.session_id == session_id:
        # Derived: the same ids on every delivery of the task (the call's place in it counts).
        place = getattr(here.request, "_tracker_adds", 0) + 1
        here.request._tracker_adds = place
        base = f"{session_id}/{here.node_id}/add/{place}"
        task_ids = [
            sig.options.get("task_id") or str(uuid.uuid5(DERIVED_IDS, f"{base}/{i}")) for i, sig in enumerate(nodes)
        ]
    else:
        task_ids = [sig.options.get("task_id") or str(uuid.uuid4()) for sig in nodes]
    ids = list(node_ids) if node_ids is not None else task_ids
    specs = [node_spec(sig, session_id, nid, tid) for sig, nid, tid in zip(nodes, ids, task_ids, strict=True)]
    outcome = manager.sync.add_nodes(session_id, specs, _named(shape, ids))
    sends = [canvas] if outcome.added else _sends_again(canvas, nodes, ids, set(outcome.pending), has_links(shape))
    try:
        for sig in sends:
            sig.apply_async()
    except Exception as exc:
        # Not (all) sent: the added nodes fail, so that the session still ends; a task sent after
        # all counts when its result comes.
        failed = [
            manager.operations.node_event(session_id, nid, NodeStatus.FAILED, reason=f"could not be sent: {exc}")
            for nid in ids
        ]
        with contextlib.suppress(TrackerError):
            manager.sync._record_nodes(session_id, failed)
        raise
    return ids
