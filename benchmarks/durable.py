"""Item 8: the cost of durability: 10 ms tasks on a real prefork worker, in four modes.

A task's outcome is now written to the store in the task's thread before its handler returns, so
before Celery acknowledges the message (``task_acks_late``): a worker killed at any moment either
recorded the result or leaves the message to be redelivered. This measures what that costs a batch
of tasks that take some time (``time.sleep(0.01)``, ``benchmarks.app``'s ``bench.sleep``), against
what a Celery user pays without the tracker:

- **U**: untracked, ``ignore_result=True`` (no result stored): the baseline;
- **C**: untracked, each result stored by Celery's Redis result backend (what ``GroupResult`` needs);
- **D**: tracked (``tracker.celery.dispatch``), today's durable writes, no result stored by Celery;
- **W**: tracked, the former write-behind, emulated: a worker started with
  ``TRACKER_BENCH_WRITE_BEHIND=1`` queues each outcome like a start (``Writer.write`` is
  ``Writer.keep``), and the writer thread writes it within ``flush_interval_s``, after the ack.

Each mode has its own worker (``celery -A benchmarks.app worker --pool prefork -c 2``, the project's
``celeryconfig``: JSON, ``acks_late``, prefetch 1), all four started together on their own queues,
with the tracker installed in each (an untracked task costs its handlers two dict lookups). One
redis-server is the broker and Celery's result backend, another the tracker's store. A batch runs
on one worker while the other three wait; each round runs one batch per mode, in the order
U C D W rotated by one each round, after two warm-up rounds: every measured batch runs on a worker
that has run as many batches before it.

Wall time runs from the send until every task is done: every message acknowledged, and for a
tracked batch its session ended too. Acknowledgements are counted by the broker itself (``INFO
commandstats``: kombu's Redis transport acknowledges a message with one ``HDEL`` from its
``unacked`` hash, and nothing else on that server runs ``HDEL``): the same check for the four
modes, and nothing added to the tasks or the worker. A tracked batch's session is then read until
it has ended (at once for D, whose last outcome was written before its ack; up to
``flush_interval_s`` later for W). Both are looked at every 5 ms. The ratios are taken within each
round; their median over the rounds is reported with the interval that holds it (order
statistics, as in row 1). Beside wall time, the CPU per task of the mode's worker, the broker and
the store (from ``/proc``).
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from celery import Celery, group

from benchmarks._redis import RedisServer, redis_server
from benchmarks.overhead import ROOT, TERMINAL, Worker, _cpu_s
from benchmarks.report import Row, Section, Target, interval_row, median, median_interval
from tracker import SessionManager, TrackerSettings
from tracker.celery import dispatch, install
from tracker.storage.redis import RedisStorageAdapter

#: The modes, in the order of the first round (rotated by one each round).
MODES = ("U", "C", "D", "W")
DESCRIPTION = {
    "U": "untracked, no result stored",
    "C": "untracked, Celery's Redis result backend storing each result",
    "D": "tracked, durable (outcome written before the ack)",
    "W": "tracked, write-behind (emulated: outcome written after the ack, within flush_interval_s)",
}
TRACKED = {"D", "W"}
#: Seconds each task sleeps.
TASK_S = 0.01
#: Process groups whose CPU is a task's cost (the mode's worker, both redis-servers); the driver apart.
SERVING = ("worker", "broker_redis", "tracker_redis")
#: Seconds between two looks at the broker (and at a tracked batch's session): a batch's end is
#: known to a few ms of its 2 s, and the driver leaves the two cores to the worker and the servers.
POLL_S = 0.005

#: One batch's figures (see :meth:`Driver.batch`); a round is one batch per mode.
Batch = dict[str, Any]
Round = dict[str, Batch]


class Driver:
    """Sends the batches of every mode and watches them finish."""

    def __init__(
        self, broker: RedisServer, store: RedisServer, workers: dict[str, Worker], queues: dict[str, str]
    ) -> None:
        self.app = Celery("tracker_bench_durable_driver")
        self.app.config_from_object("celeryconfig")
        self.app.conf.update(broker_url=broker.url, result_backend=broker.url)
        install(self.app, beat=False)  # dispatch sends only through an app the tracker is installed in
        self.broker, self.store = broker, store
        self.broker_stats = redis.Redis(port=broker.port)
        self.store_stats = redis.Redis(port=store.port)
        settings = TrackerSettings(redis_url=store.url)
        self.manager = SessionManager(storage=RedisStorageAdapter(redis.Redis(port=store.port)), settings=settings)
        self.workers, self.queues = workers, queues

    @staticmethod
    def _calls(client: redis.Redis, *commands: str) -> int:
        """How many times the server ran these commands (``INFO commandstats``)."""
        stats = client.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{command}", {}).get("calls", 0)) for command in commands)

    def _acks(self) -> int:
        # kombu's Redis transport acknowledges a message with ZREM + HDEL of its `unacked` entry;
        # nothing else on the broker runs HDEL.
        return self._calls(self.broker_stats, "hdel")

    def _results(self) -> int:
        # Celery's Redis backend stores a result with SETEX (result_expires is set); kombu's own
        # SETs (its restore mutex) are not results.
        return self._calls(self.broker_stats, "setex")

    def _store_script_calls(self) -> int:
        return self._calls(self.store_stats, "evalsha", "eval")

    def _cpu(self, mode: str) -> dict[str, float]:
        return {
            "worker": _cpu_s(self.workers[mode].pids()),
            "broker_redis": _cpu_s([self.broker.process.pid]),
            "tracker_redis": _cpu_s([self.store.process.pid]),
            "driver": _cpu_s([os.getpid()]),
        }

    def batch(self, mode: str, n: int, timeout_s: float = 120.0) -> Batch:
        """One batch of ``n`` tasks of ``mode``, sent and waited for; what it took."""
        options = {"queue": self.queues[mode], "ignore_result": mode != "C"}
        canvas = group(self.app.signature("bench.sleep", args=(TASK_S,), options=options) for _ in range(n))
        acks, results, store_calls = self._acks(), self._results(), self._store_script_calls()
        cpu = self._cpu(mode)
        start = time.perf_counter()
        session_id = None
        if mode in TRACKED:
            session_id = dispatch(canvas, canvas_path="bench.durable", manager=self.manager, app=self.app)
        else:
            canvas.apply_async()  # the GroupResult dropped at once, as dispatch() drops it
        deadline = time.monotonic() + timeout_s
        while self._acks() - acks < n:
            if time.monotonic() > deadline:
                self.workers[mode].check()
                raise TimeoutError(f"mode {mode}: not every task acknowledged after {timeout_s} s")
            time.sleep(POLL_S)
        acked = time.perf_counter() - start
        status: dict[str, Any] | None = None
        reads = 0
        while session_id is not None:
            status = self.manager.sync.get_session_status(session_id)
            reads += 1
            if status["status"] in TERMINAL:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"mode {mode}: session still {status['status']} after {timeout_s} s")
            time.sleep(POLL_S)
        done = time.perf_counter() - start
        cpu_after = self._cpu(mode)
        stored = self._results() - results
        if stored != (n if mode == "C" else 0):
            raise RuntimeError(f"mode {mode}: {stored} results stored by Celery's backend for {n} tasks")
        if status is not None and (status["status"] != "completed" or status["completed_nodes"] != n):
            raise RuntimeError(f"mode {mode}: session ended {status['status']} with {status['completed_nodes']} of {n}")
        return {
            "done_s": done,
            "acked_s": acked,
            # Tracked: was the session ended at the first look after the last ack?
            "ended_at_last_ack": reads == 1 if session_id is not None else None,
            "cpu_s": {name: cpu_after[name] - cpu[name] for name in cpu_after},
            "store_script_calls": self._store_script_calls() - store_calls,
        }


def _order(r: int) -> tuple[str, ...]:
    """Round ``r``'s order: U C D W rotated by ``r``."""
    return MODES[r % len(MODES) :] + MODES[: r % len(MODES)]


def _rounds(driver: Driver, n: int, rounds: int, warmup: int) -> list[Round]:
    """``rounds`` rounds of one batch per mode, after ``warmup`` rounds of smaller batches."""
    for r in range(warmup):
        for mode in _order(r):
            driver.batch(mode, min(n, 50))
    return [{mode: driver.batch(mode, n) for mode in _order(r)} for r in range(rounds)]


def _summary(values: Sequence[float]) -> dict[str, Any]:
    """A per-round figure: its median, the interval that holds it, every value."""
    low, high, coverage = median_interval(values)
    return {"median": median(values), "low": low, "high": high, "coverage": coverage, "values": list(values)}


def _cpu_us(batch: Batch, n: int, names: Sequence[str] = SERVING) -> float:
    """CPU per task of these process groups in one batch (µs)."""
    return float(sum(batch["cpu_s"][name] for name in names)) / n * 1e6


def run(quick: bool) -> Section:
    n = 30 if quick else 250
    rounds = 2 if quick else 16
    warmup = 1 if quick else 2
    section = Section("8", f"The cost of durability: {TASK_S * 1000:.0f} ms tasks, prefork worker (concurrency 2)")
    tag = uuid.uuid4().hex[:8]
    with redis_server() as broker, redis_server() as store, tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "TRACKER_BENCH_BROKER": broker.url,
            "TRACKER_REDIS_URL": store.url,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        }
        for name in (
            "TRACKER_KEY_PREFIX",
            "TRACKER_BENCH_WRITE_BEHIND",
            "TRACKER_BENCH_TRACK",
            "TRACKER_BENCH_INWORKER",
        ):
            env.pop(name, None)
        queues = {mode: f"bench-durable-{tag}-{mode}" for mode in MODES}
        workers: dict[str, Worker] = {}
        try:
            for mode in MODES:
                mode_env = {**env, "TRACKER_BENCH_QUEUE": queues[mode]}
                if mode == "W":
                    mode_env["TRACKER_BENCH_WRITE_BEHIND"] = "1"
                workers[mode] = Worker(mode_env, queues[mode], Path(tmp) / f"worker-{mode}.log")
            measured = _rounds(Driver(broker, store, workers, queues), n, rounds, warmup)
        finally:
            for worker in workers.values():
                worker.proc.terminate()  # all four shut down at once, then each is waited for
            for worker in workers.values():
                worker.stop()

    def wall(mode: str) -> list[float]:
        return [batches[mode]["done_s"] for batches in measured]

    def ratio(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(wall(a), wall(b), strict=True)]

    def added_ms(mode: str, over: str = "U") -> list[float]:
        """Per round: wall time per task over ``over``'s (ms)."""
        return [(x - y) / n * 1000 for x, y in zip(wall(mode), wall(over), strict=True)]

    per_task_ms = {mode: median(wall(mode)) / n * 1000 for mode in MODES}
    added = {mode: median(added_ms(mode)) for mode in ("C", "D", "W")}
    d_vs_u, c_vs_u, w_vs_u, d_vs_w, d_vs_c = (ratio(a, b) for a, b in ("DU", "CU", "WU", "DW", "DC"))
    # Per round, the tracker's time per task against that of Celery storing the result.
    d_vs_c_added = [d / c for d, c in zip(added_ms("D"), added_ms("C"), strict=True)]
    cpu = {mode: median([_cpu_us(batches[mode], n) for batches in measured]) for mode in MODES}
    cpu_d_vs_u = [_cpu_us(batches["D"], n) / _cpu_us(batches["U"], n) for batches in measured]
    store_calls = {mode: median([b[mode]["store_script_calls"] / n for b in measured]) for mode in sorted(TRACKED)}
    ended_at_ack = {
        mode: 100 * sum(b[mode]["ended_at_last_ack"] for b in measured) / rounds for mode in sorted(TRACKED)
    }
    after_ack_ms = {mode: median([(b[mode]["done_s"] - b[mode]["acked_s"]) * 1000 for b in measured]) for mode in MODES}

    def vs_u(mode: str, ratios: list[float], target: Target | None = None) -> Row:
        return Row(
            f"{mode}: {DESCRIPTION[mode]}, vs U",
            "ms/task",
            per_task_ms[mode],
            per_task_ms["U"],
            median(ratios),
            baseline_name="U",
            target=target,
            note=f"{added[mode]:+.3f} ms per task (median of the rounds' differences); a batch's wall time / {n}",
        )

    section.rows += [
        vs_u("D", d_vs_u, Target("ratio", "<=", 1.02)),
        interval_row(d_vs_u, "rounds"),
        Row(
            "time added per task over U: tracked, durable (D) vs Celery storing each result (C)",
            "ms",
            added["D"],
            added["C"],
            added["D"] / added["C"],
            baseline_name="C",
            target=Target("ratio", "<", 1),
            note="(D - U) / (C - U), medians of the rounds' differences; per round it divides by a small, "
            "noisy difference: the next line compares D and C directly",
        ),
        Row(
            "D vs C, per round: below 1 exactly when D adds less than C",
            "ms/task",
            per_task_ms["D"],
            per_task_ms["C"],
            median(d_vs_c),
            baseline_name="C",
        ),
        interval_row(d_vs_c, "rounds"),
        vs_u("C", c_vs_u),
        vs_u("W", w_vs_u),
        Row(
            "D vs W: durable vs write-behind (emulated), both tracked",
            "ms/task",
            per_task_ms["D"],
            per_task_ms["W"],
            median(d_vs_w),
            baseline_name="W",
            note=f"{median(added_ms('D', over='W')):+.3f} ms per task; the session ended "
            f"{after_ack_ms['W']:.0f} ms after the last ack in W, {after_ack_ms['D']:.1f} ms in D (medians)",
        ),
        Row(
            "CPU per task: the mode's worker + broker Redis + tracker Redis, D vs U",
            "µs",
            cpu["D"],
            cpu["U"],
            median(cpu_d_vs_u),
            baseline_name="U",
            note=f"from /proc; C {cpu['C']:,.0f} µs, W {cpu['W']:,.0f} µs",
        ),
        Row(
            "store script calls per task, D vs W",
            "commands",
            store_calls["D"],
            store_calls["W"],
            store_calls["D"] / store_calls["W"],
            baseline_name="W",
            note="EVALSHA on the store over a batch / its tasks (the session's creation and heartbeats included)",
        ),
        Row(
            "batches whose session had ended when their last task was acked, D vs W",
            "%",
            ended_at_ack["D"],
            ended_at_ack["W"],
            baseline_name="W",
            note="D writes each outcome before its ack, W after it",
        ),
    ]
    section.details = {
        "tasks_per_batch": n,
        "task_s": TASK_S,
        "rounds": rounds,
        "warmup_rounds": warmup,
        "poll_s": POLL_S,
        "modes": DESCRIPTION,
        "completion": "every message acked (the broker's INFO commandstats: kombu's HDEL of its unacked hash); "
        "tracked: then the session read until ended",
        "per_task_ms": per_task_ms,
        "added_ms_per_task_over_U": {mode: _summary(added_ms(mode)) for mode in ("C", "D", "W")},
        "ratios": {
            "D/U": _summary(d_vs_u),
            "C/U": _summary(c_vs_u),
            "W/U": _summary(w_vs_u),
            "D/W": _summary(d_vs_w),
            "D/C": _summary(d_vs_c),
            "(D-U)/(C-U)": _summary(d_vs_c_added),
            "cpu D/U": _summary(cpu_d_vs_u),
        },
        "cpu_us_per_task": cpu,
        "cpu_us_per_task_by_process": {
            mode: {name: median([_cpu_us(b[mode], n, (name,)) for b in measured]) for name in (*SERVING, "driver")}
            for mode in MODES
        },
        "store_script_calls_per_task": store_calls,
        "session_ended_at_last_ack_pct": ended_at_ack,
        "after_last_ack_ms": after_ack_ms,
        "batches": measured,
    }
    return section
