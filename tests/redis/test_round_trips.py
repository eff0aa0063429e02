"""Round trips, counted by the server: one EVALSHA per write, one HGETALL per status read.

This module has a redis-server of its own, so nothing but the code under test talks to it.
``INFO commandstats`` deltas (after ``CONFIG RESETSTAT``) say which commands ran; since Redis also
counts the commands a script calls, the slow log (threshold 0) tells the commands a *client*
sent apart from those (a script's own calls are logged with client ``?:0``). The status read
stays one command whether the session has 10 or 10 000 nodes, and after the first call the
scripts go by EVALSHA, never EVAL; when the server forgets them (``SCRIPT FLUSH``), redis-py
reloads them and the write still happens.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import FakeClock
from tests.servers import RedisProcess, redis_process
from tracker import NodeSpec, SessionManager, TrackerSettings
from tracker.storage.keys import KeySpace
from tracker.storage.redis import SCRIPTS, RedisStorageAdapter, script_source

#: Commands the observer itself sends; left out of every count.
OBSERVER_COMMANDS = ("info", "config|", "slowlog|")


@dataclass
class Observed:
    """What the server ran while a block ran."""

    #: ``INFO commandstats`` calls by command (a script's own calls included), observer left out.
    stats: dict[str, int]
    #: Commands sent by clients, in order (from the slow log; script calls and observer left out).
    client_commands: list[str]


class Observer:
    """Counts the commands a redis-server runs, from a connection named ``observer``."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, client_name="observer", decode_responses=True)

    def reset(self) -> None:
        self.client.config_resetstat()
        self.client.slowlog_reset()

    def observe(self) -> Observed:
        info = self.client.info("commandstats")
        stats = {
            name.removeprefix("cmdstat_"): int(values["calls"])
            for name, values in info.items()
            if not name.removeprefix("cmdstat_").startswith(OBSERVER_COMMANDS)
        }
        entries = self.client.slowlog_get(10_000)
        sent = [
            _text(entry["command"]).split(" ", 1)[0].lower()
            for entry in reversed(entries)
            if _text(entry.get("client_address")) != "?:0" and _text(entry.get("client_name")) != "observer"
        ]
        return Observed(stats=stats, client_commands=sent)

    def during(self, block: Callable[[], Any]) -> Observed:
        self.reset()
        block()
        return self.observe()

    def close(self) -> None:
        self.client.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server for this module alone, logging every command in its slow log."""
    directory: Path = tmp_path_factory.mktemp("round-trips")
    with redis_process(directory, "--slowlog-log-slower-than", "0", "--slowlog-max-len", "100000") as started:
        yield started


@pytest.fixture
def observer(server: RedisProcess) -> Iterator[Observer]:
    """Counts what the module's server runs (see :class:`Observer`)."""
    watching = Observer(server.url)
    yield watching
    watching.close()


@pytest.fixture
def manager(server: RedisProcess, key_prefix: str, clock: FakeClock) -> Iterator[SessionManager]:
    """A manager on the module's server, warmed up: connection open, every script loaded."""
    settings = TrackerSettings(redis_url=server.url, key_prefix=key_prefix)
    store = RedisStorageAdapter.from_settings(settings)
    manager = SessionManager(storage=store, settings=settings, clock=clock)
    warm_up(manager)
    yield manager
    store.close()


def warm_up(manager: SessionManager) -> None:
    """One call of each script and of the status read (opens the connection, loads the scripts)."""
    sid = manager.sync.create_session("warm.canvas", 2, nodes=[NodeSpec(node_id="a")])
    manager.sync.add_node_result(sid, "a", 1)
    manager.sync.update_progress(sid, 60)
    manager.sync.update_status(sid, "cancelled")
    manager.sync._reopen_session(sid)
    manager.sync.get_session_status(sid)
    manager.sync.cleanup_expired_sessions()


def one_write(observed: Observed) -> None:
    """The block was one EVALSHA from the client, and no EVAL or SCRIPT anywhere."""
    assert observed.client_commands == ["evalsha"]
    assert observed.stats["evalsha"] == 1
    assert not {"eval", "eval_ro", "evalsha_ro"} & observed.stats.keys()
    assert not [name for name in observed.stats if name.startswith("script")]


def one_read(observed: Observed) -> None:
    """The block was exactly one HGETALL."""
    assert observed.client_commands == ["hgetall"]
    assert observed.stats == {"hgetall": 1}


def new_session(manager: SessionManager, node_count: int) -> str:
    nodes = [
        NodeSpec(node_id=f"n{i}", task_id=f"t{i}", signature={"task": "x", "args": [i]}) for i in range(node_count)
    ]
    return manager.sync.create_session("rt.canvas", node_count, nodes=nodes)


def test_the_observer_sees_client_commands_apart_from_script_calls(observer: Observer, server: RedisProcess) -> None:
    client = redis.Redis.from_url(server.url)
    client.ping()  # connection handshake done before counting
    observed = observer.during(
        lambda: client.eval("redis.call('SET', KEYS[1], 'v'); return redis.call('GET', KEYS[1])", 1, "rt:k")
    )
    assert observed.client_commands == ["eval"]
    assert observed.stats == {"eval": 1, "set": 1, "get": 1}
    client.delete("rt:k")
    client.close()


@pytest.mark.parametrize("node_count", [10, 10_000])
def test_each_write_is_one_evalsha_and_the_status_read_one_hgetall(
    manager: SessionManager, observer: Observer, node_count: int
) -> None:
    # Given a session created in one command, with node_count nodes
    created: list[str] = []
    one_write(observer.during(lambda: created.append(new_session(manager, node_count))))
    sid = created[0]

    # When each kind of write runs, Then each is one EVALSHA
    one_write(observer.during(lambda: manager.sync.add_node_result(sid, "n0", {"ok": 1})))
    one_write(observer.during(lambda: manager.sync._record_node(sid, "n1", "running", task_id="t1")))
    one_write(observer.during(lambda: manager.sync.add_node_result(sid, "n0", {"ok": 1})))  # duplicate
    one_write(observer.during(lambda: manager.sync.update_progress(sid, 42.5)))
    one_write(observer.during(lambda: manager.sync.update_status(sid, "cancelled")))
    one_write(observer.during(lambda: manager.sync._reopen_session(sid)))

    # And the status read is one HGETALL, whatever the node count
    status: list[dict[str, Any]] = []
    one_read(observer.during(lambda: status.append(manager.sync.get_session_status(sid))))
    assert status[0]["node_count"] == node_count
    assert status[0]["completed_nodes"] == 1


def test_the_status_read_does_not_grow_with_the_node_count(
    manager: SessionManager, observer: Observer, key_prefix: str
) -> None:
    # Given two sessions of 20 and 10 000 nodes, each with 10 results (both still running)
    small, large = new_session(manager, 20), new_session(manager, 10_000)
    for sid in (small, large):
        for i in range(10):
            manager.sync.add_node_result(sid, f"n{i}", {"ok": 1})

    # When their status is read
    observed = [observer.during(partial(manager.sync.get_session_status, sid)) for sid in (small, large)]

    # Then each read is one HGETALL of a session hash of the same size
    for seen in observed:
        one_read(seen)
    space = KeySpace(key_prefix)
    sizes = {len(observer.client.hgetall(space.session(sid).session)) for sid in (small, large)}
    assert len(sizes) == 1


async def test_the_async_flavour_makes_the_same_round_trips(
    manager: SessionManager, observer: Observer, key_prefix: str
) -> None:
    # Given the async store warmed up (its own connection pool and script registrations)
    sid = await manager.create_session("async.canvas", 3, nodes=[NodeSpec(node_id="a"), NodeSpec(node_id="b")])
    await manager.add_node_result(sid, "a", 1)
    await manager.get_session_status(sid)

    async def observed(call: Any) -> Observed:
        observer.reset()
        await call
        return observer.observe()

    # When / Then: one EVALSHA per write, one HGETALL per read
    one_write(await observed(manager.create_session("async.canvas", 2)))
    one_write(await observed(manager.add_node_result(sid, "b", {"ok": 1})))
    one_write(await observed(manager.update_progress(sid, 70)))
    one_write(await observed(manager.update_status(sid, "cancelled")))
    one_write(await observed(manager._reopen_session(sid)))
    one_read(await observed(manager.get_session_status(sid)))
    await manager.cleanup()


def test_scripts_go_by_evalsha_and_survive_script_flush(manager: SessionManager, observer: Observer) -> None:
    # Given a session (the scripts are loaded and in use)
    sid = new_session(manager, 3)
    one_write(observer.during(lambda: manager.sync.add_node_result(sid, "n0", 1)))

    # When the server forgets every script
    shas = {name: hashlib.sha1(script_source(name).encode()).hexdigest() for name in SCRIPTS}
    assert observer.client.script_exists(shas["record_nodes"]) == [True]
    observer.client.script_flush()
    assert observer.client.script_exists(*shas.values()) == [False] * len(SCRIPTS)

    # Then the next write still happens: EVALSHA answered NOSCRIPT, redis-py loaded the script and
    # sent EVALSHA again; never EVAL
    after = observer.during(lambda: manager.sync.add_node_result(sid, "n1", 2))
    assert after.client_commands == ["evalsha", "script", "evalsha"]
    assert after.stats["evalsha"] == 2
    assert after.stats["script|load"] == 1
    assert "eval" not in after.stats
    assert manager.sync.get_session_status(sid)["completed_nodes"] == 2

    # And the write after that is one EVALSHA again
    one_write(observer.during(lambda: manager.sync.add_node_result(sid, "n2", 3)))
    assert manager.sync.get_session_status(sid)["status"] == "completed"


def test_a_new_client_loads_each_script_once_and_never_uses_eval(
    server: RedisProcess, observer: Observer, key_prefix: str
) -> None:
    # Given a server that has no script loaded, and a new adapter
    observer.client.script_flush()
    settings = TrackerSettings(redis_url=server.url, key_prefix=key_prefix)
    store = RedisStorageAdapter.from_settings(settings)
    manager = SessionManager(storage=store, settings=settings)
    sid = str(uuid.uuid4())

    # When it writes twice
    first = observer.during(lambda: manager.sync.create_session("first.canvas", 1, session_id=sid))
    second = observer.during(lambda: manager.sync.add_node_result(sid, "a", 1))
    third = observer.during(lambda: manager.sync.create_session("second.canvas", 1))
    store.close()

    # Then the first call of each script loads it (SCRIPT LOAD after NOSCRIPT), later calls are one EVALSHA
    for seen in (first, second):
        assert "eval" not in seen.stats
        assert seen.stats["script|load"] == 1
        assert seen.client_commands[-3:] == ["evalsha", "script", "evalsha"]
    assert set(first.client_commands[:-3]) <= {"hello", "ping", "client"}  # opening the connection
    assert len(second.client_commands) == 3
    one_write(third)
