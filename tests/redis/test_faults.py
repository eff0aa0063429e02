"""Connection faults: a server that is down or frozen gives StorageUnavailableError naming it; back, it works.

Each test has a redis-server of its own (append-only file on, so data survives a restart) and
stops, freezes or restarts it. Retries are kept small (``redis_retries=1``, 0.5 s socket timeout)
so a failure surfaces in about a second. A write whose reply is lost on the way back (the
server did it, the client saw the connection drop) is sent again by redis-py; it must act once
and answer as the first attempt would have.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import LossyProxy, RedisProcess, redis_process
from tracker import SessionManager, SessionNotFoundError, StorageUnavailableError, TrackerError, TrackerSettings
from tracker.storage.redis import RedisStorageAdapter


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test's own that keeps its data across a stop/start (AOF)."""
    with redis_process(tmp_path / "redis", "--appendonly", "yes") as started:
        yield started


@pytest.fixture
def manager(server: RedisProcess, key_prefix: str) -> Iterator[SessionManager]:
    """A manager on that server with small retries: 1 retry, 0.5 s socket timeout."""
    settings = TrackerSettings(redis_url=server.url, key_prefix=key_prefix, redis_retries=1, redis_socket_timeout_s=0.5)
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    yield manager
    manager.storage.close()


def calls(manager: SessionManager, sid: str) -> dict[str, Callable[[], Any]]:
    """One call of each kind: reads, writes, listing, cleanup."""
    return {
        "get_session_status": lambda: manager.sync.get_session_status(sid),
        "add_node_result": lambda: manager.sync.add_node_result(sid, "a", 1),
        "create_session": lambda: manager.sync.create_session("down.canvas", 1),
        "update_status": lambda: manager.sync.update_status(sid, "cancelled"),
        "update_progress": lambda: manager.sync.update_progress(sid, 10),
        "get_nodes": lambda: manager.sync.get_nodes(sid),
        "list_sessions": lambda: manager.sync.list_sessions(),
        "read_events": lambda: manager.sync.read_events(sid),
        "cleanup_expired_sessions": lambda: manager.sync.cleanup_expired_sessions(),
    }


def assert_unavailable(caught: pytest.ExceptionInfo[StorageUnavailableError], url: str) -> None:
    assert isinstance(caught.value, TrackerError)
    assert caught.value.url == url
    assert url in str(caught.value)


def test_a_stopped_server_gives_storage_unavailable_naming_the_url(
    server: RedisProcess, manager: SessionManager
) -> None:
    # Given a session, then the server stops
    sid = manager.sync.create_session("up.canvas", 2)
    server.stop()

    # When any call is made, Then it fails with StorageUnavailableError naming the server
    for name, call in calls(manager, sid).items():
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError) as caught:
            call()
        assert_unavailable(caught, server.url)
        assert time.monotonic() - started < 5, name


def test_calls_succeed_again_once_the_server_is_back_on_the_same_port(
    server: RedisProcess, manager: SessionManager
) -> None:
    # Given a session, and the server stopped (the client's pooled connection is now dead)
    sid = manager.sync.create_session("up.canvas", 2)
    manager.sync.add_node_result(sid, "a", 1)
    port = server.port
    server.stop()
    with pytest.raises(StorageUnavailableError):
        manager.sync.get_session_status(sid)

    # When it starts again on the same port
    server.start()
    assert server.port == port

    # Then the same manager reads and writes again (the scripts are reloaded after the restart)
    assert manager.sync.get_session_status(sid)["completed_nodes"] == 1
    done = manager.sync.add_node_result(sid, "b", 2)
    assert (done["status"], done["completed_nodes"]) == ("completed", 2)
    assert manager.sync.create_session("after.canvas", 1)


def test_a_frozen_server_times_out_into_storage_unavailable(server: RedisProcess, manager: SessionManager) -> None:
    # Given a session, then the server process is frozen (accepts nothing, answers nothing)
    sid = manager.sync.create_session("frozen.canvas", 1)
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        # When a call is made, Then it gives up after the socket timeout and its retry
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError) as caught:
            manager.sync.add_node_result(sid, "a", 1)
        assert_unavailable(caught, server.url)
        assert time.monotonic() - started < 5
    finally:
        os.kill(server.process.pid, signal.SIGCONT)

    # And once the server runs again, calls succeed; the write that timed out may or may not have
    # happened (the server read it before freezing or not), but it counts once at most
    status = manager.sync.add_node_result(sid, "a", 1)
    assert (status["status"], status["completed_nodes"]) == ("completed", 1)


async def test_the_async_flavour_fails_and_recovers_the_same_way(server: RedisProcess, manager: SessionManager) -> None:
    sid = await manager.create_session("async.canvas", 1)
    server.stop()
    with pytest.raises(StorageUnavailableError) as caught:
        await manager.get_session_status(sid)
    assert_unavailable(caught, server.url)
    with pytest.raises(StorageUnavailableError):
        await manager.add_node_result(sid, "a", 1)
    server.start()
    assert (await manager.add_node_result(sid, "a", 1))["status"] == "completed"
    await manager.cleanup()


def test_a_server_that_lost_its_data_reads_as_not_found_never_as_pending(tmp_path: Path, key_prefix: str) -> None:
    # Given a server without persistence that restarts (or fails over to an empty replica)
    with redis_process(tmp_path / "volatile") as server:
        settings = TrackerSettings(redis_url=server.url, key_prefix=key_prefix, redis_retries=1)
        manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
        sid = manager.sync.create_session("volatile.canvas", 2)
        server.stop()
        server.start()

        # Then the session is not found, for reads and writes alike (a write never recreates it)
        with pytest.raises(SessionNotFoundError):
            manager.sync.get_session_status(sid)
        with pytest.raises(SessionNotFoundError):
            manager.sync.add_node_result(sid, "a", 1)
        with pytest.raises(SessionNotFoundError):
            manager.sync.get_session_status(sid)
        manager.storage.close()


@pytest.fixture
def lossy(server: RedisProcess, key_prefix: str) -> Iterator[tuple[SessionManager, LossyProxy]]:
    """A manager that reaches the server through a proxy able to lose one reply; scripts loaded."""
    proxy = LossyProxy(server.port)
    settings = TrackerSettings(redis_url=proxy.url, key_prefix=key_prefix, redis_retries=1, redis_socket_timeout_s=2)
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    # Every script loaded first, so a lost reply is the reply of a script that ran (not a NOSCRIPT).
    warm = manager.sync.create_session("warm.canvas", 1)
    manager.sync.update_progress(warm, 10)
    manager.sync.update_status(warm, "cancelled")
    manager.sync._reopen_session(warm)
    manager.sync.add_node_result(warm, "a", 1)
    manager.sync.delete_session(warm)
    yield manager, proxy
    manager.storage.close()
    proxy.close()


def test_writes_whose_reply_is_lost_act_once_and_answer_as_the_first_attempt(
    lossy: tuple[SessionManager, LossyProxy], server: RedisProcess, key_prefix: str
) -> None:
    manager, proxy = lossy
    direct = RedisStorageAdapter.from_settings(TrackerSettings(redis_url=server.url, key_prefix=key_prefix))

    # When the reply to a create is lost, Then the retried create returns the new session
    proxy.lose_next_reply()
    sid = manager.sync.create_session("lossy.canvas", 2)
    assert proxy.replies_lost == 1
    assert [e.type for e in direct.read_events(sid)] == ["created"]

    # When the replies to transitions are lost, Then the retried ones report the moves they made
    proxy.lose_next_reply()
    assert manager.sync.update_status(sid, "running")["status"] == "running"
    proxy.lose_next_reply()
    moved = manager.sync._transition(sid, "failed")
    assert (moved.previous_status.value, moved.session.status.value) == ("running", "failed")
    assert proxy.replies_lost == 3

    # When the replies to a resume, a node result and a progress update are lost, Then each acts once
    proxy.lose_next_reply()
    assert manager.sync._reopen_session(sid).previous_status.value == "failed"
    proxy.lose_next_reply()
    assert manager.sync.add_node_result(sid, "a", 1)["completed_nodes"] == 1
    proxy.lose_next_reply()
    assert manager.sync.update_progress(sid, 75)["progress_percent"] == 75
    assert proxy.replies_lost == 6

    status = direct.get(sid)
    assert status is not None
    assert (status.status.value, status.completed_nodes, status.failed_nodes) == ("running", 1, 0)
    # Each create, transition and resume left one event; a repeated node result or progress may
    # append its event again (state unchanged), as a duplicate delivery does.
    events = [e.type for e in direct.read_events(sid)]
    assert events[:4] == ["created", "status", "status", "status"]
    assert set(events[4:]) == {"node", "progress"}
    assert [s.session_id for s in direct.list_sessions().sessions] == [sid]
    direct.close()
