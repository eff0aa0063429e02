"""The Redis operations, free of I/O: each a *program*, a generator that yields batches of
commands (one round trip each) and receives their replies. Both flavours of the adapter drive
the same programs (:mod:`tracker.storage.redis.adapter`)."""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, TypeVar

from tracker import errors, models, validation
from tracker.states import NodeStatus, SessionStatus
from tracker.storage import base
from tracker.storage.keys import KeySpace, SessionKeys, filed, path_member
from tracker.storage.redis import codec
from tracker.structure import TREE_FIELD, Tree, links
from tracker.validation import is_worker_id

T = TypeVar("T")


#: The scripts, by file name (without ``.lua``); each is loaded with ``common.lua`` before it.
SCRIPTS = (
    "create", "record_nodes", "transition", "resume", "set_progress", "remove_if_expired", "keep_alive", "end_stalled",
    "nodes_by_status", "add_nodes",
)  # fmt: skip

#: The session fields ``record_nodes`` replies, in order (``session_values`` in ``common.lua``; its
#: ``load_session`` reads them in the same order).
SESSION_FIELDS = (
    "status", "node_count", "completed", "failed", "running", "lost", "cancelled", "skipped", "retrying", "progress",
    "started_ms", "finished_ms", "updated_ms", "canvas_path", "created_ms", "metadata", "run", "children",
    "children_open", "parent", "failure_types", "rate", "tags",
)  # fmt: skip

#: Sessions whose key names each program object remembers (see ``RedisPrograms._session_keys``).
SESSION_KEYS_CACHE_SIZE = 1024

#: How many cleanup candidates one pass takes from the index at a time.
CLEANUP_BATCH = 500


def script_source(name: str) -> str:
    """The full text of script ``name`` as loaded: ``common.lua`` followed by ``<name>.lua``."""
    lua = resources.files("tracker.storage") / "lua"
    return (lua / "common.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


@dataclass(frozen=True)
class Script:
    """A script call to make: its name, keys and arguments."""

    name: str
    keys: list[str]
    args: list[Any]


Command = Script | tuple[Any, ...]
"""One Redis call: a script, or a raw command as ``("HGETALL", key)``."""

Program = Generator[list[Command], list[Any], T]
"""An operation: yields batches of commands (one round trip each), receives their replies."""


class RedisPrograms:
    """The operations, free of I/O. Shared by the blocking and the asyncio adapter.

    Args:
        keys: Builds the key names.
        ttl_s: TTL given to a session's keys on every write.
        events_maxlen: Approximate cap of each session's event stream.
        cluster: Keep the global index out of session scripts (it lives in another slot).
        finished_ttl_s: TTL given to an ended session's keys.
    """

    def __init__(self, keys: KeySpace, ttl_s: int, events_maxlen: int, cluster: bool, finished_ttl_s: int) -> None:
        self.keys = keys
        self.ttl_s = ttl_s
        self.finished_ttl_s = finished_ttl_s
        self.events_maxlen = events_maxlen
        self.cluster = cluster
        self._session_keys_cache: dict[str, SessionKeys] = {}

    def _session_keys(self, session_id: str) -> SessionKeys:
        """``self.keys.session(session_id)``, built (and the id validated) once per session.

        Every signal handler write and every status read needs them, and a session's calls come in
        runs: benchmark row 7 (a task's handlers) shows the difference.
        """
        found = self._session_keys_cache.get(session_id)
        if found is None:
            found = self.keys.session(session_id)
            if len(self._session_keys_cache) >= SESSION_KEYS_CACHE_SIZE:
                self._session_keys_cache.clear()
            self._session_keys_cache[session_id] = found
        return found

    def _script(self, name: str, sk: SessionKeys, *args: Any) -> Script:
        return Script(name, sk.all(), list(args))

    @staticmethod
    def _check(session_id: str, reply: list[Any], target: str = "") -> list[Any]:
        code = codec.text(reply[0])
        if code == "ok":
            return reply
        if code == "not_found":
            raise errors.SessionNotFoundError(session_id)
        if code == "invalid":
            current = codec.text(reply[1])
            reason = "the session has ended" if not target else ""
            raise errors.InvalidStateTransitionError(session_id, current, target or current, reason)
        if code == "exists":
            raise errors.SessionExistsError(session_id)
        raise errors.StorageUnavailableError(f"unexpected script reply {code!r}")

    def create(self, session: models.SessionInfo, nodes: base.NewNodes = base.NO_NODES) -> Program[None]:
        sid = session.session_id
        sk = self.keys.session(sid)
        now_ms = codec.ms_int(session.created_at)
        member = path_member(session.canvas_path, now_ms, sid)
        args: list[Any] = [
            sid,
            session.canvas_path,
            session.node_count,
            now_ms,
            json.dumps(session.metadata, separators=(",", ":")),
            self.ttl_s,
            self.events_maxlen,
            len(nodes.specs),
            base.new_request_id(),
            f"{session.parent_session_id}|{session.parent_node_id}" if session.parent_session_id else "",
            self.finished_ttl_s,
            " ".join(session.tags),
            member,
            filed(session.tags, member),
        ]
        args += _node_args(nodes)
        if nodes.tree is not None:
            # Kept beside the signatures: the links, read by record_nodes when a node ends, and the
            # tree, read by resume.
            args += [TREE_FIELD, validation.compact_json(nodes.tree)]
        script = self._script("create", sk, *args)
        tags = [self.keys.tag_index(tag) for tag in session.tags]
        if not self.cluster:
            everywhere = [
                self.keys.created_index,
                self.keys.expiry_index,
                self.keys.children_index,
                self.keys.path_index,
                self.keys.filed_index,
            ]
            script = Script(script.name, [*script.keys, *everywhere, *tags], script.args)
            self._check(sid, (yield [script])[0])
            return
        self._check(sid, (yield [script])[0])
        indexes: list[Command] = [
            ("ZADD", key, {sid: now_ms}) for key in (self.keys.created_index, self.keys.expiry_index, *tags)
        ]
        indexes.append(("ZADD", self.keys.path_index, {member: 0}))
        indexes.append(("HSET", self.keys.filed_index, sid, filed(session.tags, member)))
        if session.parent_session_id:
            watched = f"{sid} {session.parent_session_id} {session.parent_node_id}"
            indexes.append(("ZADD", self.keys.children_index, {watched: now_ms}))
        yield indexes

    def add_nodes(
        self, session_id: str, nodes: base.NewNodes, max_node_count: int, now: datetime
    ) -> Program[models.AddOutcome]:
        specs = nodes.specs
        args: list[Any] = [
            models.ms_from_utc(now), self.ttl_s, self.events_maxlen, max_node_count, len(specs),
            "" if nodes.tree is None else validation.compact_json(nodes.tree),
        ]  # fmt: skip
        args += _node_args(nodes)
        reply = (yield [self._script("add_nodes", self._session_keys(session_id), *args)])[0]
        code = codec.text(reply[0])
        if code == "again":
            pending = [codec.text(node) for node in reply[2]]
            return models.AddOutcome(
                session=codec.session_from_values(session_id, reply[1]), added=False, pending=pending
            )
        if code == "ended":
            raise errors.InvalidStateTransitionError(
                session_id, codec.text(reply[1]), "running", "the session has ended: nodes can no longer be added"
            )
        if code == "exists":
            raise errors.TrackerValidationError(
                "nodes", codec.text(reply[1]), "already a node of the session", session_id
            )
        if code == "limit":
            raise errors.TrackerValidationError(
                "nodes", len(specs), f"more than {max_node_count} nodes in all (TRACKER_MAX_NODE_COUNT)", session_id
            )
        reply = self._check(session_id, reply)
        session = codec.session_from_values(session_id, reply[1])
        return models.AddOutcome(session=session, added=True, pending=[spec.node_id for spec in specs])

    def get_structure(self, session_id: str) -> Program[Tree | None]:
        found = (yield [("HGET", self._session_keys(session_id).sigs, TREE_FIELD)])[0]
        return None if found is None else json.loads(found)

    def get(self, session_id: str) -> Program[models.SessionInfo | None]:
        flat = (yield [("HGETALL", self._session_keys(session_id).session)])[0]
        if not flat:
            return None
        fields = flat if isinstance(flat, dict) else codec.flat_dict(flat)
        return codec.session_from_hash(session_id, {codec.text(k): codec.text(v) for k, v in fields.items()})

    def transition(
        self, session_id: str, target: SessionStatus, allowed_from: frozenset[SessionStatus], now: datetime
    ) -> Program[models.TransitionOutcome]:
        sk = self.keys.session(session_id)
        script = self._script(
            "transition",
            sk,
            target.value,
            models.ms_from_utc(now),
            self.ttl_s,
            self.events_maxlen,
            base.new_request_id(),
            *sorted(allowed_from),
        )
        reply = self._check(session_id, (yield [script])[0], target.value)
        return models.TransitionOutcome(
            session=codec.session_from_hash(session_id, codec.flat_dict(reply[1])),
            previous_status=SessionStatus(codec.text(reply[2])),
        )

    def resume(
        self, session_id: str, choice: base.ResumeChoice, allowed_from: frozenset[SessionStatus], now: datetime
    ) -> Program[models.ResumeOutcome]:
        sk = self.keys.session(session_id)
        nodes = choice.nodes
        chosen = [] if nodes is None else [validation.node_id(node, session_id) for node in nodes]
        script = self._script(
            "resume",
            sk,
            "1" if choice.retry_failed else "0",
            choice.task_id_base,
            models.ms_from_utc(now),
            self.ttl_s,
            self.events_maxlen,
            base.new_request_id(),
            "-1" if nodes is None else len(chosen),
            *chosen,
            *sorted(allowed_from),
        )
        if not self.cluster:
            script = Script(script.name, [*script.keys, self.keys.expiry_index], script.args)
        reply = (yield [script])[0]
        if codec.text(reply[0]) == "changed":
            raise base.ResumePlanChanged(session_id)
        reply = self._check(session_id, reply, SessionStatus.RUNNING.value)
        if self.cluster:  # (outside Cluster the script does it)
            yield [("ZADD", self.keys.expiry_index, {session_id: models.ms_from_utc(now)})]
        flat = [codec.text(v) for v in reply[3]]
        reset = [
            models.NodeSpec(node_id=nid, task_id=task or None, signature=json.loads(sig) if sig else None)
            for nid, task, sig in zip(flat[0::3], flat[1::3], flat[2::3], strict=True)
        ]
        return models.ResumeOutcome(
            session=codec.session_from_hash(session_id, codec.flat_dict(reply[1])),
            previous_status=SessionStatus(codec.text(reply[2])),
            nodes=reset,
        )

    def set_progress(self, session_id: str, progress_percent: float, now: datetime) -> Program[models.SessionInfo]:
        sk = self.keys.session(session_id)
        script = self._script(
            "set_progress", sk, repr(float(progress_percent)), models.ms_from_utc(now), self.ttl_s, self.events_maxlen
        )
        reply = self._check(session_id, (yield [script])[0])
        return codec.session_from_hash(session_id, codec.flat_dict(reply[1]))

    def _record_script(
        self,
        session_id: str,
        events: Sequence[base.NodeEvent],
        now_ms: int,
        details: bool,
        request_id: str,
        expect_holder: str = "",
        started_before_ms: int | str = "",
    ) -> Script:
        keys = self._session_keys(session_id).all()
        args: list[Any] = [self.ttl_s, self.events_maxlen, request_id, "1" if details else "0", session_id]
        # Outside Cluster the holder registry is kept by the same script (no extra round trip):
        # each worker process named by an event gets a number, 0 for none (asked once per name).
        holders: dict[str, int] = {}
        numbers: dict[str | None, int] = {None: 0, "": 0}
        for event in events:
            holder = expect_holder or event.worker
            held = numbers.get(holder)
            if held is None:
                held = 0
                if not self.cluster and is_worker_id(holder):
                    held = holders[holder] = len(holders) + 1  # type: ignore[index]
                numbers[holder] = held
            at, started, task_id, worker = event.at, event.started_at, event.task_id, event.worker
            if task_id is not None:
                task_id = codec.record_field(task_id, "task_id")
            if worker is not None:
                worker = codec.record_field(worker, "worker")
            status: str = event.status
            if event.child is not None:  # a child session opened or ended (record_nodes.lua: with_children)
                status, payload = codec.child_payload(event.child)
            elif event.progress is not None:  # a progress report (record_nodes.lua: progress_applies)
                status, payload = "progress", codec.progress_payload(event.progress)
            else:
                payload = codec.record_payload(event)
            # One argument per event, its fields joined by '|' (none but the payload, last, may
            # hold one): far cheaper to send and to read than eleven arguments.
            args.append(
                f"{event.node_id}|{status}|{'' if event.attempt is None else event.attempt}|{task_id or ''}|"
                f"{worker or ''}|{now_ms if at is None else round(at.timestamp() * 1000)}|"
                f"{'' if started is None else round(started.timestamp() * 1000)}|{expect_holder}|{started_before_ms}|"
                f"{held}|{payload}"
            )
        if holders:
            keys += [self.keys.workers, *(self.keys.held(h) for h in holders)]
        return Script("record_nodes", keys, args)

    def _registry_update(self, session_id: str, holder: str, node: models.NodeResult, now_ms: int) -> list[Command]:
        # On Cluster the registry lives in other slots: one more round trip, on starts and results.
        member = f"{session_id} {node.node_id}"
        if node.status is NodeStatus.RUNNING and node.worker == holder:
            return [("SADD", self.keys.held(holder), member), ("ZADD", self.keys.workers, {holder: now_ms})]
        return [("SREM", self.keys.held(holder), member)]

    def _reply(
        self, session_id: str, reply: list[Any]
    ) -> tuple[Callable[[], models.SessionInfo], SessionStatus | None, list[Any]]:
        """An ``ok`` (or ``not_found``) ``record_nodes`` reply: a reader of the session, what the
        call finished, the details."""
        self._check(session_id, reply)
        finished = codec.text(reply[1])
        read_session = functools.partial(codec.session_from_values, session_id, reply[2])
        return read_session, SessionStatus(finished) if finished else None, reply[4]

    def _node_outcome(self, session_id: str, node_id: str, reply: list[Any]) -> models.NodeOutcome:
        """A one-event ``record_nodes`` reply (with details) as what happened to that node."""
        read_session, finished, details = self._reply(session_id, reply)
        old, record = codec.text(details[0]), codec.text(details[1])
        return models.NodeOutcome(
            # No record: an event that did not apply to a node never recorded (a progress report).
            node=codec.node_from_record(node_id, record)
            if record
            else models.NodeResult(node_id=node_id, status=NodeStatus.PENDING),
            session=read_session(),
            previous_node_status=NodeStatus(old) if old else None,
            finished=finished,
            **codec.callbacks(reply),
        )

    def _refused(self, session_id: str, events: Sequence[base.NodeEvent], reply: list[Any]) -> Program[None]:
        """Raise what a refused ``record_nodes`` call means: more nodes than the session has room
        for, or no such session (then :meth:`_check`). A session that is gone has no node a worker
        process runs: on Cluster, where their sets are in other slots, they are taken out here."""
        code = codec.text(reply[0])
        if code == "limit":
            info = yield from self.get(session_id)
            raise errors.NodeLimitError(session_id, codec.text(reply[1]), info.node_count if info else 0)
        if code == "not_found" and self.cluster:
            gone: list[Command] = [
                ("SREM", self.keys.held(event.worker), f"{session_id} {event.node_id}")
                for event in events
                if event.worker and is_worker_id(event.worker)
            ]
            if gone:
                yield gone

    def record_node(self, session_id: str, event: base.NodeEvent, now: datetime) -> Program[models.NodeOutcome]:
        now_ms = codec.ms_int(now)
        script = self._record_script(session_id, [event], now_ms, True, event.request_id or base.new_request_id())
        reply = (yield [script])[0]
        yield from self._refused(session_id, [event], reply)
        outcome = self._node_outcome(session_id, event.node_id, reply)
        if self.cluster and event.worker and is_worker_id(event.worker):
            yield self._registry_update(session_id, event.worker, outcome.node, now_ms)
        return outcome

    def record_nodes(
        self, session_id: str, events: Sequence[base.NodeEvent], now: datetime, request_id: str | None = None
    ) -> Program[models.BatchOutcome]:
        now_ms = codec.ms_int(now)
        details = self.cluster  # on Cluster the registry is updated from each node's final record
        script = self._record_script(session_id, events, now_ms, details, request_id or base.new_request_id())
        reply = (yield [script])[0]
        yield from self._refused(session_id, events, reply)
        read_session, finished, records = self._reply(session_id, reply)
        if details:
            registry: list[Command] = []
            for event, record in zip(events, records[1::2], strict=True):
                if event.worker and is_worker_id(event.worker):
                    node = codec.node_from_record(event.node_id, codec.text(record))
                    registry += self._registry_update(session_id, event.worker, node, now_ms)
            if registry:
                yield registry
        return models.BatchOutcome(read_session, finished, **codec.callbacks(reply))

    def heartbeat(self, worker: str | None, now: datetime, sessions: Sequence[str] = ()) -> Program[None]:
        now_ms = codec.ms_int(now)
        keep_alive: list[Command] = [
            Script("keep_alive", self.keys.session(sid).all(), [now_ms, self.ttl_s]) for sid in sessions
        ]
        if worker is not None:
            keep_alive.insert(0, ("ZADD", self.keys.workers, {validation.worker_id(worker): now_ms}))
        if keep_alive:
            yield keep_alive

    def retire(self, worker: str) -> Program[None]:
        # Nothing adds to a stopped process's set, so its size cannot change before the ZREMs.
        (held,) = yield [("SCARD", self.keys.held(worker))]
        if not held:
            yield [("ZREM", self.keys.workers, worker), ("ZREM", self.keys.suspects, worker)]

    def get_children(self, session_id: str) -> Program[list[models.ChildSession]]:
        found = (yield [("HGETALL", self._session_keys(session_id).children)])[0] or {}
        fields = found if isinstance(found, dict) else codec.flat_dict(found)
        entries = {codec.text(k): codec.text(v) for k, v in fields.items()}
        return [codec.child_from_entry(child, entry) for child, entry in entries.items() if child[0] != "#"]

    def get_failures(self, session_id: str) -> Program[list[models.FailureGroup]]:
        sk = self._session_keys(session_id)
        exists, found = yield [("EXISTS", sk.session), ("HGETALL", sk.failures)]
        if not exists:
            raise errors.SessionNotFoundError(session_id)
        fields = found if isinstance(found, dict) else codec.flat_dict(found)
        return [codec.failure_group(codec.text(k), codec.text(v)) for k, v in fields.items()]

    def list_workers(self, limit: int) -> Program[list[models.WorkerInfo]]:
        # Two round trips: the page of the registry, then for each worker on it the size of its
        # set and a bounded sample of it. The registry keys are global (no hash tag), so each
        # lives in a slot of its own on a Cluster: plain commands, which a pipeline sends to each
        # key's node, never a script.
        (found,) = yield [("ZREVRANGE", self.keys.workers, 0, limit - 1, "WITHSCORES")]
        seen = [(codec.text(worker), int(float(score))) for worker, score in found]
        if not seen:
            return []
        reads: list[Command] = []
        for worker, _ in seen:
            held = self.keys.held(worker)
            # SRANDMEMBER with a positive count: distinct members, the whole set when it is that
            # small (a worker runs about its concurrency), O(count) when it is not.
            reads += [("SCARD", held), ("SRANDMEMBER", held, base.WORKER_NODES_SHOWN)]
        replies = yield reads
        workers: list[models.WorkerInfo] = []
        for (worker, ms), running, members in zip(seen, replies[0::2], replies[1::2], strict=True):
            pairs = sorted(codec.text(member).partition(" ")[0::2] for member in members or [])
            workers.append(
                models.WorkerInfo(
                    worker=worker,
                    last_seen_at=codec.utc(ms),
                    running=int(running),
                    nodes=[models.HeldNode(session_id=sid, node_id=nid) for sid, nid in pairs],
                )
            )
        return workers

    def watched_children(self, limit: int) -> Program[list[base.ChildWatch]]:
        found = (yield [("ZRANGE", self.keys.children_index, 0, limit - 1)])[0]
        return [base.ChildWatch(*codec.text(member).split(" ")) for member in found]

    def unwatch_child(self, watch: base.ChildWatch) -> Program[None]:
        yield [("ZREM", self.keys.children_index, " ".join(watch))]

    def reap_lost(
        self, now: datetime, stale_after_s: float, max_runtime_s: float | None = None, requeued: bool = False
    ) -> Program[list[models.NodeOutcome]]:
        now_ms = codec.ms_int(now)
        seen, suspected, state = yield [
            ("ZRANGE", self.keys.workers, 0, -1, "WITHSCORES"),
            ("ZRANGE", self.keys.suspects, 0, -1, "WITHSCORES"),
            ("GET", self.keys.reaper),
        ]
        workers = {codec.text(w): int(float(score)) for w, score in seen}
        suspects = {codec.text(w): int(float(score)) for w, score in suspected}
        silent = base.silent_workers(workers, suspects, state is None or codec.text(state) == "1", now_ms,
                                round(stale_after_s * 1000))  # fmt: skip
        upkeep: list[Command] = [("DEL", self.keys.suspects), ("SET", self.keys.reaper, "1" if silent.alive else "0")]
        if silent.suspects:
            upkeep.append(("ZADD", self.keys.suspects, silent.suspects))
        if silent.due:
            upkeep.append(("SET", self.keys.reaped, now_ms))
        due = silent.due
        check = list(workers) if max_runtime_s is not None else list(due)
        held = (yield [*upkeep, *[("SMEMBERS", self.keys.held(w)) for w in check]])[len(upkeep) :]
        calls: list[tuple[str, str, str, Script]] = []
        for worker, members in zip(check, held, strict=True):
            status = NodeStatus.LOST
            if worker in due:
                last_seen = models.utc_from_ms(due[worker]) or now
                reason, started_before = base.lost_reason(worker, last_seen, now), ""
                if requeued:
                    status, reason = NodeStatus.PENDING, base.requeued_reason(worker, last_seen, now)
            else:
                assert max_runtime_s is not None
                reason = f"ran longer than the {max_runtime_s:g} s limit on {worker}"
                started_before = str(now_ms - round(max_runtime_s * 1000))
            for member in sorted(codec.text(m) for m in members):
                session_id, _, node_id = member.partition(" ")
                event = base.NodeEvent(node_id=node_id, status=status, reason=reason)
                request_id = base.new_request_id()
                script = self._record_script(session_id, [event], now_ms, True, request_id, worker, started_before)
                calls.append((worker, session_id, node_id, script))
        replies = (yield [call[3] for call in calls]) if calls else []
        outcomes: list[models.NodeOutcome] = []
        done: list[Command] = []
        for (worker, session_id, node_id, _), reply in zip(calls, replies, strict=True):
            code = codec.text(reply[0])
            if code == "ok" and reply[3]:  # skipped: the node no longer runs there
                code = "skip"
            if code == "ok":
                outcomes.append(self._node_outcome(session_id, node_id, reply))
            if code == "not_found" or (self.cluster and (code == "ok" or worker in due)):
                done.append(("SREM", self.keys.held(worker), f"{session_id} {node_id}"))
        if due:
            sizes = yield [*done, *[("SCARD", self.keys.held(w)) for w in due]]
            idle = [w for w, size in zip(due, sizes[len(done) :], strict=True) if not size]
            if idle:
                yield [("ZREM", self.keys.workers, *idle), ("ZREM", self.keys.suspects, *idle)]
        elif done:
            yield done
        return outcomes

    def _idle_candidates(self, cutoff_ms: int, offset: int) -> Program[list[str]]:
        """A page (from ``offset``) of the sessions whose last *known* change, as the expiry index has
        it, is older than ``cutoff_ms``: candidates only, each re-checked by a script of its own."""
        (ids,) = yield [
            ("ZRANGEBYSCORE", self.keys.expiry_index, "-inf", f"({cutoff_ms}", "LIMIT", offset, CLEANUP_BATCH)
        ]
        return [codec.text(i) for i in ids]

    def end_stalled(self, now: datetime, stalled_after_s: float, reason: str) -> Program[list[models.BatchOutcome]]:
        now_ms = codec.ms_int(now)
        (reaped,) = yield [("GET", self.keys.reaped)]
        if reaped is None or now_ms - int(codec.text(reaped)) > round((stalled_after_s + self.ttl_s) * 1000):
            return []  # no worker died within the window: nothing can have been left waiting
        cutoff_ms = now_ms - round(stalled_after_s * 1000)
        payload = json.dumps({"reason": reason}, separators=(",", ":"))
        outcomes: list[models.BatchOutcome] = []
        offset = 0
        while True:
            ids = yield from self._idle_candidates(cutoff_ms, offset)
            if not ids:
                return outcomes
            args = [cutoff_ms, codec.text(reaped), now_ms, self.ttl_s, self.events_maxlen, payload]
            replies = yield [Script("end_stalled", self.keys.session(sid).all(), args) for sid in ids]
            active: dict[str, int] = {}
            for sid, reply in zip(ids, replies, strict=True):
                code = codec.text(reply[0])
                if code == "active":
                    active[sid] = int(codec.text(reply[1]))
                elif code == "stalled":
                    finished = codec.text(reply[1])
                    outcomes.append(
                        models.BatchOutcome(
                            functools.partial(codec.session_from_values, sid, reply[2]),
                            finished=SessionStatus(finished) if finished else None,
                            first_failure=codec.text(reply[3]) or None,
                        )
                    )
            if active:  # their real last change: those younger than the cutoff leave the range
                yield [("ZADD", self.keys.expiry_index, active)]
            if len(ids) < CLEANUP_BATCH:
                return outcomes
            offset += len(ids) - sum(ms >= cutoff_ms for ms in active.values())

    def get_nodes(
        self, session_id: str, status: NodeStatus | None = None, cursor: str | None = None, limit: int = 100
    ) -> Program[models.NodePage]:
        sk = self.keys.session(session_id)
        if status is not None:
            return (yield from self._nodes_by_status(session_id, sk, status, cursor, limit))
        position = base.offset_cursor(cursor)
        exists, (next_position, items) = yield [
            ("EXISTS", sk.session),
            ("HSCAN", sk.nodes, position, "COUNT", limit),
        ]
        if not exists:
            raise errors.SessionNotFoundError(session_id)
        fields = items if isinstance(items, dict) else codec.flat_dict(items)
        next_cursor = codec.text(next_position)
        return models.NodePage(
            nodes=[codec.node_from_record(codec.text(k), codec.text(v)) for k, v in fields.items()],
            next_cursor=None if next_cursor == "0" else next_cursor,
        )

    def get_node(self, session_id: str, node_id: str) -> Program[models.NodeResult]:
        sk = self._session_keys(session_id)
        exists, record = yield [("EXISTS", sk.session), ("HGET", sk.nodes, node_id)]
        if not exists:
            raise errors.SessionNotFoundError(session_id)
        if record is None:
            raise errors.NodeNotFoundError(session_id, node_id)
        return codec.node_from_record(node_id, codec.text(record))

    def _nodes_by_status(
        self, session_id: str, sk: SessionKeys, status: NodeStatus, cursor: str | None, limit: int
    ) -> Program[models.NodePage]:
        # From the status index: a full page whenever that many nodes are in the status; the cursor
        # is the last node id of the page before.
        (reply,) = yield [self._script("nodes_by_status", sk, status.value, base.status_cursor(cursor), limit)]
        if codec.text(reply[0]) == "not_found":
            raise errors.SessionNotFoundError(session_id)
        flat = [codec.text(v) for v in reply[1]]
        nodes = [
            codec.node_from_record(nid, record) for nid, record in zip(flat[0::2], flat[1::2], strict=True) if record
        ]
        return models.NodePage(nodes=nodes, next_cursor=flat[-2] if reply[2] and flat else None)

    def list_sessions(
        self, where: base.SessionFilter = base.EVERY_SESSION, cursor: str | None = None, limit: int = 50
    ) -> Program[models.SessionPage]:
        tag, path = where.tag, where.path
        start = base.offset_cursor(cursor)
        # One index gives the page (a tag's, the paths', or all sessions'); other filters sift it.
        members: list[str] = []
        if tag is None and path is not None:
            members = yield from self._by_path(path, start, limit)
            ids = [member.rpartition("\0")[2] for member in members]
        else:
            index = self.keys.created_index if tag is None else self.keys.tag_index(tag)
            (found,) = yield [("ZREVRANGE", index, start, start + limit - 1)]
            ids = [codec.text(i) for i in found]
        replies = (yield [("HGETALL", self.keys.session(sid).session) for sid in ids]) if ids else []
        sessions, stale = [], []
        for sid, flat in zip(ids, replies, strict=True):
            if not flat:
                stale.append(sid)
                continue
            fields = flat if isinstance(flat, dict) else codec.flat_dict(flat)
            info = codec.session_from_hash(sid, {codec.text(k): codec.text(v) for k, v in fields.items()})
            if where.matches(info):
                sessions.append(info)
        if stale:  # expired by TTL: taken out of every index as we pass by (cleanup does the rest)
            yield from self._forget(stale)
        return models.SessionPage(sessions=sessions, next_cursor=str(start + limit) if len(ids) == limit else None)

    def _by_path(self, prefix: str, start: int, limit: int) -> Program[list[str]]:
        """A page (from ``start``) of the members of the paths index whose canvas path starts with
        ``prefix``: by path, newest first within one. Its first member's rank is counted (the
        members below the prefix), so the page costs the page, however far it is."""
        (before,) = yield [("ZLEXCOUNT", self.keys.path_index, "-", f"({prefix}")]
        first = int(before) + start
        (found,) = yield [("ZRANGE", self.keys.path_index, first, first + limit - 1)]
        members = [codec.text(member) for member in found]
        return list(itertools.takewhile(lambda member: member.startswith(prefix), members))

    def delete(self, session_id: str) -> Program[bool]:
        (deleted,) = yield [("DEL", *self.keys.session(session_id).all())]
        yield from self._forget([session_id])
        return bool(deleted)

    def _forget(self, ids: list[str]) -> Program[None]:
        """Take sessions that are gone out of every index: the listing and cleanup ones, and the
        filter ones the filed index says they are in."""
        (entries,) = yield [("HMGET", self.keys.filed_index, *ids)]
        removals: dict[str, list[str]] = {self.keys.created_index: list(ids), self.keys.expiry_index: list(ids)}
        for sid, entry in zip(ids, entries, strict=True):
            if entry is None:
                continue
            tags, _, member = codec.text(entry).partition("\n")
            removals.setdefault(self.keys.path_index, []).append(member)
            for tag in tags.split():
                removals.setdefault(self.keys.tag_index(tag), []).append(sid)
        yield [*(("ZREM", key, *members) for key, members in removals.items()), ("HDEL", self.keys.filed_index, *ids)]

    def remove_expired(self, now: datetime, timeout_s: float, finished_ttl_s: float | None = None) -> Program[int]:
        now_ms = codec.ms_int(now)
        timeout_ms = round(timeout_s * 1000)
        ended_ms = timeout_ms if finished_ttl_s is None else round(finished_ttl_s * 1000)
        # The cleanup index scores a session by when it expires less the shorter of the two
        # retentions (a lower bound: re-checked, then moved on to the real one), so a pass reads
        # only the sessions due, and ended sessions kept for a day cost nothing until then.
        cutoff_ms = now_ms - min(timeout_ms, ended_ms)
        removed = 0
        while True:
            # Each candidate is re-checked atomically against its real updated_ms before it is deleted.
            # Every one leaves the range (deleted, or moved on to its real expiry, at or after the
            # cutoff), so each round reads from the front.
            ids = yield from self._idle_candidates(cutoff_ms, 0)
            if not ids:
                return removed
            args = [now_ms, timeout_ms, ended_ms]
            replies = yield [Script("remove_if_expired", self.keys.session(sid).all(), args) for sid in ids]
            gone, active = [], {}
            for sid, reply in zip(ids, replies, strict=True):
                code = codec.text(reply[0])
                if code == "active":
                    active[sid] = int(codec.text(reply[1]))
                else:
                    removed += code == "deleted"
                    gone.append(sid)  # deleted now, or expired by TTL before
            if gone:
                yield from self._forget(gone)
            if active:
                yield [("ZADD", self.keys.expiry_index, active)]
            if len(ids) < CLEANUP_BATCH:
                return removed

    def read_events(
        self, session_id: str, after: str | None = None, limit: int = 100, block_ms: int | None = None
    ) -> Program[list[models.SessionEvent]]:
        sk = self.keys.session(session_id)
        start = f"({after}" if after else "-"
        exists, entries = yield [("EXISTS", sk.session), ("XRANGE", sk.events, start, "+", "COUNT", limit)]
        if not exists:
            raise errors.SessionNotFoundError(session_id)
        if not entries and block_ms:
            (streams,) = yield [("XREAD", "COUNT", limit, "BLOCK", block_ms, "STREAMS", sk.events, after or "0-0")]
            entries = streams[0][1] if streams else []
            if isinstance(streams, dict):
                entries = next(iter(streams.values()), [[]])[0]
        return [codec.event_from_entry(entry_id, fields) for entry_id, fields in entries]


def _node_args(nodes: base.NewNodes) -> list[Any]:
    """The arguments that carry new nodes to ``create`` and ``add_nodes``: each node's id, task id
    and signature, then the links of their tree."""
    args: list[Any] = []
    for spec, sig in zip(nodes.specs, nodes.signatures, strict=True):
        args += [spec.node_id, codec.record_field(spec.task_id, "task_id"), sig or ""]
    if nodes.tree is not None:
        args += [item for pair in links(nodes.tree).fields().items() for item in pair]
    return args
