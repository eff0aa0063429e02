"""Which Celery app dispatched a session, so that cancel and resume reach the same workers.

A revoke or a re-sent task published through another broker reaches no worker of the session:
Celery reports success all the same. So :func:`tracker.celery.dispatch` records, in the session's
metadata (:data:`ORIGIN_KEY`), the dispatching app's import path when it has one and a fingerprint
of its broker URL (without credentials). Cancel and resume then go through an app whose broker has
that fingerprint, or refuse with :class:`tracker.errors.WrongCeleryAppError` before changing anything.
"""

from __future__ import annotations

import hashlib
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from celery import Celery
from celery import current_app as default_app
from celery.app.utils import find_app

from tracker.errors import WrongCeleryAppError

#: The metadata key of what dispatch records: ``{"app": "module:attr" | None, "broker": fingerprint}``.
ORIGIN_KEY = "dispatched_by"

#: Host names that all mean this machine: the same broker whichever a configuration spells.
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})

#: Packages that hold apps they did not define (Celery's default app, its current one).
_NOT_THE_PROJECT = frozenset({"celery", "kombu"})

_import_paths: weakref.WeakKeyDictionary[Celery, str | None] = weakref.WeakKeyDictionary()


def real_app(app: Any) -> Celery:
    """``app`` itself when it is Celery's ``current_app`` proxy (the object is what gets recorded)."""
    get = getattr(app, "_get_current_object", None)
    return get() if get is not None else app


def broker_location(app: Celery) -> str:
    """Where ``app`` publishes tasks: its broker URL without credentials (``amqp://host:5672/vhost``)."""
    connection = app.connection_for_write()  # not connected: only its URL is read
    try:
        transport = connection.get_transport_cls()
        kind = getattr(transport, "driver_type", None) or connection.transport_cls  # amqp:// and pyamqp:// alike
        host = connection.hostname or "localhost"
        port = connection.port or getattr(transport, "default_port", None) or ""
        vhost = connection.virtual_host or ""
    finally:
        connection.release()
    if host in _LOOPBACK:
        host = "localhost"
    return f"{kind}://{host}{':' if port else ''}{port}/{str(vhost).lstrip('/')}"


def broker_fingerprint(app: Celery) -> str:
    """A short hash of :func:`broker_location` (what a session records: no host names in its metadata)."""
    return hashlib.sha256(broker_location(app).encode()).hexdigest()[:16]


def import_path(app: Celery) -> str | None:
    """``module:attr`` another process can import ``app`` by, None when it has none (an app made in
    ``__main__`` or inside a function). Looked up once per app among the imported modules (not
    Celery's own, nor private ones), the module named like the app (``Celery("proj")``) first."""
    try:
        return _import_paths[app]
    except KeyError:
        pass
    path = None
    modules = [(app.main, sys.modules.get(app.main or ""))] if app.main else []
    modules += list(sys.modules.items())
    for name, module in modules:
        if not name or name == "__main__" or name.split(".")[0] in _NOT_THE_PROJECT or "._" in f".{name}":
            continue
        for attr, value in list(getattr(module, "__dict__", {}).items()):
            if value is app and not attr.startswith("_"):
                path = f"{name}:{attr}"
                break
        if path is not None:
            break
    _import_paths[app] = path
    return path


def origin(app: Celery) -> dict[str, Any]:
    """What a session records of the app that dispatches it."""
    return {"app": import_path(app), "broker": broker_fingerprint(app)}


def dispatching_app(
    session_id: str,
    metadata: Mapping[str, Any],
    app: Celery | None,
    fallback: Callable[[], Celery | None] | None = None,
) -> Celery:
    """The app to cancel or resume a session with: ``app`` when given, else the one that dispatched
    it (imported by its recorded path), else ``fallback()`` (default: Celery's current app); always
    one whose broker is the session's.

    A session without a record (created by hand, or before this was recorded) takes ``app`` or the
    default as it is.

    Raises:
        WrongCeleryAppError: the app given, or every app found, publishes to another broker.
    """
    recorded = metadata.get(ORIGIN_KEY)
    if not isinstance(recorded, Mapping) or not isinstance(recorded.get("broker"), str):
        return app or (fallback() if fallback is not None else None) or default_app
    path = recorded.get("app") if isinstance(recorded.get("app"), str) else None
    broker = recorded["broker"]
    if app is not None:
        if broker_fingerprint(app) == broker:
            return app
        raise WrongCeleryAppError(session_id, path, broker_location(app))
    tried: list[str] = []
    if path is not None:
        try:
            found = find_app(path)
        except Exception as exc:  # any import-time failure of the user's module
            tried.append(f"{path} cannot be imported here ({type(exc).__name__}: {exc})")
        else:
            if isinstance(found, Celery) and broker_fingerprint(found) == broker:
                return found
            tried.append(f"{path} now publishes to {broker_location(found)}" if isinstance(found, Celery) else "")
    other = fallback() if fallback is not None else real_app(default_app)
    if other is not None and broker_fingerprint(other) == broker:
        return other
    raise WrongCeleryAppError(
        session_id, path, broker_location(other) if other is not None else None, "; ".join(t for t in tried if t)
    )
