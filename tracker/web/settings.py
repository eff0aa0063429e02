"""Settings of the web part, environment first (``TRACKER_*``), like :class:`tracker.TrackerSettings`.

The API token itself is :attr:`tracker.TrackerSettings.api_token` (``TRACKER_API_TOKEN``): one
secret for every part of the tracker. What is here only concerns serving HTTP.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WebSettings(BaseSettings):
    """Knobs of :func:`tracker.web.create_app` and :func:`tracker.web.create_router`.

    List values come from the environment as JSON, e.g. ``TRACKER_CORS_ORIGINS='["https://ops.example"]'``.
    """

    model_config = SettingsConfigDict(env_prefix="TRACKER_", extra="ignore")

    #: Most event streams (SSE connections) open at once in this process; one more is answered 503.
    #: With Redis each open stream holds one connection of the asyncio pool while it waits, so keep
    #: this below ``TRACKER_REDIS_MAX_CONNECTIONS``.
    sse_max_connections: int = Field(default=32, ge=1)
    #: Seconds between keep-alive comments on an idle event stream (proxies drop silent connections).
    sse_ping_s: float = Field(default=15.0, gt=0)
    #: How long one read of a session's stream waits for a new event, in milliseconds. Must stay below
    #: the Redis socket timeout (``TRACKER_REDIS_SOCKET_TIMEOUT_S``, 5 s by default).
    sse_block_ms: int = Field(default=1000, ge=10, le=4000)
    #: Events sent per read of the stream.
    sse_batch: int = Field(default=100, ge=1, le=1000)
    #: Reconnection delay the server asks ``EventSource`` clients to use, in milliseconds.
    sse_retry_ms: int = Field(default=2000, ge=0)
    #: Origins allowed by CORS (``["*"]`` for any); empty: no CORS headers at all (same origin only).
    cors_origins: list[str] = Field(default_factory=list)
    #: Let CORS requests carry cookies and ``Authorization`` (not allowed together with ``"*"``).
    cors_allow_credentials: bool = False
    #: Lifetime of the dashboard's login cookie, in seconds.
    dashboard_cookie_ttl_s: int = Field(default=8 * 3600, ge=60)
    #: Serve the dashboard page (``/dashboard``) next to the API.
    dashboard: bool = True
    #: The directory whose ``.canvas`` files the API may serve as a session's layout
    #: (``GET …/sessions/{id}/canvas``): a session's relative canvas path is read from here, and a
    #: file that resolves outside it (``..``, a symlink) is never read. None: the server's working
    #: directory, where ``tracker run FILE.canvas`` is usually run from too.
    canvas_dir: Path | None = None
