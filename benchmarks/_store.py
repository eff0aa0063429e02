"""Building big data sets fast: the tracker's own scripts, sent through a pipeline.

The public API sends one command per call (one round trip each); to fill a 100 000-node session
or 200 000 sessions within seconds, the benchmarks take the very commands the API would send
(built by the same plans and programs, so the data is what the API would write) and pipeline
them. Only set-up uses this; every measurement goes through the public API.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from tracker import SessionManager
from tracker.models import SessionInfo
from tracker.storage.redis import RedisStorageAdapter, Script


def first_batch(program: Iterator[list[Any]]) -> list[Any]:
    return next(program)


def send_pipelined(store: RedisStorageAdapter, scripts: Iterable[Script], chunk: int = 1000) -> int:
    """Run ``scripts`` through pipelines of ``chunk`` commands; return how many replied ``ok``."""
    ok = 0
    pending: list[Script] = []

    def flush() -> int:
        pipe = store.client.pipeline(transaction=False)
        for script in pending:
            store._scripts[script.name](keys=script.keys, args=script.args, client=pipe)
        replies = pipe.execute()
        pending.clear()
        return sum(1 for r in replies if isinstance(r, list) and r and r[0] in (b"ok", "ok"))

    for script in scripts:
        pending.append(script)
        if len(pending) >= chunk:
            ok += flush()
    if pending:
        ok += flush()
    return ok


def node_events(
    manager: SessionManager,
    store: RedisStorageAdapter,
    session_id: str,
    events: Iterable[tuple[str, str, dict[str, Any]]],
) -> Iterator[Script]:
    """The ``record_node`` scripts ``manager.sync._record_node(session_id, node_id, status, **details)`` would run."""
    for node_id, status, details in events:
        call = manager.operations.record_node(session_id, node_id, status, **details).call
        (script,) = first_batch(store.programs.record_node(*call.args, **call.kwargs))
        yield script


def node_results(
    manager: SessionManager, store: RedisStorageAdapter, session_id: str, node_ids: Iterable[str], result: Any = None
) -> Iterator[Script]:
    """The ``record_node`` scripts that ``add_node_result(session_id, node_id, result)`` would run."""
    return node_events(manager, store, session_id, ((nid, "completed", {"result": result}) for nid in node_ids))


def sessions(
    store: RedisStorageAdapter, session_ids: Iterable[str], at: datetime, node_count: int = 1
) -> Iterator[Script]:
    """The ``create`` scripts that ``create_session`` would run, as if at time ``at``."""
    for sid in session_ids:
        info = SessionInfo(
            session_id=sid, canvas_path="bench.canvas", node_count=node_count, created_at=at, updated_at=at
        )
        (script,) = first_batch(store.programs.create(info))
        yield script
