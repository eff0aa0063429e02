"""What the dashboard's reads cost in Redis: the batches each program sends, run against the real
server one batch (one round trip) at a time.

``list_workers`` is two round trips whatever the number of nodes (the registry page, then a size
and a bounded sample per worker), never a read of a whole set; ``get_node`` is one.
"""

from __future__ import annotations

from typing import Any, TypeVar

from tests.redis.conftest import ManagerFactory
from tracker import NodeSpec
from tracker.storage.redis import RedisStorageAdapter
from tracker.storage.redis.programs import Program, Script

T = TypeVar("T")

W1, W2 = "celery@host-a:101", "celery@host-b:202"


def batches(store: RedisStorageAdapter, program: Program[T]) -> tuple[list[list[str]], T]:
    """Run ``program`` on ``store``'s server, noting the command names of each batch it sends."""
    sent: list[list[str]] = []
    replies: list[Any] | None = None
    while True:
        try:
            batch = program.send(replies)  # type: ignore[arg-type]
        except StopIteration as stop:
            return sent, stop.value
        sent.append([command.name if isinstance(command, Script) else str(command[0]) for command in batch])
        replies = store._execute(batch)


def test_list_workers_is_two_round_trips_of_bounded_reads(make_manager: ManagerFactory) -> None:
    # Given W1 running 500 nodes and W2 only beating
    manager = make_manager()
    store = manager.storage
    assert isinstance(store, RedisStorageAdapter)
    sid = manager.sync.create_session("big.canvas", 500)
    events = [manager.operations.node_event(sid, f"n{i:03d}", "running", worker=W1) for i in range(500)]
    manager.sync._record_nodes(sid, events)
    manager.sync._heartbeat(W2)

    # When the workers are listed
    sent, workers = batches(store, store.programs.list_workers(200))

    # Then the registry page, then per worker its size and a sample of 20: never the whole set
    assert sent == [["ZREVRANGE"], ["SCARD", "SRANDMEMBER", "SCARD", "SRANDMEMBER"]]
    assert [(w.worker, w.running, len(w.nodes)) for w in workers] == [(W2, 0, 0), (W1, 500, 20)]


def test_list_workers_of_an_empty_registry_is_one_round_trip(make_manager: ManagerFactory) -> None:
    store = make_manager().storage
    assert isinstance(store, RedisStorageAdapter)
    assert batches(store, store.programs.list_workers(200)) == ([["ZREVRANGE"]], [])


def test_get_node_is_one_round_trip(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    store = manager.storage
    assert isinstance(store, RedisStorageAdapter)
    sid = manager.sync.create_session("one.canvas", 10_000, nodes=[NodeSpec(node_id=f"n{i}") for i in range(1000)])

    sent, node = batches(store, store.programs.get_node(sid, "n999"))

    assert sent == [["EXISTS", "HGET"]]
    assert node.node_id == "n999"
