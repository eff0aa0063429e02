"""``tracker workers``: the worker processes from their heartbeats, through click's CliRunner on the
tests' own Redis."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from tests.cli.conftest import Cli
from tracker import SessionManager
from tracker.cli import ExitCode
from tracker.manager import utc_now

W1, W2 = "celery@host-a:101", "celery@host-b:202"


def beat_ago(manager: SessionManager, worker: str, seconds: float) -> None:
    """A heartbeat of ``worker`` ``seconds`` ago (the manager's clock set back to the real one after)."""
    then = datetime.now(UTC) - timedelta(seconds=seconds)
    manager.clock = lambda: then
    try:
        manager.sync._heartbeat(worker)
    finally:
        manager.clock = utc_now


def test_workers_shows_alive_and_silent_workers_with_their_nodes(cli: Cli, store_manager: SessionManager) -> None:
    # Given W1 silent for 5 minutes while holding a node, W2 running 7 nodes now
    sid = store_manager.sync.create_session("w.canvas", 8)
    store_manager.sync._record_node(sid, "lonely", "running", worker=W1)
    beat_ago(store_manager, W1, 300)
    for i in range(7):
        store_manager.sync._record_node(sid, f"n{i}", "running", worker=W2)

    # When
    result = cli("workers")

    # Then one row each, newest first: state, when last seen, how many nodes, the first five of them
    assert result.exit_code == ExitCode.OK, result.stderr
    out = result.stdout
    assert out.index(W2) < out.index(W1)
    assert re.search(rf"{re.escape(W2)}\s+alive\s+\d\d:\d\d:\d\d \(\d s ago\)\s+7\s+{sid[:8]}/n0 ", out), out
    assert f"{sid[:8]}/n4 …" in out and "/n5" not in out
    assert re.search(rf"{re.escape(W1)}\s+silent\s+\d\d:\d\d:\d\d \(5 min ago\)\s+1\s+{sid[:8]}/lonely", out), out

    # and --json has the web API's fields, every node the store read
    listed = cli.json("workers", "--json")
    assert [(w["worker"], w["alive"], w["running"]) for w in listed] == [(W2, True, 7), (W1, False, 1)]
    assert set(listed[0]) == {"worker", "last_seen_at", "seen_s_ago", "alive", "running", "nodes"}
    assert [n["node_id"] for n in listed[0]["nodes"]] == [f"n{i}" for i in range(7)]
    assert listed[1]["nodes"] == [{"session_id": sid, "node_id": "lonely"}]
    assert 300 <= listed[1]["seen_s_ago"] < 310


def test_workers_limit_and_an_empty_registry(cli: Cli, store_manager: SessionManager) -> None:
    assert "No workers" in cli("workers").stdout
    assert cli.json("workers", "--json") == []
    beat_ago(store_manager, W1, 2)
    beat_ago(store_manager, W2, 1)
    assert [w["worker"] for w in cli.json("workers", "--limit", "1", "--json")] == [W2]
    assert cli("workers", "--limit", "0").exit_code == ExitCode.USAGE


def test_workers_is_listed_in_the_help(cli: Cli) -> None:
    assert "  workers " in cli("--help").stdout
    assert "TRACKER_WORKER_STALE_AFTER_S" in cli("workers", "--help").stdout
