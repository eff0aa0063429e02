"""This process's id, for the handlers and the writer to tell a forked child from its parent.

Asked once, and again in a forked child: ``os.getpid`` is a system call, and the handlers would ask
it several times per task. Read it as ``process.pid`` (an imported copy would keep the parent's).
"""

from __future__ import annotations

import os

pid = os.getpid()


def _after_fork() -> None:
    global pid
    pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)
