"""The awaitable flavour of a blocking adapter, for stores without a native asyncio client."""

from __future__ import annotations

import asyncio
from typing import TypeVar

from tracker.storage.base import SessionStorageAdapter, StoreCall

T = TypeVar("T")

#: Verbs that may wait (a blocking event read); they always run in a worker thread.
_MAY_BLOCK = frozenset({"read_events"})


class ThreadedAsyncStore:
    """Runs the verbs of a :class:`SessionStorageAdapter` for asyncio callers.

    Args:
        store: The blocking adapter.
        inline: Call quick verbs directly on the event loop (right for an in-memory store, whose
            calls hold a lock briefly); otherwise every call runs in a thread.
    """

    def __init__(self, store: SessionStorageAdapter, inline: bool = False) -> None:
        self._store = store
        self._inline = inline

    async def run(self, call: StoreCall[T]) -> T:
        if self._inline and call.verb not in _MAY_BLOCK:
            return call.run(self._store)
        return await asyncio.to_thread(call.run, self._store)

    async def close(self) -> None:
        """Nothing to release: the blocking store owns the connections."""
