"""One error tree. Driver errors are translated into it where they enter."""

from __future__ import annotations

import re
import reprlib
from typing import Any
from urllib.parse import urlsplit, urlunsplit

#: Shows an offending value in a message: bounded in length and in depth, so that a value nested
#: deeper than the recursion limit (a task's result) can be named without recursing through it.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80


class TrackerError(Exception):
    """Base of every error this library raises on purpose.

    Attributes:
        hint: What can be done about it, in one sentence, where the message alone does not say
            (the CLI prints it under the message, the web API ends its ``detail`` with it).
    """

    hint: str | None = None


class SessionNotFoundError(TrackerError, LookupError):
    """No session with this id exists (never created, expired, or removed)."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(f"session {session_id!r} not found (unknown, expired or removed)")


class NodeNotFoundError(TrackerError, LookupError):
    """The session exists but has no record of this node: not a node it was created with, and no
    event of it was recorded yet (a node id from another session, or a typo)."""

    def __init__(self, session_id: str, node_id: str) -> None:
        self.session_id = session_id
        self.node_id = node_id
        super().__init__(f"node {node_id!r} not found in session {session_id!r} (never recorded there)")


class InvalidStateTransitionError(TrackerError):
    """The state machine does not allow this move from the session's current status."""

    def __init__(self, session_id: str, from_status: str, to_status: str, reason: str = "") -> None:
        self.session_id = session_id
        # Plain text, whichever store raised: a SessionStatus's repr would show the enum's name.
        self.from_status = str(from_status)
        self.to_status = str(to_status)
        detail = f": {reason}" if reason else ""
        super().__init__(f"session {session_id!r}: cannot go from {self.from_status!r} to {self.to_status!r}{detail}")


class ResumeNotPossibleError(InvalidStateTransitionError):
    """A resume that could not re-send the session's canvas as Celery would have run it. Nothing changed.

    ``hint`` says what can be done instead.
    """

    def __init__(self, session_id: str, reason: str, hint: str) -> None:
        super().__init__(session_id, "", "running", reason)
        self.hint = hint
        self.args = (f"session {session_id!r} cannot be resumed: {reason}",)


class TrackerNotInstalledError(TrackerError):
    """``dispatch`` through a Celery app the tracker is not installed in: its workers would run the
    tasks and record nothing. Nothing was sent."""

    hint = "from tracker.celery import install; install(app) right after app = Celery(...)"

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        super().__init__(
            f"the tracker is not installed in the Celery app {app_name!r}: call tracker.celery.install(app) "
            "where the app is defined (the workers and the dispatching process both import it)"
        )


class WrongCeleryAppError(TrackerError):
    """Cancel or resume was asked through a Celery app whose broker did not dispatch the session
    (its revokes and tasks would reach none of the session's workers). Nothing changed.

    Attributes:
        app_path: The import path of the app that dispatched the session, when it has one.
    """

    def __init__(self, session_id: str, app_path: str | None, used: str | None, detail: str = "") -> None:
        self.session_id = session_id
        self.app_path = app_path
        dispatched = f"by the Celery app {app_path}" if app_path else "by a Celery app with no import path"
        through = f"; the app here publishes to {used}" if used else ""
        more = f" ({detail})" if detail else ""
        super().__init__(f"session {session_id!r} was dispatched {dispatched}, through another broker{through}{more}")


class TrackerValidationError(TrackerError, ValueError):
    """Input was refused before it touched the store; nothing changed.

    Attributes:
        field: Which argument was wrong.
        value: The offending value (shortened for messages).
    """

    def __init__(self, field: str, value: Any, reason: str, session_id: str | None = None) -> None:
        self.field = field
        self.value = value
        self.session_id = session_id
        shown = _SHORT.repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        # Input is checked before the store is asked anything, so the message does not name the
        # session (it may never have been created); ``session_id`` keeps it for the caller.
        super().__init__(f"invalid {field} {shown}: {reason}")


class NodeLimitError(TrackerValidationError):
    """A result for one node more than the session's ``node_count`` allows."""

    def __init__(self, session_id: str, node_id: str, node_count: int) -> None:
        super().__init__(
            "node_id", node_id, f"the session already has {node_count} distinct nodes (its node_count)", session_id
        )
        # The store refused it, so this session does exist: say so, unlike other validation errors.
        self.args = (
            f"session {session_id!r} already has {node_count} distinct nodes (its node_count): "
            f"node_id {_SHORT.repr(node_id)} would be one more",
        )


class SessionExistsError(TrackerError):
    """A session with this id exists already."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(f"session {session_id!r} exists already")


_QUERY_SECRET = re.compile(r"(?i)([?&]password=)[^&#]*")


def redact_url(url: str) -> str:
    """``url`` with any password (``user:password@`` or ``?password=``) replaced by ``***``, safe to log."""
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            url = urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"))
    except ValueError:
        return "<unparsable URL>"
    return _QUERY_SECRET.sub(r"\1***", url)


class StorageUnavailableError(TrackerError):
    """The store could not be reached after retrying (or answered with a driver error).

    Attributes:
        url: The store's URL with its password masked (the message, logged and shown to API
            clients, never carries a secret).
    """

    def __init__(self, message: str, url: str | None = None) -> None:
        self.url = redact_url(url) if url else url
        super().__init__(f"{message} (store: {self.url})" if self.url else message)
