"""The asyncio flavour from any event loop: one ``redis.asyncio`` client per loop, closed with it.

A process-wide manager is used from repeated ``asyncio.run`` calls, from a loop per thread at
once, from pytest-asyncio's loop of each test, by the web app in uvicorn's loop, and on a Redis
Cluster. The connections are
counted on a redis-server of this module's own (``CLIENT LIST``): a loop's connections are gone
when ``asyncio.run`` returns. Its client is configured with redis.asyncio's own classes, and no
client is left to be collected unclosed: no warnings from redis-py.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from tests.servers import RedisClusterProcesses, RedisProcess, redis_process
from tests.web.conftest import serve_in_thread
from tracker import NodeStatus, SessionManager, TrackerSettings
from tracker.storage.base import SessionStorageAdapter, store_call
from tracker.storage.redis import RedisStorageAdapter
from tracker.web import WebSettings, create_app


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server only this module's managers use: its client count is theirs."""
    with redis_process(tmp_path_factory.mktemp("async-client")) as server:
        yield server


def connected(server: RedisProcess, settle_to: int | None = None) -> int:
    """How many clients are connected to ``server``, not counting the one asking.

    With ``settle_to``, asks again for a moment until the count is that: a socket closed just now
    may not have been seen closed by the server yet.
    """
    admin = redis.Redis(port=server.port)
    deadline = time.monotonic() + 2.0
    try:
        while True:
            count = len(admin.client_list()) - 1
            if settle_to is None or count == settle_to or time.monotonic() > deadline:
                return count
            time.sleep(0.01)
    finally:
        admin.close()


def new_manager(url: str, **options: object) -> SessionManager:
    settings = TrackerSettings(redis_url=url, key_prefix=f"a{uuid.uuid4().hex[:8]}", **options)  # type: ignore[arg-type]
    return SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)


@pytest.fixture
def manager(own_server: RedisProcess) -> Iterator[SessionManager]:
    """A manager on the module's server, as a process would keep one for its whole life."""
    manager = new_manager(own_server.url)
    yield manager
    manager.storage.close()


async def create_record_get(manager: SessionManager, nodes: int = 3) -> None:
    """One round of the async API: create, record every node (one by one, and at once), read back."""
    sid = await manager.create_session("loops.canvas", nodes)
    await manager.add_node_result(sid, "n0", {"loop": id(asyncio.get_running_loop())})
    await manager._record_node(sid, "n1", NodeStatus.RUNNING, task_id="t1")
    await asyncio.gather(*(manager.add_node_result(sid, f"n{i}", i) for i in range(1, nodes)))
    info = await manager.get_session(sid)
    assert (info.completed_nodes, info.status) == (nodes, "completed")
    assert (await manager.get_session_status(sid))["progress_percent"] == 100.0


def redis_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings redis-py (or asyncio about a socket it left open) gave: none is expected."""
    return [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, ResourceWarning) or "redis" in f"{w.filename} {w.message}".lower()
    ]


def test_the_asyncio_flavour_makes_no_warning(redis_url: str) -> None:
    settings = TrackerSettings(redis_url=redis_url, key_prefix=f"w{uuid.uuid4().hex[:8]}")
    store = RedisStorageAdapter.from_settings(settings)

    async def read() -> None:
        flavour = store.asynchronous()
        try:
            assert await flavour.run(store_call(SessionStorageAdapter.get, str(uuid.uuid4()))) is None
        finally:
            await flavour.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(read())
    store.close()
    # (Objects of earlier tests may be collected meanwhile: only what configuring a client warns counts.)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "redis" in str(w.message)] == []


def test_repeated_asyncio_run_on_one_manager(manager: SessionManager, own_server: RedisProcess) -> None:
    # Given one process-wide manager, When five asyncio.run calls each use it
    for _ in range(5):
        asyncio.run(create_record_get(manager))
        # Then each works, and its loop's connections ended with the loop
        assert connected(own_server, settle_to=0) == 0


def test_a_loop_per_thread_at_once(manager: SessionManager, own_server: RedisProcess) -> None:
    # Given four threads, each with its own loop (asyncio.run), all using the manager at the same time
    threads = 4
    together = threading.Barrier(threads)
    during: list[int] = []

    async def work() -> None:
        await create_record_get(manager)
        # (Every loop holds its client here: none is done before all have used theirs.)
        await asyncio.to_thread(together.wait, 10)
        if not during:
            during.append(connected(own_server))
        await asyncio.to_thread(together.wait, 10)
        await create_record_get(manager)

    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(asyncio.run, work()) for _ in range(threads)]:
            done.result(timeout=30)  # Then every thread's calls succeed

    # And each loop had connections of its own, all closed with their loops
    assert during[0] >= threads
    assert connected(own_server, settle_to=0) == 0


def test_pools_of_closed_loops_are_released(manager: SessionManager, own_server: RedisProcess) -> None:
    # Given many loops, each ended while its client was connected (and one in use by a pending task)
    async def leave_connected() -> None:
        sid = await manager.create_session("left.canvas", 1)
        events = await manager.read_events(sid)
        reading = asyncio.create_task(manager.read_events(sid, after=events[-1].id if events else None, block_ms=5_000))
        await asyncio.sleep(0.05)
        await manager.get_session(sid)  # on a second connection: the blocking read holds the first
        assert connected(own_server) >= 2
        assert not reading.done()

    for _ in range(10):
        asyncio.run(leave_connected())
        # Then no connection of a closed loop is left: neither the idle one nor the cancelled read's
        assert connected(own_server, settle_to=0) == 0


def test_the_client_of_a_loop_closed_without_shutdown_is_dropped(
    manager: SessionManager, own_server: RedisProcess
) -> None:
    # Given loops closed bare, without shutting down their async generators as asyncio.run does
    with warnings.catch_warnings():
        # (Their sockets can only be closed by the garbage collector, and asyncio says so.)
        warnings.simplefilter("ignore", ResourceWarning)
        for _ in range(3):
            loop = asyncio.new_event_loop()
            loop.run_until_complete(create_record_get(manager))
            loop.close()
        # When another loop makes its client
        asyncio.run(create_record_get(manager))
        gc.collect()
    # Then the adapter kept none of the closed loops' clients: all their connections are gone
    assert connected(own_server, settle_to=0) == 0


def test_no_warning_from_redis_py_across_loops(manager: SessionManager, own_server: RedisProcess) -> None:
    gc.collect()  # what earlier tests left is collected outside the record
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            asyncio.run(create_record_get(manager))
        with ThreadPoolExecutor(3) as pool:
            for done in [pool.submit(asyncio.run, create_record_get(manager)) for _ in range(3)]:
                done.result(timeout=30)

        async def close_inside() -> None:
            await create_record_get(manager)
            await manager.cleanup()  # the documented shutdown, from within a loop

        asyncio.run(close_inside())
        gc.collect()  # a client dropped unclosed would warn here
    assert redis_warnings(caught) == []
    assert connected(own_server, settle_to=0) == 0


def test_close_closes_the_running_loops_client_and_a_later_call_reconnects(
    manager: SessionManager, own_server: RedisProcess
) -> None:
    async def scenario() -> None:
        astorage = manager.astorage
        await create_record_get(manager)
        assert connected(own_server) >= 1
        await astorage.close()
        assert connected(own_server, settle_to=0) == 0
        await create_record_get(manager)  # the same adapter, a new client for this loop
        assert connected(own_server) >= 1

    asyncio.run(scenario())
    assert connected(own_server, settle_to=0) == 0


def test_the_web_app_in_uvicorn_and_asyncio_run_share_one_manager(
    manager: SessionManager, own_server: RedisProcess
) -> None:
    # Given the web app on the manager, served by uvicorn (its loop in a thread), stopped, served again
    app = create_app(manager, TrackerSettings(), web_settings=WebSettings())
    for _ in range(2):
        # When the manager is used by asyncio.run in between, then by the app
        sid = asyncio.run(manager.create_session("web.canvas", 1))
        with serve_in_thread(app) as server:
            response = httpx.get(f"{server.url}/api/v1/parallel/status/{sid}", timeout=10)
            # Then the app answers from its loop's own client
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "pending"
        # And uvicorn's loop closed it when the server stopped
        assert connected(own_server, settle_to=0) == 0


# -- pytest-asyncio: every test runs in a loop of its own (function scope) ------------------------

_loops_seen: list[asyncio.AbstractEventLoop] = []


@pytest.fixture(scope="module")
def shared_manager(own_server: RedisProcess) -> Iterator[SessionManager]:
    """One manager for the tests below, made and first used outside their loops, as a module-level one would be."""
    manager = new_manager(own_server.url)
    asyncio.run(create_record_get(manager))
    yield manager
    manager.storage.close()


@pytest.mark.parametrize("round_", range(3))
async def test_each_pytest_asyncio_loop_uses_the_shared_manager(shared_manager: SessionManager, round_: int) -> None:
    loop = asyncio.get_running_loop()
    assert all(loop is not seen for seen in _loops_seen)  # pytest-asyncio gave this test a loop of its own
    _loops_seen.append(loop)
    await create_record_get(shared_manager, nodes=2 + round_)


async def test_a_pytest_asyncio_loop_after_asyncio_run(shared_manager: SessionManager) -> None:
    # A test's own asyncio.run (in a worker thread: this test's loop is running) before using it here
    await asyncio.to_thread(asyncio.run, create_record_get(shared_manager))
    await create_record_get(shared_manager)


# -- Redis Cluster: the same per-loop clients, of redis.asyncio's RedisCluster ---------------------


def test_repeated_asyncio_run_on_a_cluster(cluster: RedisClusterProcesses) -> None:
    manager = new_manager(cluster.url, redis_cluster=True)
    try:
        for _ in range(3):
            asyncio.run(create_record_get(manager))
        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(asyncio.run, create_record_get(manager)) for _ in range(2)]:
                done.result(timeout=30)
    finally:
        manager.storage.close()
