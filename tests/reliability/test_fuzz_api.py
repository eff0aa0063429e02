"""Scenario 7a: hypothesis across the public Python API, on both stores and both flavours.

Each example creates one session in some state, dumps the whole store, then makes one call of the
public API with arbitrary arguments: JSON values of any shape, huge and negative numbers, NaN and
infinities, lone surrogates, ids with ``*``, ``{``, ``}``, ``:``, newlines, unicode, 10 KB strings.
A call may succeed; if it raises, the error must be one of the documented ones (never a TypeError,
a pydantic error or a driver error), and the store must be exactly as before (byte for byte in
Redis, every readable field in memory).
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import StartRedis
from tests.reliability.helpers import public_state, redis_dump
from tracker import (
    InMemoryStorageAdapter,
    InvalidStateTransitionError,
    NodeError,
    NodeResult,
    NodeSpec,
    NodeStatus,
    SessionExistsError,
    SessionManager,
    SessionNotFoundError,
    TrackerError,
    TrackerSettings,
    TrackerValidationError,
)
from tracker.storage.base import NodeEvent
from tracker.storage.redis import RedisStorageAdapter

#: What a rejected call may raise (NodeLimitError is a TrackerValidationError).
DOCUMENTED = (TrackerValidationError, SessionNotFoundError, InvalidStateTransitionError, SessionExistsError)

#: Examples per store and flavour; raise it for a longer hunt (1500 each ran clean in 5 min).
EXAMPLES = int(os.environ.get("TRACKER_FUZZ_EXAMPLES", "60"))

NASTY_TEXT = ["", " ", "*", "{x}", "}{", "a:b", "a\nb", "\r\n", "\x00", "é", "日本", "\ud800", "x" * 10240, "|", "%s"]
NASTY_NUMBERS: list[Any] = [0, -1, 10**20, -(10**20), 10**400, 2**63, math.nan, math.inf, -math.inf, 1e308, -0.0, True]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.text(st.characters(codec=None, categories=["Cs", "Cc", "Lo"]), max_size=5)
    | st.sampled_from(NASTY_TEXT)
    | st.sampled_from(NASTY_NUMBERS)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Well-formed values two times in three (so calls get past validation and meet the state
    machine, the node limit, missing sessions), arbitrary ones otherwise."""
    return st.one_of(valid, valid, json_values)


statuses = mostly(st.sampled_from(["pending", "running", "retrying", "completed", "failed", "cancelled", "lost",
                                   "partial_failure", "COMPLETED", "done"]))  # fmt: skip
node_ids = st.one_of(st.sampled_from(["a", "b", "c", "new", "n:1"]), st.sampled_from(["a", "b", "c"]), json_values)
errors = (
    st.none()
    | st.builds(NodeError, type=st.text(max_size=30), message=st.text(max_size=30))
    | st.builds(NodeError, type=st.just("T" * 5000), message=st.just("m" * 100_000))
    | st.text(max_size=10).map(RuntimeError)
    | json_values
)
specs = st.lists(
    st.builds(NodeSpec, node_id=st.text(max_size=12), task_id=st.none() | st.text(max_size=300))
    | st.builds(NodeSpec, node_id=st.just("s"), signature=st.dictionaries(st.text(max_size=4), json_values, max_size=3))
    | json_values,
    max_size=4,
)
#: Hand-made NodeEvents for record_nodes: what node_event builds, and what it never would.
node_events = st.lists(
    st.builds(NodeEvent, node_id=node_ids, status=st.sampled_from(list(NodeStatus)) | json_values,
              result_json=st.none() | st.sampled_from(['{"x":1}', "[1", "", "x" * 70_000]) | json_values,
              error=errors, attempt=st.none() | json_values, task_id=st.none() | json_values,
              worker=st.none() | json_values, reason=st.none() | json_values,
              at=st.none() | st.datetimes(timezones=st.just(UTC)) | st.datetimes() | json_values)
    | json_values,
    max_size=4,
)  # fmt: skip
results = (
    st.dictionaries(node_ids.filter(lambda v: isinstance(v, str)), json_values, max_size=4)
    | st.lists(st.builds(NodeResult, node_id=st.sampled_from(["a", "b", "new"]), result=st.integers()), max_size=3)
    | json_values
)
block_ms = (
    st.none()
    | st.integers(max_value=30)
    | st.integers(min_value=10**7)
    | json_values.filter(lambda v: not isinstance(v, int) or isinstance(v, bool) or v <= 30 or v >= 10**7)
)


def sid_strategy(sid: str) -> st.SearchStrategy[Any]:
    """The session's own id half of the time, else near misses, other UUIDs and arbitrary values."""
    near = st.sampled_from([sid.upper(), sid.replace("-", ""), "*", f"{{{sid}}}", f"{sid}:x", f"{sid}\n"])
    return st.one_of(st.just(sid), st.just(sid), st.just(sid), near, st.uuids().map(str), json_values)


def calls(sid: str) -> st.SearchStrategy[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """One public call: (method name, positional args, keyword args)."""
    ids = sid_strategy(sid)
    kw = st.fixed_dictionaries
    text = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=12)
    attempt = mostly(st.integers(1, 5))
    limit = mostly(st.integers(1, 50))
    cursor = mostly(st.none() | st.just("0"))
    return st.one_of(
        st.tuples(st.just("create_session"), st.tuples(mostly(text), mostly(st.integers(0, 4))),
                  kw({}, optional={"metadata": json_values, "nodes": specs, "session_id": ids})),
        st.tuples(st.just("update_status"), st.tuples(ids, statuses), st.just({})),
        st.tuples(st.just("update_progress"), st.tuples(ids, mostly(st.floats(0, 100))), st.just({})),
        st.tuples(st.just("add_node_result"), st.tuples(ids, node_ids, json_values),
                  kw({}, optional={"status": statuses, "error": errors, "task_id": mostly(text),
                                   "worker": mostly(text), "attempt": attempt})),
        st.tuples(st.just("_record_node"), st.tuples(ids, node_ids, statuses),
                  kw({}, optional={"result": json_values, "error": errors, "task_id": mostly(text),
                                   "worker": mostly(text.map(lambda t: f"celery@{t}:1")), "attempt": attempt,
                                   "reason": mostly(text)})),
        st.tuples(st.sampled_from(["get_session_status", "get_session", "is_session_expired", "delete_session"]),
                  st.tuples(ids), st.just({})),
        st.tuples(st.just("get_nodes"), st.tuples(ids), kw({}, optional={"status": statuses, "cursor": cursor,
                                                                          "limit": limit})),
        st.tuples(st.just("list_sessions"), st.just(()), kw({}, optional={"status": statuses, "cursor": cursor,
                                                                           "limit": limit})),
        st.tuples(st.just("read_events"), st.tuples(ids),
                  kw({}, optional={"after": json_values | st.just("99999999999999-0"), "limit": limit,
                                   "block_ms": block_ms})),
        st.tuples(st.just("_reopen_session"), st.tuples(ids), kw({}, optional={"retry_failed": json_values})),
        st.tuples(st.just("add_node_results"), st.tuples(ids, results), st.just({})),
        st.tuples(st.just("_record_nodes"), st.tuples(ids, node_events), kw({}, optional={"request_id": mostly(text)})),
        st.tuples(st.just("_heartbeat"), st.tuples(mostly(text.map(lambda t: f"celery@{t}:1"))), st.just({})),
    )  # fmt: skip


def seed_session(manager: SessionManager, state: str) -> str:
    """A session of three nodes (a, b, c) in ``state``."""
    sid = manager.sync.create_session("fuzz.canvas", 3, nodes=[NodeSpec(node_id=n) for n in "abc"])
    if state in {"running", "completed", "partial_failure", "cancelled"}:
        manager.sync._record_node(sid, "a", "running", attempt=1, worker="celery@fuzz:1")
    if state in {"completed", "partial_failure"}:
        manager.sync._record_node(sid, "a", "completed", result={"x": 1})
        manager.sync._record_node(sid, "b", "completed", result=[1])
        last = "completed" if state == "completed" else "failed"
        manager.sync._record_node(sid, "c", last, error=NodeError(type="E", message="m"))
    if state == "cancelled":
        manager.sync.update_status(sid, "cancelled")
    return sid


Snapshot = Callable[[], Any]


@pytest.fixture(params=["memory", "redis"])
def fuzzed(
    request: pytest.FixtureRequest, start_redis: StartRedis, key_prefix: str
) -> Iterator[tuple[SessionManager, Snapshot]]:
    """A manager on each store, and a function dumping that whole store."""
    if request.param == "memory":
        manager = SessionManager(storage=InMemoryStorageAdapter(), settings=TrackerSettings())
        yield manager, lambda: public_state(manager)
        return
    server = start_redis()
    settings = TrackerSettings(redis_url=server.url, key_prefix=key_prefix, redis_socket_timeout_s=1.0)
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    client = redis.Redis(port=server.port)
    yield manager, lambda: redis_dump(client, key_prefix)
    client.close()
    manager.storage.close()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for a whole test: the asyncio Redis client is bound to the loop it started in."""
    running = asyncio.new_event_loop()
    yield running
    running.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.timeout(600)
def test_bad_input_only_raises_documented_errors_and_changes_nothing(
    fuzzed: tuple[SessionManager, Snapshot], flavour: str, loop: asyncio.AbstractEventLoop
) -> None:
    manager, snapshot = fuzzed
    seen: dict[str, int] = {}

    def run(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if flavour == "sync":
            return getattr(manager.sync, method)(*args, **kwargs)
        return loop.run_until_complete(getattr(manager, method)(*args, **kwargs))

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(state=st.sampled_from(["pending", "running", "completed", "partial_failure", "cancelled"]), data=st.data())
    def example(state: str, data: st.DataObject) -> None:
        # Given a session in some state, and the whole store as it is
        sid = seed_session(manager, state)
        method, args, kwargs = data.draw(calls(sid), label="call")
        before = snapshot()
        # When one public call is made with arbitrary arguments
        refused: TrackerError | None = None
        value: Any = None
        try:
            value = run(method, args, kwargs)
        except DOCUMENTED as exc:
            refused = exc
        # Then a refusal is a documented error, and nothing changed
        try:
            if refused is not None:
                seen[type(refused).__name__] = seen.get(type(refused).__name__, 0) + 1
                assert snapshot() == before, f"{method}{args}{kwargs} raised {refused!r} but changed the store"
            else:
                seen["ok"] = seen.get("ok", 0) + 1
        finally:
            if method == "create_session" and isinstance(value, str):
                manager.sync.delete_session(value)
            manager.sync.delete_session(sid)

    example()
    if flavour == "async":
        loop.run_until_complete(manager.cleanup())
    # Both outcomes were exercised, not only refusals
    assert seen.get("ok", 0) > 5 and seen.get("TrackerValidationError", 0) > 5, seen
    print(f"\nfuzz-api: {sum(seen.values())} calls: " + ", ".join(f"{k} {v}" for k, v in sorted(seen.items())))
