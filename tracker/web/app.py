"""``create_app()``: the tracker's router served alone, and ``serve()`` to run it with uvicorn."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from tracker import __version__
from tracker.config import TrackerSettings
from tracker.manager import SessionManager
from tracker.web.api import create_router
from tracker.web.dashboard import create_dashboard_router
from tracker.web.settings import WebSettings


def create_app(
    manager: SessionManager | None = None,
    settings: TrackerSettings | None = None,
    celery_app: Any = None,
    *,
    web_settings: WebSettings | None = None,
) -> FastAPI:
    """A FastAPI app serving the tracker API, its event streams and the dashboard.

    Its arguments are :func:`~tracker.web.create_router`'s; ``web_settings`` also says which
    origins CORS lets in, and whether to serve the dashboard.

    Returns:
        The app: ``/api/v1/parallel/...``, ``/dashboard``, ``/openapi.json``, ``/docs``.
    """
    manager = manager if manager is not None else SessionManager.get_instance()
    settings = settings or manager.settings
    web_settings = web_settings or WebSettings()
    app = FastAPI(
        title="tracker",
        version=__version__,
        description="Batch sessions of Celery work: status, nodes, live events, cancel and resume.",
    )
    app.include_router(create_router(manager, settings, celery_app, web_settings=web_settings))
    if web_settings.dashboard:
        app.include_router(create_dashboard_router(settings, web_settings))
    if web_settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=web_settings.cors_origins,
            allow_credentials=web_settings.cors_allow_credentials,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
        )
    return app


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    manager: SessionManager | None = None,
    settings: TrackerSettings | None = None,
    celery_app: Any = None,
    web_settings: WebSettings | None = None,
    log_level: str = "info",
) -> None:
    """Run :func:`create_app` with uvicorn until interrupted (what ``tracker serve`` calls).

    Args:
        host: Interface to listen on; the default only accepts local connections.
        port: TCP port.
        manager: See :func:`create_app`.
        settings: See :func:`create_app`.
        celery_app: See :func:`create_app`.
        web_settings: See :func:`create_app`.
        log_level: uvicorn's log level.
    """
    import uvicorn

    app = create_app(manager, settings, celery_app, web_settings=web_settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
