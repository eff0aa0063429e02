"""Item 6: cleanup cost follows the expired sessions, not the live ones.

Two private redis-servers: one holds 200 000 live sessions, the other 20 000; each then gets the
same 10 000 expired sessions (last updated twice the session timeout ago), and
``cleanup_expired_sessions()`` is timed on both, alternately, a few times (the expired sessions
are made anew before each). A ratio near 1 says the cost is O(expired): the index is read from its
old end only, never scanned whole. The commands each server ran for it (``INFO commandstats``,
scripts' own commands included) are counted too: the same count on both is O(expired) exactly,
whatever the bigger keyspace costs per key in the server's memory.

Ended sessions are kept ``TRACKER_FINISHED_TTL_S`` (a day), far longer than the timeout of those
that have not ended: a third server holds sessions that ended twice the timeout ago, and the
commands of two cleanup passes are counted. The first pass re-checks each once (and moves it on,
in the cleanup index, to its own expiry); the next one reads none of them.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

from benchmarks._redis import RedisServer, redis_server
from benchmarks._store import node_results, send_pipelined, sessions
from benchmarks.report import Row, Section, Target, median
from tracker import SessionManager, TrackerSettings
from tracker.storage.redis import RedisStorageAdapter


class Scenario:
    def __init__(self, server: RedisServer, live: int) -> None:
        self.server = server
        self.settings = TrackerSettings(redis_url=server.url)
        self.store = RedisStorageAdapter.from_url(server.url, self.settings)
        self.manager = SessionManager(storage=self.store, settings=self.settings)
        self.live = live
        made = send_pipelined(self.store, sessions(self.store, (str(uuid.uuid4()) for _ in range(live)), _now()))
        if made != live:
            raise RuntimeError(f"{made} of {live} live sessions created")

    def expire(self, count: int) -> None:
        old = _now() - timedelta(seconds=2 * self.settings.session_timeout_s)
        made = send_pipelined(self.store, sessions(self.store, (str(uuid.uuid4()) for _ in range(count)), old))
        if made != count:
            raise RuntimeError(f"{made} of {count} expired sessions created")

    def cleanup_s(self, expected: int) -> tuple[float, int]:
        """Seconds to remove ``expected`` expired sessions, and the commands the server ran for it."""
        return timed_cleanup(self.server, self.manager, expected)


def timed_cleanup(server: RedisServer, manager: SessionManager, expected: int) -> tuple[float, int]:
    """Seconds a cleanup pass took to remove ``expected`` sessions, and the commands the server ran for it."""
    before = server.command_calls()
    start = time.perf_counter()
    removed = manager.sync.cleanup_expired_sessions()
    elapsed = time.perf_counter() - start
    after = server.command_calls()
    if removed != expected:
        raise RuntimeError(f"cleanup removed {removed}, expected {expected}")
    housekeeping = ("info", "hello", "client|")  # the two command_calls() connections
    ran = {name: calls - before.get(name, 0) for name, calls in after.items()}
    return elapsed, sum(calls for name, calls in ran.items() if not name.startswith(housekeeping))


def kept_passes(count: int) -> tuple[int, int]:
    """The commands of two cleanup passes over ``count`` sessions that ended twice the session
    timeout ago (kept: within the finished TTL)."""
    with redis_server() as server:
        settings = TrackerSettings(redis_url=server.url)
        store = RedisStorageAdapter.from_url(server.url, settings)
        ended_at = _now() - timedelta(seconds=2 * settings.session_timeout_s)
        ids = [str(uuid.uuid4()) for _ in range(count)]
        if send_pipelined(store, sessions(store, ids, ended_at)) != count:
            raise RuntimeError(f"not all of {count} sessions created")
        then = SessionManager(storage=store, settings=settings, clock=lambda: ended_at)
        results = (script for sid in ids for script in node_results(then, store, sid, ["node-0"], 1))
        if send_pipelined(store, results) != count:
            raise RuntimeError(f"not all of {count} sessions ended")
        manager = SessionManager(storage=store, settings=settings)
        _, first = timed_cleanup(server, manager, 0)
        _, later = timed_cleanup(server, manager, 0)
        store.close()
    return first, later


def _now() -> datetime:
    return datetime.now(UTC)


def run(quick: bool) -> Section:
    expired = 1_000 if quick else 10_000
    many, few = (20_000, 2_000) if quick else (200_000, 20_000)
    reps = 2 if quick else 6
    section = Section("6", "Cleanup of expired sessions")
    with redis_server() as big_server, redis_server() as small_server:
        setup_start = time.perf_counter()
        big, small = Scenario(big_server, many), Scenario(small_server, few)
        setup_s = time.perf_counter() - setup_start
        big_s: list[float] = []
        small_s: list[float] = []
        commands: dict[str, list[int]] = {"many": [], "few": []}
        for rep in range(reps):
            for scenario, times, name in (
                ((big, big_s, "many"), (small, small_s, "few"))
                if rep % 2 == 0
                else ((small, small_s, "few"), (big, big_s, "many"))
            ):
                scenario.expire(expired)
                seconds, ran = scenario.cleanup_s(expired)
                times.append(seconds)
                commands[name].append(ran)
        left = {
            "big": big.manager.sync.cleanup_expired_sessions(),
            "small": small.manager.sync.cleanup_expired_sessions(),
        }
        big.store.close()
        small.store.close()
    kept = few
    first_pass, later_pass = kept_passes(kept)

    per_expired = {name: median([float(c) for c in counts]) / expired for name, counts in commands.items()}
    section.rows += [
        Row(
            f"remove {expired:,} expired among {many:,} live vs among {few:,}",
            "s",
            median(big_s),
            median(small_s),
            median(big_s) / median(small_s),
            baseline_name=f"{few:,} live",
            target=Target("ratio", "<=", 1.25),
            note="≈ 1 means O(expired)",
        ),
        Row(
            "Redis commands run per expired session, same two servers",
            "commands",
            per_expired["many"],
            per_expired["few"],
            per_expired["many"] / per_expired["few"],
            baseline_name=f"{few:,} live",
            target=Target("ratio", "<=", 1.0),
            note="INFO commandstats delta, scripts' own commands included",
        ),
        Row(
            f"Redis commands of a cleanup pass among {kept:,} ended sessions kept a day: the next pass vs the first",
            "commands",
            float(later_pass),
            float(first_pass),
            later_pass / first_pass,
            baseline_name="first pass",
            target=Target("ours", "<=", 2),
            note="each kept session is re-checked once, when the timeout of running ones passes",
        ),
    ]
    section.details = {
        "expired": expired,
        "live": {"many": many, "few": few},
        "cleanup_s": {"many": big_s, "few": small_s},
        "commands": commands,
        "setup_s": setup_s,
        "left_after": left,
        "kept": {"sessions": kept, "first_pass_commands": first_pass, "later_pass_commands": later_pass},
    }
    return section
