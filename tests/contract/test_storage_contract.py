"""The adapter contract: every test runs against every adapter (in-memory and Redis).

A second adapter passes this suite unchanged or it is not an adapter. The manager is used as
the way in, so validation and store semantics are checked together.
"""

from __future__ import annotations

import asyncio
import math
import threading
import uuid
from datetime import UTC, datetime

import pytest

from tests.conftest import FakeClock, by_status
from tracker import (
    VALID_TRANSITIONS,
    InvalidStateTransitionError,
    NodeLimitError,
    NodeSpec,
    NodeStatus,
    SessionExistsError,
    SessionInfo,
    SessionManager,
    SessionNotFoundError,
    SessionStatus,
    TrackerValidationError,
)
from tracker.storage.base import NewNodes, SessionStorageAdapter

S = SessionStatus


async def new_session(manager: SessionManager, node_count: int = 3, **kwargs: object) -> str:
    return await manager.create_session(canvas_path="test.canvas", node_count=node_count, **kwargs)  # type: ignore[arg-type]


async def drive_to(manager: SessionManager, status: SessionStatus, node_count: int = 2) -> str:
    """A session in ``status``, reached by the path a real batch takes."""
    sid = await new_session(manager, node_count)
    if status is S.PENDING:
        return sid
    if status is S.CANCELLED:
        await manager.update_status(sid, S.CANCELLED)
        return sid
    await manager.update_status(sid, S.RUNNING)
    outcomes = {
        S.RUNNING: [],
        S.COMPLETED: ["completed", "completed"],
        S.FAILED: ["failed", "failed"],
        S.PARTIAL_FAILURE: ["completed", "failed"],
    }[status]
    for i, node_status in enumerate(outcomes):
        await manager.add_node_result(sid, f"n{i}", i, status=node_status)
    assert (await manager.get_session_status(sid))["status"] == status.value
    return sid


# -- creation and metadata ------------------------------------------------------------------


async def test_session_creation(manager: SessionManager) -> None:
    session_id = await manager.create_session(canvas_path="test.canvas", node_count=10)
    assert session_id is not None
    assert len(session_id) == 36
    assert uuid.UUID(session_id).version == 4


async def test_session_ids_are_unique(manager: SessionManager) -> None:
    ids = await asyncio.gather(*(new_session(manager) for _ in range(200)))
    assert len(set(ids)) == 200


async def test_session_creation_stores_metadata(manager: SessionManager, clock: FakeClock) -> None:
    sid = await new_session(manager, 10, metadata={"owner": "ops", "tags": ["a", 1]})
    status = await manager.get_session_status(sid)
    assert status["session_id"] == sid
    assert status["canvas_path"] == "test.canvas"
    assert status["node_count"] == 10
    assert status["status"] == "pending"
    assert status["progress_percent"] == 0
    assert status["completed_nodes"] == status["failed_nodes"] == 0
    assert status["pending_nodes"] == 10
    assert status["metadata"] == {"owner": "ops", "tags": ["a", 1]}
    assert status["created_at"] == status["updated_at"] == clock.now.isoformat().replace("+00:00", "Z")


async def test_create_with_an_existing_id_is_refused(manager: SessionManager) -> None:
    sid = await new_session(manager)
    with pytest.raises(SessionExistsError):
        await manager.create_session("other.canvas", 1, session_id=sid)
    assert (await manager.get_session_status(sid))["canvas_path"] == "test.canvas"


@pytest.mark.parametrize(
    ("canvas_path", "node_count"),
    [("", 1), ("   ", 1), ("x" * 1025, 1), ("bad\npath", 1), (None, 1), ("a.canvas", -1), ("a.canvas", 1.5),
     ("a.canvas", True), ("a.canvas", "3")],
)  # fmt: skip
async def test_bad_create_input_is_refused(
    manager: SessionManager, store: SessionStorageAdapter, canvas_path: object, node_count: object
) -> None:
    with pytest.raises(TrackerValidationError):
        await manager.create_session(canvas_path, node_count)  # type: ignore[arg-type]
    assert store.list_sessions().sessions == []


def test_a_store_is_handed_new_nodes_with_one_signature_text_each(store: SessionStorageAdapter) -> None:
    # Given nodes whose signatures a caller other than the manager encodes with NewNodes.of
    now = datetime.now(UTC)
    info = SessionInfo(
        session_id=str(uuid.uuid4()), canvas_path="d.canvas", node_count=2, created_at=now, updated_at=now
    )
    specs = [NodeSpec(node_id="a", task_id="t-a", signature={"task": "t"}), NodeSpec(node_id="b", task_id="t-b")]
    assert NewNodes.of(specs).signatures == ('{"task":"t"}', None)

    # When signatures that do not match the nodes one for one are given, Then it is refused before
    # any store sees it
    with pytest.raises(TrackerValidationError, match="one per node"):
        NewNodes(tuple(specs), ('{"task":"t"}',))

    # And the encoded ones create the session with both nodes pending
    store.create(info, NewNodes.of(specs))
    page = store.get_nodes(info.session_id)
    assert [(n.node_id, n.status) for n in page.nodes] == [("a", NodeStatus.PENDING), ("b", NodeStatus.PENDING)]


# -- the state machine ----------------------------------------------------------------------

ALL_PAIRS = [(a, b) for a in S for b in S]


@pytest.mark.parametrize(("current", "target"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
async def test_update_status_follows_the_table(
    manager: SessionManager, current: SessionStatus, target: SessionStatus
) -> None:
    sid = await drive_to(manager, current)
    before = await manager.get_session_status(sid)
    # Only resume may reopen an ended session, and only its counts (a late result) may change its
    # ended status: a plain update does neither.
    if target in VALID_TRANSITIONS[current] and not current.is_terminal:
        after = await manager.update_status(sid, target)
        assert after["status"] == target.value
        if target.is_terminal:
            assert after["finished_at"] is not None
    else:
        with pytest.raises(InvalidStateTransitionError) as caught:
            await manager.update_status(sid, target)
        assert caught.value.from_status == current.value
        assert caught.value.to_status == target.value
        assert f"{sid!r}: cannot go from {current.value!r} to {target.value!r}" in str(caught.value)
        assert await manager.get_session_status(sid) == before


async def test_concurrent_transitions_have_one_winner(manager: SessionManager) -> None:
    sid = await drive_to(manager, S.RUNNING)
    targets = [S.COMPLETED, S.FAILED, S.CANCELLED, S.PARTIAL_FAILURE] * 5
    results = await asyncio.gather(*(manager.update_status(sid, t) for t in targets), return_exceptions=True)
    winners = [r for r in results if isinstance(r, dict)]
    assert len(winners) == 1
    assert all(isinstance(r, InvalidStateTransitionError) for r in results if not isinstance(r, dict))
    assert (await manager.get_session_status(sid))["status"] == winners[0]["status"]


async def test_unknown_status_name_is_refused(manager: SessionManager) -> None:
    sid = await new_session(manager)
    with pytest.raises(TrackerValidationError):
        await manager.update_status(sid, "exploded")


# -- progress -------------------------------------------------------------------------------


async def test_progress_update_and_retrieval(manager: SessionManager) -> None:
    sid = await drive_to(manager, S.RUNNING)
    for value in (0, 12.5, 99.99, 100):
        await manager.update_progress(sid, value)
        assert (await manager.get_session_status(sid))["progress_percent"] == value


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.01, 100.01, "50", None, True])
async def test_bad_progress_is_refused_and_changes_nothing(manager: SessionManager, value: object) -> None:
    sid = await drive_to(manager, S.RUNNING)
    await manager.update_progress(sid, 40)
    before = await manager.get_session_status(sid)
    with pytest.raises(TrackerValidationError):
        await manager.update_progress(sid, value)  # type: ignore[arg-type]
    assert await manager.get_session_status(sid) == before


async def test_progress_of_an_ended_session_is_final(manager: SessionManager) -> None:
    sid = await drive_to(manager, S.COMPLETED)
    with pytest.raises(InvalidStateTransitionError):
        await manager.update_progress(sid, 10)
    assert (await manager.get_session_status(sid))["progress_percent"] == 100


# -- node results and counting --------------------------------------------------------------


async def test_node_results_drive_progress_and_finish(manager: SessionManager) -> None:
    sid = await new_session(manager, 4)
    first = await manager.add_node_result(sid, "a", {"rows": 3})
    assert first["status"] == "running"  # the first node event starts a pending session
    assert first["started_at"] is not None
    assert first["progress_percent"] == 25
    await manager.add_node_result(sid, "b", None, status="failed", error=ValueError("bad row"))
    await manager.add_node_result(sid, "c", [1, 2])
    last = await manager.add_node_result(sid, "d", "ok")
    assert last["status"] == "partial_failure"
    assert (last["completed_nodes"], last["failed_nodes"], last["progress_percent"]) == (3, 1, 100)
    assert last["finished_at"] is not None
    nodes = {n.node_id: n for n in (await manager.get_nodes(sid)).nodes}
    assert nodes["a"].result == {"rows": 3}
    assert nodes["b"].error is not None
    assert (nodes["b"].error.type, nodes["b"].error.message) == ("ValueError", "bad row")
    assert nodes["c"].result == [1, 2]


@pytest.mark.parametrize(
    ("outcomes", "final"),
    [(["completed"] * 3, S.COMPLETED), (["failed"] * 3, S.FAILED), (["completed", "failed", "lost"], S.PARTIAL_FAILURE),
     (["cancelled"] * 3, S.CANCELLED), (["cancelled", "failed", "cancelled"], S.FAILED)],
)  # fmt: skip
async def test_finish_rule(manager: SessionManager, outcomes: list[str], final: SessionStatus) -> None:
    sid = await new_session(manager, len(outcomes))
    for i, outcome in enumerate(outcomes):
        await manager.add_node_result(sid, f"n{i}", None, status=outcome)
    assert (await manager.get_session_status(sid))["status"] == final.value


async def test_duplicate_results_count_once(manager: SessionManager) -> None:
    sid = await new_session(manager, 3)
    for _ in range(3):
        status = await manager.add_node_result(sid, "a", 1)
    assert status["completed_nodes"] == 1
    assert status["progress_percent"] == pytest.approx(33.33)
    for _ in range(2):
        status = await manager.add_node_result(sid, "b", None, status="failed")
    assert (status["completed_nodes"], status["failed_nodes"]) == (1, 1)


async def test_failed_then_completed_moves_between_counters(manager: SessionManager) -> None:
    sid = await new_session(manager, 2)
    await manager.add_node_result(sid, "a", None, status="failed", error=RuntimeError("x"))
    status = await manager.add_node_result(sid, "a", 42)
    assert (status["completed_nodes"], status["failed_nodes"]) == (1, 0)
    node = (await manager.get_nodes(sid)).nodes[0]
    assert (node.status, node.result, node.error) == (NodeStatus.COMPLETED, 42, None)


async def test_completed_is_final_for_a_node(manager: SessionManager) -> None:
    sid = await new_session(manager, 2)
    await manager.add_node_result(sid, "a", "first")
    for late in ("failed", "lost", "cancelled", "running", "retrying"):
        status = await manager._record_node(sid, "a", late)
        assert status.node.status is NodeStatus.COMPLETED
    node = (await manager.get_nodes(sid)).nodes[0]
    assert node.result == "first"
    assert (await manager.get_session_status(sid))["completed_nodes"] == 1


async def test_start_events_do_not_reopen_a_result(manager: SessionManager) -> None:
    sid = await new_session(manager, 2)
    await manager.add_node_result(sid, "a", None, status="failed")
    outcome = await manager._record_node(sid, "a", "running", attempt=2)
    assert outcome.node.status is NodeStatus.FAILED
    assert outcome.node.attempts == 2
    assert outcome.session.failed_nodes == 1


async def test_running_then_result_records_times_and_attempts(manager: SessionManager, clock: FakeClock) -> None:
    sid = await new_session(manager, 1)
    started = await manager._record_node(sid, "a", "running", task_id="t-1", worker="w@h:1")
    assert started.session.running_nodes == 1
    assert started.node.attempts == 1
    clock.advance(2)
    retrying = await manager._record_node(sid, "a", "retrying", attempt=1, error=RuntimeError("flaky"))
    # A node waiting for its retry is counted apart from those running (as Flower and GroupResult do)
    assert (retrying.session.running_nodes, retrying.session.retrying_nodes) == (0, 1)
    status = await manager.get_session_status(sid)
    assert (status["running_nodes"], status["retrying_nodes"], status["pending_nodes"]) == (0, 1, 0)
    again = await manager._record_node(sid, "a", "running", attempt=2)
    assert (again.session.running_nodes, again.session.retrying_nodes) == (1, 0)
    clock.advance(3)
    done = await manager._record_node(sid, "a", "completed", result={"ok": True}, attempt=2)
    assert done.finished is S.COMPLETED
    assert done.node.attempts == 2
    assert done.node.task_id == "t-1"
    assert done.node.worker == "w@h:1"
    assert done.node.execution_time_ms == 3000
    assert done.session.running_nodes == 0


async def test_more_nodes_than_node_count_is_refused(manager: SessionManager) -> None:
    sid = await new_session(manager, 2)
    await manager.add_node_result(sid, "a", 1)
    await manager.add_node_result(sid, "b", None, status="running")
    before = await manager.get_session_status(sid)
    with pytest.raises(NodeLimitError):
        await manager.add_node_result(sid, "c", 1)
    assert await manager.get_session_status(sid) == before
    await manager.add_node_result(sid, "b", 2)  # known nodes still record


@pytest.mark.parametrize(
    ("node_id", "result"),
    [("", 1), ("x" * 201, 1), ("has space", 1), ("new\nline", 1), ("ünï", 1), (None, 1), ("a", {1, 2}),
     ("a", object()), ("a", math.nan), ("a", "x" * (64 * 1024))],
)  # fmt: skip
async def test_bad_node_input_is_refused_and_changes_nothing(
    manager: SessionManager, node_id: object, result: object
) -> None:
    sid = await new_session(manager, 2)
    before = await manager.get_session_status(sid)
    with pytest.raises(TrackerValidationError):
        await manager.add_node_result(sid, node_id, result)  # type: ignore[arg-type]
    assert await manager.get_session_status(sid) == before
    assert (await manager.get_nodes(sid)).nodes == []


async def test_an_error_text_utf_8_cannot_hold_is_recorded_escaped(manager: SessionManager) -> None:
    # A task failing on a file name os.listdir could not decode: its message holds a lone surrogate
    sid = await new_session(manager, 2)
    await manager.add_node_result(sid, "a", status="failed", error=FileNotFoundError("no such file: 'x\udcff.csv'"))
    await manager._record_node(sid, "b", "failed", reason="gave up on \udcff")
    # Then the failure counts, the session ends, and the text is kept with the byte escaped
    status = await manager.get_session_status(sid)
    assert (status["status"], status["failed_nodes"]) == ("failed", 2)
    node = await manager.get_node(sid, "a")
    assert node.error is not None
    assert (node.error.type, node.error.message) == ("FileNotFoundError", "no such file: 'x\\udcff.csv'")
    assert (await manager.get_node(sid, "b")).reason == "gave up on \\udcff"
    messages = {g.error_type: g.first_message for g in await manager.get_failures(sid)}
    assert messages == {"FileNotFoundError": "no such file: 'x\\udcff.csv'", "unknown": "gave up on \\udcff"}


@pytest.mark.parametrize(
    "details",
    [{"task_id": "t\ud800"}, {"worker": "celery@h\udcff:1"}, {"status": [[[[[]]]]] * 2}],
)
async def test_an_id_utf_8_cannot_hold_is_refused_and_changes_nothing(
    manager: SessionManager, details: dict[str, object]
) -> None:
    sid = await new_session(manager, 2)
    before = await manager.get_session_status(sid)
    with pytest.raises(TrackerValidationError):
        await manager.add_node_result(sid, "a", 1, **details)  # type: ignore[arg-type]
    assert await manager.get_session_status(sid) == before
    with pytest.raises(TrackerValidationError):
        await manager.list_sessions(path="jobs/\ud800")


async def test_arguments_of_the_wrong_kind_are_refused_and_change_nothing(manager: SessionManager) -> None:
    sid = await new_session(manager, 2)
    before = await manager.get_session_status(sid)
    for nodes in (None, 5, "ab", NodeSpec(node_id="a")):
        with pytest.raises(TrackerValidationError, match="expected a list of NodeSpec"):
            await manager.create_session("test.canvas", 2, nodes=nodes)  # type: ignore[arg-type]
        with pytest.raises(TrackerValidationError, match="expected a list of NodeSpec"):
            await manager.add_nodes(sid, nodes)  # type: ignore[arg-type]
    for flag in ("yes", 1, None, []):
        with pytest.raises(TrackerValidationError, match="expected True or False"):
            await manager.reap_lost_nodes(requeued=flag)  # type: ignore[arg-type]
        with pytest.raises(TrackerValidationError, match="expected True or False"):
            await manager._reopen_session(sid, retry_failed=flag)  # type: ignore[arg-type]
    for seconds in (10**400, math.inf, math.nan, 0, -1, "60"):
        with pytest.raises(TrackerValidationError, match="stalled_after_s"):
            await manager.end_stalled_sessions(seconds)  # type: ignore[arg-type]
    assert await manager.get_session_status(sid) == before
    assert [s.session_id for s in (await manager.list_sessions()).sessions] == [sid]


async def test_result_cap_is_configurable(store: SessionStorageAdapter, clock: FakeClock) -> None:
    from tracker import TrackerSettings

    manager = SessionManager(storage=store, settings=TrackerSettings(max_result_bytes=100), clock=clock)
    sid = await new_session(manager, 2)
    await manager.add_node_result(sid, "a", "x" * 90)
    with pytest.raises(TrackerValidationError, match="100-byte cap"):
        await manager.add_node_result(sid, "b", "x" * 100)


async def test_a_node_signature_that_is_not_json_or_over_the_cap_creates_nothing(
    store: SessionStorageAdapter, clock: FakeClock
) -> None:
    from tracker import TrackerSettings

    manager = SessionManager(storage=store, settings=TrackerSettings(max_result_bytes=100), clock=clock)
    sid = str(uuid.uuid4())
    for bad, why in (
        ({"task": "t", "args": [object()]}, "not JSON"),
        ({"task": "t", "args": ["x" * 90]}, "100-byte cap"),
    ):
        nodes = [NodeSpec(node_id="a", signature={"task": "t"}), NodeSpec(node_id="b", signature=bad)]
        with pytest.raises(TrackerValidationError, match=why) as caught:
            await manager.create_session("bad.canvas", 2, nodes=nodes, session_id=sid)
        assert caught.value.field == "signature"
        with pytest.raises(SessionNotFoundError):
            await manager.get_session_status(sid)
    # The same nodes with storable signatures: each is kept as given (resume re-sends it).
    fine = [NodeSpec(node_id="a", signature={"task": "t"}), NodeSpec(node_id="b", signature={"task": "u", "args": [1]})]
    await manager.create_session("fine.canvas", 2, nodes=fine, session_id=sid)
    await manager.update_status(sid, S.CANCELLED)
    outcome = await manager._reopen_session(sid)
    assert {n.node_id: n.signature for n in outcome.nodes} == {"a": {"task": "t"}, "b": {"task": "u", "args": [1]}}


async def test_late_events_after_the_end_are_recorded_without_moving_status(manager: SessionManager) -> None:
    sid = await new_session(manager, 3)
    await manager.add_node_result(sid, "a", 1)
    await manager.update_status(sid, S.CANCELLED)
    cancelled = await manager.get_session_status(sid)
    assert (cancelled["cancelled_nodes"], cancelled["completed_nodes"]) == (0, 1)
    status = await manager.add_node_result(sid, "b", 2)
    assert status["status"] == "cancelled"
    assert status["completed_nodes"] == 2


async def test_cancel_marks_unfinished_nodes(manager: SessionManager) -> None:
    specs = [NodeSpec(node_id=f"n{i}", task_id=f"task-{i}") for i in range(4)]
    sid = await new_session(manager, 4, nodes=specs)
    await manager.add_node_result(sid, "n0", 1)
    await manager._record_node(sid, "n1", "running")
    status = await manager.update_status(sid, S.CANCELLED)
    assert (status["completed_nodes"], status["cancelled_nodes"], status["running_nodes"]) == (1, 3, 0)
    nodes = {n.node_id: n for n in (await manager.get_nodes(sid)).nodes}
    assert nodes["n0"].status is NodeStatus.COMPLETED
    assert {nodes[f"n{i}"].status for i in (1, 2, 3)} == {NodeStatus.CANCELLED}
    assert nodes["n2"].task_id == "task-2"


async def test_exactly_one_caller_sees_the_finish(manager: SessionManager) -> None:
    sid = await new_session(manager, 20)
    events = [manager._record_node(sid, f"n{i % 20}", "completed") for i in range(60)]
    outcomes = await asyncio.gather(*events)
    assert [o.finished for o in outcomes if o.finished] == [S.COMPLETED]


# -- resume ---------------------------------------------------------------------------------


async def test_resume_resets_only_unfinished_nodes(manager: SessionManager) -> None:
    sig = {"task": "workers.tasks.process_node", "args": [1], "kwargs": {}, "options": {}}
    specs = [NodeSpec(node_id=f"n{i}", task_id=f"t{i}", signature=sig if i == 1 else None) for i in range(4)]
    sid = await new_session(manager, 4, nodes=specs)
    await manager.add_node_result(sid, "n0", 1)
    await manager.add_node_result(sid, "n1", None, status="failed")
    await manager._record_node(sid, "n2", "lost", reason="worker gone")
    await manager.add_node_result(sid, "n3", 3)
    assert (await manager.get_session_status(sid))["status"] == "partial_failure"

    outcome = await manager._reopen_session(sid)
    assert outcome.previous_status is S.PARTIAL_FAILURE
    assert sorted(n.node_id for n in outcome.nodes) == ["n1", "n2"]
    assert next(n for n in outcome.nodes if n.node_id == "n1").signature == sig
    assert (outcome.session.status, outcome.session.completed_nodes, outcome.session.failed_nodes) == (S.RUNNING, 2, 0)
    assert outcome.session.finished_at is None
    assert outcome.session.progress_percent == 50

    await manager.add_node_result(sid, "n1", 11)
    final = await manager.add_node_result(sid, "n2", 22)
    assert (final["status"], final["completed_nodes"], final["failed_nodes"]) == ("completed", 4, 0)


async def test_resume_without_retry_failed_keeps_failures(manager: SessionManager) -> None:
    sid = await new_session(manager, 3, nodes=[NodeSpec(node_id=f"n{i}") for i in range(3)])
    await manager.add_node_result(sid, "n0", None, status="failed")
    await manager.update_status(sid, S.CANCELLED)
    outcome = await manager._reopen_session(sid, retry_failed=False)
    assert sorted(n.node_id for n in outcome.nodes) == ["n1", "n2"]
    assert outcome.session.failed_nodes == 1


async def test_completed_session_cannot_resume(manager: SessionManager) -> None:
    sid = await drive_to(manager, S.COMPLETED)
    with pytest.raises(InvalidStateTransitionError):
        await manager._reopen_session(sid)


# -- expiry and cleanup ---------------------------------------------------------------------


async def test_session_timeout_and_cleanup(manager: SessionManager, clock: FakeClock) -> None:
    old = await new_session(manager)
    clock.advance(1000)
    fresh = await new_session(manager)
    assert not await manager.is_session_expired(old)
    clock.advance(801)  # old: 1801 s since its last update; fresh: 801 s
    assert await manager.is_session_expired(old)
    assert not await manager.is_session_expired(fresh)
    assert await manager.cleanup_expired_sessions() == 1
    with pytest.raises(SessionNotFoundError):
        await manager.get_session_status(old)
    assert (await manager.get_session_status(fresh))["status"] == "pending"
    assert await manager.cleanup_expired_sessions() == 0


async def test_cleanup_keeps_a_session_updated_since_creation(manager: SessionManager, clock: FakeClock) -> None:
    sid = await new_session(manager)
    clock.advance(1700)
    await manager.add_node_result(sid, "a", 1)
    clock.advance(1700)  # 3400 s after creation, 1700 s after the last update
    assert await manager.cleanup_expired_sessions() == 0
    assert not await manager.is_session_expired(sid)
    clock.advance(200)
    assert await manager.cleanup_expired_sessions() == 1


async def test_timeout_is_configurable(store: SessionStorageAdapter, clock: FakeClock) -> None:
    from tracker import TrackerSettings

    manager = SessionManager(storage=store, settings=TrackerSettings(session_timeout_s=10), clock=clock)
    sid = await new_session(manager)
    clock.advance(11)
    assert await manager.is_session_expired(sid)


# -- lookups, listing, events ---------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    ["get_session_status", "is_session_expired", "update_progress", "update_status", "add_node_result",
     "get_nodes", "read_events", "_reopen_session"],
)  # fmt: skip
async def test_unknown_and_malformed_ids(manager: SessionManager, call: str) -> None:
    extra: dict[str, tuple[object, ...]] = {
        "update_progress": (5,),
        "update_status": ("running",),
        "add_node_result": ("n", 1),
    }
    method = getattr(manager, call)
    with pytest.raises(SessionNotFoundError) as caught:
        await method(str(uuid.uuid4()), *extra.get(call, ()))
    assert isinstance(caught.value, LookupError)
    for bad in ("nope", "*", "{x}", "a:b", str(uuid.uuid4()).upper(), "x" * 10_000, 42):
        with pytest.raises(TrackerValidationError):
            await method(bad, *extra.get(call, ()))


async def test_list_sessions_pages_and_filters(manager: SessionManager, clock: FakeClock) -> None:
    ids = []
    for _ in range(7):
        ids.append(await new_session(manager, 1))
        clock.advance(1)
    await manager.add_node_result(ids[0], "a", 1)
    seen, cursor = [], None
    while True:
        page = await manager.list_sessions(cursor=cursor, limit=3)
        seen += [s.session_id for s in page.sessions]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    completed = await manager.list_sessions(status="completed")
    assert [s.session_id for s in completed.sessions] == [ids[0]]
    with pytest.raises(TrackerValidationError):
        await manager.list_sessions(status="nope")
    for bad_cursor in ("abc", "²", "-1", "9" * 30):
        with pytest.raises(TrackerValidationError):
            await manager.list_sessions(cursor=bad_cursor)
        sid = ids[0]
        with pytest.raises(TrackerValidationError):
            await manager.get_nodes(sid, cursor=bad_cursor)


async def test_get_nodes_pages_and_filters(manager: SessionManager) -> None:
    sid = await new_session(manager, 250)
    for i in range(250):
        await manager.add_node_result(sid, f"n{i}", i, status="completed" if i % 5 else "failed")
    seen, cursor = [], None
    while True:
        page = await manager.get_nodes(sid, cursor=cursor, limit=50)
        seen += [n.node_id for n in page.nodes]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted(f"n{i}" for i in range(250))
    failed, cursor = [], None
    while True:
        page = await manager.get_nodes(sid, status="failed", cursor=cursor, limit=100)
        failed += [n.node_id for n in page.nodes]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(failed) == sorted(f"n{i}" for i in range(0, 250, 5))


async def test_events_record_every_change_in_order(manager: SessionManager) -> None:
    sid = await new_session(manager, 2)
    await manager.add_node_result(sid, "a", 1)
    await manager.update_progress(sid, 70)
    await manager.add_node_result(sid, "b", 2)
    events = await manager.read_events(sid)
    assert [e.type for e in events] == ["created", "node", "progress", "node"]
    assert [e.node_id for e in events] == [None, "a", None, "b"]
    assert events[-1].status is S.COMPLETED
    assert (events[-1].completed_nodes, events[-1].progress_percent) == (2, 100)
    ids = [e.id for e in events]
    assert len(set(ids)) == 4
    after = await manager.read_events(sid, after=ids[1])
    assert [e.id for e in after] == ids[2:]
    assert await manager.read_events(sid, after=ids[-1]) == []
    with pytest.raises(TrackerValidationError):
        await manager.read_events(sid, after="not-an-id")


async def test_blocking_event_read_wakes_on_a_write(manager: SessionManager) -> None:
    sid = await new_session(manager, 2)
    (created,) = await manager.read_events(sid)
    timer = threading.Timer(0.2, lambda: manager.sync.add_node_result(sid, "a", 1))
    timer.start()
    events = await manager.read_events(sid, after=created.id, block_ms=5000)
    timer.join()
    assert [e.node_id for e in events] == ["a"]


async def test_delete_session(manager: SessionManager) -> None:
    sid = await new_session(manager)
    assert await manager.delete_session(sid)
    assert not await manager.delete_session(sid)
    with pytest.raises(SessionNotFoundError):
        await manager.get_session_status(sid)


# -- concurrency ----------------------------------------------------------------------------


async def test_concurrent_access_with_asyncio_gather(manager: SessionManager) -> None:
    sid = await new_session(manager, 100)
    calls = [manager.add_node_result(sid, f"n{i}", i, status="failed" if i % 10 == 0 else "completed")
             for i in range(100)]  # fmt: skip
    await asyncio.gather(*calls, *(manager.update_progress(sid, 10) for _ in range(5)), return_exceptions=True)
    status = await manager.get_session_status(sid)
    assert (status["completed_nodes"], status["failed_nodes"]) == (90, 10)
    assert status["status"] == "partial_failure"


def test_concurrent_access_with_threads(manager: SessionManager) -> None:
    sid = manager.sync.create_session("test.canvas", 400)
    finishes: list[SessionStatus] = []

    def worker(offset: int) -> None:
        for i in range(offset, 400, 8):
            for status in ("running", "completed", "completed"):  # a duplicate delivery too
                outcome = manager.sync._record_node(sid, f"n{i}", status)
                if outcome.finished:
                    finishes.append(outcome.finished)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = manager.sync.get_session_status(sid)
    assert (status["completed_nodes"], status["failed_nodes"], status["running_nodes"]) == (400, 0, 0)
    assert finishes == [S.COMPLETED]


def test_sync_and_async_forms_agree(manager: SessionManager) -> None:
    sid = manager.sync.create_session("test.canvas", 2, metadata={"k": 1})
    manager.sync.add_node_result(sid, "a", 1)
    from_sync = manager.sync.get_session_status(sid)
    from_async = asyncio.run(manager.get_session_status(sid))
    assert from_sync == from_async
    assert manager.sync.update_progress(sid, 80)["progress_percent"] == 80
    assert manager.sync.update_status(sid, "cancelled")["status"] == "cancelled"
    assert manager.sync._reopen_session(sid).session.status is S.RUNNING
    assert manager.sync.get_nodes(sid).nodes[0].node_id == "a"
    assert manager.sync.list_sessions().sessions[0].session_id == sid
    assert [e.type for e in manager.sync.read_events(sid)][-1] == "status"
    assert not manager.sync.is_session_expired(sid)
    assert manager.sync.cleanup_expired_sessions() == 0
    assert manager.sync.get_session(sid).session_id == sid
    assert manager.sync.delete_session(sid)


async def test_a_stale_report_of_a_replaced_task_changes_nothing(manager: SessionManager) -> None:
    # Given a cancelled session resumed: its nodes have fresh task ids
    sid = await new_session(manager, 2, nodes=[NodeSpec(node_id=f"n{i}", task_id=f"old-{i}") for i in range(2)])
    await manager.update_status(sid, S.CANCELLED)
    outcome = await manager._reopen_session(sid)
    fresh = {n.node_id: n.task_id for n in outcome.nodes}
    assert all(t and not t.startswith("old-") for t in fresh.values())
    # When the old tasks' revokes and failures arrive late
    await manager._record_node(sid, "n0", "cancelled", task_id="old-0", reason="revoked")
    await manager._record_node(sid, "n1", "failed", task_id="old-1", error=RuntimeError("old run"))
    # Then nothing moved; the re-run decides, and a success counts whichever task sends it
    status = await manager.get_session_status(sid)
    assert (status["status"], status["cancelled_nodes"], status["failed_nodes"]) == ("running", 0, 0)
    await manager._record_node(sid, "n0", "completed", task_id="old-0", result=1)
    final = await manager._record_node(sid, "n1", "completed", task_id=fresh["n1"], result=2)
    assert final.finished is S.COMPLETED


def test_nodes_by_status_come_in_full_pages_through_results_cancel_and_resume(manager: SessionManager) -> None:
    # Given a dispatched batch of 300 nodes: 8 failed (spread out), 272 completed, 20 not started
    ids = [f"n{i:03d}" for i in range(300)]
    sid = manager.sync.create_session("pages.canvas", 300, nodes=[NodeSpec(node_id=n, task_id=f"t-{n}") for n in ids])
    failed = ids[5::37][:8]
    waiting = ids[-20:]
    for n in ids:
        if n in failed:
            manager.sync._record_node(sid, n, "failed", error=RuntimeError("boom"))
        elif n not in waiting:
            manager.sync._record_node(sid, n, "completed", result=1)

    # Then a page of 2 failed nodes holds 2 each time, the cursor going on from the last one
    first = manager.sync.get_nodes(sid, "failed", limit=2)
    assert [n.node_id for n in first.nodes] == sorted(failed)[:2] and first.next_cursor == sorted(failed)[1]
    assert by_status(manager, sid, NodeStatus.FAILED, 2) == sorted(failed)
    assert by_status(manager, sid, NodeStatus.PENDING, 7) == waiting
    assert len(by_status(manager, sid, NodeStatus.COMPLETED, 100)) == 272

    # When the session is cancelled, the waiting nodes are listed as cancelled
    manager.sync.update_status(sid, "cancelled")
    assert by_status(manager, sid, NodeStatus.PENDING, 7) == []
    assert by_status(manager, sid, NodeStatus.CANCELLED, 7) == waiting

    # and when it is resumed, failed and cancelled nodes are pending again
    manager.sync._reopen_session(sid)
    assert by_status(manager, sid, NodeStatus.PENDING, 5) == sorted(failed + waiting)
    assert by_status(manager, sid, NodeStatus.FAILED, 5) == by_status(manager, sid, NodeStatus.CANCELLED, 5) == []


def test_a_cursor_no_page_handed_out_is_refused(manager: SessionManager) -> None:
    sid = manager.sync.create_session("pages.canvas", 2)
    with pytest.raises(TrackerValidationError, match="cursor"):
        manager.sync.get_nodes(sid, "failed", cursor="not a node id!")
