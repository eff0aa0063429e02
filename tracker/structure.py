"""A session's canvas: which node feeds which, as Celery will run them. Pure rules, no I/O.

:func:`tracker.celery.dispatch` records the shape of what it sends as a *tree* of plain JSON:

- ``{"n": node_id}``: a task;
- ``{"chain": [tree, ...]}``: each part gets the result of the one before;
- ``{"group": [tree, ...]}``: the parts run side by side; a group's result is the list of theirs;
- ``{"chord": [tree, ...], "body": tree}``: the body runs with the header's results once every
  header part has completed;
- any of them may carry ``"e": [tree, ...]``: error callbacks (``link_error``) Celery runs when a
  task of that part fails.

From the tree come the session's *links* (:class:`Links`): what runs only after a node completes,
and which error callbacks a node's failure calls. The store reads them when a node ends, to mark
``skipped`` what Celery will never run (:func:`skips`); resume reads the tree to re-send what did
not complete with its structure (:func:`resume_plan`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, NoReturn

from tracker.errors import ResumeNotPossibleError, TrackerValidationError
from tracker.states import FAILED_NODE_STATUSES, NodeStatus

Tree = dict[str, Any]
"""One part of a canvas, as JSON (see the module's text)."""

#: Field names a store keeps the structure under, next to the signatures (node ids never hold
#: these characters): the tree, what runs after a node, and the nodes an error callback handles.
TREE_FIELD = "#tree"
AFTER_PREFIX = ">"
HANDLES_PREFIX = "<"
LAST_PREFIX = "^"

#: How the reason of a completed node whose result could not be kept begins (resume cannot give
#: that result back to what needs it).
RESULT_NOT_STORED = "result not stored"

#: The reason recorded on a node that an error callback would have run, and nothing it handles failed.
ERRBACK_NOT_NEEDED = "skipped: an error callback, and no task it handles failed"


def skipped_reason(node_id: str, status: NodeStatus | str) -> str:
    """The reason recorded on a node skipped because ``node_id`` ended ``status`` (failed, lost...)."""
    return f"skipped: node {node_id} {NodeStatus(status).value}"


def leaf_ids(tree: Tree, *, errbacks: bool = True) -> Iterator[str]:
    """The node ids of a tree, depth first, in order (error callbacks after the part they serve)."""
    if "n" in tree:
        yield tree["n"]
    for part in parts_of(tree):
        yield from leaf_ids(part, errbacks=errbacks)
    if errbacks:
        for errback in tree.get("e", ()):
            yield from leaf_ids(errback)


def parts_of(tree: Tree) -> list[Tree]:
    """The parts a tree runs (not its error callbacks), in order; a chord's body last."""
    if "chain" in tree:
        return list(tree["chain"])
    if "group" in tree:
        return list(tree["group"])
    if "chord" in tree:
        return [*tree["chord"], tree["body"]]
    return []


def depth(tree: Tree) -> int:
    """How deeply groups, chains and chords nest in ``tree`` (a task alone: 0)."""
    inner = [depth(part) for part in parts_of(tree)] + [depth(errback) for errback in tree.get("e", ())]
    return ("n" not in tree) + max(inner, default=0)


def _entries(tree: Tree) -> list[str]:
    """The nodes that start when ``tree`` is sent (and receive what feeds it)."""
    if "n" in tree:
        return [tree["n"]]
    if "chain" in tree:
        return _entries(tree["chain"][0])
    members = tree["chord"] if "chord" in tree else tree["group"]
    return [node for member in members for node in _entries(member)]


def _exits(tree: Tree) -> list[str]:
    """The nodes whose completion makes ``tree`` complete (what feeds the next part)."""
    if "n" in tree:
        return [tree["n"]]
    if "chain" in tree:
        return _exits(tree["chain"][-1])
    if "chord" in tree:
        return _exits(tree["body"])
    return [node for member in tree["group"] for node in _exits(member)]


@dataclass
class Links:
    """What a node's end means for the others (direct links only)."""

    #: node -> the nodes that run only once it completed (next chain link, chord body).
    after: dict[str, list[str]] = field(default_factory=dict)
    #: node -> the error callbacks (their first tasks) its failure calls, looked at when it ends.
    errbacks: dict[str, list[str]] = field(default_factory=dict)
    #: error callback (its first task) -> every node whose failure calls it.
    handles: dict[str, list[str]] = field(default_factory=dict)
    #: error callback (its first task) -> the last tasks of the part it serves (its exits): they
    #: usually end last, so a store looks at them before reading every node handled.
    last: dict[str, list[str]] = field(default_factory=dict)

    def fields(self) -> dict[str, str]:
        """The links as a store keeps them: ``>node`` = ``"after ids|errback ids"``, ``<errback`` =
        ``"handled ids"``, ``^errback`` = ``"last ids"`` (ids separated by spaces)."""
        out = {}
        for node in self.after.keys() | self.errbacks.keys():
            after, errbacks = " ".join(self.after.get(node, ())), " ".join(self.errbacks.get(node, ()))
            out[AFTER_PREFIX + node] = f"{after}|{errbacks}"
        for errback, handled in self.handles.items():
            out[HANDLES_PREFIX + errback] = " ".join(handled)
        for errback, ends in self.last.items():
            out[LAST_PREFIX + errback] = " ".join(ends)
        return out


def links(tree: Tree) -> Links:
    """The links of every node of ``tree``."""
    # Ordered sets (dicts): a long chain's error callback handles every one of its tasks.
    after: dict[str, dict[str, None]] = {}
    errbacks: dict[str, dict[str, None]] = {}
    handles: dict[str, dict[str, None]] = {}
    last: dict[str, dict[str, None]] = {}

    def add(mapping: dict[str, dict[str, None]], source: str, targets: Iterable[str]) -> None:
        mapping.setdefault(source, {}).update(dict.fromkeys(targets))

    def walk(part: Tree) -> None:
        children = parts_of(part)
        for child in children:
            walk(child)
        if "chain" in part:
            for before, later in itertools.pairwise(children):
                for node in _exits(before):
                    add(after, node, _entries(later))
        elif "chord" in part:
            for node in [n for member in part["chord"] for n in _exits(member)]:
                add(after, node, _entries(part["body"]))
            # A failed header task fails the body without running it, and Celery calls the body's
            # error callbacks then: they handle the header's tasks too.
            header = [n for member in part["chord"] for n in leaf_ids(member, errbacks=False)]
            for errback in part["body"].get("e", ()):
                for entry in _entries(errback):
                    add(handles, entry, header)
                for node in header:
                    add(errbacks, node, _entries(errback))
        for errback in part.get("e", ()):
            walk(errback)
            # Celery calls a part's error callbacks from any of its tasks that fails (a chain passes
            # them to every link). Each of them may end last: Celery sends a chain's next link
            # before the link's own outcome is recorded.
            handled = list(leaf_ids(part, errbacks=False))
            for entry in _entries(errback):
                add(handles, entry, handled)
                add(last, entry, _exits(part))
            for node in handled:
                add(errbacks, node, _entries(errback))

    walk(tree)
    return Links(
        after={node: list(targets) for node, targets in after.items()},
        errbacks={node: list(targets) for node, targets in errbacks.items()},
        handles={node: list(targets) for node, targets in handles.items()},
        last={node: list(targets) for node, targets in last.items()},
    )


def grown(tree: Tree | None, part: Tree | None, known: Iterable[str], added: Iterable[str]) -> Tree | None:
    """A session's tree once the nodes ``added`` (with ``part``, their tree when it has links) joined
    the nodes ``known`` (with ``tree``, the session's tree, when it has one): both run side by side.
    None while neither has links. ``add_nodes.lua`` applies the same rule.

    A tree that is a plain group takes the added part's members (or the part) as more members, so
    adding many times does not nest the tree deeper.
    """
    if tree is None and part is None:
        return None
    joining = part if part is not None else {"group": [{"n": node} for node in added]}
    if tree is None:
        members = [{"n": node} for node in known]
        if not members:
            return joining
        tree = {"group": members}
    grown_tree = tree if set(tree) == {"group"} else {"group": [tree]}
    more = joining["group"] if set(joining) == {"group"} else [joining]
    return {"group": [*grown_tree["group"], *more]}


def has_links(tree: Tree) -> bool:
    """True when some node's end may decide whether another runs: anything but tasks side by side."""
    if "chain" in tree or "chord" in tree or "e" in tree:
        return True
    return any(has_links(member) for member in tree.get("group", ()))


def skips(
    links_of: Callable[[str], tuple[list[str], list[str]]],
    handled_by: Callable[[str], list[str]],
    status_of: Callable[[str], NodeStatus | None],
    node_id: str,
    status: NodeStatus,
) -> list[tuple[str, str]]:
    """The nodes Celery will never run now that ``node_id`` ended ``status``, with their reasons.

    A node that did not complete (failed, lost, cancelled, skipped) takes what runs after it with
    it; a node that did not fail leaves its error callbacks nothing to do once every node they
    handle has ended without failing. Only ``pending`` nodes are skipped, and what they lead to is
    followed in turn. The Redis scripts apply the same rule (``record_nodes.lua``).

    Args:
        links_of: node -> (what runs after it, its error callbacks).
        handled_by: error callback -> the nodes whose failure calls it.
        status_of: node -> its status now (None: unknown).
        node_id: The node that ended.
        status: How it ended.
    """
    marked: dict[str, str] = {}

    def current(node: str) -> NodeStatus | None:
        return NodeStatus.SKIPPED if node in marked else status_of(node)

    # What a skipped node leads to is skipped for the same reason as it.
    queue = [(node_id, status, skipped_reason(node_id, status))]
    while queue:
        node, ended, reason = queue.pop(0)
        after, errbacks = links_of(node)
        if ended is not NodeStatus.COMPLETED:
            for child in after:
                if current(child) is NodeStatus.PENDING:
                    marked[child] = reason
                    queue.append((child, NodeStatus.SKIPPED, reason))
        if ended not in FAILED_NODE_STATUSES:
            for errback in errbacks:
                handled = [current(n) for n in handled_by(errback)]
                if current(errback) is NodeStatus.PENDING and all(
                    s is not None and s.is_terminal and s not in FAILED_NODE_STATUSES for s in handled
                ):
                    marked[errback] = ERRBACK_NOT_NEEDED
                    queue.append((errback, NodeStatus.SKIPPED, ERRBACK_NOT_NEEDED))
    return list(marked.items())


def check_tree(tree: object, node_ids: list[str], max_depth: int) -> Tree:
    """Return ``tree`` if it is a canvas tree whose tasks are exactly ``node_ids``, each once.

    Raises:
        TrackerValidationError: anything else, or nested deeper than ``max_depth``.
    """
    try:
        leaves = list(leaf_ids(_checked(tree)))
    except (TypeError, KeyError, AttributeError, IndexError):
        raise TrackerValidationError("structure", tree, "expected a canvas tree (see tracker.structure)") from None
    except RecursionError:
        raise TrackerValidationError("canvas", tree, f"nested deeper than {max_depth} levels") from None
    if sorted(leaves) != sorted(node_ids):
        raise TrackerValidationError("structure", tree, "its tasks must be the session's nodes, each once")
    if depth(tree) > max_depth:  # type: ignore[arg-type]
        raise TrackerValidationError("canvas", tree, f"nested deeper than {max_depth} levels (max_canvas_depth)")
    return tree  # type: ignore[return-value]


def _checked(tree: object) -> Tree:
    """``tree`` if every part has one known shape (raises TypeError otherwise)."""
    if not isinstance(tree, dict):
        raise TypeError(tree)
    kinds = {"n", "chain", "group", "chord"} & tree.keys()
    if len(kinds) != 1 or not tree.keys() <= {"n", "chain", "group", "chord", "body", "e"}:
        raise TypeError(tree)
    if ("body" in tree) != ("chord" in tree):
        raise TypeError(tree)
    if "n" in tree and not isinstance(tree["n"], str):
        raise TypeError(tree)
    for key in ("chain", "group", "chord", "e"):
        if key in tree and (not isinstance(tree[key], list) or (key != "e" and not tree[key])):
            raise TypeError(tree)
    for part in [*parts_of(tree), *tree.get("e", ())]:
        _checked(part)
    return tree


# -- resume ------------------------------------------------------------------------------------------


@dataclass
class ResumePlan:
    """What a resume re-sends: a canvas tree whose tasks are ``{"n": id}`` (re-sent nodes) and
    ``{"v": id}`` (a completed node's stored result, given back as it was)."""

    #: None: nothing to re-send.
    tree: Tree | None
    #: The nodes re-sent, in tree order.
    reset: list[str]
    #: The stored results the tree gives back, by node id.
    values: dict[str, Any]


_DONE = "done"  # every task of the part completed
_BLOCKED = "blocked"  # a failed task is kept (retry_failed=False): the part cannot run again


class _Planner:
    def __init__(
        self,
        nodes: Mapping[str, tuple[NodeStatus, Any, bool]],
        retry_failed: bool,
        session: str,
        chosen: AbstractSet[str] | None,
    ) -> None:
        self.nodes = nodes  # node -> (status, result, result stored)
        self.retry_failed = retry_failed
        self.session = session
        self.values: dict[str, Any] = {}
        self.chosen = chosen
        # Inside what runs after a re-sent part (a later chain link, a chord body, an error
        # callback): with a chosen subset, what did not complete there is re-sent too.
        self.downstream = False

    @contextlib.contextmanager
    def after_resent(self, resent: bool = True) -> Iterator[None]:
        """While planning what runs after a re-sent part (when ``resent``)."""
        before, self.downstream = self.downstream, self.downstream or resent
        try:
            yield
        finally:
            self.downstream = before

    def status(self, node: str) -> NodeStatus:
        return self.nodes[node][0] if node in self.nodes else NodeStatus.PENDING

    def residual(self, tree: Tree, consumed: bool) -> Tree | str:
        """What is left to run of ``tree``: a tree, ``_DONE`` or ``_BLOCKED``. ``consumed``: its
        result feeds something (a later chain link, a chord body), so completed parts of it are
        given back rather than dropped."""
        if "n" in tree:
            status = self.status(tree["n"])
            if status is NodeStatus.COMPLETED:
                return _DONE
            if self.chosen is not None:
                # Only the chosen nodes, and what did not complete after them; the rest is kept.
                if tree["n"] not in self.chosen and not self.downstream:
                    return _BLOCKED
            elif status is NodeStatus.FAILED and not self.retry_failed:
                return _BLOCKED
            return self._with_errbacks(tree, {"n": tree["n"]})
        if "chain" in tree:
            return self._chain(tree, consumed)
        if "group" in tree:
            return self._group(tree, tree["group"], consumed)
        header = self._group(tree, tree["chord"], True)
        if header == _BLOCKED:
            return _BLOCKED
        with self.after_resent(isinstance(header, dict)):
            body = self.residual(tree["body"], consumed)
        if header == _DONE:
            if not isinstance(body, dict):
                return body
            header = {"group": [self.member_output(member) for member in tree["chord"]]}
        elif body == _BLOCKED:
            return _BLOCKED
        elif body == _DONE:
            body = self.output(tree["body"])
        assert isinstance(header, dict) and isinstance(body, dict)
        return self._with_errbacks(tree, {"chord": header["group"], "body": body})

    def _chain(self, tree: Tree, consumed: bool) -> Tree | str:
        links = tree["chain"]
        for i, link in enumerate(links):
            rest = self.residual(link, consumed or i < len(links) - 1)
            if rest == _DONE:
                continue
            if rest == _BLOCKED:
                return _BLOCKED
            assert isinstance(rest, dict)
            # The link before gives back its result to the first link re-sent, as Celery passed it.
            parts = [self.link_output(links[i - 1])] if i > 0 else []
            parts.append(rest)
            with self.after_resent():
                for later in links[i + 1 :]:
                    after = self.residual(later, True)
                    if after == _BLOCKED:
                        return _BLOCKED
                    parts.append(self.output(later) if after == _DONE else after)  # type: ignore[arg-type]
            return self._with_errbacks(tree, {"chain": parts})
        return _DONE

    def _group(self, tree: Tree, members: list[Tree], consumed: bool) -> Tree | str:
        rests = [self.residual(member, consumed) for member in members]
        if all(rest == _DONE for rest in rests):
            return _DONE
        if _BLOCKED in rests and consumed:  # what it feeds needs every member's result
            return _BLOCKED
        if not any(isinstance(rest, dict) for rest in rests):
            return _BLOCKED
        kept: list[Tree] = []
        for member, rest in zip(members, rests, strict=True):
            if isinstance(rest, dict):
                kept.append(rest)
            elif consumed:  # a completed member's result, in its place
                kept.append(self.member_output(member))
        return self._with_errbacks(tree, {"group": kept})

    def _with_errbacks(self, tree: Tree, rest: Tree) -> Tree:
        errbacks = []
        with self.after_resent():
            for errback in tree.get("e", ()):
                again = self.residual(errback, False)
                if isinstance(again, dict):
                    errbacks.append(again)
        if errbacks:
            rest["e"] = errbacks
        return rest

    def member_output(self, member: Tree) -> Tree:
        """:meth:`output` of a completed member of a group whose results feed something (a chord
        header): Celery merges the results of a member that ends in a group into the list, in an
        order it does not keep, so that cannot be given back."""
        if _ends_in_group(member):
            self._refuse(
                member,
                "the part of node {node} ends in a group whose results Celery merged into its parent's "
                "in an order that cannot be given back",
            )
        return self.output(member)

    def link_output(self, link: Tree) -> Tree:
        """:meth:`output` of the completed chain link before the first one re-sent. Celery runs what
        follows a chord whose body is a group once per member of that group, each with one member's
        result: there is no one result to give back."""
        last = link
        while "chain" in last:
            last = last["chain"][-1]
        if "chord" in last and _ends_in_group(last["body"]):
            self._refuse(
                last["body"],
                "what follows the group of node {node} ran once per member of that group: "
                "there is no one result to give back",
            )
        return self.output(link)

    def _refuse(self, part: Tree, reason: str) -> NoReturn:
        """Raise ResumeNotPossibleError, ``reason`` naming the first node of ``part`` (``{node}``)."""
        node = next(leaf_ids(part, errbacks=False))
        raise ResumeNotPossibleError(
            self.session,
            reason.format(node=node),
            "Celery cannot be given that part's results back: dispatch the batch again",
        )

    def output(self, tree: Tree) -> Tree:
        """What gives back the result of completed ``tree`` as the next chain link receives it: the
        result of a chain's last part, of a chord's body, of each member of a group."""
        if "chain" in tree:
            return self.output(tree["chain"][-1])
        if "chord" in tree:
            return self.output(tree["body"])
        if "group" in tree:
            return {"group": [self.output(member) for member in tree["group"]]}
        return self.value(tree["n"])

    def value(self, node: str) -> Tree:
        """Completed ``node``'s stored result, given back in its place. Raises ResumeNotPossibleError
        when it was not stored."""
        status, result, stored = self.nodes.get(node, (NodeStatus.PENDING, None, False))
        if status is not NodeStatus.COMPLETED or not stored:
            reason = f"the result of node {node} is needed again but was not stored (too large, or not JSON)"
            hint = "a result over TRACKER_MAX_RESULT_BYTES (or not JSON) is not stored: dispatch the batch again"
            raise ResumeNotPossibleError(self.session, reason, hint)
        self.values[node] = result
        return {"v": node}


def _ends_in_group(tree: Tree) -> bool:
    """True when the result of ``tree`` is a group's (a group, or a chain or chord ending in one)."""
    if "chain" in tree:
        return _ends_in_group(tree["chain"][-1])
    if "chord" in tree:
        return _ends_in_group(tree["body"])
    return "group" in tree


def resume_plan(
    tree: Tree,
    nodes: Mapping[str, tuple[NodeStatus, Any, bool]],
    retry_failed: bool,
    session: str,
    chosen: AbstractSet[str] | None = None,
) -> ResumePlan:
    """What to re-send of ``tree`` so that the session completes as if Celery had run it whole.

    Completed nodes are not re-run: where a re-sent part needs their result (a chain link's
    parent, a chord's header results), the stored result is given back in its place. Failed nodes
    are re-sent only with ``retry_failed``; a part that needs a kept failed node stays as it is.

    Args:
        tree: The session's canvas tree.
        nodes: node -> (status, stored result, whether the result was stored).
        retry_failed: Re-send failed nodes too.
        session: The session's id, for the error's message.
        chosen: Re-send only these nodes (none completed), with what did not complete of what runs
            after them (the rest of their chain, their chord's body, their error callbacks);
            every other node keeps its result. ``retry_failed`` is then not consulted.

    Raises:
        ResumeNotPossibleError: a completed node's result is needed and was not stored, or a chosen
            node cannot run again without a node that is not chosen (a chord's body needs every
            header result: choose its failed header nodes together).
    """
    planner = _Planner(nodes, retry_failed, session, chosen)
    rest = planner.residual(tree, False)
    reset = list(leaf_ids(rest)) if isinstance(rest, dict) else []
    left_out = sorted(set(chosen or ()) - set(reset))
    if left_out:
        raise ResumeNotPossibleError(
            session,
            f"node {left_out[0]} cannot run again alone: what it feeds also needs a node that did not "
            "complete and is not chosen",
            "choose those nodes too, or resume without choosing nodes",
        )
    if not isinstance(rest, dict):
        return ResumePlan(tree=None, reset=[], values={})
    return ResumePlan(tree=rest, reset=reset, values=planner.values)
