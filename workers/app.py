"""The Celery app: ``celery -A workers.app worker -B`` runs nodes and the cleanup schedule."""

from __future__ import annotations

import os

from celery import Celery

from tracker.celery import install

app = Celery("workers", include=["workers.tasks"])
# workers/config.py (shipped with the package); CELERY_CONFIG_MODULE names another module.
app.config_from_object(os.environ.get("CELERY_CONFIG_MODULE", "workers.config"))
install(app)
