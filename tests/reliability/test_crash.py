"""Scenario: a prefork worker SIGKILLed at a random moment of a 300-task batch, on Redis and on RabbitMQ.

What a user trusts after a crash: the session ends by itself (no resume), ``completed`` with every
node counted exactly once and holding its own result, and its ``on_complete`` callback called
exactly once. Each run is seeded (``random.Random(seed)``): the node durations (5-50 ms), the
moment of the kill (after 10-80 % of the nodes completed) and, for a pool child, which one.

One exception, not the tracker's: kombu's Redis transport pops a message before it records it as
unacknowledged, so a whole worker killed in between takes a message with it (no worker ever runs
it; celery#7950). The tracker cannot bring the task back, but the session must still end by
itself: the node is ``lost`` ("never ran"), the session ``partial_failure`` with exact counts, and
``on_complete`` says so once. The test checks that such a node's message is really gone (not in
the broker's queue nor its unacked hash, and in no worker's log) before it accepts that.

Kill modes:

- ``worker``: the main process and its pool children, all at once (nothing acks, nothing reports);
  a fresh worker starts. Redis gives the dead worker's unacknowledged messages back after the
  ``visibility_timeout`` (2 s), RabbitMQ as soon as the connection drops.
- ``child``: one pool child; the same worker goes on (Celery starts a new child and, with
  ``task_reject_on_worker_lost``, requeues the message the child held).

Workers heartbeat every 0.5 s and are presumed dead after 3 s of silence; this test runs the reaper
(:func:`tracker.celery.maintain`) every 0.5 s in a thread, as beat would.

Each run prints a table row (``-s`` shows it) and, with ``TRACKER_CRASH_TABLE=<file>``, appends it
to that file as a markdown row: the share of nodes done at the kill, the nodes the store saw running
then, the tasks the kill hit as the worker logged them (whole worker: received and not finished;
one child: jobs lost with it), how long after the kill the session ended, its status and counts,
how many times ``on_complete`` was called, and what went wrong.

The default test runs one seed per broker and mode (``TRACKER_CRASH_SEED``, default 1, to replay a
seed); the ``slow`` one runs ``TRACKER_CRASH_RUNS`` (default 1) more seeds per broker and mode, the
next ones after it; all of its rounds run, then every failure is reported::

    TRACKER_CRASH_RUNS=20 TRACKER_CRASH_TABLE=crash.md .venv/bin/python -m pytest -m slow -s \\
        tests/reliability/test_crash.py
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import group

from tests.reliability import appmod
from tests.reliability.conftest import BROKERS, MakeWorker
from tests.reliability.helpers import TERMINAL, Reaper, Worker, all_nodes, text, wait_for
from tracker import NodeResult, NodeStatus, SessionManager, TrackerSettings
from tracker.celery import dispatch
from tracker.celery.handlers import Recorder
from tracker.storage.redis import RedisStorageAdapter

NODES = 300
#: Each node sleeps this long (seconds), drawn per node from the run's seed.
SLEEP_S = (0.005, 0.050)
#: The kill comes once this share of the nodes completed, drawn from the run's seed.
KILL_AFTER = (0.10, 0.80)
#: The session must end this long after the kill, by itself.
END_DEADLINE_S = 90.0
#: After the first callback, how long to watch for a second one.
CALLBACK_WINDOW_S = 2.0
REAP_EVERY_S = 0.5
HEARTBEAT_S, STALE_AFTER_S = 0.5, 3.0
WORKER_ENV = {"TRACKER_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S), "TRACKER_WORKER_STALE_AFTER_S": str(STALE_AFTER_S)}
MODES = ["worker", "child"]
#: The Redis broker's visibility_timeout (s): a dead worker's messages come back after it.
VISIBILITY_S = 2

#: The default test's seed; the slow test's rounds use the next ``RUNS`` ones.
SEED = int(os.environ.get("TRACKER_CRASH_SEED", "1"))
#: Rounds of the slow test per broker and kill mode. CI runs it too (nothing deselects ``slow``
#: there): a round takes about 8 s when it passes, so two each keep this file near 100 s.
RUNS = int(os.environ.get("TRACKER_CRASH_RUNS", "1"))
#: Markdown rows are appended here when set.
TABLE = os.environ.get("TRACKER_CRASH_TABLE")

HEADER = (
    "| broker | kill | seed | kill at % done | running at kill (store) | tasks hit (worker log) | end after kill (s) "
    "| status | completed | lost | of which the broker lost | callbacks | verdict |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)

#: Worker log lines: a task received (main process), a task finished (pool child), a job lost with its child.
RECEIVED = re.compile(r"Task rel\.step\[([0-9a-f-]+)\] received")
FINISHED = re.compile(r"Task rel\.step\[([0-9a-f-]+)\] (?:succeeded|raised|retry)")
JOB_LOST = re.compile(r"WorkerLostError\('Worker exited prematurely: signal 9 \(SIGKILL\) Job: (\d+)")


def in_flight(log: str) -> int:
    """Tasks a worker's log shows received and not finished (running, or prefetched)."""
    return len(set(RECEIVED.findall(log)) - set(FINISHED.findall(log)))


@dataclass
class Row:
    """One run, as a table row."""

    broker: str
    mode: str
    seed: int
    kill_pct: float | None = None
    running_at_kill: int | None = None
    #: Whole worker: the tasks it held (received, not finished); one child: the jobs lost with it.
    hit: int | None = None
    end_s: float | None = None
    status: str = "?"
    completed: int | None = None
    lost: int | None = None
    callbacks: int | None = None
    #: Nodes whose message the broker lost with the worker (never ran; ended as lost).
    broker_lost: int = 0
    problems: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        def show(value: object, fmt: str = "{}") -> str:
            return "-" if value is None else fmt.format(value)

        verdict = "ok" if not self.problems else "FAIL: " + "; ".join(p.splitlines()[0] for p in self.problems)
        cells = [
            self.broker, self.mode, str(self.seed), show(self.kill_pct, "{:.0f}"), show(self.running_at_kill),
            show(self.hit),
            show(self.end_s, "{:.1f}"), self.status, show(self.completed), show(self.lost), str(self.broker_lost),
            show(self.callbacks),
            verdict.replace("|", "/"),
        ]  # fmt: skip
        return "| " + " | ".join(cells) + " |"


def report(row: Row) -> None:
    """Print the row; append it to ``TRACKER_CRASH_TABLE`` (with a header when the file is new)."""
    line = row.markdown()
    print(f"\n{line}")
    if TABLE:
        path = Path(TABLE)
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a") as out:
            out.write((HEADER + "\n" if new else "") + line + "\n")


def _pid_of(node: NodeResult) -> int | None:
    """The process id in a node's ``worker`` (``<hostname>:<pid>``)."""
    _, _, pid = (node.worker or "").rpartition(":")
    return int(pid) if pid.isdigit() else None


@dataclass
class Crash:
    """Runs crash rounds on one broker and queue; its worker carries over from round to round."""

    broker: str
    broker_url: str
    store_url: str
    queue: str
    manager: SessionManager
    make_worker: MakeWorker
    store: redis.Redis
    reaper: Reaper
    worker: Worker | None = None
    workers: list[Worker] = field(default_factory=list)

    def start_worker(self) -> Worker:
        self.worker = self.make_worker(
            self.store_url, concurrency=2, visibility_s=VISIBILITY_S, env_extra=WORKER_ENV, broker_url=self.broker_url
        )
        self.workers.append(self.worker)
        return self.worker

    def status(self, sid: str) -> dict[str, Any]:
        return self.manager.sync.get_session_status(sid)

    def callbacks(self, sid: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.store.lrange(appmod.CALLBACKS_KEY.format(sid), 0, -1)]

    def describe(self, sid: str) -> tuple[str, str]:
        """For a failure: a one-line summary (the nodes not completed with their own result), and
        the details (the status dict, each such node, what the worker logs say of it, where its
        message is on a Redis broker)."""
        status = self.status(sid)
        nodes = all_nodes(self.manager, sid)
        bad = [node for nid, node in sorted(nodes.items(), key=lambda item: int(item[0][1:])) if not _right(nid, node)]
        missing = NODES - len(nodes)
        named = [f"{n.node_id} {n.status.value}" for n in bad[:4]] + ([f"+{len(bad) - 4} more"] if len(bad) > 4 else [])
        summary = f"not completed: {', '.join(named) or 'none'}" + (f", {missing} missing" if missing else "")
        lines = [f"status: {status}", f"{len(nodes)} node(s) stored, {len(bad)} not completed with their result:"]
        logs = {w.log_path.name: w.output for w in self.workers}
        gone = []  # pending nodes whose message no worker got and the broker no longer has
        for n in bad[:25]:
            # What the workers logged of its task: "succeeded" there means finished (and acked) work.
            seen = [f"{name}: {verb}" for name, out in logs.items() if n.task_id
                    for verb in ("received", "succeeded", "raised") if f"[{n.task_id}] {verb}" in out]  # fmt: skip
            where = self.in_broker(n.task_id)
            if n.status is NodeStatus.PENDING and not seen and where == []:
                gone.append(n.node_id)
            lines.append(
                f"  {n.node_id}: {n.status.value} attempts={n.attempts} worker={n.worker} task={n.task_id} "
                f"reason={n.reason!r} result={n.result!r} logged: {', '.join(seen) or 'nothing'}"
                + ("" if where is None else f"; in the broker: {', '.join(where) or 'nowhere (the message is gone)'}")
            )
        if gone:
            # kombu's Redis transport pops a message (BRPOP) before it records it as unacknowledged:
            # a worker killed with the reply unread takes the message with it.
            summary += f"; the Redis broker lost the message of {', '.join(gone)} (no worker got it)"
        if len(bad) > 25:
            lines.append(f"  ... and {len(bad) - 25} more")
        if missing:
            lines.append(f"{missing} node(s) missing from the store")
        lines.append(f"callbacks: {[(c.get('status'), c.get('completed_nodes')) for c in self.callbacks(sid)]}")
        lines.append(
            f"reaper: {self.reaper.lost} node(s) marked lost so far in this test; "
            f"errors: {self.reaper.errors[-3:] or 'none'}"
        )
        lines.append("worker logs: " + ", ".join(str(w.log_path) for w in self.workers))
        return summary, "\n".join(lines)

    def lost_by_broker(self, node: NodeResult) -> bool:
        """A node the tracker ended as never run, whose message the Redis broker no longer has and
        no worker ever logged: kombu's Redis transport pops a message (BRPOP) before it records it
        as unacknowledged, so a worker killed with the reply unread takes the message with it."""
        if node.status is not NodeStatus.LOST or "never ran" not in (node.reason or "") or not node.task_id:
            return False
        logged = any(f"[{node.task_id}]" in worker.output for worker in self.workers)
        return not logged and self.in_broker(node.task_id) == []

    def in_broker(self, task_id: str | None) -> list[str] | None:
        """Redis broker: where the task's message is now (its queue, the unacked hash; none: the
        broker lost it). RabbitMQ: None (its queues cannot be searched by task id)."""
        if self.broker != "redis" or not task_id:
            return None
        client = redis.Redis.from_url(self.broker_url)
        try:
            places = [
                text(key)
                for key in client.scan_iter(match=f"{self.queue}*")
                if client.type(key) == b"list" and any(task_id.encode() in m for m in client.lrange(key, 0, -1))
            ]
            if any(task_id.encode() in m for m in client.hvals("unacked")):
                places.append("unacked")
        finally:
            client.close()
        return places

    def fail(self, row: Row, sid: str, what: str) -> None:
        """Note a problem of this run: ``what`` and the session's summary, then the details."""
        summary, details = self.describe(sid)
        row.problems.append(f"{what}; {summary}\n{details}")

    def run(self, mode: str, seed: int) -> Row:
        """One crash round; the row lists what went wrong (``problems``), if anything."""
        rng = random.Random(seed)
        sleeps = [round(rng.uniform(*SLEEP_S), 4) for _ in range(NODES)]
        kill_after = round(NODES * rng.uniform(*KILL_AFTER))
        row = Row(self.broker, mode, seed)
        worker = self.worker or self.start_worker()
        worker.wait_ready()
        calls = [appmod.step.s(i, sleep_s=sleeps[i]).set(queue=self.queue) for i in range(NODES)]
        sid = dispatch(group(calls), canvas_path=f"crash-{self.broker}-{mode}-{seed}.canvas", app=appmod.app,
                       node_ids=[f"n{i}" for i in range(NODES)], manager=self.manager,
                       on_complete=appmod.completion.s().set(queue=self.queue))  # fmt: skip

        def check(predicate: Callable[[], bool], timeout_s: float, what: str) -> bool:
            try:
                wait_for(predicate, timeout_s, what)
            except AssertionError as exc:
                self.fail(row, sid, f"{exc} (status {self.status(sid)['status']})")
                return False
            return True

        try:
            if not check(lambda: self.status(sid)["completed_nodes"] >= kill_after, 120, f"{kill_after} nodes done"):
                return row
            # When: the whole worker, or one pool child (preferably one the store says runs a node), is SIGKILLed
            before = self.status(sid)
            row.kill_pct = 100.0 * before["completed_nodes"] / NODES
            row.running_at_kill = before["running_nodes"]
            log_at_kill = len(worker.output)
            if mode == "worker":
                worker.kill()
                killed_at = time.monotonic()
                row.hit = in_flight(worker.output)  # its log ends here
                self.start_worker()
            else:
                children = sorted(worker.children())
                busy = {_pid_of(n) for n in all_nodes(self.manager, sid).values() if n.status is NodeStatus.RUNNING}
                victims = [pid for pid in children if pid in busy] or children
                if not victims:
                    self.fail(row, sid, "no pool child to kill")
                    return row
                os.kill(rng.choice(victims), signal.SIGKILL)
                killed_at = time.monotonic()

            # Then the session ends by itself...
            first_status: str | None = None
            ended = check(lambda: self.status(sid)["status"] in TERMINAL, END_DEADLINE_S, "the session to end")
            if ended:
                row.end_s = time.monotonic() - killed_at
                first_status = self.status(sid)["status"]
                # ...its callback comes, and no second one within the window
                with contextlib.suppress(AssertionError):  # none within 30 s: said below
                    wait_for(lambda: len(self.callbacks(sid)) >= 1, 30, "the on_complete callback")
                    time.sleep(CALLBACK_WINDOW_S)  # a window to watch, not a wait for a result
            if mode == "child":  # the jobs lost with it, as its worker logged them (WorkerLostError)
                row.hit = len(set(JOB_LOST.findall(worker.output[log_at_kill:])))
            status = self.status(sid)
            callbacks = self.callbacks(sid)
            row.status = status["status"] if ended else f"{status['status']} (not ended)"
            if first_status is not None and first_status != row.status:
                row.status = f"{first_status}→{row.status}"  # the ended status moved
            row.completed, row.lost, row.callbacks = status["completed_nodes"], status["lost_nodes"], len(callbacks)
            if not ended:
                return row
            # ...completed, every node counted exactly once with its own result; except the nodes
            # whose message the broker itself lost with the worker (the tracker ends their session
            # by itself, the node lost, counted as what happened: it never ran)
            nodes = all_nodes(self.manager, sid)
            gone = {nid for nid, node in nodes.items() if self.lost_by_broker(node)}
            row.broker_lost = len(gone)
            end = "completed" if not gone else "partial_failure"
            expected = {"completed_nodes": NODES - len(gone), "failed_nodes": len(gone), "lost_nodes": len(gone),
                        "running_nodes": 0, "cancelled_nodes": 0}  # fmt: skip
            off = [f"{key} {status[key]} (not {want})" for key, want in expected.items() if status[key] != want]
            wrong = [nid for nid in (f"n{i}" for i in range(NODES))
                     if nid not in gone and (nid not in nodes or not _right(nid, nodes[nid]))]  # fmt: skip
            if status["status"] != end or off or wrong:
                self.fail(row, sid, f"ended {row.status}: {', '.join(off) or 'counts right'}")
            # ...and on_complete was called exactly once, saying how it ended
            said = [(c.get("status"), c.get("completed_nodes")) for c in callbacks]
            if said != [(end, NODES - len(gone))]:
                each = ", ".join(f"{st} ({n} completed)" for st, n in said)
                row.problems.append(f"on_complete called {len(callbacks)} time(s){': ' if each else ''}{each}")
            return row
        finally:
            report(row)


def _right(nid: str, node: NodeResult) -> bool:
    """Node ``n<i>`` completed with ``step(i)``'s result."""
    i = int(nid[1:])
    result = node.result
    return (
        node.status is NodeStatus.COMPLETED
        and isinstance(result, dict)
        and (result.get("i"), result.get("doubled")) == (i, 2 * i)
    )


@pytest.fixture
def crash(
    rel_broker_url: str, request: pytest.FixtureRequest, make_worker: MakeWorker, redis_url: str, key_prefix: str,
    rel_queue: str,
) -> Iterator[Crash]:  # fmt: skip
    """A :class:`Crash` on this test's broker, with the reaper running in a thread."""
    settings = TrackerSettings(
        redis_url=redis_url, key_prefix=key_prefix, heartbeat_interval_s=HEARTBEAT_S, worker_stale_after_s=STALE_AFTER_S
    )
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    store = redis.Redis.from_url(redis_url)
    broker = request.node.callspec.params["rel_broker_url"]
    # The reaper here knows the workers' broker settings, as beat does in production (it derives
    # how long a redelivery may take from them).
    transport = dict(appmod.app.conf.broker_transport_options)
    appmod.app.conf.broker_transport_options = {**transport, "visibility_timeout": VISIBILITY_S}
    reaper = Reaper(Recorder(appmod.app, manager), REAP_EVERY_S)
    harness = Crash(broker, rel_broker_url, redis_url, rel_queue, manager, make_worker, store, reaper)
    reaper.start()
    yield harness
    reaper.stop()
    for worker in harness.workers:
        worker.kill()  # all done (or given up on): a warm shutdown would only take seconds (6 s on RabbitMQ)
    appmod.app.conf.broker_transport_options = transport
    if reaper.errors:
        print(f"\nreaper errors ({len(reaper.errors)}): {reaper.errors[:3]}")
    store.close()
    manager.storage.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rel_broker_url", BROKERS, indirect=True)
def test_a_sigkilled_worker_loses_nothing_and_the_session_completes_once(crash: Crash, mode: str) -> None:
    row = crash.run(mode, SEED)
    if row.problems:
        pytest.fail("\n\n".join(row.problems), pytrace=False)


@pytest.mark.slow
@pytest.mark.timeout(60 + RUNS * 240)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rel_broker_url", BROKERS, indirect=True)
def test_repeated_crashes_each_seed(crash: Crash, mode: str) -> None:
    """``TRACKER_CRASH_RUNS`` rounds (seeds after ``TRACKER_CRASH_SEED``); all run, then every failure is reported."""
    rows = [crash.run(mode, seed) for seed in range(SEED + 1, SEED + 1 + RUNS)]
    failed = [row for row in rows if row.problems]
    summary = f"{len(failed)} of {len(rows)} {crash.broker}/{mode} run(s) failed"
    print(f"\n{summary}")
    if failed:
        details = "\n\n".join(f"seed {r.seed}:\n" + "\n".join(r.problems) for r in failed)
        pytest.fail(f"{summary}\n\n{details}", pytrace=False)
