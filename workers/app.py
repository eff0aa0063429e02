"""The Celery app: ``celery -A workers.app worker -B`` runs nodes and the cleanup schedule."""

from __future__ import annotations

from celery import Celery

from tracker.celery import install

app = Celery("workers", include=["workers.tasks"])
app.config_from_object("celeryconfig")
install(app)
