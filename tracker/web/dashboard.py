"""The dashboard: one HTML page and its script and style, shipped as package data, no build step.

The page holds no data; it reads the JSON API and the event streams from the browser. With an
API token configured it asks for the token once and trades it for the login cookie
(``POST /dashboard/login``), which the API accepts for reads only (see :mod:`tracker.web.auth`);
cancel and resume send the token itself, typed into their confirmation.

The same page answers every dashboard address (``/dashboard``, ``/dashboard/sessions/{id}``,
``/dashboard/workers``), so that a link or a reload opens the view it names. Its one vendored
library, uPlot (MIT, the throughput chart), lies in ``static/vendor/`` with its licence.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Path, Request, Response, status
from pydantic import BaseModel, SecretStr

from tracker.config import TrackerSettings
from tracker.web.auth import COOKIE_NAME, cookie_is_valid, make_cookie_value, token_matches
from tracker.web.settings import WebSettings

#: Files served under ``/dashboard/static/``, with their media types. Nothing else is reachable.
STATIC_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
    "vendor/uplot.min.js": "text/javascript; charset=utf-8",
    "vendor/uplot.min.css": "text/css; charset=utf-8",
    "vendor/uplot.LICENSE": "text/plain; charset=utf-8",
}

#: A session id in a dashboard address (the page itself reads it through the API, which checks it).
SESSION_ID_PATTERN = r"^[0-9a-fA-F-]{32,36}$"

#: Headers of every dashboard file: same-origin scripts only, no framing, no sniffing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class DashboardState(BaseModel):
    """What the page needs to know before it reads anything: whether to ask for the token."""

    token_required: bool
    logged_in: bool


class LoginRequest(BaseModel):
    """The API token, typed by a person into the dashboard."""

    token: SecretStr


def _static(name: str) -> bytes:
    return resources.files("tracker.web").joinpath("static", *name.split("/")).read_bytes()


def _page(request: Request) -> Response:
    # Relative addresses in the page resolve against <base>: the app's root (behind a proxy's
    # prefix too), whichever dashboard address was opened.
    root = request.scope.get("root_path", "").rstrip("/")
    html = _static("index.html").replace(b"__BASE__", f"{root}/".encode())
    return Response(html, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


def create_dashboard_router(settings: TrackerSettings, web_settings: WebSettings) -> APIRouter:
    """The dashboard page at each of its addresses, its static files, its login routes and the favicon.

    Args:
        settings: Tracker settings (the API token).
        web_settings: The cookie lifetime.

    Returns:
        A router with ``/dashboard`` (and its views' addresses), ``/dashboard/static/{name}``,
        ``/dashboard/state``, ``/dashboard/login``, ``/dashboard/logout`` and ``/favicon.ico``.
    """
    router = APIRouter(tags=["dashboard"])
    token = settings.api_token

    @router.get("/dashboard", include_in_schema=False)
    @router.get("/dashboard/workers", include_in_schema=False)
    async def page(request: Request) -> Response:
        """The dashboard page (public: it contains no data)."""
        return _page(request)

    @router.get("/dashboard/sessions/{session_id}", include_in_schema=False)
    async def session_page(request: Request, session_id: Annotated[str, Path(pattern=SESSION_ID_PATTERN)]) -> Response:
        """The page, opening one session (a deep link)."""
        return _page(request)

    @router.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        """The tracker's icon (browsers ask for it on every page of the host)."""
        return Response(_static("favicon.svg"), media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @router.get("/dashboard/state", response_model=DashboardState, include_in_schema=False)
    async def state(request: Request) -> DashboardState:
        """Whether the server wants the token, and whether this browser's login cookie is valid."""
        cookie = request.cookies.get(COOKIE_NAME)
        logged_in = token is not None and cookie is not None and cookie_is_valid(cookie, token)
        return DashboardState(token_required=token is not None, logged_in=logged_in)

    @router.get("/dashboard/static/{name:path}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        """The dashboard's script, style sheet, icon and vendored library (only those listed)."""
        media_type = STATIC_FILES.get(name)
        if media_type is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such file")
        return Response(_static(name), media_type=media_type, headers=SECURITY_HEADERS)

    @router.post(
        "/dashboard/login",
        status_code=status.HTTP_204_NO_CONTENT,
        responses={
            400: {"description": "The body is not JSON."},
            401: {"description": "Wrong token."},
            403: {"description": "The server has no API token."},
        },
        summary="Log the dashboard in",
    )
    async def login(request: Request, body: Annotated[LoginRequest, Body()]) -> Response:
        """Trade the API token for a read-only, expiring, HttpOnly login cookie."""
        if token is None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, detail="the server has no TRACKER_API_TOKEN: nothing to log in to"
            )
        if not token_matches(body.token.get_secret_value(), token):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="wrong token")
        response = Response(status_code=status.HTTP_204_NO_CONTENT)
        response.set_cookie(
            COOKIE_NAME,
            make_cookie_value(token, web_settings.dashboard_cookie_ttl_s),
            max_age=web_settings.dashboard_cookie_ttl_s,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @router.post("/dashboard/logout", status_code=status.HTTP_204_NO_CONTENT, summary="Log the dashboard out")
    async def logout() -> Response:
        """Forget the login cookie."""
        response = Response(status_code=status.HTTP_204_NO_CONTENT)
        response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
        return response

    return router
