"""Scenario 6, clock and expiry: cleanup never removes a session active within the timeout.

A session expires when ``now - updated_at > session_timeout_s``. Two things delete sessions: the
cleanup (beat, or the asyncio scheduler) and, in Redis, the keys' own TTL. The first test runs
cleanup over and over while threads keep writing, on a shared fake clock, and checks every
deletion against the writes that succeeded before it. The second checks that Redis's TTL never
cuts a session shorter than the configured timeout (a fractional timeout included).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
import redis

from tests.conftest import FakeClock
from tests.reliability.conftest import StartRedis
from tracker import SessionManager, SessionNotFoundError, TrackerSettings
from tracker.storage.base import SessionStorageAdapter
from tracker.storage.keys import KeySpace
from tracker.storage.redis import RedisStorageAdapter

#: Long in real time (Redis's own TTL must not step in), short on the fake clock the test moves.
TIMEOUT_S = 600.0
SESSIONS = 60
#: Fake seconds the clock moves between two cleanups.
STEP_S = 30.0
STEPS = 80
WRITERS = 3


@dataclass
class Log:
    """What the writers and the cleaner saw, for checking afterwards."""

    #: session id -> updated_at of each write that succeeded.
    writes: dict[str, list[datetime]] = field(default_factory=dict)
    #: (clock value during the cleanup, sessions that cleanup removed).
    cleanups: list[tuple[datetime, set[str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Writes that succeeded so far (the cleaner paces itself on it).
    count: int = 0


@pytest.mark.timeout(300)
def test_cleanup_under_concurrent_writes_only_removes_sessions_idle_past_the_timeout(
    store: SessionStorageAdapter,
) -> None:
    # Given 60 sessions on a fake clock, each written until a random moment of its own (some to the end)
    clock = FakeClock()
    manager = SessionManager(storage=store, settings=TrackerSettings(session_timeout_s=TIMEOUT_S), clock=clock)
    start = clock.now
    rng = random.Random(8)
    last_write_at = {
        manager.sync.create_session("expiry.canvas", 10**6): start + timedelta(seconds=rng.uniform(0, STEPS * STEP_S))
        for _ in range(SESSIONS)
    }
    log = Log(writes={sid: [start] for sid in last_write_at})
    stop = threading.Event()
    # Cleared while the test lists which sessions exist (writes do not change that): 120 reads a
    # step would otherwise each wait for the writer threads to let go of the GIL.
    writing = threading.Event()
    writing.set()

    def existing() -> set[str]:
        """The sessions that exist now, listed while the writers wait."""
        writing.clear()
        try:
            return {sid for sid in last_write_at if store.get(sid) is not None}
        finally:
            writing.set()

    def write(seed: int) -> None:
        pick = random.Random(seed)
        n = 0
        while not stop.is_set():
            writing.wait()
            now = clock.now
            live = [sid for sid, until in last_write_at.items() if until >= now]
            if not live:
                return
            sid = pick.choice(live)
            n += 1
            try:
                outcome = manager.sync._record_node(sid, f"w{seed}-{n}", "running", attempt=1)
            except SessionNotFoundError:
                continue  # removed before this write: it must then have been idle (checked below)
            with log.lock:
                log.writes[sid].append(outcome.session.updated_at)
                log.count += 1

    # When cleanup runs every 30 fake seconds for 40 fake minutes while 3 threads keep writing
    writers = [threading.Thread(target=write, args=(seed,)) for seed in range(WRITERS)]
    for thread in writers:
        thread.start()
    try:
        for _ in range(STEPS):
            clock.advance(STEP_S)
            before = existing()
            manager.sync.cleanup_expired_sessions()  # while the writers write
            after = existing()
            log.cleanups.append((clock.now, before - after))
            # Let the writers make progress between two cleanups (both stores, however fast)
            wanted, deadline = log.count + 2 * WRITERS, time.monotonic() + 10
            while log.count < wanted and any(t.is_alive() for t in writers) and time.monotonic() < deadline:
                time.sleep(0.002)
    finally:
        stop.set()
        writing.set()
        for thread in writers:
            thread.join()

    # Then no cleanup removed a session that had a successful write within the timeout before it
    removed = 0
    for cleaned_at, gone in log.cleanups:
        cutoff = cleaned_at - timedelta(seconds=TIMEOUT_S)
        for sid in gone:
            removed += 1
            assert max(log.writes[sid]) < cutoff, f"{sid} was active at {max(log.writes[sid])}, cutoff {cutoff}"
    # and once the writers are done, cleanup removes exactly the sessions idle past the timeout
    clock.advance(STEP_S)
    cutoff = clock.now - timedelta(seconds=TIMEOUT_S)
    manager.sync.cleanup_expired_sessions()
    for sid, writes in log.writes.items():
        assert (store.get(sid) is not None) == (max(writes) >= cutoff), sid
    assert removed > 10, "some sessions must have expired during the run"
    assert any(len(w) > 20 for w in log.writes.values()), "some sessions must have been written all along"
    total = sum(len(w) - 1 for w in log.writes.values())
    print(f"\nexpiry: {len(log.cleanups)} cleanups during {total} writes; {removed} sessions removed, none early")


@pytest.mark.parametrize("timeout_s", [2.4, 3.0, 1800.4])
def test_redis_ttls_never_end_a_session_before_its_timeout(
    start_redis: StartRedis, key_prefix: str, timeout_s: float
) -> None:
    # Given a store whose session timeout is not a whole number of seconds
    server = start_redis()
    settings = TrackerSettings(redis_url=server.url, key_prefix=key_prefix, session_timeout_s=timeout_s)
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    client = redis.Redis(port=server.port)

    # When a session is written
    sid = manager.sync.create_session("ttl.canvas", 2)
    manager.sync.add_node_result(sid, "a", 1)

    # Then none of its keys can vanish before the timeout has passed
    keys = KeySpace(key_prefix).session(sid)
    for key in (keys.session, keys.nodes, keys.events):
        ttl_ms = client.pttl(key)
        assert ttl_ms >= timeout_s * 1000 - 100, f"{key}: {ttl_ms} ms of life for a {timeout_s} s timeout"
    client.close()
    manager.storage.close()
