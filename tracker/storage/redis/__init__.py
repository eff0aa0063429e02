"""Redis storage: every write is one Lua script run by EVALSHA, every status read one HGETALL.

- :mod:`~tracker.storage.redis.codec`: replies read into models, and the text a call sends;
- :mod:`~tracker.storage.redis.programs`: the operations, free of I/O (see ``lua/`` for the
  scripts and :mod:`tracker.storage.keys` for the key layout);
- :mod:`~tracker.storage.redis.clients`: redis-py clients, blocking and asyncio;
- :mod:`~tracker.storage.redis.adapter`: the adapter, which drives the programs with them.
"""

from tracker.storage.redis.adapter import AsyncRedisStore, RedisStorageAdapter
from tracker.storage.redis.programs import SCRIPTS, SESSION_FIELDS, RedisPrograms, Script, script_source

__all__ = [
    "SCRIPTS",
    "SESSION_FIELDS",
    "AsyncRedisStore",
    "RedisPrograms",
    "RedisStorageAdapter",
    "Script",
    "script_source",
]
