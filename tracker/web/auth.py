"""Who may call the API.

The model, in three rules:

* No ``TRACKER_API_TOKEN``: reads are open to anyone who can reach the server, and every mutating
  route answers **403** (there is no way to authorise it).
* With a token: every API route needs ``Authorization: Bearer <token>`` (compared in constant
  time), else **401**. Read routes (``GET``) also accept the dashboard's login cookie, because a
  browser ``EventSource`` cannot send a header and the token must never travel in a URL.
* The login cookie is not the token: it is ``<expiry>.<HMAC-SHA256(token, expiry)>``, HttpOnly,
  ``SameSite=Strict``, ``Secure`` over HTTPS. It expires by itself, dies when the token is
  rotated, and is never accepted by a mutating route (so a forged cross-site request cannot
  cancel anything).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

#: Name of the dashboard's login cookie.
COOKIE_NAME = "tracker_dashboard"

#: The OpenAPI security scheme; it reads the header and never answers by itself.
bearer_scheme = HTTPBearer(auto_error=False, description="`TRACKER_API_TOKEN`, when the server has one.")

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]

_COOKIE_CONTEXT = b"tracker-dashboard-cookie:v1:"


def token_matches(given: str, token: SecretStr) -> bool:
    """Constant-time comparison of a presented token with the configured one."""
    # surrogatepass: a lone surrogate in what was presented is a mismatch, not an error.
    return secrets.compare_digest(given.encode("utf-8", "surrogatepass"), token.get_secret_value().encode())


def _cookie_mac(token: SecretStr, expires_s: int) -> str:
    message = _COOKIE_CONTEXT + str(expires_s).encode()
    return hmac.new(token.get_secret_value().encode(), message, hashlib.sha256).hexdigest()


def make_cookie_value(token: SecretStr, ttl_s: int, now_s: float | None = None) -> str:
    """A login cookie value valid for ``ttl_s`` seconds from ``now_s`` (default: now)."""
    expires_s = int(now_s if now_s is not None else time.time()) + ttl_s
    return f"{expires_s}.{_cookie_mac(token, expires_s)}"


def cookie_is_valid(value: str, token: SecretStr, now_s: float | None = None) -> bool:
    """True when ``value`` was made by :func:`make_cookie_value` with this token and has not expired."""
    expires_text, _, mac = value.partition(".")
    if not expires_text.isdigit() or len(expires_text) > 12 or len(mac) != 64:
        return False
    expires_s = int(expires_text)
    if expires_s <= (now_s if now_s is not None else time.time()):
        return False
    return secrets.compare_digest(mac.encode(), _cookie_mac(token, expires_s).encode())


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=message, headers={"WWW-Authenticate": "Bearer"})


def _bearer_ok(credentials: HTTPAuthorizationCredentials | None, token: SecretStr) -> bool:
    return credentials is not None and token_matches(credentials.credentials, token)


def read_access(token: SecretStr | None) -> Callable[..., Awaitable[None]]:
    """A dependency guarding read routes: the bearer token or the dashboard cookie, when a token is set."""

    async def require_read(request: Request, credentials: Credentials) -> None:
        if token is None or _bearer_ok(credentials, token):
            return
        cookie = request.cookies.get(COOKIE_NAME)
        if cookie is not None and cookie_is_valid(cookie, token):
            return
        raise _unauthorized("missing or invalid credentials: send 'Authorization: Bearer <TRACKER_API_TOKEN>'")

    return require_read


def write_access(token: SecretStr | None) -> Callable[..., Awaitable[None]]:
    """A dependency guarding mutating routes: the bearer token only; 403 when no token is configured."""

    async def require_write(credentials: Credentials) -> None:
        if token is None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail="mutating routes are disabled: the server has no TRACKER_API_TOKEN",
            )
        if not _bearer_ok(credentials, token):
            raise _unauthorized("this route needs 'Authorization: Bearer <TRACKER_API_TOKEN>' (cookies are read-only)")

    return require_write
