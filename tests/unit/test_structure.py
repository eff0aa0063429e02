"""tracker.structure: a session's canvas tree, its links, the skip rule and the resume plan.

Pure rules, no store: the contract suite (tests/contract/test_structure.py) checks that both
stores apply them.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import pytest

from tests.trees import chain, chord, group, t, with_errbacks
from tracker.errors import ResumeNotPossibleError, TrackerValidationError
from tracker.states import NodeStatus
from tracker.structure import (
    ERRBACK_NOT_NEEDED,
    Links,
    Tree,
    check_tree,
    depth,
    has_links,
    leaf_ids,
    links,
    resume_plan,
    skipped_reason,
    skips,
)

N = NodeStatus
C, F, L, X, S, P, R = N.COMPLETED, N.FAILED, N.LOST, N.CANCELLED, N.SKIPPED, N.PENDING, N.RUNNING


# -- links --------------------------------------------------------------------------------------


def test_links_of_a_chain() -> None:
    found = links(chain("a", "b", "c"))
    assert found.after == {"a": ["b"], "b": ["c"]}
    assert found.errbacks == {}
    assert found.handles == {}


def test_links_of_a_chord() -> None:
    found = links(chord(["a", "b", "c"], "d"))
    assert found.after == {"a": ["d"], "b": ["d"], "c": ["d"]}
    assert found.errbacks == {} and found.handles == {}


def test_links_of_a_chord_inside_a_chain() -> None:
    found = links(chain("x", chord(["a", "b"], "c"), "y"))
    # x feeds every header task; every header task feeds the body; the body feeds what follows.
    assert found.after == {"x": ["a", "b"], "a": ["c"], "b": ["c"], "c": ["y"]}


def test_links_of_a_chain_into_a_group_and_out() -> None:
    found = links(chain("a", group("b", "c"), "d"))
    assert found.after == {"a": ["b", "c"], "b": ["d"], "c": ["d"]}


def test_links_of_a_group_of_chains_stay_inside_each_chain() -> None:
    found = links(group(chain("a", "b"), chain("c", "d")))
    assert found.after == {"a": ["b"], "c": ["d"]}
    assert found.errbacks == {} and found.handles == {}


def test_links_of_a_group_of_tasks_are_none() -> None:
    found = links(group("a", "b", "c"))
    assert found == Links()


def test_error_callbacks_of_a_chain_handle_every_link() -> None:
    found = links(with_errbacks(chain("a", "b"), "h"))
    assert found.after == {"a": ["b"]}
    assert found.errbacks == {"a": ["h"], "b": ["h"]}  # each may end last (Celery sends b before a's outcome)
    assert found.last == {"h": ["b"]}
    assert found.handles == {"h": ["a", "b"]}


def test_error_callbacks_of_a_chord_handle_the_header_and_the_body() -> None:
    found = links(with_errbacks(chord(["a", "b"], "c"), "h"))
    assert found.errbacks == {"a": ["h"], "b": ["h"], "c": ["h"]}
    assert found.last == {"h": ["c"]}
    assert sorted(found.handles["h"]) == ["a", "b", "c"]


def test_error_callbacks_of_a_chord_body_handle_the_header_tasks() -> None:
    # Celery calls a chord body's link_error callbacks when a header task fails (the chord
    # errors its body: chord_error_from_stack), so they handle the header tasks too.
    found = links(chord(["a", "b"], t("c", t("h"))))
    assert found.after == {"a": ["c"], "b": ["c"]}
    assert sorted(found.handles["h"]) == ["a", "b", "c"]
    assert found.errbacks["a"] == ["h"] and found.errbacks["b"] == ["h"] and found.errbacks["c"] == ["h"]


def test_an_error_callback_chain_links_its_own_tasks() -> None:
    found = links(with_errbacks(chain("a", "b"), chain("h1", "h2")))
    assert found.after == {"a": ["b"], "h1": ["h2"]}
    assert found.errbacks == {"a": ["h1"], "b": ["h1"]}  # an error callback's first task is called
    assert found.handles == {"h1": ["a", "b"]}


def test_links_fields_are_what_a_store_keeps() -> None:
    fields = links(with_errbacks(chain("a", "b"), "h")).fields()
    assert fields == {">a": "b|h", ">b": "|h", "<h": "a b", "^h": "b"}


# -- depth --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "expected"),
    [
        (t("a"), 0),
        (chain("a"), 1),
        (chain("a", "b", "c"), 1),
        (group(chain("a", "b"), "c"), 2),
        (chain("x", chord(["a", "b"], "c"), "y"), 2),
        (chord([group(chain("a", "b"))], "c"), 3),
        (t("a", t("h")), 0),  # a task with a task as error callback nests nothing
        (t("a", chain("h1", "h2")), 1),  # error callbacks count too
        (with_errbacks(chain("a"), group(chain("h1", "h2"))), 3),  # chain > group > chain
    ],
)
def test_depth(tree: Tree, expected: int) -> None:
    assert depth(tree) == expected


def test_leaf_ids_order_puts_error_callbacks_after_their_part() -> None:
    tree = with_errbacks(chain("a", chord(["b", "c"], t("d", t("h1")))), "h2")
    assert list(leaf_ids(tree)) == ["a", "b", "c", "d", "h1", "h2"]
    assert list(leaf_ids(tree, errbacks=False)) == ["a", "b", "c", "d"]


# -- check_tree -----------------------------------------------------------------------------------


def test_check_tree_accepts_a_canvas_of_the_sessions_nodes() -> None:
    tree = with_errbacks(chain("x", chord(["a", "b"], t("c", t("h1"))), group("y", "z")), "h2")
    assert check_tree(tree, ["z", "y", "x", "h2", "h1", "c", "b", "a"], 32) is tree


@pytest.mark.parametrize(
    ("tree", "node_ids"),
    [
        (chain("a", "b"), ["a"]),  # a task that is not a node
        (chain("a", "b"), ["a", "b", "c"]),  # a node that is not a task
        (chain("a", "b"), ["a", "c"]),  # another id
        (chain("a", "a"), ["a"]),  # the same task twice
        (t("a", t("a")), ["a"]),  # its own error callback
        (chain("a", t("b", t("a"))), ["a", "b"]),
    ],
    ids=["missing", "extra", "renamed", "duplicate", "errback-duplicate", "nested-duplicate"],
)
def test_check_tree_refuses_other_nodes(tree: Tree, node_ids: list[str]) -> None:
    with pytest.raises(TrackerValidationError, match="its tasks must be the session's nodes, each once") as caught:
        check_tree(tree, node_ids, 32)
    assert caught.value.field == "structure"


@pytest.mark.parametrize(
    ("tree", "node_ids"),
    [
        (None, []),
        ("a", ["a"]),
        (["a"], ["a"]),
        ({}, []),
        ({"n": 1}, [1]),
        ({"n": None}, [None]),
        ({"n": "a", "chain": [{"n": "b"}]}, ["a", "b"]),  # two kinds
        ({"n": "a", "x": 1}, ["a"]),  # an unknown key
        ({"n": "a", "v": "b"}, ["a"]),  # a resume plan's constant is not a dispatched task
        ({"chain": []}, []),
        ({"group": []}, []),
        ({"chord": [], "body": {"n": "a"}}, ["a"]),
        ({"chain": {"n": "a"}}, ["a"]),  # not a list
        ({"chain": ["a"]}, ["a"]),  # a part that is not a tree
        ({"chord": [{"n": "a"}]}, ["a"]),  # no body
        ({"group": [{"n": "a"}], "body": {"n": "b"}}, ["a", "b"]),  # a body without a chord
        ({"chord": [{"n": "a"}], "body": "b"}, ["a", "b"]),
        ({"n": "a", "e": {"n": "b"}}, ["a", "b"]),  # error callbacks not a list
        ({"n": "a", "e": [None]}, ["a"]),
        ({"chain": [{"n": "a"}, {"group": [{"n": "b"}, {"chain": [{"v": "c"}]}]}]}, ["a", "b", "c"]),  # deep inside
    ],
)
def test_check_tree_refuses_bad_shapes(tree: object, node_ids: list[str]) -> None:
    with pytest.raises(TrackerValidationError, match="expected a canvas tree") as caught:
        check_tree(tree, node_ids, 32)
    assert caught.value.field == "structure"


def nested(levels: int) -> Tree:
    tree = t("a")
    for _ in range(levels):
        tree = chain(tree)
    return tree


def test_check_tree_refuses_a_tree_deeper_than_the_limit() -> None:
    assert check_tree(nested(4), ["a"], 4) == nested(4)
    with pytest.raises(TrackerValidationError, match="deeper than 4"):
        check_tree(nested(5), ["a"], 4)
    assert check_tree(t("a", chain("b", "c")), ["a", "b", "c"], 1)
    with pytest.raises(TrackerValidationError, match="deeper than 0"):
        check_tree(t("a", chain("b", "c")), ["a", "b", "c"], 0)  # error callbacks count too


def test_check_tree_refuses_a_very_deep_tree_as_invalid_input() -> None:
    # Deeper than Python's recursion limit: still bad input (TrackerValidationError), not a crash.
    with pytest.raises(TrackerValidationError):
        check_tree(nested(5000), ["a"], 32)


# -- skips --------------------------------------------------------------------------------------


def skipped_by(tree: Tree, statuses: dict[str, NodeStatus], node: str, status: NodeStatus) -> list[tuple[str, str]]:
    """What ``skips`` marks when ``node`` ends ``status`` (``statuses`` holds it already)."""
    found = links(tree)
    known = {n: P for n in leaf_ids(tree)} | statuses | {node: status}
    return skips(
        lambda n: (found.after.get(n, []), found.errbacks.get(n, [])),
        lambda n: found.handles.get(n, []),
        known.get,
        node,
        status,
    )


def test_skipped_reason() -> None:
    assert skipped_reason("b", N.FAILED) == "skipped: node b failed"
    assert skipped_reason("b", "lost") == "skipped: node b lost"


@pytest.mark.parametrize("status", [F, L, X, S])
def test_a_chain_link_that_did_not_complete_skips_the_rest_of_the_chain(status: NodeStatus) -> None:
    reason = f"skipped: node b {status.value}"
    assert skipped_by(chain("a", "b", "c", "d"), {"a": C}, "b", status) == [("c", reason), ("d", reason)]


def test_a_completed_node_skips_nothing() -> None:
    assert skipped_by(chain("a", "b", "c"), {}, "a", C) == []
    assert skipped_by(chord(["a", "b"], "c"), {"a": F}, "b", C) == []


def test_a_header_failure_skips_the_body_and_what_follows_the_chord() -> None:
    tree = chain("x", chord(["a", "b"], "c"), "y", "z")
    reason = "skipped: node a failed"
    assert skipped_by(tree, {"x": C, "b": R}, "a", F) == [("c", reason), ("y", reason), ("z", reason)]
    # the other header task still runs: it is not after a
    assert "b" not in dict(skipped_by(tree, {"x": C}, "a", F))


def test_only_pending_nodes_are_skipped_and_followed() -> None:
    # c already runs (or ended): it is not marked, and what follows it is not reached through it.
    for c_status in (R, C, F):
        assert skipped_by(chain("a", "b", "c", "d"), {"a": C, "c": c_status}, "b", F) == []


def test_a_failure_in_one_chain_of_a_group_leaves_the_other_chain() -> None:
    tree = group(chain("a", "b"), chain("c", "d"))
    assert skipped_by(tree, {}, "a", F) == [("b", "skipped: node a failed")]


def test_an_error_callback_is_skipped_once_every_node_it_handles_ended_without_failing() -> None:
    tree = with_errbacks(chain("a", "b"), "h")
    assert skipped_by(tree, {}, "a", C) == []  # b may still fail
    assert skipped_by(tree, {"a": C}, "b", C) == [("h", ERRBACK_NOT_NEEDED)]
    assert skipped_by(tree, {"a": C}, "b", X) == [("h", ERRBACK_NOT_NEEDED)]  # revoked: not a failure


@pytest.mark.parametrize("status", [F, L])
def test_an_error_callback_is_not_skipped_when_a_node_it_handles_failed(status: NodeStatus) -> None:
    tree = with_errbacks(chain("a", "b", "c"), "h")
    # b's failure skips c; h stays (Celery calls it)
    assert skipped_by(tree, {"a": C}, "b", status) == [("c", f"skipped: node b {status.value}")]
    # and a later success of another handled node does not skip it either
    assert skipped_by(tree, {"a": status, "b": S}, "c", C) == []


def test_a_chord_body_error_callback_is_not_skipped_when_a_header_task_fails() -> None:
    # Celery calls it for the header task's failure: it will run.
    tree = chord(["a", "b"], t("c", t("h")))
    assert skipped_by(tree, {"b": R}, "a", F) == [("c", "skipped: node a failed")]


def test_an_error_callback_is_skipped_after_what_it_handles_was_skipped() -> None:
    tree = with_errbacks(chain("a", "b"), "h")
    assert skipped_by(tree, {}, "a", X) == [("b", "skipped: node a cancelled"), ("h", ERRBACK_NOT_NEEDED)]


def test_a_skipped_error_callback_takes_its_own_chain_with_it() -> None:
    tree = with_errbacks(chain("a", "b"), chain("h1", "h2"))
    marked = dict(skipped_by(tree, {"a": C}, "b", C))
    assert marked.keys() == {"h1", "h2"}
    assert marked["h1"] == ERRBACK_NOT_NEEDED
    assert marked["h2"] == ERRBACK_NOT_NEEDED  # skipped for the same reason as the node before it


def test_skips_follow_the_statuses_given() -> None:
    # A node the store does not know (None) is neither skipped nor counted as ended.
    tree = with_errbacks(chain("a", "b"), "h")
    found = links(tree)
    marked = skips(
        lambda n: (found.after.get(n, []), found.errbacks.get(n, [])),
        lambda n: found.handles.get(n, []),
        {"a": C, "b": C}.get,  # h unknown
        "b",
        C,
    )
    assert marked == []


# -- resume_plan --------------------------------------------------------------------------------


def done(result: Any, stored: bool = True) -> tuple[NodeStatus, Any, bool]:
    return (C, result, stored)


def ended(status: NodeStatus) -> tuple[NodeStatus, Any, bool]:
    return (status, None, True)


def test_resume_a_failed_middle_chain_link_gives_back_its_parents_result() -> None:
    tree = chain("a", "b", "c")
    plan = resume_plan(tree, {"a": done({"rows": 3}), "b": ended(F), "c": ended(S)}, True, "s1")
    assert plan.tree == {"chain": [{"v": "a"}, {"n": "b"}, {"n": "c"}]}
    assert plan.reset == ["b", "c"]
    assert plan.values == {"a": {"rows": 3}}


def test_resume_a_failed_first_link_resends_the_whole_chain() -> None:
    plan = resume_plan(chain("a", "b"), {"a": ended(L), "b": ended(S)}, True, "s1")
    assert plan.tree == {"chain": [{"n": "a"}, {"n": "b"}]}
    assert plan.reset == ["a", "b"] and plan.values == {}


def test_resume_a_failed_chord_header_task_gives_back_the_other_header_results_in_order() -> None:
    tree = chord(["a", "b", "c", "d"], "e")
    nodes = {"a": done(1), "b": ended(F), "c": done([3]), "d": ended(L), "e": ended(S)}
    plan = resume_plan(tree, nodes, True, "s1")
    assert plan.tree == {"chord": [{"v": "a"}, {"n": "b"}, {"v": "c"}, {"n": "d"}], "body": {"n": "e"}}
    assert plan.reset == ["b", "d", "e"]
    assert plan.values == {"a": 1, "c": [3]}


def test_resume_a_chord_inside_a_chain() -> None:
    tree = chain("x", chord(["a", "b"], "c"), "y")
    nodes = {"x": done("in"), "a": done(1), "b": ended(F), "c": ended(S), "y": ended(S)}
    plan = resume_plan(tree, nodes, True, "s1")
    assert plan.tree == {"chain": [{"v": "x"}, {"chord": [{"v": "a"}, {"n": "b"}], "body": {"n": "c"}}, {"n": "y"}]}
    assert plan.reset == ["b", "c", "y"]
    assert plan.values == {"x": "in", "a": 1}


def test_resume_without_retry_failed_keeps_a_failed_node_and_what_needs_it() -> None:
    tree = group(chain("a", "b", "c"), chain("d", "e"))
    nodes = {"a": done(1), "b": ended(F), "c": ended(S), "d": done(4), "e": ended(L)}
    plan = resume_plan(tree, nodes, False, "s1")
    assert plan.tree == {"group": [{"chain": [{"v": "d"}, {"n": "e"}]}]}
    assert plan.reset == ["e"]
    assert "b" not in plan.reset and "c" not in plan.reset
    # with retry_failed the failed chain comes back as well
    again = resume_plan(tree, nodes, True, "s1")
    assert again.reset == ["b", "c", "e"]


def test_resume_without_retry_failed_of_a_failed_chain_resends_nothing() -> None:
    plan = resume_plan(chain("a", "b", "c"), {"a": done(1), "b": ended(F), "c": ended(S)}, False, "s1")
    assert (plan.tree, plan.reset, plan.values) == (None, [], {})


def test_resume_needing_a_result_that_was_not_stored_is_not_possible() -> None:
    nodes = {"a": done(None, stored=False), "b": ended(F), "c": ended(S)}
    with pytest.raises(ResumeNotPossibleError, match="node a") as caught:
        resume_plan(chain("a", "b", "c"), nodes, True, "s-42")
    assert "s-42" in str(caught.value)
    assert caught.value.hint.endswith("is not stored: dispatch the batch again")
    # a chord header result too
    nodes = {"a": done(1), "b": done(2, stored=False), "c": ended(F), "d": ended(S)}
    with pytest.raises(ResumeNotPossibleError, match="node b"):
        resume_plan(chord(["a", "b", "c"], "d"), nodes, True, "s-42")


def test_resume_needs_only_the_results_it_gives_back() -> None:
    # y takes the chord's result, which is the body's (c): the header results are not needed.
    tree = chain("x", chord(["a", "b"], "c"), "y")
    nodes = {"x": done(0), "a": done(1, stored=False), "b": done(2), "c": done(3), "y": ended(F)}
    plan = resume_plan(tree, nodes, True, "s1")
    assert plan.reset == ["y"]
    assert plan.values.get("c") == 3


def test_resume_a_top_level_group_drops_completed_members() -> None:
    tree = group("a", "b", "c", "d")
    # a result not stored does not matter: nothing needs the group's result
    nodes = {"a": done(1), "b": ended(F), "c": done(3, stored=False), "d": ended(X)}
    plan = resume_plan(tree, nodes, True, "s1")
    assert plan.tree == {"group": [{"n": "b"}, {"n": "d"}]}
    assert plan.reset == ["b", "d"]
    assert plan.values == {}


def test_resume_of_a_completed_canvas_resends_nothing() -> None:
    tree = chain("a", chord(["b", "c"], "d"))
    plan = resume_plan(tree, {n: done(n) for n in "abcd"}, True, "s1")
    assert (plan.tree, plan.reset, plan.values) == (None, [], {})


def test_resume_resends_an_error_callback_that_did_not_run() -> None:
    tree = with_errbacks(chain("a", "b"), "h")
    plan = resume_plan(tree, {"a": done(1), "b": ended(F), "h": ended(P)}, True, "s1")
    assert plan.tree == {"chain": [{"v": "a"}, {"n": "b"}], "e": [{"n": "h"}]}
    assert plan.reset == ["b", "h"]
    # one that ran is not re-sent
    plan = resume_plan(tree, {"a": done(1), "b": ended(F), "h": done(None)}, True, "s1")
    assert plan.tree == {"chain": [{"v": "a"}, {"n": "b"}]}
    assert plan.reset == ["b"]


# -- the Lua copy -------------------------------------------------------------------------------


def test_the_lua_errback_reason_is_the_python_one() -> None:
    text = (resources.files("tracker.storage") / "lua" / "common.lua").read_text()
    found = re.findall(r"^local ERRBACK_NOT_NEEDED = '([^']*)'$", text, re.MULTILINE)
    assert found == [ERRBACK_NOT_NEEDED]


def test_the_lua_skip_reason_is_the_python_one() -> None:
    text = (resources.files("tracker.storage") / "lua" / "record_nodes.lua").read_text()
    found = re.findall(r"'(skipped: node )' \.\. node_id \.\. '([^']*)' \.\. status", text)
    assert len(found) == 1
    before, between = found[0]  # the reason of the nodes a node's end skips
    assert f"{before}b{between}failed" == skipped_reason("b", N.FAILED)


def test_only_tasks_side_by_side_have_no_links() -> None:
    assert not has_links({"n": "a"})
    assert not has_links({"group": [{"n": "a"}, {"group": [{"n": "b"}, {"n": "c"}]}]})
    assert has_links({"group": [{"n": "a"}, {"chain": [{"n": "b"}, {"n": "c"}]}]})
    assert has_links({"chord": [{"n": "a"}], "body": {"n": "b"}})
    assert has_links({"group": [{"n": "a", "e": [{"n": "h"}]}]})


def test_resume_refuses_to_give_back_a_header_part_that_ends_in_a_group() -> None:
    # Celery merges such a part's results into the header's list in an order it does not keep
    tree = chord([group("a", "b"), "c"], "d")
    nodes = {"a": done(1), "b": done(2), "c": done(3), "d": ended(F)}
    with pytest.raises(ResumeNotPossibleError, match="node a ends in a group"):
        resume_plan(tree, nodes, True, "s1")
    # re-sent (b failed), that part is Celery's to merge again, as it did the first time
    plan = resume_plan(tree, {**nodes, "b": ended(F)}, True, "s1")
    assert plan.reset == ["b", "d"]
    assert plan.tree == {"chord": [{"group": [{"v": "a"}, {"n": "b"}]}, {"v": "c"}], "body": {"n": "d"}}


def test_resume_refuses_to_give_back_what_fed_a_link_once_per_group_member() -> None:
    # Celery ran e once per member of the chord's body group, each with one member's result
    tree = chain(chord(["a"], group("b", "c")), "e")
    nodes = {"a": done(1), "b": done(2), "c": done(3), "e": ended(F)}
    with pytest.raises(ResumeNotPossibleError, match="no one result to give back"):
        resume_plan(tree, nodes, True, "s1")


def test_resume_of_chosen_nodes_re_sends_them_and_what_did_not_complete_after_them() -> None:
    # A group of two chains and a chord: b (chain 1), d (chain 2) and the chord's f failed
    tree = group(chain("a", "b", "c"), chain("d", "e"), chord(["f", "g"], "h"))
    nodes = {"a": done(1), "b": ended(F), "c": ended(S), "d": ended(F), "e": ended(S), "f": ended(F), "g": done(7),
             "h": ended(S)}  # fmt: skip
    # Choosing b re-sends the rest of its chain only; d's chain and the chord keep their results
    plan = resume_plan(tree, nodes, True, "s1", {"b"})
    assert plan.tree == {"group": [{"chain": [{"v": "a"}, {"n": "b"}, {"n": "c"}]}]}
    assert plan.reset == ["b", "c"]
    # Choosing f re-sends the chord's body too, with g's result given back
    plan = resume_plan(tree, nodes, True, "s1", {"f", "d"})
    assert plan.reset == ["d", "e", "f", "h"]
    assert plan.values == {"g": 7}


def test_resume_of_a_chord_header_node_without_its_failed_sibling_is_refused() -> None:
    nodes = {"a": ended(F), "b": ended(F), "c": ended(S)}
    with pytest.raises(ResumeNotPossibleError, match="node a cannot run again alone") as caught:
        resume_plan(chord(["a", "b"], "c"), nodes, True, "s1", {"a"})
    assert caught.value.hint == "choose those nodes too, or resume without choosing nodes"
    assert resume_plan(chord(["a", "b"], "c"), nodes, True, "s1", {"a", "b"}).reset == ["a", "b", "c"]
