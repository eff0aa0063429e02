"""SessionManager plumbing: singleton, default store from the environment, scheduler, models."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import FakeClock, make_store
from tracker import (
    InMemoryStorageAdapter,
    NodeError,
    NodeLimitError,
    NodeResult,
    ParallelTaskStatus,
    SessionManager,
    SessionNotFoundError,
    TrackerSettings,
    TrackerValidationError,
)
from tracker.storage.redis import RedisStorageAdapter


@pytest.fixture(autouse=True)
def _fresh_singleton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRACKER_REDIS_URL", raising=False)
    SessionManager.reset_instance()
    yield
    SessionManager.reset_instance()


def test_singleton() -> None:
    first = SessionManager.get_instance()
    assert SessionManager.get_instance() is first
    assert isinstance(first.storage, InMemoryStorageAdapter)
    SessionManager.reset_instance()
    assert SessionManager.get_instance() is not first


def test_redis_store_when_the_url_is_set(monkeypatch: pytest.MonkeyPatch, redis_url: str, key_prefix: str) -> None:
    monkeypatch.setenv("TRACKER_REDIS_URL", redis_url)
    monkeypatch.setenv("TRACKER_KEY_PREFIX", key_prefix)
    monkeypatch.setenv("TRACKER_SESSION_TIMEOUT_S", "42")
    manager = SessionManager.get_instance()
    assert isinstance(manager.storage, RedisStorageAdapter)
    assert manager.settings.session_timeout_s == 42
    sid = manager.sync.create_session("env.canvas", 1)
    assert manager.sync.get_session_status(sid)["canvas_path"] == "env.canvas"


async def test_cleanup_scheduler_runs_and_stops() -> None:
    clock = FakeClock()
    manager = SessionManager(storage=InMemoryStorageAdapter(), clock=clock)
    sid = await manager.create_session("old.canvas", 1)
    clock.advance(3600)
    manager.start_cleanup_scheduler(interval_s=0.01)
    manager.start_cleanup_scheduler(interval_s=0.01)  # a second start is a no-op
    assert manager.cleanup_scheduler_running
    for _ in range(200):
        if manager.storage.get(sid) is None:
            break
        await asyncio.sleep(0.01)
    assert manager.storage.get(sid) is None
    await manager.cleanup()
    assert not manager.cleanup_scheduler_running


async def test_scheduler_survives_a_failing_cleanup(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(InMemoryStorageAdapter):
        calls = 0

        def remove_expired(self, now: datetime, timeout_s: float) -> int:
            Broken.calls += 1
            raise RuntimeError("store down")

    manager = SessionManager(storage=Broken())
    manager.start_cleanup_scheduler(interval_s=0.01)
    for _ in range(500):
        if Broken.calls >= 3:
            break
        await asyncio.sleep(0.01)
    assert manager.cleanup_scheduler_running
    assert "session cleanup failed" in caplog.text
    await manager.stop_cleanup_scheduler()


async def test_add_node_result_accepts_a_node_result() -> None:
    manager = SessionManager(storage=InMemoryStorageAdapter())
    sid = await manager.create_session("m.canvas", 2)
    node = NodeResult(node_id="a", status="failed", error=NodeError(type="KeyError", message="'x'"), attempts=2)
    status = await manager.add_node_result(sid, "a", node)
    assert status["failed_nodes"] == 1
    (stored,) = (await manager.get_nodes(sid)).nodes
    assert (stored.error, stored.attempts) == (node.error, 2)


async def test_models_are_json_safe() -> None:
    clock = FakeClock(datetime(2026, 1, 20, 12, 0, 0, 500000, tzinfo=UTC))
    manager = SessionManager(storage=InMemoryStorageAdapter(), clock=clock)
    sid = await manager.create_session("m.canvas", 2, metadata={"k": [1, "x"]})
    await manager.add_node_result(sid, "a", {"deep": [1.5, None]})
    status = await manager.get_session_status(sid)
    assert json.loads(json.dumps(status)) == status
    assert status["created_at"] == "2026-01-20T12:00:00.500000Z"
    node = (await manager.get_nodes(sid)).nodes[0].to_dict()
    assert json.loads(json.dumps(node)) == node
    api = ParallelTaskStatus.from_session(await manager.get_session(sid)).to_dict()
    assert api["task_id"] == sid
    assert (api["completed_nodes"], api["pending_nodes"], api["progress_percent"]) == (1, 1, 50)


async def test_the_api_status_is_the_status_dict_with_task_id_and_a_hint() -> None:
    # Given a session's status dict
    manager = SessionManager(storage=InMemoryStorageAdapter())
    sid = await manager.create_session("m.canvas", 2, tags=["nightly"])
    await manager.add_node_result(sid, "a", {"ok": True})
    status = await manager.get_session_status(sid)

    # When the HTTP API's view of it is made
    api = ParallelTaskStatus.from_session(await manager.get_session(sid), hint="start a worker").to_dict()

    # Then it holds every field of the status dict (a new one reaches the API by itself), the id
    # named task_id as in the seed's schema
    assert api == {"task_id": sid, **{k: v for k, v in status.items() if k != "session_id"}, "hint": "start a worker"}
    assert list(api)[:5] == ["task_id", "status", "progress_percent", "completed_nodes", "failed_nodes"]
    # And a client reads it back, also from a newer server that says more
    read = ParallelTaskStatus.model_validate({**api, "said_by_a_newer_server": 1})
    assert (read.task_id, read.session_id, read.completed_nodes, read.hint) == (sid, sid, 1, "start a worker")


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_an_invalid_node_id_does_not_claim_its_session_exists(kind: str, redis_url: str, key_prefix: str) -> None:
    # Given a session id that was never created, on each store
    store = make_store(kind, redis_url, key_prefix)
    manager = SessionManager(storage=store)
    never = "0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e"

    # When a node with an invalid id is recorded for it
    with pytest.raises(TrackerValidationError) as caught:
        manager.sync._record_node(never, "bad id!", "running")

    # Then the message is about the node id, and names no session as if it existed
    assert str(caught.value) == "invalid node_id 'bad id!': only letters, digits and . _ : @ / + = - are allowed"
    assert caught.value.session_id == never
    with pytest.raises(SessionNotFoundError):  # a valid node id reaches the store, which says so
        manager.sync._record_node(never, "good-id", "running")
    # and a node over the node_count is refused by the store itself: that session does exist
    sid = manager.sync.create_session("one.canvas", 1)
    manager.sync._record_node(sid, "n1", "running")
    with pytest.raises(NodeLimitError) as over:
        manager.sync._record_node(sid, "n2", "running")
    assert str(over.value) == (
        f"session '{sid}' already has 1 distinct nodes (its node_count): node_id 'n2' would be one more"
    )
    store.close()


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKER_API_TOKEN", "s3cret")
    monkeypatch.setenv("TRACKER_KEY_PREFIX", "bad prefix!")
    with pytest.raises(ValueError, match="key_prefix"):
        TrackerSettings()
    monkeypatch.setenv("TRACKER_KEY_PREFIX", "ok")
    settings = TrackerSettings()
    assert settings.api_token is not None and settings.api_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_no_pickle_anywhere() -> None:
    root = Path(__file__).resolve().parents[2]
    for path in [*root.glob("tracker/**/*.py"), *root.glob("workers/*.py"), root / "celeryconfig.py"]:
        text = path.read_text()
        assert "import pickle" not in text and "pickle.loads" not in text, path
    import celeryconfig

    assert celeryconfig.accept_content == ["json"]
    assert celeryconfig.task_serializer == "json"
