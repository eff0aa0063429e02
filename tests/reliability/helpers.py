"""Shared pieces of the reliability scenarios: waiting with deadlines, worker subprocesses, state dumps."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from tests.workers import CeleryWorker
from tracker import NodeResult, SessionManager, SessionNotFoundError
from tracker.celery import maintain
from tracker.celery.handlers import Recorder

TERMINAL = {"completed", "failed", "partial_failure", "cancelled"}


def wait_for(predicate: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 50 ms until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def all_nodes(manager: SessionManager, sid: str) -> dict[str, NodeResult]:
    """Every node of a session, by id (all pages)."""
    nodes: dict[str, NodeResult] = {}
    cursor: str | None = None
    while True:
        page = manager.sync.get_nodes(sid, cursor=cursor, limit=1000)
        nodes.update({node.node_id: node for node in page.nodes})
        cursor = page.next_cursor
        if cursor is None:
            return nodes


def public_state(manager: SessionManager) -> dict[str, Any]:
    """Everything a caller can read, through the public API: each session, its nodes and its events.

    Two dumps compare equal exactly when no call changed anything a reader could see.
    """
    state: dict[str, Any] = {}
    cursor: str | None = None
    while True:
        page = manager.sync.list_sessions(cursor=cursor, limit=1000)
        for info in page.sessions:
            sid = info.session_id
            try:
                nodes = {nid: node.to_dict() for nid, node in all_nodes(manager, sid).items()}
                events = [event.to_dict() for event in manager.sync.read_events(sid, limit=1000)]
            except SessionNotFoundError:
                continue
            state[sid] = {"info": info.to_dict(), "nodes": nodes, "events": events}
        cursor = page.next_cursor
        if cursor is None:
            return state


def text(value: bytes | str) -> str:
    """A Redis reply as text (the clients here do not decode replies)."""
    return value.decode() if isinstance(value, bytes) else value


def redis_dump(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """Every key under ``prefix`` with its type and value (TTLs left out: they tick)."""
    dump: dict[str, Any] = {}
    for key in sorted(client.scan_iter(match=f"{prefix}:*", count=1000)):
        kind = text(client.type(key))
        value: Any
        if kind == "hash":
            value = client.hgetall(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(client.smembers(key))
        elif kind == "stream":
            value = client.xrange(key)
        else:
            value = client.dump(key)
        dump[text(key)] = (kind, value)
    return dump


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the last ``CONFIG RESETSTAT`` (``INFO commandstats``)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


class Reaper(threading.Thread):
    """``maintain(app, manager)`` every ``every_s`` seconds until stopped (beat's job, sped up); its
    errors (a store outage) are kept and it goes on."""

    def __init__(self, recorder: Recorder, every_s: float) -> None:
        super().__init__(name="test-reaper", daemon=True)
        self.recorder = recorder
        self.every_s = every_s
        self.halt = threading.Event()
        self.lost = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.lost += maintain(self.recorder.app, self.recorder.manager)["lost"]
            except Exception as exc:
                self.errors.append(repr(exc))
            self.halt.wait(self.every_s)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)


class Worker(CeleryWorker):
    """``celery -A tests.reliability.appmod worker`` (prefork) on the queue named in its env."""

    def __init__(self, env: dict[str, str], log_path: Path, concurrency: int = 2) -> None:
        super().__init__("tests.reliability.appmod", env["TRACKER_REL_QUEUE"], env, log_path, concurrency,
                         name=f"rel{uuid.uuid4().hex[:6]}@%h")  # fmt: skip
