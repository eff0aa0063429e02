"""Hints the views show next to a session's status: pure rules, no I/O, written once for the CLI and the web.

A session nobody works on looks like a session waiting in a queue: its nodes stay ``pending``.
When that lasts, the likely cause is on the worker's side (no worker, or a worker whose app has
not installed the tracker, so that it runs the tasks and records nothing), and saying so saves
the user a search.
"""

from __future__ import annotations

from datetime import datetime

from tracker.states import SessionStatus

#: What :func:`pickup_hint` says, ``{seconds}`` being the session's age in whole seconds.
PICKUP_HINT = (
    "no worker has picked up any node for {seconds} s: is a worker running, "
    "with the tracker installed in its app (tracker.celery.install(app))?"
)


def pickup_hint(status: str, created_at: datetime, now: datetime, after_s: float) -> str | None:
    """The hint for a session no worker has reported on yet, or None.

    A session stays ``pending`` until the first node event of any worker moves it to ``running``,
    so ``pending`` for longer than ``after_s`` means that no worker has recorded anything for it.

    Args:
        status: The session's status (its value, as in the status dict).
        created_at: When the session was created (aware).
        now: The current time (aware), from the manager's clock.
        after_s: How long a session may stay pending before the hint shows, in seconds
            (``TRACKER_PICKUP_HINT_AFTER_S``).

    Returns:
        The hint text, or None when the session is not pending or is younger than ``after_s``.
    """
    if status != SessionStatus.PENDING:
        return None
    age_s = (now - created_at).total_seconds()
    if age_s <= after_s:
        return None
    return PICKUP_HINT.format(seconds=int(age_s))
