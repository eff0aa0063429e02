"""Items 1 and 2: the cost of tracking a batch on a real prefork worker, and its Redis round trips.

One worker (``celery -A benchmarks.app worker --pool prefork -c 2``) runs every batch; the broker
and result backend are one private redis-server, the tracker's store another, so the store's
statistics hold the tracker's commands only. A batch is a group of no-op tasks, sent either with
``tracker.celery.dispatch`` (tracked) or ``group.apply_async`` (untracked); the tracker's signal
handlers are installed in the worker for both (an untracked task costs them two dict lookups).

Wall time runs from the send to the moment the driver sees every task's result stored in the
result backend (both kinds of batch pay result storage, and are watched the same way: one
``EXISTS`` over the next unfinished results every millisecond); a tracked batch is then also
waited for until its session is terminal, so its time includes the tracker's last write.
Tracked and untracked batches alternate (ABBA...), 20 pairs, and the median of the pairs' ratios
is reported: on these shared machines one pair's ratio ranged from 0.81 to 1.28 within a run, and
the median of 10 pairs from 0.98 to 1.13 between runs of the same code. Beside wall time, the CPU
each process used per batch (from ``/proc``: the worker and its pool children, the broker's and the
store's redis-server) gives a ratio that other load on a shared machine disturbs much less. The time
a tracked batch spends in ``dispatch()`` before its first send, while the workers idle, is shown too.

Then 10 pairs again on a worker without the tracker installed, the tracked batch only
dispatched (session created, tasks stamped, nothing recorded): what dispatch and Celery's handling
of the stamps cost alone, and so what is left for the worker's side of tracking.

Then 3 pairs on a third worker whose processes time the tracker's own code where it runs
(:mod:`benchmarks.inworker`): the handlers of a tracked and of an untracked task in the pool
children (a tracked task's ``task_success`` writes its outcome, its start folded in, before it
returns) and in the main process, and the pool children's writer threads, per task.

Round trips are counted in one more tracked batch with the store's slow log recording every
command (a Lua script's own commands are told apart by their fake client): commands sent by the
worker per node, and by the dispatching process per session.
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Celery, group

from benchmarks._redis import LoggedCommand, RedisServer, command_log, redis_server
from benchmarks.inworker import collect
from benchmarks.report import Row, Section, Target, interval_row, median
from tracker import SessionManager, TrackerSettings
from tracker.celery import dispatch, install
from tracker.storage.keys import KeySpace
from tracker.storage.redis import RedisStorageAdapter

ROOT = Path(__file__).resolve().parents[1]
#: Name the dispatching process gives its connections to the store (told apart in the slow log).
DRIVER_CLIENT = "bench-driver"
TERMINAL = {"completed", "partial_failure", "failed", "cancelled"}


class Worker:
    """``celery -A benchmarks.app worker --pool prefork`` in a subprocess, stopped by its own pid."""

    def __init__(self, env: dict[str, str], queue: str, log: Path, concurrency: int = 2) -> None:
        self.log = log
        args = [
            sys.executable, "-m", "celery", "-A", "benchmarks.app", "worker", "--pool", "prefork",
            "--concurrency", str(concurrency), "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-Q", queue, "--hostname", f"bench-{uuid.uuid4().hex[:6]}@%h",
        ]  # fmt: skip
        with log.open("wb") as out:
            self.proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def pids(self) -> list[int]:
        """The main process and its pool children."""
        children = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        return [self.proc.pid, *(int(pid) for pid in children)]

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the benchmark worker exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # warm shutdown: the main process stops its pool children
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                children = subprocess.run(
                    ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
                ).stdout.split()
                self.proc.kill()
                for pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
                self.proc.wait()


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the processes ``pids`` have used so far (Linux ``/proc``; 0 elsewhere)."""
    ticks = 0
    for pid in pids:
        try:
            # Fields after the command name: state is field 3, utime and stime are fields 14 and 15.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.0


class Driver:
    """Sends batches and watches them finish; notes the CPU each group of processes used per batch."""

    def __init__(self, broker: RedisServer, store: RedisServer, queue: str, worker: Worker) -> None:
        self.app = Celery("tracker_bench_driver")
        self.app.config_from_object("celeryconfig")
        self.app.conf.update(broker_url=broker.url, result_backend=broker.url, task_default_queue=queue)
        install(self.app, beat=False)  # dispatch sends only through an app the tracker is installed in
        self.results = redis.Redis(port=broker.port)
        settings = TrackerSettings(redis_url=store.url)
        client = redis.Redis(port=store.port, client_name=DRIVER_CLIENT)
        self.manager = SessionManager(storage=RedisStorageAdapter(client), settings=settings)
        self.worker = worker
        self.status_reads = 0
        self.processes: dict[str, Callable[[], list[int]]] = {
            "worker_main": lambda: worker.pids()[:1],
            "worker_pool": lambda: worker.pids()[1:],
            "broker_redis": lambda: [broker.process.pid],
            "tracker_redis": lambda: [store.process.pid],
            "driver": lambda: [os.getpid()],
        }
        #: CPU seconds by process group, one dict per batch, by kind of batch.
        self.cpu: dict[str, list[dict[str, float]]] = {"tracked": [], "untracked": []}
        #: Per tracked batch, seconds from calling dispatch() to its first send (the workers idle).
        self.before_send: list[float] = []

    def _cpu(self) -> dict[str, float]:
        return {name: _cpu_s(pids()) for name, pids in self.processes.items()}

    def _note_cpu(self, kind: str, before: dict[str, float]) -> None:
        after = self._cpu()
        self.cpu[kind].append({name: after[name] - before[name] for name in after})

    def batch(self, n: int, queue: str | None = None) -> group:
        options = {"queue": queue} if queue else {}
        return group(self.app.signature("bench.noop", options=options) for _ in range(n))

    def wait_results(self, task_ids: list[str], timeout_s: float = 300.0) -> None:
        """Return once every task's result is stored (the same check for tracked and untracked batches)."""
        keys = [self.app.backend.get_key_for_task(tid) for tid in task_ids]
        done, chunk = 0, 256
        deadline = time.monotonic() + timeout_s
        while done < len(keys):
            window = keys[done : done + chunk]
            if self.results.exists(*window) == len(window):
                done += len(window)
                continue
            if time.monotonic() > deadline:
                self.worker.check()
                raise TimeoutError(f"only {done} of {len(keys)} results after {timeout_s} s")
            time.sleep(0.001)

    def wait_session(self, session_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            self.status_reads += 1
            status = self.manager.sync.get_session_status(session_id)
            if status["status"] in TERMINAL:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"session {session_id} still {status['status']} after {timeout_s} s")
            time.sleep(0.001)

    def untracked(self, n: int) -> float:
        canvas = self.batch(n)
        cpu = self._cpu()
        start = time.perf_counter()
        # The GroupResult is dropped at once, as dispatch() drops it: with a Redis result backend
        # each AsyncResult unsubscribes from its result's channel when it goes (~17 µs per task in
        # the sending process), and both kinds of batch must pay that inside the timed window.
        task_ids = [r.id for r in canvas.apply_async().results]
        self.wait_results(task_ids)
        elapsed = time.perf_counter() - start
        self._note_cpu("untracked", cpu)
        return elapsed

    def dispatched(self, n: int) -> float:
        """A tracked batch as far as the sender goes (for a worker without the tracker)."""
        return self.tracked(n, until_ended=False)

    def tracked(self, n: int, until_ended: bool = True) -> float:
        """A batch sent with dispatch(), until every result is stored and (``until_ended``) its session ended."""
        canvas = self.batch(n)
        send = canvas.apply_async
        sent_at: list[float] = []

        def timed_send(*args: Any, **kwargs: Any) -> Any:  # what dispatch() calls once the session exists
            sent_at.append(time.perf_counter())
            return send(*args, **kwargs)

        canvas.apply_async = timed_send
        cpu = self._cpu()
        start = time.perf_counter()
        session_id = dispatch(canvas, canvas_path="bench.canvas", manager=self.manager, app=self.app)
        self.before_send.append(sent_at[0] - start)
        self.wait_results([sig.options["task_id"] for sig in canvas.tasks])
        status = self.wait_session(session_id) if until_ended else None
        elapsed = time.perf_counter() - start
        self._note_cpu("tracked", cpu)
        if status is not None and (status["status"] != "completed" or status["completed_nodes"] != n):
            raise RuntimeError(f"tracked batch ended {status['status']} with {status['completed_nodes']} of {n}")
        return elapsed


def _pairs(driver: Driver, ours: Callable[[int], float], n: int, pairs: int) -> tuple[list[float], ...]:
    """``pairs`` A/B pairs (ABBA...) of ``ours`` against an untracked batch: both times and their ratios.

    Two small pairs warm up first (pool children started, connections open, scripts loaded, code
    paths hot); the driver's CPU notes start after them.
    """
    for _ in range(2):
        ours(min(n, 200))
        driver.untracked(min(n, 200))
    driver.cpu = {"tracked": [], "untracked": []}
    driver.before_send = []
    ours_s: list[float] = []
    untracked_s: list[float] = []
    ratios: list[float] = []
    for pair in range(pairs):
        if pair % 2 == 0:
            a = ours(n)
            b = driver.untracked(n)
        else:
            b = driver.untracked(n)
            a = ours(n)
        ours_s.append(a)
        untracked_s.append(b)
        ratios.append(a / b)
    return ours_s, untracked_s, ratios


def _per_node(
    logged: list[LoggedCommand], n: int, keep: Callable[[LoggedCommand], bool]
) -> tuple[float, dict[str, int]]:
    counts = collections.Counter(c.name for c in logged if keep(c))
    return sum(counts.values()) / n, dict(counts)


def _vs_untracked(name: str, figures: dict[str, float], note: str = "") -> Row:
    """A row of µs of CPU timed inside the worker: a tracked task's against an untracked one's."""
    tracked, untracked = figures["tracked"], figures["untracked"]
    return Row(name, "µs CPU", tracked, untracked, tracked / untracked, baseline_name="untracked", note=note)


def run(quick: bool) -> Section:
    n = 100 if quick else 2000
    pairs = 2 if quick else 20
    split_pairs = 2 if quick else 10  # the line under it: a coarser split is enough
    timed_pairs = 1 if quick else 3  # inside the worker: medians of thousands of calls each
    section = Section("1-2", "Tracking overhead and round trips (prefork worker, concurrency 2)")
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    with redis_server() as broker, redis_server() as store, tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "TRACKER_BENCH_BROKER": broker.url,
            "TRACKER_BENCH_QUEUE": queue,
            "TRACKER_REDIS_URL": store.url,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        }
        env.pop("TRACKER_KEY_PREFIX", None)
        worker = Worker(env, queue, Path(tmp) / "worker.log")
        try:
            driver = Driver(broker, store, queue, worker)
            tracked_s, untracked_s, ratios = _pairs(driver, driver.tracked, n, pairs)
            cpu_runs = {kind: list(runs) for kind, runs in driver.cpu.items()}
            before_send = list(driver.before_send)
            # Round trips: one more tracked batch with every command logged.
            reads_before = driver.status_reads
            stats_before = store.command_calls()
            with command_log(store) as logged:
                driver.tracked(n)
                time.sleep(0.2)
            stats_after = store.command_calls()
            reads = driver.status_reads - reads_before
            # Fairness: an untracked batch on the same worker must cost the store nothing.
            with command_log(store) as untracked_log:
                driver.untracked(n)
            # Dispatch: what the dispatching process sent for a batch nobody consumes (so that no
            # worker command mixes in), at two sizes to show it does not grow with the batch.
            idle = f"{queue}-idle"
            dispatch_counts = {}
            for size in (10, n):
                with command_log(store) as dispatch_log:
                    dispatch(driver.batch(size, idle), canvas_path="bench.canvas", manager=driver.manager)
                dispatch_counts[size] = sum(
                    1 for c in dispatch_log if not c.in_script and c.client_name == DRIVER_CLIENT
                )  # the worker's heartbeat may fall in the window
        finally:
            worker.stop()
        # The same pairs on a worker without the tracker: dispatch and the stamps alone.
        bare_queue = f"{queue}-bare"
        bare = Worker({**env, "TRACKER_BENCH_TRACK": "0"}, bare_queue, Path(tmp) / "bare-worker.log")
        try:
            bare_driver = Driver(broker, store, bare_queue, bare)
            _, _, split_ratios = _pairs(bare_driver, bare_driver.dispatched, n, split_pairs)
            split_cpu = {kind: list(runs) for kind, runs in bare_driver.cpu.items()}
        finally:
            bare.stop()
        # Inside the worker: a third one, whose processes time the tracker's handlers and flushes.
        timed_queue, timed_dir = f"{queue}-timed", Path(tmp) / "inworker"
        timed_dir.mkdir()
        timed = Worker({**env, "TRACKER_BENCH_INWORKER": str(timed_dir)}, timed_queue, Path(tmp) / "timed-worker.log")
        try:
            timed_driver = Driver(broker, store, timed_queue, timed)
            _pairs(timed_driver, timed_driver.tracked, n, timed_pairs)
        finally:
            timed.stop()
        inworker = collect(timed_dir)

    # Heartbeats (one ZADD per worker process every few seconds) are the tracker's too, but they
    # follow the clock, not the nodes: counted apart.
    heartbeat_key = getattr(KeySpace(), "workers", None)

    def worker_sent(c: LoggedCommand) -> bool:
        return not c.in_script and c.client_name != DRIVER_CLIENT

    heartbeats = sum(1 for c in logged if worker_sent(c) and c.key == heartbeat_key)
    worker_rt, worker_cmds = _per_node(logged, n, lambda c: worker_sent(c) and c.key != heartbeat_key)
    driver_cmds = collections.Counter(c.name for c in logged if not c.in_script and c.client_name == DRIVER_CLIENT)
    in_script, _ = _per_node(logged, n, lambda c: c.in_script)
    delta = {k: v - stats_before.get(k, 0) for k, v in stats_after.items()}
    housekeeping = {k: v for k, v in delta.items() if k.split("|")[0] in ("info", "config", "slowlog", "client")}
    executed = sum(delta.values()) - sum(housekeeping.values()) - reads
    serving = ("worker_main", "worker_pool", "broker_redis", "tracker_redis")
    cpu_per_task = {
        kind: {name: median([run[name] for run in runs]) / n * 1e6 for name in runs[0]}
        for kind, runs in cpu_runs.items()
    }
    serving_us = {kind: sum(cpu_per_task[kind][name] for name in serving) for kind in cpu_per_task}
    cpu_ratios = [
        sum(t[name] for name in serving) / sum(u[name] for name in serving)
        for t, u in zip(cpu_runs["tracked"], cpu_runs["untracked"], strict=True)
    ]
    section.rows += [
        Row(
            f"wall time, {n} no-op tasks, tracked vs untracked (median of {pairs} pairs)",
            "s",
            median(tracked_s),
            median(untracked_s),
            median(ratios),
            baseline_name="untracked",
            target=Target("ratio", "<=", 1.05),
        ),
        interval_row(ratios, "pairs"),
        Row(
            "of which dispatch and Celery's stamps alone (worker without the tracker)",
            "ratio",
            median(split_ratios),
            note=f"median of {split_pairs} pairs: session created, tasks stamped, nothing recorded",
        ),
        Row(
            "of which before the first task is sent: tagging the leaves, creating the session",
            "ms",
            median(before_send) * 1000,
            note=f"{median(before_send) / median(tracked_s):.1%} of a tracked batch's wall time; the workers wait",
        ),
        Row(
            "CPU per task: worker + broker Redis + tracker Redis",
            "µs",
            serving_us["tracked"],
            serving_us["untracked"],
            median(cpu_ratios),
            baseline_name="untracked",
            note="from /proc; less sensitive than wall time to other load on the machine",
        ),
        _vs_untracked(
            "inside the worker: the tracker's handlers per task, pool child (prerun + success, its write)",
            inworker["handlers_us"],
            note=f"of which the outcome's store call {inworker['outcome_write_median_us']:.0f} µs (median, "
            f"{inworker['outcome_store_calls_per_100_tasks']:.0f} per 100 tasks); thread CPU around each "
            "call (a third worker, wrapped): the clock reads are in both",
        ),
        Row(
            "inside the worker: the writer thread per tracked task, pool child",
            "µs CPU",
            inworker["writer_thread_us_per_task"],
            note=f"heartbeats, wake-ups; starts written alone (task past flush_interval_s): "
            f"{inworker['writer_flushes_per_100_tasks']:.1f} store calls per 100 tasks, "
            f"{inworker['writer_flush_us_per_task']:.1f} µs per task",
        ),
        _vs_untracked("inside the worker: the task_received handler per task, main process", inworker["received_us"]),
        Row(
            "round trips per node, worker (its result with its start, written before the ack)",
            "commands",
            worker_rt,
            target=Target("ours", "<=", 2),
            note=f"one store call per task, its start folded in; plus {heartbeats} heartbeat(s) over the batch",
        ),
        Row(f"round trips per batch, dispatch ({n} nodes)", "commands", float(dispatch_counts[n]),
            float(dispatch_counts[10]), dispatch_counts[n] / dispatch_counts[10], baseline_name="10 nodes"),
        Row("Redis commands run per node, incl. inside scripts", "commands", executed / n,
            note="INFO commandstats delta over the batch, less the driver's status reads"),
    ]  # fmt: skip
    section.details = {
        "nodes": n,
        "pairs": pairs,
        "tracked_s": tracked_s,
        "untracked_s": untracked_s,
        "pair_ratios": ratios,
        "tracked_before_send_s": before_send,
        "cpu_us_per_task_by_process": cpu_per_task,
        "cpu_pair_ratios": cpu_ratios,
        "dispatch_only_pair_ratios": split_ratios,
        "inside_worker": {"pairs": timed_pairs, **inworker},
        "dispatch_only_cpu_us_per_task_by_process": {
            kind: {name: median([run[name] for run in runs]) / n * 1e6 for name in runs[0]}
            for kind, runs in split_cpu.items()
        },
        "completion": "all results stored (EXISTS over the result keys); tracked: then session terminal",
        "worker_round_trips_by_command": worker_cmds,
        "driver_round_trips_by_command": dict(driver_cmds),
        "driver_status_reads": reads,
        "heartbeat_round_trips": heartbeats,
        "untracked_batch_store_commands": {
            "round_trips": sum(1 for c in untracked_log if not c.in_script and c.key != heartbeat_key),
            "heartbeats": sum(1 for c in untracked_log if c.key == heartbeat_key),
        },
        "in_script_commands_per_node": in_script,
        "dispatch_round_trips_by_size": dispatch_counts,
        "commandstats_delta": delta,
    }
    return section
