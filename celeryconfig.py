"""Celery settings of ``workers.app``, for ``celery --config celeryconfig`` users: see workers/config.py.

The settings live in the installed ``workers`` package, so a worker started outside this
directory (or from the wheel) gets them too.
"""

from workers.config import *  # noqa: F403
