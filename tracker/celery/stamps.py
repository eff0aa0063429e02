"""Where a task's session and node ids travel: two Celery stamps.

Only this module knows the stamp names, so dispatch and the signal handlers cannot disagree.
"""

from __future__ import annotations

from typing import Any

#: Stamp carrying the session id.
SESSION_STAMP = "tracker_session_id"
#: Stamp carrying the node id.
NODE_STAMP = "tracker_node_id"


def _one(value: Any) -> str | None:
    if type(value) is str:
        return value
    # With append_stamps a stamp may arrive as a list; the last one is the latest.
    if isinstance(value, list | tuple):
        value = value[-1] if value else None
    return value if isinstance(value, str) else None


def ids_of(request: Any) -> tuple[str, str] | None:
    """``(session_id, node_id)`` of a task request or revoke Context, or None for untracked tasks.

    Works for ``task.request`` (pool child) and the ``Context`` that ``task_revoked`` receives
    (main process); both expose ``.stamps``. Falls back to plain headers.
    """
    if request is None:
        return None
    stamps = getattr(request, "stamps", None) or {}
    sid, nid = _one(stamps.get(SESSION_STAMP)), _one(stamps.get(NODE_STAMP))
    if sid is None or nid is None:
        getter = getattr(request, "get", None)
        if getter is None:
            return None
        sid, nid = _one(getter(SESSION_STAMP)), _one(getter(NODE_STAMP))
        if sid is None or nid is None:
            headers = getattr(request, "headers", None) or {}
            sid, nid = _one(headers.get(SESSION_STAMP)), _one(headers.get(NODE_STAMP))
    if sid is None or nid is None:
        return None
    return sid, nid


def ids_of_headers(headers: Any) -> tuple[str, str] | None:
    """``(session_id, node_id)`` of a raw task message's headers (protocol 2 keeps the stamps
    under ``stamps``), for a message the worker refused before it became a request."""
    if not isinstance(headers, dict):
        return None
    nested = headers.get("stamps")
    stamps: dict[str, Any] = nested if isinstance(nested, dict) else headers
    sid, nid = _one(stamps.get(SESSION_STAMP)), _one(stamps.get(NODE_STAMP))
    return None if sid is None or nid is None else (sid, nid)
