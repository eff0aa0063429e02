"""How long a session waits after a worker died before its unfinished nodes are presumed lost."""

from __future__ import annotations

from celery import Celery

from tracker import TrackerSettings
from tracker.celery import _redelivery_warning, stalled_after_s


def app_on(broker: str, **options: object) -> Celery:
    app = Celery("stall", broker=broker, set_as_current=False)
    app.conf.broker_transport_options = options
    return app


def test_the_redis_broker_waits_for_its_visibility_timeout_sweep_and_restore_lock() -> None:
    settings = TrackerSettings(worker_stale_after_s=3)
    # kombu's defaults: an hour, 10 x 10 s sweeps, a 300 s lock held by a worker killed mid-sweep
    assert stalled_after_s(app_on("redis://127.0.0.1:1/0"), settings) == 3600 + 100 + 300 + 6
    tuned = app_on(
        "redis://127.0.0.1:1/0",
        visibility_timeout=2,
        unacked_restore_interval=1,
        unacked_restore_throttle=1,
        unacked_mutex_expire=3,
    )
    assert stalled_after_s(tuned, settings) == 2 + 1 + 3 + 6


def test_sqs_waits_for_its_visibility_timeout_and_amqp_for_the_reaper_only() -> None:
    settings = TrackerSettings(worker_stale_after_s=3)
    assert stalled_after_s(app_on("sqs://", visibility_timeout=30), settings) == 30 + 6
    assert stalled_after_s(app_on("amqp://guest@127.0.0.1:1//"), settings) == 6
    assert stalled_after_s(app_on("amqp://"), TrackerSettings(stalled_after_s=42)) == 42


def test_a_worker_is_warned_when_its_broker_redelivers_after_sessions_expire() -> None:
    # Given kombu's defaults on the Redis broker (an hour) and the default session timeout (30 min)
    app = app_on("redis://127.0.0.1:1/0")

    # When its workers start, Then each is told that a session waiting for a dead worker's
    # messages would be removed first
    warning = _redelivery_warning(app, TrackerSettings())
    assert warning is not None
    assert "up to 4060 s" in warning and "TRACKER_SESSION_TIMEOUT_S (1800 s)" in warning
    # and not with a session timeout above that delay, nor on a broker that redelivers at once
    assert _redelivery_warning(app, TrackerSettings(session_timeout_s=4061)) is None
    assert _redelivery_warning(app_on("amqp://guest@127.0.0.1:1//"), TrackerSettings()) is None
