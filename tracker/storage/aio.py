"""An awaitable view of a blocking adapter, for stores without a native asyncio client."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, cast

from tracker.storage.base import AsyncSessionStorageAdapter, SessionStorageAdapter

#: Methods that may wait (a blocking event read); they always run in a worker thread.
_MAY_BLOCK = frozenset({"read_events"})


class ThreadedAsyncAdapter:
    """Awaitable methods over a :class:`SessionStorageAdapter`.

    Args:
        store: The blocking adapter.
        inline: Call quick methods directly on the event loop (right for an in-memory store,
            whose calls hold a lock for microseconds); otherwise every call runs in a thread.
    """

    def __init__(self, store: SessionStorageAdapter, inline: bool = False) -> None:
        self._store = store
        self._inline = inline

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._store, name)
        run_inline = self._inline and name not in _MAY_BLOCK

        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            if run_inline:
                return method(*args, **kwargs)
            return await asyncio.to_thread(method, *args, **kwargs)

        return call


def as_async(store: SessionStorageAdapter, inline: bool = False) -> AsyncSessionStorageAdapter:
    """Typed constructor of :class:`ThreadedAsyncAdapter`."""
    return cast(AsyncSessionStorageAdapter, ThreadedAsyncAdapter(store, inline=inline))
