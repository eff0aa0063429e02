"""Redis fixtures: managers on our own redis-server, and a real 3-master Redis Cluster.

The cluster is session-scoped and started only by the tests that ask for it; every server the
fixtures start is stopped at the end. Tests keep apart through ``key_prefix``, never by flushing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import FakeClock
from tests.servers import RedisClusterProcesses, redis_cluster
from tracker import SessionManager, TrackerSettings
from tracker.storage.redis import RedisStorageAdapter

#: The test cluster's password.
CLUSTER_PASSWORD = "cluster-secret"

ManagerFactory = Callable[..., SessionManager]
"""``make_manager(clock=None, **settings)``: a manager on a new Redis adapter of this test."""


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A Redis Cluster of 3 masters on loopback (no replicas), in ``cluster_state:ok``.

    It requires a password (carried by its ``url``), so a client that drops the URL's
    credentials on the way (e.g. when building the asyncio flavour) fails here.
    """
    with redis_cluster(tmp_path_factory.mktemp("cluster"), password=CLUSTER_PASSWORD) as started:
        yield started


@pytest.fixture
def make_manager(redis_url: str, key_prefix: str) -> Iterator[ManagerFactory]:
    """Builds managers on the shared test server under this test's key prefix; closes their stores."""
    stores: list[RedisStorageAdapter] = []

    def make(clock: FakeClock | None = None, **options: Any) -> SessionManager:
        settings = TrackerSettings(redis_url=options.pop("redis_url", redis_url), key_prefix=key_prefix, **options)
        store = RedisStorageAdapter.from_settings(settings)
        stores.append(store)
        if clock is None:
            return SessionManager(storage=store, settings=settings)
        return SessionManager(storage=store, settings=settings, clock=clock)

    yield make
    for store in stores:
        store.close()
