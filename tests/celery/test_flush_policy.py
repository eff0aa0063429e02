"""The writer's timing rules, on plain numbers: no thread, no clock, no store.

Times and intervals are sums of halves and quarters (exact in binary floating point), so every
outcome is asserted exactly.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from tracker.celery.flush_policy import (
    FIRST_BEAT,
    IDLE,
    RETRY_BACKOFF_S,
    STORE_DOWN_HOLD_S,
    UP,
    Backoff,
    FlushPolicy,
    Ticks,
)

INF = math.inf
POLICY = FlushPolicy(flush_interval_s=0.25, heartbeat_interval_s=5.0, retry_backoff=(0.125, 0.25, 0.5), hold_s=4.0)


def test_the_defaults_are_the_documented_ones() -> None:
    policy = FlushPolicy(flush_interval_s=0.05, heartbeat_interval_s=5.0)
    assert (policy.retry_backoff, policy.hold_s) == (RETRY_BACKOFF_S, STORE_DOWN_HOLD_S) == ((0.05, 0.2, 0.5), 5.0)
    assert Ticks(idle=True, at=0.0) == IDLE
    assert Backoff(failures=0, retry_at=0.0) == UP
    assert FIRST_BEAT == 0.0


@pytest.mark.parametrize("state", [POLICY, IDLE, UP])
def test_every_state_is_immutable(state: object) -> None:
    field = dataclasses.fields(state)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(state, field, 1)


# -- ticks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("interval", "now", "expected"), [(0.25, 0.0, 0.25), (0.25, 3.5, 3.75), (0.0, 3.5, 3.5)])
def test_a_start_wakes_an_idle_writer_to_tick_an_interval_later(interval: float, now: float, expected: float) -> None:
    policy = dataclasses.replace(POLICY, flush_interval_s=interval)
    assert policy.woken(now) == Ticks(idle=False, at=expected)


@pytest.mark.parametrize(
    ("held", "oldest_waited", "flushes"),
    [(False, False, False), (False, True, True), (True, False, True), (True, True, True)],
)
def test_a_tick_writes_when_calls_are_held_or_the_oldest_start_waited_a_whole_interval(
    held: bool, oldest_waited: bool, flushes: bool
) -> None:
    assert POLICY.tick_flushes(held=held, oldest_waited=oldest_waited) is flushes


@pytest.mark.parametrize(
    ("started", "waiting", "idle"),
    [(False, False, True), (False, True, False), (True, False, False), (True, True, False)],
)
def test_a_writer_goes_idle_after_a_tick_without_any_start_and_nothing_waiting(
    started: bool, waiting: bool, idle: bool
) -> None:
    assert POLICY.goes_idle(started=started, waiting=waiting) is idle


@pytest.mark.parametrize(
    ("before", "goes_idle", "after"),
    [
        (Ticks(idle=False, at=1.0), False, Ticks(idle=False, at=1.25)),  # ticking on
        (Ticks(idle=False, at=1.0), True, Ticks(idle=True, at=1.25)),  # goes idle
        (Ticks(idle=True, at=0.0), True, Ticks(idle=True, at=1.25)),
        # A tick while idle (held calls retried) leaves it idle: the retry wakes it, not the ticks.
        (Ticks(idle=True, at=0.0), False, Ticks(idle=True, at=1.25)),
    ],
)
def test_after_a_tick_the_next_is_an_interval_later(before: Ticks, goes_idle: bool, after: Ticks) -> None:
    assert POLICY.ticked(before, 1.0, goes_idle=goes_idle) == after


def test_a_long_tasks_start_is_written_at_the_second_tick_then_the_writer_goes_idle() -> None:
    # A start at 1.0 (the writer idle) wakes it: it ticks at 1.25
    ticks = POLICY.woken(1.0)
    assert POLICY.flush_due(ticks, UP, held=False) == 1.25
    # The tick at 1.25 sees the start for the first time: it does not write, and ticks again
    assert not POLICY.tick_flushes(held=False, oldest_waited=False)
    ticks = POLICY.ticked(ticks, 1.25, goes_idle=POLICY.goes_idle(started=True, waiting=True))
    assert ticks == Ticks(idle=False, at=1.5)
    # The tick at 1.5 finds it still the oldest: it writes it; no start came since: idle
    assert POLICY.tick_flushes(held=False, oldest_waited=True)
    ticks = POLICY.ticked(ticks, 1.5, goes_idle=POLICY.goes_idle(started=False, waiting=False))
    assert ticks == Ticks(idle=True, at=1.75)
    assert POLICY.flush_due(ticks, UP, held=False) == INF


# -- retries -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("failures", "delay"), [(1, 0.125), (2, 0.25), (3, 0.5), (4, 4.0), (5, 4.0), (1000, 4.0)])
def test_the_retry_after_the_nth_failure_backs_off_then_holds(failures: int, delay: float) -> None:
    assert POLICY.retry_delay(failures) == delay


@pytest.mark.parametrize("failures", [0, -1])
def test_failures_count_from_one(failures: int) -> None:
    with pytest.raises(ValueError, match="counts from 1"):
        POLICY.retry_delay(failures)


def test_without_backoff_every_retry_waits_the_hold() -> None:
    policy = dataclasses.replace(POLICY, retry_backoff=())
    assert [policy.retry_delay(n) for n in (1, 2, 3)] == [4.0, 4.0, 4.0]
    assert policy.holding(Backoff(1, 4.0))


def test_failures_in_a_row_each_set_the_next_try_from_when_they_failed() -> None:
    backoff = UP
    tries = [0.0]
    for _ in range(6):
        backoff = POLICY.failed(backoff, tries[-1])
        tries.append(backoff.retry_at)
    assert backoff == Backoff(failures=6, retry_at=12.875)
    assert tries == [0.0, 0.125, 0.375, 0.875, 4.875, 8.875, 12.875]


def test_a_failure_counts_from_the_time_it_happened_not_from_its_retry() -> None:
    assert POLICY.failed(Backoff(failures=1, retry_at=0.125), 2.0) == Backoff(failures=2, retry_at=2.25)


@pytest.mark.parametrize(
    ("failures", "holding"), [(0, False), (1, False), (2, False), (3, False), (4, True), (9, True)]
)
def test_the_writer_holds_the_events_once_the_retries_are_spent(failures: int, holding: bool) -> None:
    assert POLICY.holding(Backoff(failures, 0.0)) is holding


def test_the_store_is_down_from_its_first_failure_until_a_try_goes_through() -> None:
    # (its retry being due changes nothing: a store that hangs would cost that try's task seconds)
    assert POLICY.failed(UP, 0.0).down
    assert Backoff(failures=2, retry_at=1.0).down
    assert not UP.down


# -- when the writer's thread acts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("ticks", "backoff", "held", "due"),
    [
        (IDLE, UP, False, INF),  # nothing woke it: no flush until a start does
        (Ticks(idle=True, at=9.0), Backoff(2, 3.0), False, INF),  # a past failure alone does not flush
        (Ticks(idle=False, at=2.0), UP, False, 2.0),  # the tick
        (Ticks(idle=False, at=2.0), Backoff(1, 1.5), False, 2.0),  # the tick, its retry due already
        (Ticks(idle=False, at=2.0), Backoff(1, 3.0), False, 3.0),  # the tick waits for the retry
        (IDLE, Backoff(1, 3.0), True, 3.0),  # held calls go at their retry, idle or not
        (Ticks(idle=False, at=2.0), Backoff(1, 3.0), True, 3.0),
        (Ticks(idle=False, at=5.0), Backoff(1, 3.0), True, 3.0),  # ... even before the tick
    ],
)
def test_when_the_next_flush_is_due(ticks: Ticks, backoff: Backoff, held: bool, due: float) -> None:
    assert POLICY.flush_due(ticks, backoff, held=held) == due


@pytest.mark.parametrize(("now", "next_beat", "due"), [(0.0, FIRST_BEAT, True), (4.75, 5.0, False), (5.0, 5.0, True)])
def test_the_heartbeat_is_due_from_its_time_on(now: float, next_beat: float, due: bool) -> None:
    assert POLICY.beat_due(now, next_beat) is due


def test_the_next_heartbeat_is_an_interval_after_the_last() -> None:
    assert [POLICY.next_beat(now) for now in (0.0, 5.25)] == [5.0, 10.25]


@pytest.mark.parametrize(
    ("ticks", "backoff", "held", "next_beat", "wake"),
    [
        (IDLE, UP, False, 5.0, 5.0),  # idle: only the heartbeat wakes it
        (Ticks(idle=False, at=0.25), UP, False, 5.0, 0.25),  # the tick first
        (Ticks(idle=False, at=7.0), UP, False, 5.0, 5.0),  # the heartbeat first
        (IDLE, Backoff(4, 6.0), True, 5.0, 5.0),  # the heartbeat before the held calls' retry
        (IDLE, Backoff(1, 0.125), True, 5.0, 0.125),
        (IDLE, UP, False, FIRST_BEAT, 0.0),  # a new writer beats at once
    ],
)
def test_the_thread_wakes_for_whichever_comes_first(
    ticks: Ticks, backoff: Backoff, held: bool, next_beat: float, wake: float
) -> None:
    assert POLICY.next_round(ticks, backoff, next_beat, held=held) == wake
