"""Settings carry their unit in their name; the old names still work, with a deprecation warning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from tracker import TrackerSettings
from tracker.config import RENAMED


def test_every_duration_names_its_unit() -> None:
    durations = [
        name for name, field in TrackerSettings.model_fields.items() if field.annotation in (float, float | None)
    ]
    assert durations and all(name.endswith("_s") for name in durations), durations


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED.items()))
def test_an_old_keyword_is_taken_with_a_warning(old: str, new: str) -> None:
    with pytest.warns(FutureWarning, match=f"{old}= is deprecated: use {new}") as caught:
        settings = TrackerSettings(**{old: 7})
    assert getattr(settings, new) == 7
    assert [w.filename for w in caught] == [__file__]  # the line that made the settings, not pydantic's


def test_an_old_environment_variable_is_taken_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKER_WORKER_STALE_AFTER", "12")
    with pytest.warns(FutureWarning, match="TRACKER_WORKER_STALE_AFTER is deprecated: use worker_stale_after_s"):
        assert TrackerSettings().worker_stale_after_s == 12


def test_the_new_name_wins_over_the_old(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKER_SESSION_TIMEOUT", "12")
    monkeypatch.setenv("TRACKER_SESSION_TIMEOUT_S", "34")
    with pytest.warns(FutureWarning, match="TRACKER_SESSION_TIMEOUT is deprecated"):
        assert TrackerSettings().session_timeout_s == 34


def test_the_new_names_make_no_warning(monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder) -> None:
    monkeypatch.setenv("TRACKER_FLUSH_INTERVAL_S", "0.5")
    assert TrackerSettings(heartbeat_interval_s=2).flush_interval_s == 0.5
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_an_old_environment_variable_is_shown_under_python_s_default_warning_filters() -> None:
    # A DeprecationWarning raised outside __main__ is hidden by default: the person who set the
    # variable would never see it.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    env["TRACKER_FLUSH_INTERVAL"] = "0.7"
    script = "from tracker import SessionManager; print(SessionManager().settings.flush_interval_s)"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "0.7"
    assert "FutureWarning: TRACKER_FLUSH_INTERVAL is deprecated: use flush_interval_s" in done.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [("session_timeout_s", "inf"), ("finished_ttl_s", "1e300"), ("redis_socket_timeout_s", "nan"),
     ("worker_stale_after_s", "-inf"), ("events_maxlen", str(10**20))],
)  # fmt: skip
def test_a_duration_or_size_the_store_cannot_use_is_refused_at_once(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    # (infinite or absurd values overflowed the TTLs and dates they became, at the first write)
    monkeypatch.setenv(f"TRACKER_{name.upper()}", value)
    with pytest.raises(ValidationError, match=name):
        TrackerSettings()
