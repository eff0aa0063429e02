"""Storage adapters: the seam between the manager and where sessions live."""

from tracker.storage.base import AsyncSessionStorageAdapter, NodeEvent, ResumeOutcome, SessionStorageAdapter
from tracker.storage.memory import InMemoryStorageAdapter

__all__ = [
    "AsyncSessionStorageAdapter",
    "InMemoryStorageAdapter",
    "NodeEvent",
    "RedisStorageAdapter",
    "ResumeOutcome",
    "SessionStorageAdapter",
]


def __getattr__(name: str) -> object:
    # redis is imported only by whoever uses the Redis adapter.
    if name == "RedisStorageAdapter":
        from tracker.storage.redis import RedisStorageAdapter

        return RedisStorageAdapter
    raise AttributeError(name)
