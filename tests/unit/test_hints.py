"""The pickup hint's rule: pending for longer than the setting, in whole seconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tracker.hints import pickup_hint
from tracker.states import SessionStatus

CREATED = datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "age_s", "expected"),
    [
        ("pending", 29.9, None),
        ("pending", 30.0, None),  # "more than" the setting
        ("pending", 30.4, 30),
        ("pending", 125.99, 125),  # whole seconds, never rounded up
        ("running", 600.0, None),  # a worker reported: the first node event moved it
        ("cancelled", 600.0, None),
    ],
)
def test_the_hint_shows_only_for_a_session_pending_longer_than_the_setting(
    status: str, age_s: float, expected: int | None
) -> None:
    hint = pickup_hint(status, CREATED, CREATED + timedelta(seconds=age_s), 30.0)
    if expected is None:
        assert hint is None
    else:
        assert hint == (
            f"no worker has picked up any node for {expected} s: is a worker running, "
            "with the tracker installed in its app (tracker.celery.install(app))?"
        )


def test_the_rule_takes_the_enum_too() -> None:
    assert pickup_hint(SessionStatus.PENDING, CREATED, CREATED + timedelta(minutes=2), 60.0) is not None
    assert pickup_hint(SessionStatus.RUNNING, CREATED, CREATED + timedelta(minutes=2), 60.0) is None
