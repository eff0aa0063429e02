"""Making redis-py clients, blocking and asyncio alike, with the tracker's timeouts and retries."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tracker.config import TrackerSettings


def connect(
    settings: TrackerSettings,
    *,
    url: str | None = None,
    like: Any = None,
    cluster: bool = False,
    asynchronous: bool = False,
) -> Any:
    """A new client on ``url``, or else on the server of the blocking client ``like``.

    Timeouts, health checks and retries come from ``settings``; connections come from a blocking
    pool (a burst of callers waits for a connection instead of failing), which closing the client
    closes. ``asynchronous`` makes a ``redis.asyncio`` client, ``cluster`` a ``RedisCluster``.
    """
    lib: Any = aioredis if asynchronous else redis
    # The asyncio flavour needs redis.asyncio's own Retry (given the blocking one, redis-py
    # converts it and warns).
    retry_class = AsyncRetry if asynchronous else Retry
    options: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_socket_timeout_s,
        "retry": retry_class(ExponentialBackoff(cap=2.0, base=0.05), settings.redis_retries),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }
    if cluster:
        cluster_lib: Any = redis.asyncio.cluster if asynchronous else redis.cluster
        if url:  # credentials and TLS come along with the URL
            return lib.RedisCluster.from_url(url, **options)
        nodes = [cluster_lib.ClusterNode(node.host, node.port) for node in like.get_nodes()]
        return lib.RedisCluster(startup_nodes=nodes, **options)
    options["health_check_interval"] = settings.redis_health_check_interval_s
    options["max_connections"] = settings.redis_max_connections
    options["timeout"] = settings.redis_socket_timeout_s  # how long to wait for a free connection
    if url:
        pool = lib.BlockingConnectionPool.from_url(url, **options)
    else:
        server = like.connection_pool.connection_kwargs
        unix = "path" in server and "host" not in server
        keep = ("host", "port", "db", "username", "password", "path")
        pool = lib.BlockingConnectionPool(
            connection_class=lib.UnixDomainSocketConnection if unix else lib.Connection,
            **{key: server[key] for key in keep if key in server},
            **options,
        )
    # from_pool: the client owns the pool, and closing it disconnects the pool's connections.
    return lib.Redis.from_pool(pool)
