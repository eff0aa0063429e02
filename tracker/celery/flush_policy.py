"""When the writer writes, retries and beats: its timing rules, as pure decisions.

Nothing here has a thread, a lock, a clock or a store. Each decision takes the time it is made at
(the writer reads it from its clock) and the state it is made on, and returns a value or a new
state; :class:`tracker.celery.writer.Writer` applies them. The rules:

- **Ticks.** A writer is idle (asleep until its next heartbeat) until a start is queued; from then
  on it ticks every ``flush_interval_s``. A tick writes what waits when the oldest waiting start was
  waiting at the tick before already (a younger one most likely goes with its outcome) or when calls
  the store refused are held. After a tick with no start since the one before and nothing queued or
  held, the writer goes idle again: a busy process wakes it once, not once per task.
- **Retries.** After the n-th store failure in a row, the next try is ``RETRY_BACKOFF_S[n - 1]``
  later; once those are spent, every ``STORE_DOWN_HOLD_S`` (and the writer says, once, that it holds
  the events). From the first failure until a try goes through the store counts as down: an
  outcome is queued rather than make its task wait on a store that failed (a store that hangs
  costs each try its socket timeout, several times over with redis-py's own retries). Held calls are
  retried, by the writer's thread, when their try is due, whether the writer ticks or not; a tick
  that is due waits for it too.
- **Heartbeat.** At the writer's first round, then every ``heartbeat_interval_s``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Seconds the writer waits before each retry of a store call that failed; after the last one it
#: says that it holds the events, and tries again every ``STORE_DOWN_HOLD_S``.
RETRY_BACKOFF_S: tuple[float, ...] = (0.05, 0.2, 0.5)

#: While the store is down, outcomes are queued at once (no waiting in the task) and the writer
#: tries the store again this often.
STORE_DOWN_HOLD_S = 5.0

#: When a writer that never beat is due to: at once.
FIRST_BEAT = 0.0


@dataclass(frozen=True, slots=True)
class Ticks:
    """Whether the writer ticks, and when its next tick is due (``at``: only while not idle)."""

    idle: bool = True
    at: float = 0.0


#: A writer nothing has woken yet.
IDLE = Ticks()


@dataclass(frozen=True, slots=True)
class Backoff:
    """The store failures in a row, and when the next try is due (``retry_at``; 0 with none)."""

    failures: int = 0
    retry_at: float = 0.0

    @property
    def down(self) -> bool:
        """The last store call failed: until a retry goes through, a task must not wait on it."""
        return self.failures > 0


#: A store whose last call went through (or that was never called).
UP = Backoff()


@dataclass(frozen=True, slots=True)
class FlushPolicy:
    """The timing rules of one writer (see the module's docstring), for its settings."""

    flush_interval_s: float
    heartbeat_interval_s: float
    retry_backoff: tuple[float, ...] = RETRY_BACKOFF_S
    hold_s: float = STORE_DOWN_HOLD_S

    # -- ticks ----------------------------------------------------------------------------------

    def woken(self, now: float) -> Ticks:
        """A start queued at ``now`` while the writer was idle: it ticks an interval later."""
        return Ticks(idle=False, at=now + self.flush_interval_s)

    @staticmethod
    def tick_flushes(*, held: bool, oldest_waited: bool) -> bool:
        """Whether a tick writes what waits: calls are held, or the oldest start queued now was
        already the oldest at the tick before (it has waited a whole interval)."""
        return held or oldest_waited

    @staticmethod
    def goes_idle(*, started: bool, waiting: bool) -> bool:
        """Whether a tick leaves the writer idle: no start came since the tick before (``started``)
        and nothing is queued or held after it (``waiting``)."""
        return not (started or waiting)

    def ticked(self, ticks: Ticks, now: float, *, goes_idle: bool) -> Ticks:
        """The ticks after one that ended at ``now``: idle when it goes idle (see :meth:`goes_idle`),
        else idle as they were (held calls retried while the writer is idle leave it idle: their
        retry, not a tick, is what wakes it); the next tick, while not idle, an interval later."""
        return Ticks(idle=goes_idle or ticks.idle, at=now + self.flush_interval_s)

    # -- retries --------------------------------------------------------------------------------

    def retry_delay(self, failures: int) -> float:
        """Seconds from the ``failures``-th store failure in a row (1 for the first) to the next try."""
        if failures < 1:
            raise ValueError(f"failures counts from 1, not {failures}")
        return self.retry_backoff[failures - 1] if failures <= len(self.retry_backoff) else self.hold_s

    def failed(self, backoff: Backoff, now: float) -> Backoff:
        """The backoff after one more store failure, at ``now``."""
        failures = backoff.failures + 1
        return Backoff(failures, now + self.retry_delay(failures))

    def holding(self, backoff: Backoff) -> bool:
        """Whether the retries are spent: the writer now holds the events until the store is back."""
        return backoff.failures > len(self.retry_backoff)

    # -- when the writer's thread acts ----------------------------------------------------------

    @staticmethod
    def flush_due(ticks: Ticks, backoff: Backoff, *, held: bool) -> float:
        """When the writer next writes (on its clock; infinity: not until a start wakes it). Held
        calls go at their retry; a tick goes when it is due and so is the retry."""
        if held:
            return backoff.retry_at
        if ticks.idle:
            return float("inf")
        return max(ticks.at, backoff.retry_at)

    @staticmethod
    def beat_due(now: float, next_beat: float) -> bool:
        """Whether the heartbeat is due at ``now``."""
        return now >= next_beat

    def next_beat(self, now: float) -> float:
        """When the heartbeat after one at ``now`` is due."""
        return now + self.heartbeat_interval_s

    @classmethod
    def next_round(cls, ticks: Ticks, backoff: Backoff, next_beat: float, *, held: bool) -> float:
        """When the writer's thread next has something to do: write, or beat."""
        return min(next_beat, cls.flush_due(ticks, backoff, held=held))
