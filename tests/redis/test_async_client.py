"""The asyncio client is configured with redis.asyncio's own classes: no warnings from redis-py."""

from __future__ import annotations

import asyncio
import uuid
import warnings

from tracker import TrackerSettings
from tracker.storage.redis import RedisStorageAdapter


def test_the_asyncio_flavour_makes_no_warning(redis_url: str) -> None:
    settings = TrackerSettings(redis_url=redis_url, key_prefix=f"w{uuid.uuid4().hex[:8]}")
    store = RedisStorageAdapter.from_settings(settings)

    async def read() -> None:
        flavour = store.asynchronous()
        try:
            assert await flavour.get(str(uuid.uuid4())) is None
        finally:
            await flavour.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(read())
    store.close()
    # (Objects of earlier tests may be collected meanwhile: only what configuring a client warns counts.)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "redis" in str(w.message)] == []
