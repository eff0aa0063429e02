"""Settings, environment first (``TRACKER_*``), through pydantic-settings."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tracker.validation import MAX_SECONDS

#: Settings renamed to carry their unit: old name -> new name. The old names still work, as
#: keywords and as ``TRACKER_<OLD NAME>`` environment variables, with a ``FutureWarning``: the
#: category Python shows by default, since whoever set the variable is who must change it.
RENAMED = {
    old: f"{old}_s"
    for old in (
        "session_timeout", "cleanup_interval", "redis_socket_timeout", "redis_health_check_interval",
        "flush_interval", "heartbeat_interval", "worker_stale_after", "stalled_after", "pickup_hint_after",
        "node_max_runtime",
    )
}  # fmt: skip


def _old_names(values: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """Each renamed setting given by its old name, as (old name, where, value): a keyword
    (``old=``) before its environment variable."""
    for old in RENAMED:
        variable = f"TRACKER_{old.upper()}"
        if old in values:
            yield old, f"{old}=", values[old]
        elif variable in os.environ:
            yield old, variable, os.environ[variable]


class TrackerSettings(BaseSettings):
    """Every knob of the tracker. Read from ``TRACKER_<NAME>`` environment variables."""

    # No infinite durations: they overflow the dates and TTLs they become (MAX_SECONDS is the bound).
    model_config = SettingsConfigDict(env_prefix="TRACKER_", extra="ignore", allow_inf_nan=False)

    #: Redis URL (``redis://``, ``rediss://``, ``unix://``). Unset: in-memory storage (one process).
    redis_url: str | None = None
    #: Connect to a Redis Cluster (``RedisCluster``) instead of a single server.
    redis_cluster: bool = False
    #: Prefix of every Redis key.
    key_prefix: str = Field(default="tracker", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    #: A session that has not ended expires this long after its last change (or heartbeat).
    session_timeout_s: float = Field(default=1800.0, gt=0, le=MAX_SECONDS)
    #: An ended session is kept this long after its last change (to look at the next morning).
    finished_ttl_s: float = Field(default=86400.0, gt=0, le=MAX_SECONDS)
    #: How often the in-process cleanup scheduler runs.
    cleanup_interval_s: float = Field(default=60.0, gt=0, le=MAX_SECONDS)
    #: Most nodes one session may have (a bound on what one dispatch may ask the store to hold).
    max_node_count: int = Field(default=10_000_000, ge=1)
    #: Deepest nesting of groups, chains and chords a dispatched canvas may have.
    max_canvas_depth: int = Field(default=32, ge=1)
    #: Largest JSON-encoded node result accepted.
    max_result_bytes: int = Field(default=64 * 1024, ge=16)
    #: Longest error message kept for a failed node; longer ones are cut.
    max_error_chars: int = Field(default=2000, ge=16)
    #: Events kept per session stream (approximate trim); older ones are replayed as a snapshot.
    events_maxlen: int = Field(default=1000, ge=10, le=10**9)
    #: Socket timeout of Redis calls.
    redis_socket_timeout_s: float = Field(default=5.0, gt=0, le=MAX_SECONDS)
    #: Retries of a Redis call on connection errors and timeouts (exponential backoff).
    redis_retries: int = Field(default=3, ge=0)
    #: Most connections one process opens to Redis (per client flavour); more callers wait.
    redis_max_connections: int = Field(default=50, ge=1)
    #: Seconds between connection health checks (0 disables).
    redis_health_check_interval_s: int = Field(default=30, ge=0)
    #: Seconds a task's start waits in its process before it is written on its own (between one and
    #: two of them): most tasks end sooner, and their start is written with their outcome (one store
    #: call). Outcomes are always written before their handler returns. 0: every start is written
    #: before the task goes on too.
    flush_interval_s: float = Field(default=0.05, ge=0, le=60)
    #: Seconds between heartbeats of each worker process that runs tracked nodes.
    heartbeat_interval_s: float = Field(default=5.0, gt=0, le=MAX_SECONDS)
    #: A worker process silent this long is presumed dead: its running nodes become ``lost``.
    worker_stale_after_s: float = Field(default=30.0, gt=0, le=MAX_SECONDS)
    #: After a worker died, a session of that time with nothing running and nothing changed for
    #: this long has its unfinished nodes marked ``lost`` (a broker lost their messages with the
    #: worker). Unset: derived from the app's broker (its redelivery delay plus twice
    #: ``worker_stale_after_s``; see ``tracker.celery.stalled_after_s``).
    stalled_after_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    #: Seconds a session may stay ``pending`` (no worker has recorded any of its nodes) before
    #: ``tracker status``, ``watch`` and the web API and dashboard show a hint about the workers.
    pickup_hint_after_s: float = Field(default=30.0, gt=0, le=MAX_SECONDS)
    #: Optional per-node run limit in seconds; a node running longer is marked ``lost``.
    node_max_runtime_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    #: Bearer token the web API requires; unset: reads are open, mutations refused.
    api_token: SecretStr | None = None

    def __init__(self, **values: Any) -> None:
        # Warned here rather than in the validator below, so that the warning names the line that
        # made the settings (stacklevel 2), not pydantic's.
        for old, where, _ in _old_names(values):
            new = RENAMED[old]
            warnings.warn(f"{where} is deprecated: use {new} (TRACKER_{new.upper()})", FutureWarning, stacklevel=2)
        super().__init__(**values)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, _, value in list(_old_names(data)):
                data.pop(old, None)
                data.setdefault(RENAMED[old], value)  # the new name wins when both are given
        return data

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix:// (e.g. redis://127.0.0.1:6379/0)")
        return url
