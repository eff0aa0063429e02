"""Shared fixtures: a real redis-server of the tests' own, stores, a controllable clock."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from tests.servers import redis_process
from tracker import InMemoryStorageAdapter, NodeStatus, SessionManager, TrackerSettings
from tracker.storage.base import SessionStorageAdapter
from tracker.storage.redis import RedisStorageAdapter


class FakeClock:
    """A clock tests move by hand. Starts at a whole second, moves in whole seconds by default."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis URL for the tests: ``REDIS_URL`` when set (never flushed), else our own server."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with redis_process(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def key_prefix() -> str:
    """A key prefix of this test's own, so tests never see each other's keys (no flush needed)."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_store(kind: str, redis_url: str, key_prefix: str, **options: object) -> SessionStorageAdapter:
    if kind == "memory":
        return InMemoryStorageAdapter(**options)  # type: ignore[arg-type]
    settings = TrackerSettings(redis_url=redis_url, key_prefix=key_prefix, **options)  # type: ignore[arg-type]
    return RedisStorageAdapter.from_settings(settings)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, redis_url: str, key_prefix: str) -> Iterator[SessionStorageAdapter]:
    """Every adapter, for the contract suite."""
    adapter = make_store(request.param, redis_url if request.param == "redis" else "", key_prefix)
    yield adapter
    adapter.close()


@pytest.fixture
def manager(store: SessionStorageAdapter, clock: FakeClock) -> SessionManager:
    """A manager on each adapter, with a fake clock."""
    return SessionManager(storage=store, settings=TrackerSettings(), clock=clock)


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    return tmp_path


def by_status(manager: SessionManager, sid: str, status: NodeStatus, limit: int) -> list[str]:
    """Every node id of ``status``, page after page, checking that only the last page is short."""
    found: list[str] = []
    cursor: str | None = None
    while True:
        page = manager.sync.get_nodes(sid, status, cursor=cursor, limit=limit)
        assert all(node.status is status for node in page.nodes)
        found += [node.node_id for node in page.nodes]
        cursor = page.next_cursor
        if cursor is None:
            return found
        assert len(page.nodes) == limit
