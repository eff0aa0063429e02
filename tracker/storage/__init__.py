"""Storage adapters: the seam between the manager and where sessions live."""

from tracker.storage.base import AsyncStore, NodeEvent, SessionStorageAdapter, StoreCall, store_call
from tracker.storage.memory import InMemoryStorageAdapter

__all__ = [
    "AsyncStore",
    "InMemoryStorageAdapter",
    "NodeEvent",
    "RedisStorageAdapter",
    "SessionStorageAdapter",
    "StoreCall",
    "store_call",
]


def __getattr__(name: str) -> object:
    # redis is imported only by whoever uses the Redis adapter.
    if name == "RedisStorageAdapter":
        from tracker.storage.redis import RedisStorageAdapter

        return RedisStorageAdapter
    raise AttributeError(name)
