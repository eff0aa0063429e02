"""Item 6: cleanup cost follows the expired sessions, not the live ones.

Two private redis-servers: one holds 200 000 live sessions, the other 20 000; each then gets the
same 10 000 expired sessions (last updated twice the session timeout ago), and
``cleanup_expired_sessions()`` is timed on both, alternately, a few times (the expired sessions
are made anew before each). A ratio near 1 says the cost is O(expired): the index is read from its
old end only, never scanned whole. The commands each server ran for it (``INFO commandstats``,
scripts' own commands included) are counted too: the same count on both is O(expired) exactly,
whatever the bigger keyspace costs per key in the server's memory.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

from benchmarks._redis import RedisServer, redis_server
from benchmarks._store import send_pipelined, sessions
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
        before = self.server.command_calls()
        start = time.perf_counter()
        removed = self.manager.sync.cleanup_expired_sessions()
        elapsed = time.perf_counter() - start
        after = self.server.command_calls()
        if removed != expected:
            raise RuntimeError(f"cleanup removed {removed}, expected {expected}")
        housekeeping = ("info", "hello", "client|")  # the two command_calls() connections
        ran = {name: calls - before.get(name, 0) for name, calls in after.items()}
        commands = sum(calls for name, calls in ran.items() if not name.startswith(housekeeping))
        return elapsed, commands


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
    ]
    section.details = {
        "expired": expired,
        "live": {"many": many, "few": few},
        "cleanup_s": {"many": big_s, "few": small_s},
        "commands": commands,
        "setup_s": setup_s,
        "left_after": left,
    }
    return section
