"""The web part (extra ``celery-session-tracker[web]``): a FastAPI router, an app serving it alone, a dashboard.

Mount the API in your own app::

    from fastapi import FastAPI
    from tracker.web import create_router

    app = FastAPI()
    app.include_router(create_router())

or serve everything (API, event streams, ``/dashboard``) with ``tracker serve`` / :func:`serve`.
"""

try:
    import fastapi  # noqa: F401
    import sse_starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(f"tracker.web needs the web extra: pip install 'celery-session-tracker[web]' ({exc})") from exc

from tracker.web.api import API_PREFIX, create_router
from tracker.web.app import create_app, serve
from tracker.web.dashboard import create_dashboard_router
from tracker.web.settings import WebSettings

__all__ = ["API_PREFIX", "WebSettings", "create_app", "create_dashboard_router", "create_router", "serve"]
