"""Failures by cause, rate and ETA, retention, and tags: what a session keeps so that a batch can be
understood and found, on every store.

Failures are grouped by cause in the same atomic step as the counters; the rate comes from a
window of stored timestamps, so a status read stays one store read; an ended session is kept
``finished_ttl_s``; tags and canvas-path folders are listing indexes.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.conftest import FakeClock
from tracker import NodeError, NodeResult, SessionManager, TrackerSettings, TrackerValidationError
from tracker.errors import SessionNotFoundError
from tracker.models import FailureGroup
from tracker.states import FAILURE_SAMPLE, RATE_HALF_WINDOW_MS, NodeStatus, RateWindow, SessionStatus
from tracker.storage.base import SessionStorageAdapter


async def fail(manager: SessionManager, sid: str, node: str, error: BaseException) -> None:
    await manager.add_node_result(sid, node, None, status="failed", error=error)


def groups(found: list[FailureGroup]) -> dict[str, tuple[int, str, list[str]]]:
    return {g.error_type: (g.count, g.first_message, g.node_ids) for g in found}


# -- failures by cause ----------------------------------------------------------------------------


async def test_failures_are_grouped_by_cause_with_the_counters(manager: SessionManager, clock: FakeClock) -> None:
    # Given a batch where three nodes time out, one raises ValueError and one is lost
    sid = await manager.create_session("insight.canvas", 7)
    first_at = clock.now
    await fail(manager, sid, "n1", TimeoutError("took 30 s"))
    clock.advance(5)
    await fail(manager, sid, "n2", TimeoutError("took 31 s"))
    await fail(manager, sid, "n3", ValueError("bad row 7"))
    await manager._record_node(sid, "n4", "lost", reason="worker celery@h:1 vanished")
    clock.advance(5)
    status = await manager.add_node_result(sid, "n5", None, status="failed", error=TimeoutError("took 29 s"))

    # Then the session knows its three causes, most nodes first, with the first message and times
    assert status["failure_types"] == 3
    found = await manager.get_failures(sid)
    assert [g.error_type for g in found] == ["TimeoutError", "ValueError", "lost"]
    timeouts = found[0]
    assert (timeouts.count, timeouts.first_message, timeouts.node_ids) == (3, "took 30 s", ["n1", "n2", "n5"])
    assert (timeouts.first_at, timeouts.last_at) == (first_at, clock.now)
    assert groups(found)["lost"] == (1, "worker celery@h:1 vanished", ["n4"])
    assert (await manager.get_session_status(sid))["failure_types"] == 3


async def test_a_node_that_later_completes_leaves_its_group(manager: SessionManager) -> None:
    sid = await manager.create_session("insight.canvas", 3)
    await fail(manager, sid, "a", TimeoutError("slow"))
    await fail(manager, sid, "b", TimeoutError("slow too"))
    await manager._record_node(sid, "c", "lost", reason="gone")

    # When a failed node's success arrives late, and the lost one's task completes after all
    await manager.add_node_result(sid, "a", 1)
    status = await manager.add_node_result(sid, "c", 3)

    # Then each leaves its group; an empty group is gone, and the count of causes follows
    assert groups(await manager.get_failures(sid)) == {"TimeoutError": (1, "slow", ["b"])}
    assert status["failure_types"] == 1
    status = await manager.add_node_result(sid, "b", 2)
    assert await manager.get_failures(sid) == []
    assert status["failure_types"] == 0
    assert status["status"] == SessionStatus.COMPLETED


async def test_a_node_failing_again_for_another_cause_moves_between_groups(manager: SessionManager) -> None:
    sid = await manager.create_session("insight.canvas", 2)
    await fail(manager, sid, "a", TimeoutError("slow"))
    await manager._record_node(sid, "a", "failed", error=ValueError("bad"), attempt=2)
    assert groups(await manager.get_failures(sid)) == {"ValueError": (1, "bad", ["a"])}
    # A failure without an error is `unknown`
    await manager.add_node_result(sid, "b", None, status="failed")
    assert groups(await manager.get_failures(sid))["unknown"] == (1, "", ["b"])


async def test_a_group_keeps_a_few_node_ids_and_counts_them_all(manager: SessionManager) -> None:
    sid = await manager.create_session("insight.canvas", 9)
    await manager.add_node_results(
        sid, [NodeResult(node_id=f"n{i}", status=NodeStatus.FAILED, error=NodeError(type="OSError")) for i in range(8)]
    )
    (group,) = await manager.get_failures(sid)
    assert group.count == 8
    assert group.node_ids == [f"n{i}" for i in range(FAILURE_SAMPLE)]
    # A sampled node that leaves gives up its place; the count follows
    await manager.add_node_result(sid, "n0", "ok")
    (group,) = await manager.get_failures(sid)
    assert (group.count, group.node_ids) == (7, [f"n{i}" for i in range(1, FAILURE_SAMPLE)])


async def test_resumed_nodes_leave_their_groups(manager: SessionManager) -> None:
    sid = await manager.create_session("insight.canvas", 3)
    await fail(manager, sid, "a", TimeoutError("slow"))
    await fail(manager, sid, "b", ValueError("bad"))
    await manager.add_node_result(sid, "c", 1)
    await manager._reopen_session(sid, nodes=["a"])
    assert groups(await manager.get_failures(sid)) == {"ValueError": (1, "bad", ["b"])}
    assert (await manager.get_session_status(sid))["failure_types"] == 1


async def test_failures_of_an_unknown_session_are_not_found(manager: SessionManager) -> None:
    with pytest.raises(SessionNotFoundError):
        await manager.get_failures("5d2f8a2e-7c1b-4d0e-9a57-3f4b6c8e1d20")
    with pytest.raises(TrackerValidationError):
        await manager.get_failures("not-a-uuid")


# -- rate and ETA ---------------------------------------------------------------------------------


async def test_rate_and_eta_follow_the_finished_nodes(manager: SessionManager, clock: FakeClock) -> None:
    # Given 10 nodes; before any starts, nothing is known
    sid = await manager.create_session("rate.canvas", 10)
    status = await manager.get_session_status(sid)
    assert (status["rate_per_s"], status["eta_s"], status["eta_at"]) == (None, None, None)

    # When the first node starts and then one node finishes every 2 s
    await manager._record_node(sid, "n0", "running")
    started = clock.now
    for i in range(4):
        clock.advance(2)
        await manager.add_node_result(sid, f"n{i}", i)

    # Then the rate is 0.5 nodes/s and the 6 nodes left should take 12 s from the last finish
    status = await manager.get_session_status(sid)
    assert status["rate_per_s"] == pytest.approx(0.5)
    assert status["eta_at"] == (started + timedelta(seconds=8 + 12)).isoformat().replace("+00:00", "Z")
    assert status["eta_s"] == pytest.approx(12)
    # A read 3 s later counts down; one past the estimate does not know any more
    clock.advance(3)
    assert (await manager.get_session_status(sid))["eta_s"] == pytest.approx(9)
    clock.advance(10)
    assert (await manager.get_session_status(sid))["eta_s"] is None

    # And once it ended, the ETA is 0
    for i in range(4, 10):
        await manager.add_node_result(sid, f"n{i}", i)
    status = await manager.get_session_status(sid)
    assert (status["status"], status["eta_s"], status["eta_at"]) == ("completed", 0.0, status["finished_at"])


async def test_the_rate_is_a_recent_one(manager: SessionManager, clock: FakeClock) -> None:
    # Given a batch that finished a node a second for a minute, then one every 4 s
    sid = await manager.create_session("rate.canvas", 1000)
    await manager._record_node(sid, "n0", "running")
    n = 0
    for _ in range(60):
        clock.advance(1)
        await manager.add_node_result(sid, f"n{n}", n)
        n += 1
    for _ in range(30):
        clock.advance(4)
        await manager.add_node_result(sid, f"n{n}", n)
        n += 1
    # Then the rate is the last 30 to 60 s's, not the whole run's (90 nodes in 180 s)
    assert (await manager.get_session_status(sid))["rate_per_s"] == pytest.approx(0.25)


async def test_a_resume_measures_the_rate_from_its_start(manager: SessionManager, clock: FakeClock) -> None:
    sid = await manager.create_session("rate.canvas", 4)
    for i in range(3):
        clock.advance(1)
        await manager.add_node_result(sid, f"n{i}", i)
    await manager.add_node_result(sid, "n3", None, status="failed")
    clock.advance(600)
    await manager._reopen_session(sid)
    assert (await manager.get_session_status(sid))["rate_per_s"] is None  # nothing finished in this run yet
    clock.advance(5)
    status = await manager.add_node_result(sid, "n3", 3)
    assert status["status"] == "completed"
    assert status["rate_per_s"] == pytest.approx(0.2)  # 1 node in the 5 s since the resume


def test_the_rate_window_moves_on_by_half() -> None:
    window = RateWindow.starting(0, 0).moved(10, 10_000)
    assert window.rate_per_s() == pytest.approx(1.0)
    moved = window.moved(40, RATE_HALF_WINDOW_MS)
    assert (moved.since_ms, moved.mid_ms) == (0, RATE_HALF_WINDOW_MS)
    later = moved.moved(50, 2 * RATE_HALF_WINDOW_MS)
    assert (later.since_ms, later.since_done) == (RATE_HALF_WINDOW_MS, 40)
    assert later.rate_per_s() == pytest.approx(10 / 30)
    assert later.moved(50, 10**9) is later  # nothing finished: unchanged
    assert later.moved(5, 10**9) == RateWindow.starting(10**9, 5)  # the count went back: start again
    assert RateWindow.parse(later.text()) == later


# -- retention ------------------------------------------------------------------------------------


def retained(store: SessionStorageAdapter, clock: FakeClock) -> SessionManager:
    settings = TrackerSettings(session_timeout_s=60.0, finished_ttl_s=3600.0)
    return SessionManager(storage=store, settings=settings, clock=clock)


def test_an_ended_session_is_kept_the_finished_ttl(store: SessionStorageAdapter, clock: FakeClock) -> None:
    # Given a 60 s timeout for sessions that have not ended and an hour for ended ones
    manager = retained(store, clock)
    idle = manager.sync.create_session("idle.canvas", 2)
    ended = manager.sync.create_session("ended.canvas", 1)
    manager.sync.add_node_result(ended, "a", 1)

    # When two minutes pass, the idle session expires, the ended one is kept
    clock.advance(120)
    assert manager.sync.is_session_expired(idle) and not manager.sync.is_session_expired(ended)
    assert manager.sync.cleanup_expired_sessions() == 1
    assert manager.sync.get_session_status(ended)["status"] == "completed"

    # And once the hour has passed since its last change, it goes too
    clock.advance(3600 - 120)
    assert manager.sync.cleanup_expired_sessions() == 0
    clock.advance(121)
    assert manager.sync.is_session_expired(ended)
    assert manager.sync.cleanup_expired_sessions() == 1
    assert manager.sync.list_sessions().sessions == []


def test_a_resumed_session_expires_by_the_timeout_again(store: SessionStorageAdapter, clock: FakeClock) -> None:
    manager = retained(store, clock)
    sid = manager.sync.create_session("resumed.canvas", 1)
    manager.sync.add_node_result(sid, "a", None, status="failed")
    clock.advance(600)  # kept: it ended
    assert manager.sync.cleanup_expired_sessions() == 0
    manager.sync._reopen_session(sid)  # running again, and then idle
    clock.advance(61)
    assert manager.sync.cleanup_expired_sessions() == 1


# -- tags and canvas paths ------------------------------------------------------------------------


def test_sessions_are_listed_by_tag_and_by_canvas_path(store: SessionStorageAdapter, clock: FakeClock) -> None:
    manager = SessionManager(storage=store, settings=TrackerSettings(), clock=clock)
    made = {}
    for name, path, tags in [
        ("etl-1", "pipelines/nightly/etl.canvas", ["nightly", "customer:42"]),
        ("report", "pipelines/report.canvas", ["customer:42"]),
        ("etl-2", "pipelines/nightly/etl.canvas", ["nightly"]),
        ("other", "adhoc.canvas", []),
    ]:
        clock.advance(1)
        made[name] = manager.sync.create_session(path, 1, tags=tags)

    def listed(**filters: str) -> list[str]:
        names = {sid: name for name, sid in made.items()}
        return [names[info.session_id] for info in manager.sync.list_sessions(**filters).sessions]  # type: ignore[arg-type]

    # A tag's sessions newest first; a path prefix's by canvas path, newest first within one
    assert listed(tag="nightly") == ["etl-2", "etl-1"]
    assert listed(tag="customer:42") == ["report", "etl-1"]
    assert listed(path="pipelines/") == ["etl-2", "etl-1", "report"]
    assert listed(path="pipelines/nightly") == ["etl-2", "etl-1"]
    assert listed(path="pipelines/nightly/etl.canvas") == ["etl-2", "etl-1"]
    assert listed(path="pipelines/r") == ["report"]
    assert listed(path="adhoc") == ["other"]
    assert listed(path="pipelines/nightly/etl.canvas.bak") == []
    assert listed(tag="customer:42", path="pipelines/nightly/") == ["etl-1"]
    assert listed(tag="nobody") == []
    # A page of a tag's, or of a prefix's, sessions holds the limit, with a cursor to the rest
    for filters in ({"tag": "nightly"}, {"path": "pipelines/nightly/"}):
        page = manager.sync.list_sessions(limit=1, **filters)  # type: ignore[arg-type]
        assert [s.session_id for s in page.sessions] == [made["etl-2"]] and page.next_cursor is not None
        rest = manager.sync.list_sessions(limit=1, cursor=page.next_cursor, **filters)  # type: ignore[arg-type]
        assert [s.session_id for s in rest.sessions] == [made["etl-1"]]
        if rest.next_cursor is not None:  # (a store may not know yet that nothing follows)
            assert manager.sync.list_sessions(limit=1, cursor=rest.next_cursor, **filters).sessions == []  # type: ignore[arg-type]
    assert manager.sync.get_session(made["etl-1"]).tags == ["nightly", "customer:42"]

    # A session removed leaves every index
    assert manager.sync.delete_session(made["etl-2"])
    assert listed(tag="nightly") == ["etl-1"]
    assert listed(path="pipelines/nightly/") == ["etl-1"]


@pytest.mark.parametrize(
    "tags",
    [["has space"], [""], ["x" * 65], [f"t{i}" for i in range(11)], "nightly", [7]],
)
def test_bad_tags_are_refused_before_anything_is_stored(store: SessionStorageAdapter, tags: object) -> None:
    manager = SessionManager(storage=store, settings=TrackerSettings())
    with pytest.raises(TrackerValidationError):
        manager.sync.create_session("t.canvas", 1, tags=tags)  # type: ignore[arg-type]
    assert manager.sync.list_sessions().sessions == []
    with pytest.raises(TrackerValidationError):
        manager.sync.list_sessions(tag="has space")
