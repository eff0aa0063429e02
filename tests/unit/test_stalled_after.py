"""How long a session waits after a worker died before its unfinished nodes are presumed lost."""

from __future__ import annotations

from celery import Celery

from tracker import TrackerSettings
from tracker.celery import stalled_after_s


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
