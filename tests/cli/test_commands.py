"""Every command and every exit code, through click's CliRunner, on the tests' own Redis."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.bin.celery import celery as celery_cli
from click.testing import CliRunner
from rich.console import Console

from tests.cli.apps import UNREACHABLE_BROKER
from tests.cli.conftest import TEST_APP, Cli
from tests.servers import free_port
from tracker import NodeError, NodeSpec, NodeStatus, SessionManager, SessionStatus, TrackerSettings
from tracker.cli import ExitCode
from tracker.cli.base import CliError, masked_url
from tracker.cli.render import follow, pace
from tracker.storage.base import ChildLink
from tracker.storage.redis import RedisStorageAdapter

ROOT = Path(__file__).resolve().parents[2]


def partial_session(manager: SessionManager) -> str:
    """A session of 3 nodes that ended partial_failure: n1 and n2 completed, n3 failed."""
    sid = manager.sync.create_session("three.canvas", 3)
    manager.sync.add_node_result(sid, "n1", {"ok": 1})
    manager.sync.add_node_result(sid, "n2", {"ok": 2})
    manager.sync.add_node_result(sid, "n3", status="failed", error=ValueError("disk on fire"))
    return sid


def skipped_session(manager: SessionManager) -> str:
    """A session of 3 nodes that ended partial_failure: n1 completed, n2 failed, n3 skipped because of n2."""
    sid = manager.sync.create_session("chain.canvas", 3)
    manager.sync.add_node_result(sid, "n1", {"ok": 1})
    manager.sync.add_node_result(sid, "n2", status="failed", error=ValueError("disk on fire"))
    manager.sync._record_node(sid, "n3", "skipped", reason="skipped: node n2 failed")
    return sid


# -- help and version ----------------------------------------------------------------------------


def test_help_lists_every_command_and_the_exit_codes(cli: Cli) -> None:
    result = cli("--help")
    assert result.exit_code == ExitCode.OK
    for command in ("demo", "run", "status", "list", "watch", "failures", "cancel", "resume", "cleanup", "serve"):
        assert f"  {command} " in result.stdout
    assert "Exit codes:" in result.stdout
    for code in range(5):
        assert f"  {code}  " in result.stdout
    assert "TRACKER_REDIS_URL" in result.stdout


def test_version_and_usage_errors(cli: Cli) -> None:
    assert "0.1.0" in cli("--version").stdout
    assert cli("status").exit_code == ExitCode.USAGE  # missing ID
    assert cli("nope").exit_code == ExitCode.USAGE
    assert cli("list", "--status", "exploded").exit_code == ExitCode.USAGE


# -- status --------------------------------------------------------------------------------------


def test_status_of_a_pending_session_exits_0(cli: Cli, store_manager: SessionManager) -> None:
    sid = store_manager.sync.create_session("batch.canvas", 5)
    result = cli("status", sid)
    assert result.exit_code == ExitCode.OK
    assert sid in result.stdout
    assert "pending" in result.stdout
    assert "0 completed, 0 failed, 0 running, 5 pending (of 5)" in result.stdout


def test_status_shows_a_sessions_children_and_a_childs_parent(cli: Cli, store_manager: SessionManager) -> None:
    sid = store_manager.sync.create_session("p.canvas", 1, nodes=[NodeSpec(node_id="p")])
    child = "5d2f8a2e-7c1b-4d0e-9a57-3f4b6c8e1d20"
    store_manager.sync._record_nodes(sid, [store_manager.operations.child_event(sid, "p", ChildLink(child))])
    store_manager.sync.create_session("c.canvas", 1, session_id=child, parent=(sid, "p"))
    assert "1 child session(s), 1 open" in cli("status", sid).stdout
    assert f"{sid} (node p)" in cli("status", child).stdout


def test_status_json_is_the_status_dict(cli: Cli, store_manager: SessionManager) -> None:
    sid = store_manager.sync.create_session("batch.canvas", 2, metadata={"owner": "ops"})
    result = cli("status", sid, "--json")
    assert result.exit_code == ExitCode.OK
    assert json.loads(result.stdout) == store_manager.sync.get_session_status(sid)


def test_status_of_a_partial_session_exits_1_and_shows_the_failures(cli: Cli, store_manager: SessionManager) -> None:
    sid = partial_session(store_manager)
    result = cli("status", sid)
    assert result.exit_code == ExitCode.SESSION_FAILED
    assert "partial_failure" in result.stdout
    assert "Failures (1)" in result.stdout
    assert "ValueError: disk on fire" in result.stdout
    assert cli("status", sid, "--json").exit_code == ExitCode.SESSION_FAILED


@pytest.mark.parametrize(("target", "code"), [("failed", 1), ("cancelled", 1), ("running", 0)])
def test_status_exit_code_follows_the_session(cli: Cli, store_manager: SessionManager, target: str, code: int) -> None:
    sid = store_manager.sync.create_session("batch.canvas", 2)
    if target != "running":
        store_manager.sync.update_status(sid, "running")
    store_manager.sync.update_status(sid, target)
    assert cli("status", sid).exit_code == code


def test_completed_session_exits_0(cli: Cli, store_manager: SessionManager) -> None:
    sid = store_manager.sync.create_session("batch.canvas", 1)
    store_manager.sync.add_node_result(sid, "only", 42)
    result = cli("status", sid)
    assert (result.exit_code, "completed" in result.stdout) == (ExitCode.OK, True)


def test_status_counts_skipped_nodes(cli: Cli, store_manager: SessionManager) -> None:
    sid = skipped_session(store_manager)
    result = cli("status", sid)
    assert result.exit_code == ExitCode.SESSION_FAILED
    assert "partial_failure" in result.stdout
    assert "1 completed, 1 failed, 0 running, 0 pending, 1 skipped (of 3)" in result.stdout
    assert "100.0 %" in result.stdout
    assert "Failures (1)" in result.stdout  # a skipped node is not a failure
    assert cli.json("status", sid, "--json")["skipped_nodes"] == 1
    # no skipped nodes: no skipped count
    assert "skipped" not in cli("status", partial_session(store_manager)).stdout


def test_skipped_has_a_colour_of_its_own() -> None:
    from rich.console import Console

    from tracker.cli.render import styled

    others = {styled(s.value).style for s in NodeStatus if s is not NodeStatus.SKIPPED}
    others |= {styled(s.value).style for s in SessionStatus}
    assert styled("skipped").style not in others | {""}
    console = Console(force_terminal=True, color_system="standard", width=40)
    with console.capture() as captured:
        console.print(styled("skipped"))
    assert "\x1b[" in captured.get() and "skipped" in captured.get()


def test_status_counts_retrying_nodes_apart_from_running(cli: Cli, store_manager: SessionManager) -> None:
    # Given a session of 3: n1 runs, n2 failed an attempt and waits for Celery's retry, n3 waits
    sid = store_manager.sync.create_session("retry.canvas", 3)
    store_manager.sync._record_node(sid, "n1", "running", attempt=1)
    store_manager.sync._record_node(sid, "n2", "running", attempt=1)
    store_manager.sync._record_node(sid, "n2", "retrying", attempt=1, error=ValueError("flaky upstream"))

    # When its status is shown (in colour, as a terminal gets it)
    result = cli("status", sid)
    coloured = cli("status", sid, env={"FORCE_COLOR": "1"})

    # Then the retrying node is named apart from the running one, in the retrying colour
    assert result.exit_code == ExitCode.OK
    assert "0 completed, 0 failed, 1 running, 1 retrying, 1 pending (of 3)" in result.stdout
    assert "\x1b[93m1 retrying\x1b[0m" in coloured.stdout  # bright yellow
    assert "retrying" not in cli("status", partial_session(store_manager)).stdout  # none: not named


def test_retrying_has_a_colour_of_its_own() -> None:
    from tracker.cli.render import styled

    others = {styled(s.value).style for s in NodeStatus if s is not NodeStatus.RETRYING}
    others |= {styled(s.value).style for s in SessionStatus}
    assert styled("retrying").style not in others | {""}


def pickup_hint_text(seconds: str) -> str:
    return (
        f"Hint: no worker has picked up any node for {seconds} s: is a worker running, "
        "with the tracker installed in its app (tracker.celery.install(app))?"
    )


def created_ago(manager: SessionManager, seconds: float, node_count: int = 2) -> str:
    """A session created ``seconds`` ago (by the manager's clock), then the clock back to now."""
    then = datetime.now(UTC) - timedelta(seconds=seconds)
    manager.clock = lambda: then
    try:
        return manager.sync.create_session("stuck.canvas", node_count)
    finally:
        manager.clock = lambda: datetime.now(UTC)


def test_status_of_a_session_no_worker_picked_up_shows_a_hint(cli: Cli, store_manager: SessionManager) -> None:
    # Given a session created 45 s ago that no worker has reported on, one created now, and one
    # created 45 s ago whose first node runs
    stuck = created_ago(store_manager, 45)
    young = store_manager.sync.create_session("young.canvas", 2)
    started = created_ago(store_manager, 45)
    store_manager.sync._record_node(started, "n1", "running")

    # When their status is shown
    result = cli("status", stuck)

    # Then only the stuck one has the hint (in yellow for a terminal), and the JSON stays the status dict
    assert result.exit_code == ExitCode.OK
    assert re.search(re.escape(pickup_hint_text("SECONDS")).replace("SECONDS", "4[5-9]"), result.stdout), result.stdout
    assert "\x1b[33mHint: no worker has picked up" in cli("status", stuck, env={"FORCE_COLOR": "1"}).stdout
    for other in (young, started):
        assert "Hint:" not in cli("status", other).stdout
    assert cli.json("status", stuck, "--json") == store_manager.sync.get_session_status(stuck)
    # and TRACKER_PICKUP_HINT_AFTER_S moves the threshold
    assert "Hint:" not in cli("status", stuck, env={"TRACKER_PICKUP_HINT_AFTER_S": "120"}).stdout


def test_unknown_session_exits_3_with_one_line(cli: Cli) -> None:
    sid = "0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e"
    result = cli("status", sid)
    assert result.exit_code == ExitCode.NOT_FOUND
    assert f"Error: no session {sid}" in result.stderr
    assert "tracker list" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_malformed_id_exits_2(cli: Cli) -> None:
    result = cli("status", "not-a-uuid")
    assert result.exit_code == ExitCode.USAGE
    assert "invalid session_id 'not-a-uuid'" in result.stderr
    assert "Hint: a session id is the UUID that dispatch returned; `tracker list` shows them" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(cli: Cli) -> None:
    result = cli("--debug", "status", "0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e")
    assert result.exit_code == ExitCode.NOT_FOUND
    assert "Traceback" in result.stderr
    assert "SessionNotFoundError" in result.stderr


def test_without_redis_a_lookup_explains_the_empty_memory_store(cli: Cli) -> None:
    result = cli("status", "0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e", env={"TRACKER_REDIS_URL": None})
    assert result.exit_code == ExitCode.NOT_FOUND
    assert "TRACKER_REDIS_URL is not set" in result.stderr


# -- store and settings problems -----------------------------------------------------------------


def test_unreachable_redis_exits_4_naming_the_url(cli: Cli) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = cli("list", env={"TRACKER_REDIS_URL": url, "TRACKER_REDIS_RETRIES": "0"})
    assert result.exit_code == ExitCode.UNREACHABLE
    assert masked_url(url) in result.stderr
    assert "is redis-server running? check TRACKER_REDIS_URL" in result.stderr
    assert "hunter2" not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_redis_that_refuses_commands_exits_4(cli: Cli, redis_url: str) -> None:
    # The tests' server has no password: AUTH is refused.
    url = redis_url.replace("redis://", "redis://someone:wrong@")
    result = cli("list", env={"TRACKER_REDIS_URL": url, "TRACKER_REDIS_RETRIES": "0"})
    assert result.exit_code == ExitCode.UNREACHABLE
    assert "check TRACKER_REDIS_URL" in result.stderr


def test_invalid_setting_exits_2(cli: Cli) -> None:
    result = cli("list", env={"TRACKER_KEY_PREFIX": "has spaces!"})
    assert result.exit_code == ExitCode.USAGE
    assert "TRACKER_KEY_PREFIX" in result.stderr


def test_unexpected_error_exits_1_and_points_to_debug(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_: Any, **__: Any) -> Any:
        raise RuntimeError("gremlins")

    monkeypatch.setattr("tracker.manager.SyncSessionManager.list_sessions", explode)
    result = cli("list")
    assert result.exit_code == ExitCode.SESSION_FAILED
    assert "unexpected RuntimeError: gremlins" in result.stderr
    assert "--debug" in result.stderr


def test_masked_url() -> None:
    assert masked_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert masked_url("redis://h:1/0") == "redis://h:1/0"
    assert masked_url(None) == "<unset>"
    assert masked_url("redis://u:p@h:notaport/0") == "<unparsable URL>"


# -- list ----------------------------------------------------------------------------------------


def test_list_shows_sessions_newest_first_and_filters(cli: Cli, store_manager: SessionManager) -> None:
    pending = store_manager.sync.create_session("first.canvas", 4)
    partial = partial_session(store_manager)
    listed = cli.json("list", "--json")
    assert [s["session_id"] for s in listed] == [partial, pending]
    assert [s["session_id"] for s in cli.json("list", "--status", "partial_failure", "--json")] == [partial]
    assert cli.json("list", "--limit", "1", "--json")[0]["session_id"] == partial
    table = cli("list")
    assert table.exit_code == ExitCode.OK
    assert pending in table.stdout and partial in table.stdout
    assert "first.canvas" in table.stdout and "Created" in table.stdout
    narrow = cli("list", env={"COLUMNS": "80"})
    assert partial in narrow.stdout and "Created" not in narrow.stdout


def test_list_at_80_columns_cuts_long_canvas_names_and_keeps_ids_whole(cli: Cli, store_manager: SessionManager) -> None:
    # Given sessions whose canvas names are longer than an 80-column listing has room for
    long_names = ("pipelines/nightly/customer-exports-2026.canvas", "reports/quarterly revenue by region.canvas")
    sids = [store_manager.sync.create_session(name, 4) for name in long_names]
    sids.append(store_manager.sync.create_session("a.canvas", 4))

    # When they are listed in an 80-column terminal
    result = cli("list", env={"COLUMNS": "80"})

    # Then each session is one line with its id whole; a long name is cut with an ellipsis, not folded
    assert result.exit_code == ExitCode.OK
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 2 + len(sids), result.stdout  # header, rule, one line per session
    assert all(len(line) <= 80 for line in lines)
    rows = {sid: next(line for line in lines if sid in line) for sid in sids}
    assert "customer-exp" in rows[sids[0]] and rows[sids[0]].rstrip().endswith("…")
    assert "2026.canvas" not in result.stdout
    assert rows[sids[1]].rstrip().endswith("…") and "region" not in result.stdout
    assert "a.canvas" in rows[sids[2]] and " 0/4 " in rows[sids[2]]


def test_list_counts_skipped_nodes_as_done(cli: Cli, store_manager: SessionManager) -> None:
    sid = skipped_session(store_manager)
    table = cli("list")
    row = next(line for line in table.stdout.splitlines() if sid in line)
    assert "partial_failure" in row and " 3/3 " in row


def test_list_when_there_is_nothing(cli: Cli) -> None:
    assert cli.json("list", "--json") == []
    assert "No sessions. (none with status running)" in cli("list", "--status", "running").stdout
    result = cli("list", env={"TRACKER_REDIS_URL": None})
    assert "TRACKER_REDIS_URL is not set" in result.stdout


# -- watch (events from a thread; the real-worker case is in test_worker.py) ----------------------


def test_watch_a_session_that_ended_returns_at_once(cli: Cli, store_manager: SessionManager) -> None:
    sid = partial_session(store_manager)
    result = cli("watch", sid)
    assert result.exit_code == ExitCode.SESSION_FAILED
    assert f"Session {sid} ended partial_failure" in result.stdout
    assert "Slowest nodes" in result.stdout or "Failures (1)" in result.stdout


def test_watch_follows_events_until_the_end(cli: Cli, store_manager: SessionManager) -> None:
    sid = store_manager.sync.create_session("live.canvas", 4)

    def work() -> None:
        for i in range(4):
            time.sleep(0.15)
            store_manager.sync._record_node(sid, f"n{i}", "running")
            store_manager.sync.add_node_result(sid, f"n{i}", i, status="failed" if i == 2 else "completed")

    thread = threading.Thread(target=work)
    thread.start()
    result = cli("watch", sid)
    thread.join()
    assert result.exit_code == ExitCode.SESSION_FAILED
    assert "node n2 failed" in result.stdout
    assert "3 completed, 1 failed of 4" in result.stdout


def test_watch_a_session_with_skipped_nodes_names_them(cli: Cli, store_manager: SessionManager) -> None:
    sid = skipped_session(store_manager)
    result = cli("watch", sid)
    assert result.exit_code == ExitCode.SESSION_FAILED
    assert f"Session {sid} ended partial_failure: 1 completed, 1 failed, 1 skipped of 3" in result.stdout
    assert "node n3" not in result.stdout  # announced as a failure: it is not one


def test_watch_counts_skipped_nodes_in_the_bar(cli: Cli, store_manager: SessionManager) -> None:
    sid = store_manager.sync.create_session("chain.canvas", 3)

    def work() -> None:
        time.sleep(0.3)
        store_manager.sync._record_node(sid, "n1", "running")
        store_manager.sync.add_node_result(sid, "n1", status="failed", error=ValueError("first link broke"))
        for node_id in ("n2", "n3"):
            time.sleep(0.15)
            store_manager.sync._record_node(sid, node_id, "skipped", reason="skipped: node n1 failed")

    thread = threading.Thread(target=work)
    thread.start()
    result = cli("watch", sid)
    thread.join()
    assert result.exit_code == ExitCode.SESSION_FAILED
    assert "node n1 failed" in result.stdout
    assert "ended failed: 0 completed, 1 failed, 2 skipped of 3" in result.stdout
    assert "3/3" in result.stdout  # the bar is full: skipped nodes count towards progress


def test_watch_counts_the_running_nodes_reported_progress(store_manager: SessionManager) -> None:
    # Given a session of 4 nodes: one completed, one running that reported half its work
    sid = store_manager.sync.create_session("long.canvas", 4)
    store_manager.sync.add_node_result(sid, "done", 1)
    store_manager.sync._record_node(sid, "long", "running", task_id="t-long", attempt=1)
    half = store_manager.operations.node_event(sid, "long", "running", task_id="t-long", attempt=1, progress=0.5)
    store_manager.sync._record_nodes(sid, [half])
    # When it is watched (for a moment: it does not end)
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    status = follow(store_manager, sid, console, timeout_s=0.2, wait_ms=50)
    # Then the bar stands at one and a half nodes of four, and one has a result
    assert status["progress_percent"] == 37.5
    assert re.search(r"1/4\s+37\.5 %", console.file.getvalue())  # type: ignore[attr-defined]


def test_watch_of_a_session_no_worker_picked_up_prints_the_hint_once(cli: Cli, store_manager: SessionManager) -> None:
    # Given a session created 45 s ago that no worker has reported on, whose node runs 2.5 s later
    sid = created_ago(store_manager, 45, node_count=1)

    def work() -> None:
        time.sleep(2.5)  # a few event reads (1 s each) see it pending
        store_manager.sync._record_node(sid, "n1", "running")
        store_manager.sync.add_node_result(sid, "n1", 1)

    thread = threading.Thread(target=work)
    thread.start()
    # When it is watched
    result = cli("watch", sid)
    thread.join()

    # Then the hint is printed once, above the bar and the summary
    assert result.exit_code == ExitCode.OK
    assert result.stdout.count("Hint: no worker has picked up any node for") == 1, result.stdout
    assert result.stdout.index("Hint:") < result.stdout.index("1/1") < result.stdout.index(f"Session {sid} ended")
    assert "is a worker running, with the tracker installed in its app (tracker.celery.install(app))?" in result.stdout


def test_watch_of_a_young_session_has_no_hint(cli: Cli, store_manager: SessionManager) -> None:
    sid = store_manager.sync.create_session("young.canvas", 1)
    thread = threading.Thread(target=lambda: (time.sleep(1.2), store_manager.sync.add_node_result(sid, "n1", 1)))
    thread.start()
    result = cli("watch", sid)
    thread.join()
    assert result.exit_code == ExitCode.OK
    assert "Hint:" not in result.stdout


def test_watch_unknown_session_exits_3(cli: Cli) -> None:
    assert cli("watch", "0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e").exit_code == ExitCode.NOT_FOUND


def test_follow_stops_at_its_timeout(store_manager: SessionManager) -> None:
    from rich.console import Console

    from tracker.cli.render import follow

    sid = store_manager.sync.create_session("stuck.canvas", 2)
    store_manager.sync._record_node(sid, "n1", "running")
    status = follow(store_manager, sid, Console(file=open("/dev/null", "w")), timeout_s=0.3, wait_ms=100)  # noqa: SIM115
    assert status["status"] == "running"


def test_follow_counts_skipped_nodes_while_the_session_runs(
    store_manager: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from tracker.cli import render

    # Given the bar's every state recorded as (finished, completed)
    shown: list[tuple[int, int]] = []
    show = render._show

    def recording_show(progress: Any, bar: Any, status: dict[str, Any]) -> None:
        shown.append((render.finished_nodes(status), int(status["completed_nodes"])))
        show(progress, bar, status)

    monkeypatch.setattr(render, "_show", recording_show)
    sid = store_manager.sync.create_session("chain.canvas", 4)

    def work() -> None:
        for node_id, status in (("n1", "failed"), ("n2", "skipped"), ("n3", "completed"), ("n4", "completed")):
            time.sleep(0.4)
            if status == "skipped":
                store_manager.sync._record_node(sid, node_id, status, reason="skipped: node n1 failed")
            else:
                store_manager.sync.add_node_result(sid, node_id, 1, status=status)

    thread = threading.Thread(target=work)
    thread.start()
    # When it is followed while its nodes end one by one (each read waits long enough to get an event)
    status = render.follow(store_manager, sid, Console(file=open("/dev/null", "w")), timeout_s=10, wait_ms=2000)  # noqa: SIM115
    thread.join()

    # Then the skipped node moved the bar as soon as its event came, before any node completed
    assert status["status"] == "partial_failure"
    assert (2, 0) in shown, shown
    assert shown[-1] == (4, 2)


# -- cancel, resume, cleanup ---------------------------------------------------------------------


def test_cancel_a_pending_session(cli: Cli, store_manager: SessionManager) -> None:
    sid = store_manager.sync.create_session("batch.canvas", 3)
    result = cli("--app", TEST_APP, "cancel", sid)
    assert result.exit_code == ExitCode.OK
    assert f"Session {sid} cancelled" in result.stdout
    assert store_manager.sync.get_session_status(sid)["status"] == "cancelled"
    again = cli("--app", TEST_APP, "cancel", sid)
    assert again.exit_code == ExitCode.USAGE
    assert "is cancelled: it cannot become cancelled" in again.stderr
    assert "Hint: it has ended: there is nothing left to cancel" in again.stderr


def test_cancel_and_resume_unknown_sessions_exit_3(cli: Cli) -> None:
    sid = "0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e"
    assert cli("--app", "no.such.module:app", "cancel", sid).exit_code == ExitCode.NOT_FOUND
    assert cli("--app", "no.such.module:app", "resume", sid).exit_code == ExitCode.NOT_FOUND


def test_resume_a_failed_session(cli: Cli, store_manager: SessionManager) -> None:
    sid = store_manager.sync.create_session("batch.canvas", 1)
    store_manager.sync.add_node_result(sid, "n1", status="failed", error=NodeError(type="OSError", message="x"))
    result = cli("--app", TEST_APP, "resume", sid)
    assert result.exit_code == ExitCode.OK
    assert f"Session {sid} resumed: 0 node(s) sent again" in result.stdout  # made by hand: no signatures
    assert store_manager.sync.get_session_status(sid)["status"] == "running"


def test_resume_a_completed_session_exits_2(cli: Cli, store_manager: SessionManager) -> None:
    sid = store_manager.sync.create_session("batch.canvas", 1)
    store_manager.sync.add_node_result(sid, "n1", 1)
    result = cli("--app", TEST_APP, "resume", sid)
    assert result.exit_code == ExitCode.USAGE
    assert "is completed" in result.stderr
    assert "Hint: every node completed: there is nothing to resume" in result.stderr


def test_bad_options_and_settings_say_where_to_look(cli: Cli) -> None:
    bad_tag = cli("list", "--tag", "bad tag!")
    assert bad_tag.exit_code == ExitCode.USAGE
    assert bad_tag.stderr.strip().splitlines() == [
        "Error: invalid tag 'bad tag!': expected 1-64 letters, digits or _.:@/+=- (e.g. customer:42)",
        "Hint: `tracker list --help` shows what it takes",
    ]
    bad_setting = cli("list", env={"TRACKER_SESSION_TIMEOUT_S": "soon"})
    assert bad_setting.exit_code == ExitCode.USAGE
    assert "invalid TRACKER_* setting: TRACKER_SESSION_TIMEOUT_S" in bad_setting.stderr
    assert "Hint: fix TRACKER_SESSION_TIMEOUT_S, or unset it for its default" in bad_setting.stderr


def test_a_resume_that_needs_a_result_not_stored_is_refused_and_changes_nothing(
    cli: Cli, store_manager: SessionManager
) -> None:
    # A chain a -> b whose a completed with a result too large to keep, and b failed
    nodes = [NodeSpec(node_id=n, signature={"task": "t.add", "args": [1], "kwargs": {}}) for n in ("a", "b")]
    structure = {"chain": [{"n": "a"}, {"n": "b"}]}
    sid = store_manager.sync.create_session("chain.canvas", 2, nodes=nodes, structure=structure)
    store_manager.sync._record_node(sid, "a", "completed", reason="result not stored: too large")
    store_manager.sync._record_node(sid, "b", "failed")
    before = store_manager.sync.get_session_status(sid)
    result = cli("--app", TEST_APP, "resume", sid)
    assert result.exit_code == ExitCode.USAGE
    assert f"session '{sid}' cannot be resumed: the result of node a is needed again" in result.stderr
    assert "Hint: a result over TRACKER_MAX_RESULT_BYTES (or not JSON) is not stored" in result.stderr
    assert store_manager.sync.get_session_status(sid) == before


def test_cleanup_removes_expired_sessions(cli: Cli, redis_url: str, key_prefix: str) -> None:
    settings = TrackerSettings(redis_url=redis_url, key_prefix=key_prefix)
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    old = SessionManager(RedisStorageAdapter.from_settings(settings), settings, clock=lambda: an_hour_ago)
    old.sync.create_session("old.canvas", 1)
    fresh = old.sync.create_session("fresh.canvas", 1)
    old.clock = lambda: datetime.now(UTC)
    old.sync.update_progress(fresh, 1.0)  # touched now: not expired
    old.sync._record_node(fresh, "n1", "running", worker="celery@gone:1")  # its worker is long silent
    old.storage.heartbeat("celery@gone:1", an_hour_ago)
    env = {"TRACKER_SESSION_TIMEOUT_S": "60", "TRACKER_WORKER_STALE_AFTER_S": "1"}
    result = cli("cleanup", env=env)
    assert result.exit_code == ExitCode.OK
    # The first pass finds the worker silent and gives it a grace to beat again; the next one reaps
    assert "Reaped 0 node(s) of dead worker processes; ended 0 stalled session(s); removed 1 expired" in result.stdout
    time.sleep(1.1)
    result = cli("cleanup", env=env)
    assert "Reaped 1 node(s) of dead worker processes; ended 0 stalled session(s); removed 0 expired" in result.stdout
    # workers.app acknowledges late: the dead worker's message comes back, so the node waits for it
    node = old.sync.get_nodes(fresh).nodes[0]
    assert node.status is NodeStatus.PENDING and node.reason is not None and "redeliver" in node.reason
    assert [s.session_id for s in old.sync.list_sessions().sessions] == [fresh]
    old.storage.close()


# -- run (errors; dispatching to a real worker is in test_worker.py) -------------------------------


def test_run_refuses_a_bad_canvas_file(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "broken.canvas"
    bad.write_text("{not json", encoding="utf-8")
    result = cli("--app", TEST_APP, "run", str(bad))
    assert result.exit_code == ExitCode.USAGE
    assert "broken.canvas" in result.stderr and "not JSON (line 1" in result.stderr
    missing = cli("--app", TEST_APP, "run", str(tmp_path / "missing.canvas"))
    assert missing.exit_code == ExitCode.USAGE
    assert "cannot read it" in missing.stderr


def test_run_refuses_a_canvas_without_work(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "groups.canvas"
    group = {"id": "g", "type": "group", "x": 0, "y": 0, "width": 10, "height": 10, "label": "only a box"}
    path.write_text(json.dumps({"nodes": [group], "edges": []}), encoding="utf-8")
    result = cli("--app", TEST_APP, "run", str(path))
    assert result.exit_code == ExitCode.USAGE
    assert "no work nodes" in result.stderr


def test_run_needs_redis(cli: Cli, canvas_file: Callable[..., Path]) -> None:
    result = cli("run", str(canvas_file("hello")), env={"TRACKER_REDIS_URL": None})
    assert result.exit_code == ExitCode.USAGE
    assert "TRACKER_REDIS_URL is not set" in result.stderr
    assert "tracker demo" in result.stderr


def test_run_with_an_unloadable_app_exits_2(cli: Cli, canvas_file: Callable[..., Path]) -> None:
    path = str(canvas_file("hello"))
    result = cli("--app", "no.such.module:app", "run", path)
    assert result.exit_code == ExitCode.USAGE
    assert "cannot load the Celery app 'no.such.module:app'" in result.stderr
    not_an_app = cli("--app", "tests.cli.apps:not_an_app", "run", path)
    assert (not_an_app.exit_code, "not a Celery app" in not_an_app.stderr) == (ExitCode.USAGE, True)


def test_run_with_an_unreachable_broker_exits_4(cli: Cli, canvas_file: Callable[..., Path]) -> None:
    result = cli("--app", "tests.cli.apps:unreachable", "run", str(canvas_file("hello")))
    assert result.exit_code == ExitCode.UNREACHABLE
    assert f"Celery broker at {UNREACHABLE_BROKER} is unreachable" in result.stderr


# -- serve ---------------------------------------------------------------------------------------


def test_serve_runs_the_web_app(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr("tracker.web.serve", lambda *args, **kwargs: calls.append((args, kwargs)))
    result = cli("--app", TEST_APP, "serve", "--port", "8765", "--log-level", "warning")
    assert result.exit_code == ExitCode.OK, result.stderr
    ((args, kwargs),) = calls
    assert args == ("127.0.0.1", 8765)
    assert kwargs["log_level"] == "warning"
    assert kwargs["manager"] is not None and kwargs["celery_app"] is not None


def test_serve_without_the_web_extra_exits_2(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tracker.web", None)  # what a missing fastapi looks like
    result = cli("serve")
    assert result.exit_code == ExitCode.USAGE
    assert "pip install 'celery-session-tracker[web]'" in result.stderr


def test_serve_warns_when_the_default_app_cannot_load(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr("tracker.web.serve", lambda *args, **kwargs: calls.append(kwargs["celery_app"]))
    monkeypatch.setattr("tracker.cli.base.DEFAULT_APP", "no.such.module:app")
    result = cli("serve", env={"TRACKER_REDIS_URL": None})
    assert result.exit_code == ExitCode.OK
    assert calls == [None]
    assert "Warning: cannot load the Celery app" in result.stderr
    assert "empty in-memory store" in result.stderr


# -- as a Celery sub-command ---------------------------------------------------------------------


def test_celery_sessions_help_lists_the_commands() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "sessions", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for command in ("demo", "run", "status", "list", "watch", "failures", "cancel", "resume", "cleanup", "serve"):
        assert f"  {command} " in done.stdout
    assert "Exit codes:" in done.stdout


def test_celery_sessions_uses_the_app_celery_loaded(
    cli_env: dict[str, str | None], store_manager: SessionManager, canvas_file: Callable[..., Path]
) -> None:
    runner = CliRunner()
    sid = partial_session(store_manager)
    SessionManager.reset_instance()
    try:
        status = runner.invoke(celery_cli, ["-A", TEST_APP, "sessions", "status", sid, "--json"], env=cli_env)
        assert status.exit_code == ExitCode.SESSION_FAILED
        assert json.loads(status.stdout)["status"] == SessionStatus.PARTIAL_FAILURE
        # The -A app (whose broker is down) is the one `run` publishes with:
        args = ["-A", "tests.cli.apps:unreachable", "sessions", "run", str(canvas_file("x"))]
        run = runner.invoke(celery_cli, args, env=cli_env)
        assert run.exit_code == ExitCode.UNREACHABLE
        assert UNREACHABLE_BROKER in run.stderr
        missing = runner.invoke(celery_cli, ["-A", TEST_APP, "sessions", "status", "0" * 8 + sid[8:]], env=cli_env)
        assert missing.exit_code == ExitCode.NOT_FOUND
        assert f"celery -A {TEST_APP} sessions list" in missing.stderr
    finally:
        SessionManager.reset_instance()


def test_celery_sessions_without_an_app_uses_the_default(
    cli_env: dict[str, str | None], monkeypatch: pytest.MonkeyPatch, canvas_file: Callable[..., Path]
) -> None:
    monkeypatch.setattr("tracker.cli.base.DEFAULT_APP", "tests.cli.apps:unreachable")
    SessionManager.reset_instance()
    try:
        result = CliRunner().invoke(celery_cli, ["sessions", "run", str(canvas_file("x"))], env=cli_env)
    finally:
        SessionManager.reset_instance()
    assert result.exit_code == ExitCode.UNREACHABLE
    assert UNREACHABLE_BROKER in result.stderr


def test_cli_error_exit_code_is_its_own() -> None:
    assert CliError("x", ExitCode.NOT_FOUND).exit_code == 3
    assert CliError("y", ExitCode.UNREACHABLE, "Cause: z").details == ("Cause: z",)


def test_a_redis_url_without_a_scheme_is_a_bad_setting_exit_2(cli: Cli) -> None:
    result = cli("status", "0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e", env={"TRACKER_REDIS_URL": "127.0.0.1:6379"})
    assert result.exit_code == ExitCode.USAGE
    assert "invalid TRACKER_* setting: TRACKER_REDIS_URL" in result.stderr
    assert "must start with redis://, rediss:// or unix://" in result.stderr
    assert "unexpected" not in result.stderr


def test_an_app_whose_module_lacks_the_attribute_is_named_so(cli: Cli, canvas_file: Callable[..., Path]) -> None:
    path = str(canvas_file("one"))
    result = cli("--app", "tests.celery.appmod:nope", "run", path)
    assert result.exit_code == ExitCode.USAGE
    assert "cannot load the Celery app 'tests.celery.appmod:nope': module 'tests.celery.appmod' has no" in result.stderr
    assert "Hint: name the app object, as in --app tests.celery.appmod:app" in result.stderr
    missing = cli("--app", "no_such_module_here:app", "run", path)
    assert missing.exit_code == ExitCode.USAGE
    assert "cannot import 'no_such_module_here'" in missing.stderr


def test_not_found_says_which_store_was_searched(cli: Cli, redis_url: str, key_prefix: str) -> None:
    result = cli("status", "0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e")
    assert result.exit_code == ExitCode.NOT_FOUND
    assert f"in Redis at {redis_url}, key prefix '{key_prefix}'" in " ".join(result.stderr.split())


def test_run_through_an_app_without_the_tracker_installed_exits_2_and_sends_nothing(
    cli: Cli, canvas_file: Callable[..., Path], store_manager: SessionManager
) -> None:
    result = cli("--app", "tests.cli.apps:not_installed", "run", str(canvas_file("x")))
    assert result.exit_code == ExitCode.USAGE
    assert "the tracker is not installed in the Celery app 'not_installed'" in result.stderr
    assert "Hint: from tracker.celery import install; install(app) right after app = Celery(...)" in result.stderr
    assert store_manager.sync.list_sessions().sessions == []


# -- failures by cause, resume of a subset, tags, rate and ETA ------------------------------------


def failing_session(manager: SessionManager) -> str:
    """Four nodes: two timed out, one raised ValueError, one completed."""
    sid = manager.sync.create_session("jobs/causes.canvas", 4, tags=["nightly"])
    manager.sync.add_node_result(sid, "n1", status="failed", error=NodeError(type="TimeoutError", message="slow 1"))
    manager.sync.add_node_result(sid, "n2", status="failed", error=NodeError(type="TimeoutError", message="slow 2"))
    manager.sync.add_node_result(sid, "n3", status="failed", error=NodeError(type="ValueError", message="bad"))
    manager.sync.add_node_result(sid, "n4", 4)
    return sid


def test_failures_shows_the_causes_most_first(cli: Cli, store_manager: SessionManager) -> None:
    sid = failing_session(store_manager)
    result = cli("failures", sid)
    assert result.exit_code == ExitCode.OK, result.stderr
    assert "Failures by cause (3 node(s))" in result.stdout
    assert re.search(r"TimeoutError\W+2\W+slow 1", result.stdout), result.stdout
    assert re.search(r"ValueError\W+1\W+bad", result.stdout)
    assert result.stdout.index("TimeoutError") < result.stdout.index("ValueError")  # most nodes first
    assert "n1 n2" in result.stdout and "slow 1" in result.stdout
    assert f"resume {sid} --error TimeoutError" in result.stdout
    assert [g["error_type"] for g in cli.json("failures", sid, "--json")] == ["TimeoutError", "ValueError"]
    status = cli("status", sid)
    assert "2 cause(s)" in status.stdout and "nightly" in status.stdout
    clean = store_manager.sync.create_session("clean.canvas", 1)
    assert "has no failed or lost nodes" in cli("failures", clean).stdout
    assert cli("failures", "0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e").exit_code == ExitCode.NOT_FOUND


def test_resume_of_one_cause_or_of_chosen_nodes(cli: Cli, store_manager: SessionManager) -> None:
    sid = failing_session(store_manager)
    # Bad subsets: one line, exit 2, nothing changed
    refusals = {
        ("--node", "nope"): "Hint: choose among the nodes that did not complete",
        ("--node", "n4"): "Hint: choose among the nodes that did not complete",
        ("--error", "KeyError"): "Hint: choose one of those causes",
    }
    for args, hint in refusals.items():
        refused = cli("--app", TEST_APP, "resume", sid, *args)
        assert refused.exit_code == ExitCode.USAGE, args
        error, shown_hint = refused.stderr.strip().splitlines()  # one line, and the hint that fits it
        assert error.startswith(f"Error: session '{sid}' cannot be resumed: ") and shown_hint.startswith(hint)
    assert store_manager.sync.get_session(sid).run == 1

    # Only the timeouts are reset (made by hand: no signatures to send)
    assert cli("--app", TEST_APP, "resume", sid, "--error", "TimeoutError").exit_code == ExitCode.OK
    pending = store_manager.sync.get_nodes(sid, NodeStatus.PENDING).nodes
    assert sorted(n.node_id for n in pending) == ["n1", "n2"]
    assert [g.error_type for g in store_manager.sync.get_failures(sid)] == ["ValueError"]
    store_manager.sync.add_node_result(sid, "n1", 1)
    store_manager.sync.add_node_result(sid, "n2", 2)
    # Then a chosen node
    assert cli("--app", TEST_APP, "resume", sid, "--node", "n3").exit_code == ExitCode.OK
    assert [n.node_id for n in store_manager.sync.get_nodes(sid, NodeStatus.PENDING).nodes] == ["n3"]


def test_list_by_tag_and_canvas_path_prefix(cli: Cli, store_manager: SessionManager) -> None:
    tagged = failing_session(store_manager)
    other = store_manager.sync.create_session("adhoc.canvas", 1)
    assert [s["session_id"] for s in cli.json("list", "--tag", "nightly", "--json")] == [tagged]
    assert [s["session_id"] for s in cli.json("list", "--path", "jobs/", "--json")] == [tagged]
    assert other in cli("list").stdout
    assert "none with tag nobody" in cli("list", "--tag", "nobody").stdout
    assert cli("list", "--tag", "has space").exit_code == ExitCode.USAGE


def test_the_pace_shows_the_rate_and_counts_the_eta_down() -> None:
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    running = {"status": "running", "rate_per_s": 4.0, "eta_at": (now + timedelta(seconds=42)).isoformat()}
    assert pace(running, now) == "4.0/s, ETA 42 s"
    assert pace(running, now + timedelta(seconds=40)) == "4.0/s, ETA 2 s"
    assert pace(running, now + timedelta(seconds=50)) == "4.0/s, ETA unknown (overdue)"
    assert pace({**running, "rate_per_s": 0.05, "eta_at": (now + timedelta(hours=3)).isoformat()}, now) == (
        "3.0/min, ETA 3.0 h"
    )
    assert pace({**running, "status": "completed"}, now) == ""
    assert pace({"status": "running", "rate_per_s": None}, now) == ""


def test_watch_shows_the_rate_and_eta(store_manager: SessionManager) -> None:
    # Given a running session whose nodes finish one every 0.2 s
    sid = store_manager.sync.create_session("paced.canvas", 20)
    for i in range(4):
        time.sleep(0.2)
        store_manager.sync.add_node_result(sid, f"n{i}", i)
    # When it is watched (for a moment: it does not end)
    console = Console(file=io.StringIO(), width=160, force_terminal=False)
    follow(store_manager, sid, console, timeout_s=0.2, wait_ms=50)
    # Then the bar shows its rate and how long the 16 nodes left should take
    assert re.search(r"\d\.\d/s, ETA \d+ s", console.file.getvalue()), console.file.getvalue()  # type: ignore[attr-defined]


def test_ctrl_c_during_watch_exits_130_not_1(cli_env: dict[str, str | None], store_manager: SessionManager) -> None:
    # Given `tracker watch` following a running session in a terminal
    sid = store_manager.sync.create_session("watched.canvas", 3)
    store_manager.sync._record_node(sid, "a", "running")
    env = {k: v for k, v in os.environ.items() if k != "TRACKER_DEBUG"}
    env.update({k: v for k, v in cli_env.items() if v is not None})
    terminal, tty = pty.openpty()
    watch = subprocess.Popen(
        [sys.executable, "-c", "from tracker.cli import main; main()", "watch", sid],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=tty, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(tty)
    try:
        assert os.read(terminal, 1000)  # its bar is drawn: it follows the session

        # When the user presses Ctrl-C
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=60)
    finally:
        watch.kill()
        os.close(terminal)

    # Then it stops with the shell's code for an interrupt, not 1 (a session that did not complete)
    assert watch.returncode == ExitCode.INTERRUPTED == 130
    assert b"Aborted" not in err and b"Traceback" not in err
