"""The dashboard: one HTML page and its script and style, shipped as package data, no build step.

The page holds no data; it reads the JSON API and the event streams from the browser. With an
API token configured it asks for the token once and trades it for the login cookie
(``POST /dashboard/login``), which the API accepts for reads only (see :mod:`tracker.web.auth`).
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Request, Response, status
from pydantic import BaseModel, SecretStr

from tracker.config import TrackerSettings
from tracker.web.auth import COOKIE_NAME, make_cookie_value, token_matches
from tracker.web.settings import WebSettings

#: Files served under ``/dashboard/static/``, with their media types. Nothing else is reachable.
STATIC_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}

#: Headers of every dashboard file: same-origin scripts only, no framing, no sniffing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class LoginRequest(BaseModel):
    """The API token, typed by a person into the dashboard."""

    token: SecretStr


def _static(name: str) -> bytes:
    return resources.files("tracker.web").joinpath("static", name).read_bytes()


def create_dashboard_router(settings: TrackerSettings, web_settings: WebSettings) -> APIRouter:
    """The dashboard page, its two static files, and the login and logout routes.

    Args:
        settings: Tracker settings (the API token).
        web_settings: The cookie lifetime.

    Returns:
        A router with ``/dashboard``, ``/dashboard/static/{name}``, ``/dashboard/login``, ``/dashboard/logout``.
    """
    router = APIRouter(prefix="/dashboard", tags=["dashboard"])
    token = settings.api_token

    @router.get("", include_in_schema=False)
    async def page() -> Response:
        """The dashboard page (public: it contains no data)."""
        return Response(_static("index.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    @router.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        """The dashboard's script and style sheet."""
        media_type = STATIC_FILES.get(name)
        if media_type is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such file")
        return Response(_static(name), media_type=media_type, headers=SECURITY_HEADERS)

    @router.post(
        "/login",
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

    @router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, summary="Log the dashboard out")
    async def logout() -> Response:
        """Forget the login cookie."""
        response = Response(status_code=status.HTTP_204_NO_CONTENT)
        response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
        return response

    return router
