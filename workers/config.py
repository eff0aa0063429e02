"""Celery settings of ``workers.app`` (``celery -A workers.app worker``), read from the environment.

CELERY_BROKER_URL / CELERY_RESULT_BACKEND default to TRACKER_REDIS_URL, then to a local Redis.
"""

import os

_redis = os.environ.get("TRACKER_REDIS_URL", "redis://127.0.0.1:6379/0")

broker_url = os.environ.get("CELERY_BROKER_URL", _redis)
result_backend = os.environ.get("CELERY_RESULT_BACKEND", _redis)

# JSON only: no pickle anywhere (CVE-2021-23727 came through stored exception type names).
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
event_serializer = "json"

# A node is acknowledged after it ran, so a worker that dies mid-task hands it to another one.
# The tracker counts the redelivered run exactly once.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
broker_transport_options = {"visibility_timeout": int(os.environ.get("CELERY_VISIBILITY_TIMEOUT", "3600"))}
result_expires = 3600

# tracker.celery.install() adds its cleanup entry (every 60 s) to this schedule.
beat_schedule: dict[str, dict[str, object]] = {}
timezone = "UTC"
