"""Celery workers in subprocesses (prefork) for tests: started, killed with SIGKILL, stopped.

Their output goes to a file, never to an unread pipe (a full pipe would block a chatty worker).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CeleryWorker:
    """``celery -A <app_module> worker --pool prefork`` consuming ``queue``.

    Args:
        app_module: The module holding the Celery app (``tests.celery.appmod``).
        queue: The queue to consume.
        env: The worker's environment.
        log_path: Where its output goes.
        concurrency: Pool processes.
        extra: More ``celery worker`` arguments.
    """

    app_module: str
    queue: str
    env: dict[str, str]
    log_path: Path
    concurrency: int = 2
    extra: tuple[str, ...] = ()
    name: str = field(default_factory=lambda: f"w{uuid.uuid4().hex[:6]}@%h")
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [sys.executable, "-m", "celery", "-A", self.app_module, "worker", "--pool", "prefork",
                "--concurrency", str(self.concurrency), "--loglevel", "INFO", "--without-gossip",
                "--without-mingle", "--without-heartbeat", "-Q", self.queue, "--hostname", self.name,
                *self.extra]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    @property
    def output(self) -> str:
        """Everything the worker logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until the worker consumes (its ``ready`` line is logged)."""
        deadline = time.monotonic() + timeout_s
        while " ready." not in self.output:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.output[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready after {timeout_s} s:\n{self.output[-3000:]}")
            time.sleep(0.05)

    def children(self) -> list[int]:
        """Pids of the pool processes."""
        if self.proc is None:
            return []
        found = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        return [int(pid) for pid in found]

    def kill(self) -> None:
        """SIGKILL the main process and its pool children at once: nothing acks, nothing reports."""
        if self.proc is None:
            return
        children = self.children()
        self.proc.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Warm shutdown; SIGKILL if it takes more than 20 s."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None
