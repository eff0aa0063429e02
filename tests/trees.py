"""Canvas trees for tests of :mod:`tracker.structure`, written short: a string is a task."""

from __future__ import annotations

from tracker.structure import Tree


def t(node: str, *errbacks: Tree) -> Tree:
    """A task (with error callbacks)."""
    return {"n": node, "e": list(errbacks)} if errbacks else {"n": node}


def _tree(part: Tree | str) -> Tree:
    return t(part) if isinstance(part, str) else part


def chain(*parts: Tree | str) -> Tree:
    return {"chain": [_tree(p) for p in parts]}


def group(*parts: Tree | str) -> Tree:
    return {"group": [_tree(p) for p in parts]}


def chord(header: list[Tree | str], body: Tree | str) -> Tree:
    return {"chord": [_tree(p) for p in header], "body": _tree(body)}


def with_errbacks(tree: Tree, *errbacks: Tree | str) -> Tree:
    return {**tree, "e": [_tree(e) for e in errbacks]}
