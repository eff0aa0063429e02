"""A ready Celery app wired to tracker: ``celery -A workers.app worker`` and ``celery -A workers.app beat``."""
