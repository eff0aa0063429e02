"""The state tables written in Lua (``tracker/storage/lua/common.lua``) agree with ``tracker/states.py``.

The scripts cannot import Python, so ``COUNTER``, ``TERMINAL_NODE`` and ``TERMINAL_SESSION`` are
copies. These tests parse the Lua text and fail as soon as either side changes alone.
"""

from __future__ import annotations

import re
from importlib import resources

import pytest

from tracker.states import (
    ACTIVE_NODE_STATUSES,
    FAILED_NODE_STATUSES,
    PROGRESS_UNITS,
    TERMINAL_NODE_STATUSES,
    TERMINAL_STATUSES,
    VALID_TRANSITIONS,
    NodeStatus,
    SessionStatus,
)
from tracker.storage.redis import SESSION_FIELDS

_ENTRY = re.compile(r"^(?P<key>[a-z_]+)\s*=\s*(?:'(?P<text>[a-z_]+)'|(?P<true>true))$")

#: The tables common.lua mirrors from states.py.
NAMES = ("COUNTER", "TERMINAL_NODE", "TERMINAL_SESSION")


def lua_table(text: str, name: str) -> dict[str, str | bool]:
    """The table ``local <name> = {key = 'value' | true, ...}`` of a Lua text.

    Raises:
        ValueError: the table is missing or defined twice, or one of its entries has another
            form (so nothing is skipped silently).
    """
    found = re.findall(rf"^local\s+{name}\s*=\s*\{{([^}}]*)\}}", text, re.MULTILINE)
    if len(found) != 1:
        raise ValueError(f"Lua table {name} defined {len(found)} times")
    entries: dict[str, str | bool] = {}
    for raw in found[0].split(","):
        if not raw.strip():
            continue
        entry = _ENTRY.match(raw.strip())
        if entry is None:
            raise ValueError(f"unexpected entry {raw.strip()!r} in Lua table {name}")
        if entry["key"] in entries:
            raise ValueError(f"key {entry['key']!r} twice in Lua table {name}")
        entries[entry["key"]] = entry["text"] if entry["text"] is not None else True
    return entries


@pytest.fixture(scope="module")
def tables() -> dict[str, dict[str, str | bool]]:
    """The mirrored tables of ``common.lua`` as shipped in the package, by name."""
    text = (resources.files("tracker.storage") / "lua" / "common.lua").read_text()
    return {name: lua_table(text, name) for name in NAMES}


def test_the_parser_reads_the_forms_used() -> None:
    text = "local A = {x = 'y', z = true,\n  w = 'v'}\nlocal B = {'f', 'g'}\n"
    assert lua_table(text, "A") == {"x": "y", "z": True, "w": "v"}
    with pytest.raises(ValueError, match="unexpected entry"):
        lua_table(text, "B")
    with pytest.raises(ValueError, match="0 times"):
        lua_table(text, "C")
    with pytest.raises(ValueError, match="twice"):
        lua_table("local A = {x = true, x = true}", "A")


def test_all_three_tables_are_there(tables: dict[str, dict[str, str | bool]]) -> None:
    assert all(tables[name] for name in NAMES)


def test_terminal_node_matches_terminal_node_statuses(tables: dict[str, dict[str, str | bool]]) -> None:
    assert set(tables["TERMINAL_NODE"].values()) == {True}
    assert set(tables["TERMINAL_NODE"]) == {s.value for s in TERMINAL_NODE_STATUSES}


def test_terminal_session_matches_terminal_statuses(tables: dict[str, dict[str, str | bool]]) -> None:
    assert set(tables["TERMINAL_SESSION"].values()) == {True}
    assert set(tables["TERMINAL_SESSION"]) == {s.value for s in TERMINAL_STATUSES}
    assert all(SessionStatus(name) for name in tables["TERMINAL_SESSION"])


def test_counter_matches_the_node_status_sets(tables: dict[str, dict[str, str | bool]]) -> None:
    counter = tables["COUNTER"]
    by_counter: dict[str | bool, set[str]] = {}
    for status, name in counter.items():
        by_counter.setdefault(name, set()).add(status)
    assert set(counter) <= {s.value for s in NodeStatus}
    assert by_counter["failed"] == {s.value for s in FAILED_NODE_STATUSES}
    assert by_counter["running"] | by_counter["retrying"] == {s.value for s in ACTIVE_NODE_STATUSES}
    assert by_counter["retrying"] == {NodeStatus.RETRYING.value}
    assert by_counter["completed"] == {NodeStatus.COMPLETED.value}
    assert by_counter["cancelled"] == {NodeStatus.CANCELLED.value}
    assert by_counter["skipped"] == {NodeStatus.SKIPPED.value}
    assert set(by_counter) == {"completed", "failed", "running", "retrying", "cancelled", "skipped"}
    # Every result counts somewhere (the finish rule adds the counters up); pending counts nowhere.
    assert {s.value for s in TERMINAL_NODE_STATUSES} <= set(counter)
    assert NodeStatus.PENDING.value not in counter


def _lua_function(name: str) -> str:
    text = (resources.files("tracker.storage") / "lua" / "common.lua").read_text()
    body = text[text.index(f"local function {name}(") :]
    return body[: body.index("\nend\n")]


def test_the_session_fields_record_nodes_replies_are_in_the_order_python_reads() -> None:
    # record_nodes replies the session as a list; redis.py unpacks it by position (SESSION_FIELDS).
    listed = re.search(r"return \{([^}]*)\}", _lua_function("session_values"))
    assert listed is not None
    assert tuple(re.findall(r"s\.([a-z_]+)", listed.group(1))) == SESSION_FIELDS


def test_load_session_reads_the_same_fields_in_the_same_order() -> None:
    # load_session names the fields itself (unrolled, it runs on every write): the same list, the
    # same positions as its table's keys, then `linked`, `unneeded`, `partial` and `ended_ttl` (read
    # by the scripts, not replied).
    body = _lua_function("load_session")
    hmget = re.search(r"redis\.call\('HMGET', S,([^)]*)\)", body)
    assert hmget is not None
    read = (*SESSION_FIELDS, "linked", "unneeded", "partial", "ended_ttl")  # then what the scripts read
    assert tuple(re.findall(r"'([a-z_]+)'", hmget.group(1))) == read
    positions = dict(re.findall(r"([a-z_]+) = (?:tonumber\()?v\[(\d+)\]", body))
    assert {name: int(i) for name, i in positions.items()} == {name: i + 1 for i, name in enumerate(read)}


def test_rederive_edges_are_the_edges_between_ended_statuses() -> None:
    # common.lua's REDERIVE: {from = {to = true, ...}, ...}, the late-result edges of VALID_TRANSITIONS.
    text = (resources.files("tracker.storage") / "lua" / "common.lua").read_text()
    block = re.search(r"^local REDERIVE = \{(.*?)\}\}", text, re.MULTILINE | re.DOTALL)
    assert block is not None
    lua = {
        source: {target for target, _ in re.findall(r"([a-z_]+) = (true)", inner)}
        for source, inner in re.findall(r"([a-z_]+) = \{([^}]*)", block.group(1) + "}")
    }
    python = {
        source.value: {t.value for t in targets if t.is_terminal}
        for source, targets in VALID_TRANSITIONS.items()
        if source.is_terminal and any(t.is_terminal for t in targets)
    }
    assert lua == python


def test_a_running_nodes_progress_is_counted_in_the_same_units() -> None:
    # common.lua's progress_units rounds a reported fraction as states.progress_units does.
    assert f"* {PROGRESS_UNITS} + 0.5" in _lua_function("progress_units")
    assert "10000 * finished + s.partial" in _lua_function("derived_progress")
