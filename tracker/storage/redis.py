"""Redis storage: every write is one Lua script run by EVALSHA, every status read one HGETALL.

Each operation is written once, as a *program*: a generator that yields batches of Redis
commands and receives their replies. :class:`RedisStorageAdapter` drives programs with a
blocking redis-py client (Celery workers), :class:`AsyncRedisStorageAdapter` with
``redis.asyncio`` clients, one per event loop (web apps, scripts, tests). The scripts live in
``lua/`` (see :mod:`tracker.storage.keys` for the key layout) and are registered once per client
with ``register_script``, which falls back from EVALSHA to loading the script when the server
answers NOSCRIPT.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import sys
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from tracker import validation
from tracker.config import TrackerSettings
from tracker.errors import (
    InvalidStateTransitionError,
    NodeLimitError,
    SessionExistsError,
    SessionNotFoundError,
    StorageUnavailableError,
    TrackerValidationError,
)
from tracker.models import (
    BatchOutcome,
    NodeError,
    NodeOutcome,
    NodePage,
    NodeResult,
    NodeSpec,
    SessionEvent,
    SessionInfo,
    SessionPage,
    TransitionOutcome,
    json_datetime,
    ms_from_utc,
    utc_from_ms,
)
from tracker.states import NodeStatus, SessionStatus
from tracker.storage.base import (
    NodeEvent,
    ResumeOutcome,
    ResumePlanChanged,
    lost_reason,
    new_request_id,
    requeued_reason,
    silent_workers,
    status_cursor,
)
from tracker.storage.keys import KeySpace, SessionKeys
from tracker.structure import TREE_FIELD, Tree, links
from tracker.validation import is_worker_id

T = TypeVar("T")

#: The scripts, by file name (without ``.lua``); each is loaded with ``common.lua`` before it.
SCRIPTS = (
    "create", "record_nodes", "transition", "resume", "set_progress", "remove_if_expired", "keep_alive", "end_stalled",
    "nodes_by_status",
)  # fmt: skip

#: The session fields ``record_nodes`` replies, in order (``session_values`` in ``common.lua``; its
#: ``load_session`` reads them in the same order).
SESSION_FIELDS = (
    "status", "node_count", "completed", "failed", "running", "lost", "cancelled", "skipped", "retrying", "progress",
    "started_ms", "finished_ms", "updated_ms", "canvas_path", "created_ms", "metadata", "run",
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flat_dict(flat: Sequence[Any]) -> dict[str, str]:
    # Every write's reply carries the session hash: decode in line rather than one call per item.
    items = [v.decode() if type(v) is bytes else _text(v) for v in flat]
    return dict(zip(items[0::2], items[1::2], strict=True))


@functools.lru_cache(maxsize=1024)
def _utc(ms: int) -> datetime:
    # Datetimes are immutable, and the same few recur in every reply of a session (created, started,
    # the current millisecond): each is converted once.
    moment = utc_from_ms(ms)
    assert moment is not None
    return moment


def _ms(value: str) -> datetime | None:
    return _utc(int(value)) if value else None


def _session(session_id: str, fields: dict[str, str]) -> SessionInfo:
    created = _utc(int(fields["created_ms"]))
    updated = _utc(int(fields["updated_ms"]))
    return SessionInfo(
        session_id=session_id,
        canvas_path=fields["canvas_path"],
        node_count=int(fields["node_count"]),
        status=SessionStatus(fields["status"]),
        progress_percent=float(fields["progress"]),
        completed_nodes=int(fields["completed"]),
        failed_nodes=int(fields["failed"]),
        running_nodes=int(fields["running"]),
        retrying_nodes=int(fields.get("retrying") or 0),
        lost_nodes=int(fields["lost"]),
        cancelled_nodes=int(fields["cancelled"]),
        skipped_nodes=int(fields.get("skipped") or 0),
        created_at=created,
        updated_at=updated,
        started_at=_ms(fields.get("started_ms", "")),
        finished_at=_ms(fields.get("finished_ms", "")),
        metadata=json.loads(fields.get("metadata") or "{}"),
        run=int(fields.get("run") or 1),
    )


def _session_values(session_id: str, values: Sequence[Any]) -> SessionInfo:
    # record_nodes replies the session's fields as values in SESSION_FIELDS order: numbers as
    # integers, the rest as bytes (read on every write: decoded in line).
    (status, node_count, completed, failed, running, lost, cancelled, skipped, retrying, progress,
     started_ms, finished_ms, updated_ms, canvas_path, created_ms, metadata, run) = values  # fmt: skip
    return SessionInfo(
        session_id=session_id,
        canvas_path=_text(canvas_path),
        node_count=node_count,
        status=_SESSION_STATUS[_text(status)],
        progress_percent=float(progress),
        completed_nodes=completed,
        failed_nodes=failed,
        running_nodes=running,
        retrying_nodes=retrying,
        lost_nodes=lost,
        cancelled_nodes=cancelled,
        skipped_nodes=skipped,
        created_at=_utc(int(created_ms)),
        updated_at=_utc(int(updated_ms)),
        started_at=_utc(int(started_ms)) if started_ms else None,
        finished_at=_utc(int(finished_ms)) if finished_ms else None,
        metadata=json.loads(metadata) if metadata and metadata != b"{}" else {},
        run=run,
    )


_SESSION_STATUS = {status.value: status for status in SessionStatus}


@functools.lru_cache(maxsize=1024)
def _json_second(second: int) -> str:
    """The JSON text of a whole UTC second, without its ``Z``: ``2026-11-29T23:21:06``."""
    return json_datetime(_utc(second * 1000))[:-1]


@functools.lru_cache(maxsize=4096)
def _json_ms(ms: int) -> str:
    """``json_datetime(_utc(ms))``, from a cached second: a write's reply holds a new millisecond
    each time, and building its datetime to format it took a good part of reading that reply. The
    session's creation and start recur in every reply: cached whole."""
    second, milli = divmod(ms, 1000)
    return f"{_json_second(second)}.{milli:03d}000Z" if milli else _json_second(second) + "Z"


def _status_values(session_id: str, values: Sequence[Any]) -> dict[str, Any]:
    # What _session_values(...).to_dict() gives, without the model: the status dict every
    # add_node_result returns (tests/unit/test_status_dict.py checks the two agree).
    (status, node_count, completed, failed, running, lost, cancelled, skipped, retrying, progress,
     started_ms, finished_ms, updated_ms, canvas_path, created_ms, metadata, run) = values  # fmt: skip
    status = _text(status)
    if status not in _SESSION_STATUS:
        raise StorageUnavailableError(f"unexpected session status {status!r} in the store")
    return {
        "session_id": session_id,
        "canvas_path": _text(canvas_path),
        "node_count": node_count,
        "status": status,
        "progress_percent": float(progress),
        "completed_nodes": completed,
        "failed_nodes": failed,
        "running_nodes": running,
        "retrying_nodes": retrying,
        "lost_nodes": lost,
        "cancelled_nodes": cancelled,
        "skipped_nodes": skipped,
        "created_at": _json_ms(int(created_ms)),
        "updated_at": _json_ms(int(updated_ms)),
        "started_at": _json_ms(int(started_ms)) if started_ms else None,
        "finished_at": _json_ms(int(finished_ms)) if finished_ms else None,
        "metadata": json.loads(metadata) if metadata and metadata != b"{}" else {},
        "run": run,
        "pending_nodes": max(0, node_count - completed - failed - cancelled - skipped - running - retrying),
    }


def _callbacks(reply: list[Any]) -> dict[str, Any]:
    """The callbacks a ``record_nodes`` reply tells its caller to send (see the script's contract)."""
    failed_node = _text(reply[6])
    return {"succeeded": _text(reply[5]) == "1", "first_failure": failed_node or None}


def _node(node_id: str, record: str) -> NodeResult:
    status, attempts, started, finished, task_id, worker, payload = record.split("|", 6)
    details = json.loads(payload) if payload else {}
    error = details.get("error")
    return NodeResult(
        node_id=node_id,
        status=NodeStatus(status),
        result=details.get("result"),
        error=NodeError(type=error[0], message=error[1]) if error else None,
        attempts=int(attempts),
        task_id=task_id or None,
        worker=worker or None,
        started_at=_ms(started),
        finished_at=_ms(finished),
        reason=details.get("reason"),
    )


def _payload(event: NodeEvent) -> str:
    # The result is already JSON text (validated and size-capped by the manager): splice it in
    # rather than decode and re-encode it.
    parts = []
    if event.result_json is not None:
        parts.append(f'"result":{event.result_json}')
    if event.error is not None:
        parts.append('"error":' + json.dumps([event.error.type, event.error.message], ensure_ascii=False))
    if event.reason is not None:
        parts.append('"reason":' + json.dumps(event.reason, ensure_ascii=False))
    return "{" + ",".join(parts) + "}" if parts else ""


def _field(value: str | None, name: str) -> str:
    if value is None:
        return ""
    if "|" in value or len(value) > 255:
        raise TrackerValidationError(name, value, "must be at most 255 characters without '|'")
    return value


def _event(entry_id: Any, fields: dict[Any, Any]) -> SessionEvent:
    f = {_text(k): _text(v) for k, v in fields.items()}
    at = utc_from_ms(int(f["at"]))
    assert at is not None
    return SessionEvent(
        id=_text(entry_id),
        type=f["t"],
        status=SessionStatus(f["s"]),
        progress_percent=float(f["p"]),
        completed_nodes=int(f["c"]),
        failed_nodes=int(f["f"]),
        node_id=f.get("n"),
        node_status=NodeStatus(f["ns"]) if "ns" in f else None,
        at=at,
    )


class RedisPrograms:
    """The operations, free of I/O. Shared by the blocking and the asyncio adapter.

    Args:
        keys: Builds the key names.
        ttl_s: TTL given to a session's keys on every write.
        events_maxlen: Approximate cap of each session's event stream.
        cluster: Keep the global index out of session scripts (it lives in another slot).
    """

    def __init__(self, keys: KeySpace, ttl_s: int, events_maxlen: int, cluster: bool) -> None:
        self.keys = keys
        self.ttl_s = ttl_s
        self.events_maxlen = events_maxlen
        self.cluster = cluster
        self._session_keys_cache: dict[str, SessionKeys] = {}

    def _session_keys(self, session_id: str) -> SessionKeys:
        """``self.keys.session(session_id)``, built (and the id validated) once per session.

        Every signal handler write and every status read needs them; a session's calls come in runs.
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
        code = _text(reply[0])
        if code == "ok":
            return reply
        if code == "not_found":
            raise SessionNotFoundError(session_id)
        if code == "invalid":
            current = _text(reply[1])
            reason = "the session has ended" if not target else ""
            raise InvalidStateTransitionError(session_id, current, target or current, reason)
        if code == "exists":
            raise SessionExistsError(session_id)
        raise StorageUnavailableError(f"unexpected script reply {code!r}")

    def create(
        self,
        session: SessionInfo,
        nodes: Sequence[NodeSpec] = (),
        signatures: Sequence[str | None] | None = None,
        structure: Tree | None = None,
    ) -> Program[None]:
        sid = session.session_id
        sk = self.keys.session(sid)
        now_ms = ms_from_utc(session.created_at)
        args: list[Any] = [
            sid,
            session.canvas_path,
            session.node_count,
            now_ms,
            json.dumps(session.metadata, separators=(",", ":")),
            self.ttl_s,
            self.events_maxlen,
            len(nodes),
            new_request_id(),
        ]
        if signatures is None:
            signatures = [None if spec.signature is None else validation.compact_json(spec.signature) for spec in nodes]
        for spec, sig in zip(nodes, signatures, strict=True):
            args += [spec.node_id, _field(spec.task_id, "task_id"), sig or ""]
        if structure is not None:
            # Kept beside the signatures: the links, read by record_nodes when a node ends, and the
            # tree, read by resume.
            fields = links(structure).fields()
            fields[TREE_FIELD] = validation.compact_json(structure)
            for name, value in fields.items():
                args += [name, value]
        script = self._script("create", sk, *args)
        if not self.cluster:
            script.keys.extend([self.keys.created_index, self.keys.expiry_index])
            self._check(sid, (yield [script])[0])
            return
        self._check(sid, (yield [script])[0])
        yield [
            ("ZADD", self.keys.created_index, {sid: now_ms}),
            ("ZADD", self.keys.expiry_index, {sid: now_ms}),
        ]

    def get_structure(self, session_id: str) -> Program[Tree | None]:
        found = (yield [("HGET", self._session_keys(session_id).sigs, TREE_FIELD)])[0]
        return None if found is None else json.loads(found)

    def get(self, session_id: str) -> Program[SessionInfo | None]:
        flat = (yield [("HGETALL", self._session_keys(session_id).session)])[0]
        if not flat:
            return None
        fields = flat if isinstance(flat, dict) else _flat_dict(flat)
        return _session(session_id, {_text(k): _text(v) for k, v in fields.items()})

    def transition(
        self, session_id: str, target: SessionStatus, allowed_from: frozenset[SessionStatus], now: datetime
    ) -> Program[TransitionOutcome]:
        sk = self.keys.session(session_id)
        script = self._script(
            "transition",
            sk,
            target.value,
            ms_from_utc(now),
            self.ttl_s,
            self.events_maxlen,
            new_request_id(),
            *sorted(allowed_from),
        )
        reply = self._check(session_id, (yield [script])[0], target.value)
        return TransitionOutcome(
            session=_session(session_id, _flat_dict(reply[1])), previous_status=SessionStatus(_text(reply[2]))
        )

    def resume(
        self,
        session_id: str,
        allowed_from: frozenset[SessionStatus],
        retry_failed: bool,
        task_id_base: str,
        now: datetime,
        nodes: Sequence[str] | None = None,
    ) -> Program[ResumeOutcome]:
        sk = self.keys.session(session_id)
        chosen = [] if nodes is None else [validation.node_id(node, session_id) for node in nodes]
        script = self._script(
            "resume",
            sk,
            "1" if retry_failed else "0",
            task_id_base,
            ms_from_utc(now),
            self.ttl_s,
            self.events_maxlen,
            new_request_id(),
            "-1" if nodes is None else len(chosen),
            *chosen,
            *sorted(allowed_from),
        )
        reply = (yield [script])[0]
        if _text(reply[0]) == "changed":
            raise ResumePlanChanged(session_id)
        reply = self._check(session_id, reply, SessionStatus.RUNNING.value)
        flat = [_text(v) for v in reply[3]]
        reset = [
            NodeSpec(node_id=nid, task_id=task or None, signature=json.loads(sig) if sig else None)
            for nid, task, sig in zip(flat[0::3], flat[1::3], flat[2::3], strict=True)
        ]
        return ResumeOutcome(
            session=_session(session_id, _flat_dict(reply[1])),
            previous_status=SessionStatus(_text(reply[2])),
            nodes=reset,
        )

    def set_progress(self, session_id: str, progress_percent: float, now: datetime) -> Program[SessionInfo]:
        sk = self.keys.session(session_id)
        script = self._script(
            "set_progress", sk, repr(float(progress_percent)), ms_from_utc(now), self.ttl_s, self.events_maxlen
        )
        reply = self._check(session_id, (yield [script])[0])
        return _session(session_id, _flat_dict(reply[1]))

    def _record_script(
        self,
        session_id: str,
        events: Sequence[NodeEvent],
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
            at, started, task_id, worker, result_json = (
                event.at, event.started_at, event.task_id, event.worker, event.result_json
            )  # fmt: skip
            if task_id is not None:
                task_id = _field(task_id, "task_id")
            if worker is not None:
                worker = _field(worker, "worker")
            if event.error is None and event.reason is None:  # the common case, without a call
                payload = "" if result_json is None else '{"result":' + result_json + "}"
            else:
                payload = _payload(event)
            # One argument per event, its fields joined by '|' (none but the payload, last, may
            # hold one): far cheaper to send and to read than eleven arguments.
            args.append(
                f"{event.node_id}|{event.status}|{'' if event.attempt is None else event.attempt}|{task_id or ''}|"
                f"{worker or ''}|{now_ms if at is None else round(at.timestamp() * 1000)}|"
                f"{'' if started is None else round(started.timestamp() * 1000)}|{expect_holder}|{started_before_ms}|"
                f"{held}|{payload}"
            )
        if holders:
            keys += [self.keys.workers, *(self.keys.held(h) for h in holders)]
        return Script("record_nodes", keys, args)

    def _registry_update(self, session_id: str, holder: str, node: NodeResult, now_ms: int) -> list[Command]:
        # On Cluster the registry lives in other slots: one more round trip, on starts and results.
        member = f"{session_id} {node.node_id}"
        if node.status is NodeStatus.RUNNING and node.worker == holder:
            return [("SADD", self.keys.held(holder), member), ("ZADD", self.keys.workers, {holder: now_ms})]
        return [("SREM", self.keys.held(holder), member)]

    def _reply(self, session_id: str, reply: list[Any]) -> tuple[SessionInfo, SessionStatus | None, list[Any]]:
        """An ``ok`` (or ``not_found``) ``record_nodes`` reply: the session, what the call finished, the details."""
        self._check(session_id, reply)
        finished = _text(reply[1])
        return _session_values(session_id, reply[2]), SessionStatus(finished) if finished else None, reply[4]

    def _node_outcome(self, session_id: str, node_id: str, reply: list[Any]) -> NodeOutcome:
        """A one-event ``record_nodes`` reply (with details) as what happened to that node."""
        session, finished, details = self._reply(session_id, reply)
        old = _text(details[0])
        return NodeOutcome(
            node=_node(node_id, _text(details[1])),
            session=session,
            previous_node_status=NodeStatus(old) if old else None,
            finished=finished,
            **_callbacks(reply),
        )

    def record_node(self, session_id: str, event: NodeEvent, now: datetime) -> Program[NodeOutcome]:
        now_ms = _ms_int(now)
        script = self._record_script(session_id, [event], now_ms, True, event.request_id or new_request_id())
        reply = (yield [script])[0]
        if _text(reply[0]) == "limit":
            info = yield from self.get(session_id)
            raise NodeLimitError(session_id, event.node_id, info.node_count if info else 0)
        outcome = self._node_outcome(session_id, event.node_id, reply)
        if self.cluster and event.worker and is_worker_id(event.worker):
            yield self._registry_update(session_id, event.worker, outcome.node, now_ms)
        return outcome

    def record_nodes(
        self, session_id: str, events: Sequence[NodeEvent], now: datetime, request_id: str | None = None
    ) -> Program[BatchOutcome]:
        now_ms = _ms_int(now)
        details = self.cluster  # on Cluster the registry is updated from each node's final record
        script = self._record_script(session_id, events, now_ms, details, request_id or new_request_id())
        reply = (yield [script])[0]
        if _text(reply[0]) == "limit":
            info = yield from self.get(session_id)
            raise NodeLimitError(session_id, _text(reply[1]), info.node_count if info else 0)
        session, finished, records = self._reply(session_id, reply)
        if details:
            registry: list[Command] = []
            for event, record in zip(events, records[1::2], strict=True):
                if event.worker and is_worker_id(event.worker):
                    node = _node(event.node_id, _text(record))
                    registry += self._registry_update(session_id, event.worker, node, now_ms)
            if registry:
                yield registry
        return BatchOutcome(session=session, finished=finished, **_callbacks(reply))

    def record_status(self, session_id: str, events: Sequence[NodeEvent], now: datetime) -> Program[dict[str, Any]]:
        if self.cluster:  # the holder registry takes a second round trip and the node records
            outcome = yield from self.record_nodes(session_id, events, now)
            return outcome.session.to_dict()
        reply = (yield [self.status_script(session_id, events, now)])[0]
        return (yield from self.status_reply(session_id, reply))

    def status_script(self, session_id: str, events: Sequence[NodeEvent], now: datetime) -> Script:
        """The one call :meth:`record_status` makes outside Cluster (see :meth:`status_reply`)."""
        # No request id: it only serves to answer `finished` to a retry, and this reply has none.
        return self._record_script(session_id, events, _ms_int(now), False, "")

    def status_reply(self, session_id: str, reply: list[Any]) -> Program[dict[str, Any]]:
        """The status dict read straight from a :meth:`status_script` reply (no model built); a
        node limit costs one more round trip, for the error's figures."""
        if _text(reply[0]) == "limit":
            info = yield from self.get(session_id)
            raise NodeLimitError(session_id, _text(reply[1]), info.node_count if info else 0)
        return _status_values(session_id, self._check(session_id, reply)[2])

    def heartbeat(self, worker: str, now: datetime, sessions: Sequence[str] = ()) -> Program[None]:
        now_ms = _ms_int(now)
        keep_alive = [Script("keep_alive", self.keys.session(sid).all(), [now_ms, self.ttl_s]) for sid in sessions]
        yield [("ZADD", self.keys.workers, {validation.worker_id(worker): now_ms}), *keep_alive]

    def reap_lost(
        self, now: datetime, stale_after_s: float, max_runtime_s: float | None = None, requeued: bool = False
    ) -> Program[list[NodeOutcome]]:
        now_ms = _ms_int(now)
        seen, suspected, state = yield [
            ("ZRANGE", self.keys.workers, 0, -1, "WITHSCORES"),
            ("ZRANGE", self.keys.suspects, 0, -1, "WITHSCORES"),
            ("GET", self.keys.reaper),
        ]
        workers = {_text(w): int(float(score)) for w, score in seen}
        suspects = {_text(w): int(float(score)) for w, score in suspected}
        silent = silent_workers(workers, suspects, state is None or _text(state) == "1", now_ms,
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
                last_seen = utc_from_ms(due[worker]) or now
                reason, started_before = lost_reason(worker, last_seen, now), ""
                if requeued:
                    status, reason = NodeStatus.PENDING, requeued_reason(worker, last_seen, now)
            else:
                assert max_runtime_s is not None
                reason = f"ran longer than the {max_runtime_s:g} s limit on {worker}"
                started_before = str(now_ms - round(max_runtime_s * 1000))
            for member in sorted(_text(m) for m in members):
                session_id, _, node_id = member.partition(" ")
                event = NodeEvent(node_id=node_id, status=status, reason=reason)
                request_id = new_request_id()
                script = self._record_script(session_id, [event], now_ms, True, request_id, worker, started_before)
                calls.append((worker, session_id, node_id, script))
        replies = (yield [call[3] for call in calls]) if calls else []
        outcomes: list[NodeOutcome] = []
        done: list[Command] = []
        for (worker, session_id, node_id, _), reply in zip(calls, replies, strict=True):
            code = _text(reply[0])
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
        return [_text(i) for i in ids]

    def end_stalled(self, now: datetime, stalled_after_s: float, reason: str) -> Program[list[BatchOutcome]]:
        now_ms = _ms_int(now)
        (reaped,) = yield [("GET", self.keys.reaped)]
        if reaped is None or now_ms - int(_text(reaped)) > round((stalled_after_s + self.ttl_s) * 1000):
            return []  # no worker died within the window: nothing can have been left waiting
        cutoff_ms = now_ms - round(stalled_after_s * 1000)
        payload = json.dumps({"reason": reason}, separators=(",", ":"))
        outcomes: list[BatchOutcome] = []
        offset = 0
        while True:
            ids = yield from self._idle_candidates(cutoff_ms, offset)
            if not ids:
                return outcomes
            args = [cutoff_ms, _text(reaped), now_ms, self.ttl_s, self.events_maxlen, payload]
            replies = yield [Script("end_stalled", self.keys.session(sid).all(), args) for sid in ids]
            active: dict[str, int] = {}
            for sid, reply in zip(ids, replies, strict=True):
                code = _text(reply[0])
                if code == "active":
                    active[sid] = int(_text(reply[1]))
                elif code == "stalled":
                    finished = _text(reply[1])
                    outcomes.append(
                        BatchOutcome(
                            session=_session_values(sid, reply[2]),
                            finished=SessionStatus(finished) if finished else None,
                            first_failure=_text(reply[3]) or None,
                        )
                    )
            if active:  # their real last change: those younger than the cutoff leave the range
                yield [("ZADD", self.keys.expiry_index, active)]
            if len(ids) < CLEANUP_BATCH:
                return outcomes
            offset += len(ids) - sum(ms >= cutoff_ms for ms in active.values())

    def get_nodes(
        self, session_id: str, status: NodeStatus | None = None, cursor: str | None = None, limit: int = 100
    ) -> Program[NodePage]:
        sk = self.keys.session(session_id)
        if status is not None:
            return (yield from self._nodes_by_status(session_id, sk, status, cursor, limit))
        position = _scan_cursor(cursor)
        exists, (next_position, items) = yield [
            ("EXISTS", sk.session),
            ("HSCAN", sk.nodes, position, "COUNT", limit),
        ]
        if not exists:
            raise SessionNotFoundError(session_id)
        fields = items if isinstance(items, dict) else _flat_dict(items)
        next_cursor = _text(next_position)
        return NodePage(
            nodes=[_node(_text(k), _text(v)) for k, v in fields.items()],
            next_cursor=None if next_cursor == "0" else next_cursor,
        )

    def _nodes_by_status(
        self, session_id: str, sk: SessionKeys, status: NodeStatus, cursor: str | None, limit: int
    ) -> Program[NodePage]:
        # From the status index: a full page whenever that many nodes are in the status; the cursor
        # is the last node id of the page before.
        (reply,) = yield [self._script("nodes_by_status", sk, status.value, status_cursor(cursor), limit)]
        if _text(reply[0]) == "not_found":
            raise SessionNotFoundError(session_id)
        flat = [_text(v) for v in reply[1]]
        nodes = [_node(nid, record) for nid, record in zip(flat[0::2], flat[1::2], strict=True) if record]
        return NodePage(nodes=nodes, next_cursor=flat[-2] if reply[2] and flat else None)

    def list_sessions(
        self, status: SessionStatus | None = None, cursor: str | None = None, limit: int = 50
    ) -> Program[SessionPage]:
        start = _scan_cursor(cursor)
        (ids,) = yield [("ZREVRANGE", self.keys.created_index, start, start + limit - 1)]
        ids = [_text(i) for i in ids]
        replies = (yield [("HGETALL", self.keys.session(sid).session) for sid in ids]) if ids else []
        sessions, stale = [], []
        for sid, flat in zip(ids, replies, strict=True):
            if not flat:
                stale.append(sid)
                continue
            fields = flat if isinstance(flat, dict) else _flat_dict(flat)
            info = _session(sid, {_text(k): _text(v) for k, v in fields.items()})
            if status is None or info.status is status:
                sessions.append(info)
        if stale:
            # Expired by TTL: drop from the index as we pass by (cleanup does the rest).
            yield [("ZREM", self.keys.created_index, *stale), ("ZREM", self.keys.expiry_index, *stale)]
        return SessionPage(sessions=sessions, next_cursor=str(start + limit) if len(ids) == limit else None)

    def delete(self, session_id: str) -> Program[bool]:
        sk = self.keys.session(session_id)
        deleted, _, _ = yield [
            ("DEL", *sk.all()),
            ("ZREM", self.keys.created_index, session_id),
            ("ZREM", self.keys.expiry_index, session_id),
        ]
        return bool(deleted)

    def remove_expired(self, now: datetime, timeout_s: float) -> Program[int]:
        now_ms = ms_from_utc(now)
        assert now_ms is not None
        cutoff_ms = now_ms - round(timeout_s * 1000)
        removed = 0
        offset = 0
        while True:
            # Each candidate is re-checked atomically against its real updated_ms before it is deleted.
            ids = yield from self._idle_candidates(cutoff_ms, offset)
            if not ids:
                return removed
            replies = yield [Script("remove_if_expired", self.keys.session(sid).all(), [cutoff_ms]) for sid in ids]
            gone, active = [], {}
            for sid, reply in zip(ids, replies, strict=True):
                code = _text(reply[0])
                if code == "active":
                    active[sid] = int(_text(reply[1]))
                else:
                    removed += code == "deleted"
                    gone.append(sid)
            index_updates: list[Command] = []
            if gone:
                index_updates += [("ZREM", self.keys.created_index, *gone), ("ZREM", self.keys.expiry_index, *gone)]
            if active:
                index_updates.append(("ZADD", self.keys.expiry_index, active))
            yield index_updates
            if len(ids) < CLEANUP_BATCH:
                return removed

    def read_events(
        self, session_id: str, after: str | None = None, limit: int = 100, block_ms: int | None = None
    ) -> Program[list[SessionEvent]]:
        sk = self.keys.session(session_id)
        start = f"({after}" if after else "-"
        exists, entries = yield [("EXISTS", sk.session), ("XRANGE", sk.events, start, "+", "COUNT", limit)]
        if not exists:
            raise SessionNotFoundError(session_id)
        if not entries and block_ms:
            (streams,) = yield [("XREAD", "COUNT", limit, "BLOCK", block_ms, "STREAMS", sk.events, after or "0-0")]
            entries = streams[0][1] if streams else []
            if isinstance(streams, dict):
                entries = next(iter(streams.values()), [[]])[0]
        return [_event(entry_id, fields) for entry_id, fields in entries]


def _ms_int(moment: datetime) -> int:
    value = ms_from_utc(moment)
    assert value is not None
    return value


def _has_script(batch: list[Command]) -> bool:
    return any(isinstance(command, Script) for command in batch)


def _scan_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 18:
        raise TrackerValidationError("cursor", cursor, "expected the next_cursor of a previous page")
    return int(cursor)


def _translate(exc: redis.RedisError, url: str | None) -> StorageUnavailableError:
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return StorageUnavailableError(f"Redis is unreachable ({exc}); is redis-server running?", url)
    return StorageUnavailableError(f"Redis refused the command ({exc})", url)


def _register_scripts(client: Any) -> dict[str, Any]:
    """Every script, registered on ``client`` (its SHA computed once, loaded on the first NOSCRIPT)."""
    return {name: client.register_script(script_source(name)) for name in SCRIPTS}


class _RedisBase:
    def __init__(
        self,
        *,
        cluster: bool,
        key_prefix: str,
        ttl_s: float,
        events_maxlen: int,
        url: str | None,
        settings: TrackerSettings | None,
    ) -> None:
        self.url = url
        self._settings = settings or TrackerSettings()
        # Rounded up: a key's TTL must never end a session before its timeout (2.4 s -> 3 s, not 2 s).
        self.programs = RedisPrograms(KeySpace(key_prefix), max(1, math.ceil(ttl_s)), events_maxlen, cluster)


def _client_options(settings: TrackerSettings, retry_class: type[Retry | AsyncRetry] = Retry) -> dict[str, Any]:
    """Timeouts, health checks and retries of a client; ``retry_class``: ``redis.asyncio``'s own
    ``Retry`` for an asyncio client (given the blocking one, redis-py converts it and warns)."""
    retry = retry_class(ExponentialBackoff(cap=2.0, base=0.05), settings.redis_retries)
    return {
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_socket_timeout,
        "health_check_interval": settings.redis_health_check_interval,
        "retry": retry,
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }


class RedisStorageAdapter(_RedisBase):
    """Sessions in Redis, shared by every worker, beat and web app. Blocking flavour.

    Args:
        client: A ``redis.Redis`` or ``redis.cluster.RedisCluster``. Safe to share between
            threads; create one per process (after fork).
        key_prefix: First part of every key.
        ttl_s: TTL of a session's keys, refreshed on every write (use the session timeout).
        events_maxlen: Approximate cap of each session's event stream.
    """

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str = "tracker",
        ttl_s: float = 1800.0,
        events_maxlen: int = 1000,
        url: str | None = None,
        settings: TrackerSettings | None = None,
    ) -> None:
        super().__init__(
            cluster=isinstance(client, RedisCluster),
            key_prefix=key_prefix,
            ttl_s=ttl_s,
            events_maxlen=events_maxlen,
            url=url,
            settings=settings,
        )
        self._client = client
        self._scripts = _register_scripts(client)

    @property
    def client(self) -> Any:
        """The redis-py client in use."""
        return self._client

    @classmethod
    def from_url(cls, url: str, settings: TrackerSettings | None = None) -> RedisStorageAdapter:
        """Connect to ``url`` with retries, timeouts and health checks from ``settings``."""
        settings = settings or TrackerSettings()
        options = _client_options(settings)
        if settings.redis_cluster:
            options.pop("health_check_interval")
            client: Any = RedisCluster.from_url(url, **options)
        else:
            # A blocking pool makes a burst of callers wait for a connection instead of failing.
            pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=settings.redis_max_connections, timeout=settings.redis_socket_timeout, **options
            )
            client = redis.Redis(connection_pool=pool)
        return cls(
            client,
            key_prefix=settings.key_prefix,
            ttl_s=settings.session_timeout,
            events_maxlen=settings.events_maxlen,
            url=url,
            settings=settings,
        )

    @classmethod
    def from_settings(cls, settings: TrackerSettings) -> RedisStorageAdapter:
        """Connect to ``settings.redis_url``."""
        if not settings.redis_url:
            raise StorageUnavailableError("TRACKER_REDIS_URL is not set")
        return cls.from_url(settings.redis_url, settings)

    def _execute(self, batch: list[Command]) -> list[Any]:
        if len(batch) == 1:
            return [self._one(batch[0], self._client)]
        if self.programs.cluster and _has_script(batch):
            # A cluster pipeline does not load a script the server lacks (NOSCRIPT): scripts go one by one.
            return [self._one(command, self._client) for command in batch]
        # Outside Cluster one round trip; on a Cluster one per node (redis-py splits by slot).
        pipe = self._client.pipeline(transaction=False)
        for command in batch:
            self._one(command, pipe)
        return list(pipe.execute())

    def _one(self, command: Command, target: Any) -> Any:
        if isinstance(command, Script):
            script = self._scripts[command.name]
            if target is not self._client or self.programs.cluster:
                return script(keys=command.keys, args=command.args, client=target)
            # The hot path (one write, one round trip): EVALSHA without the wrapper's copies.
            keys = command.keys
            try:
                return target.execute_command("EVALSHA", script.sha, len(keys), *keys, *command.args)
            except redis.exceptions.NoScriptError:
                script.sha = target.script_load(script.script)  # the server forgot it (restart, SCRIPT FLUSH)
                return target.execute_command("EVALSHA", script.sha, len(keys), *keys, *command.args)
        name, *args = command
        if name == "ZADD":
            return target.zadd(args[0], args[1])
        return target.execute_command(name, *args)

    def _drive(self, program: Program[T]) -> T:
        try:
            batch = next(program)
            while True:
                batch = program.send(self._execute(batch))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        except redis.RedisError as exc:
            raise _translate(exc, self.url) from exc

    def create(
        self,
        session: SessionInfo,
        nodes: Sequence[NodeSpec] = (),
        signatures: Sequence[str | None] | None = None,
        structure: Tree | None = None,
    ) -> None:
        self._drive(self.programs.create(session, nodes, signatures, structure))

    def get(self, session_id: str) -> SessionInfo | None:
        return self._drive(self.programs.get(session_id))

    def get_structure(self, session_id: str) -> Tree | None:
        return self._drive(self.programs.get_structure(session_id))

    def transition(
        self, session_id: str, target: SessionStatus, allowed_from: frozenset[SessionStatus], now: datetime
    ) -> TransitionOutcome:
        return self._drive(self.programs.transition(session_id, target, allowed_from, now))

    def resume(
        self,
        session_id: str,
        allowed_from: frozenset[SessionStatus],
        retry_failed: bool,
        task_id_base: str,
        now: datetime,
        nodes: Sequence[str] | None = None,
    ) -> ResumeOutcome:
        return self._drive(self.programs.resume(session_id, allowed_from, retry_failed, task_id_base, now, nodes))

    def set_progress(self, session_id: str, progress_percent: float, now: datetime) -> SessionInfo:
        return self._drive(self.programs.set_progress(session_id, progress_percent, now))

    def record_node(self, session_id: str, event: NodeEvent, now: datetime) -> NodeOutcome:
        return self._drive(self.programs.record_node(session_id, event, now))

    def record_nodes(
        self, session_id: str, events: Sequence[NodeEvent], now: datetime, request_id: str | None = None
    ) -> BatchOutcome:
        return self._drive(self.programs.record_nodes(session_id, events, now, request_id))

    def record_status(self, session_id: str, events: Sequence[NodeEvent], now: datetime) -> dict[str, Any]:
        programs = self.programs
        if programs.cluster:
            return self._drive(programs.record_status(session_id, events, now))
        # add_node_result's path: the call made and read without driving a generator.
        try:
            reply = self._one(programs.status_script(session_id, events, now), self._client)
        except redis.RedisError as exc:
            raise _translate(exc, self.url) from exc
        if reply[0] == b"ok":
            return _status_values(session_id, reply[2])
        return self._drive(programs.status_reply(session_id, reply))

    def heartbeat(self, worker: str, now: datetime, sessions: Sequence[str] = ()) -> None:
        self._drive(self.programs.heartbeat(worker, now, sessions))

    def reap_lost(
        self, now: datetime, stale_after_s: float, max_runtime_s: float | None = None, requeued: bool = False
    ) -> list[NodeOutcome]:
        return self._drive(self.programs.reap_lost(now, stale_after_s, max_runtime_s, requeued))

    def get_nodes(
        self, session_id: str, status: NodeStatus | None = None, cursor: str | None = None, limit: int = 100
    ) -> NodePage:
        return self._drive(self.programs.get_nodes(session_id, status, cursor, limit))

    def list_sessions(
        self, status: SessionStatus | None = None, cursor: str | None = None, limit: int = 50
    ) -> SessionPage:
        return self._drive(self.programs.list_sessions(status, cursor, limit))

    def delete(self, session_id: str) -> bool:
        return self._drive(self.programs.delete(session_id))

    def remove_expired(self, now: datetime, timeout_s: float) -> int:
        return self._drive(self.programs.remove_expired(now, timeout_s))

    def end_stalled(self, now: datetime, stalled_after_s: float, reason: str) -> list[BatchOutcome]:
        return self._drive(self.programs.end_stalled(now, stalled_after_s, reason))

    def read_events(
        self, session_id: str, after: str | None = None, limit: int = 100, block_ms: int | None = None
    ) -> list[SessionEvent]:
        return self._drive(self.programs.read_events(session_id, after, limit, block_ms))

    def asynchronous(self) -> AsyncRedisStorageAdapter:
        """An asyncio flavour on the same server: a ``redis.asyncio`` client (and pool) per event loop."""
        return AsyncRedisStorageAdapter(
            self._new_async_client,
            cluster=self.programs.cluster,
            key_prefix=self.programs.keys.prefix,
            ttl_s=self.programs.ttl_s,
            events_maxlen=self.programs.events_maxlen,
            url=self.url,
            settings=self._settings,
        )

    def _new_async_client(self) -> Any:
        """A new ``redis.asyncio`` client on this one's server, with its options; closing it closes its pool."""
        options = _client_options(self._settings, AsyncRetry)
        if self.programs.cluster:
            options.pop("health_check_interval")
            if self.url:
                # From the URL, as the blocking client was: credentials and TLS come along.
                client: Any = aioredis.RedisCluster.from_url(self.url, **options)
            else:
                nodes = [aioredis.cluster.ClusterNode(n.host, n.port) for n in self._client.get_nodes()]
                client = aioredis.RedisCluster(startup_nodes=nodes, **options)
        elif self.url:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self._settings.redis_max_connections,
                timeout=self._settings.redis_socket_timeout,
                **options,
            )
            # from_pool: the client owns the pool, and aclose() disconnects it (a client given
            # connection_pool= leaves the pool's connections open).
            client = aioredis.Redis.from_pool(pool)
        else:
            conn = self._client.connection_pool.connection_kwargs
            keep = ("host", "port", "db", "username", "password", "path")
            connection_class = (
                aioredis.UnixDomainSocketConnection if "path" in conn and "host" not in conn else aioredis.Connection
            )
            pool = aioredis.BlockingConnectionPool(
                connection_class=connection_class,
                max_connections=self._settings.redis_max_connections,
                timeout=self._settings.redis_socket_timeout,
                **{k: conn[k] for k in keep if k in conn},
                **options,
            )
            client = aioredis.Redis.from_pool(pool)
        return client

    def close(self) -> None:
        self._client.close()


def _start(generator: AsyncGenerator[None, None]) -> None:
    """Run ``generator`` to its first ``yield`` now, in the running loop, without a task.

    The first step is what registers an async generator with the running loop (its ``firstiter``
    hook), so that the loop's ``shutdown_asyncgens()`` closes it. Stepped by a task instead, a loop
    ending before the task ran would leave it never started, its ``finally`` never run. The
    generators given here await nothing before their ``yield``: the step ends at once.
    """
    with contextlib.suppress(StopIteration):  # StopIteration: it reached its yield
        generator.asend(None).send(None)


@dataclass(eq=False)
class _LoopClient:
    """The ``redis.asyncio`` client of one event loop, its scripts, and what closes it with the loop."""

    client: Any
    scripts: dict[str, Any]
    closer: AsyncGenerator[None, None] | None = None


class AsyncRedisStorageAdapter(_RedisBase):
    """The asyncio flavour of :class:`RedisStorageAdapter`: same programs, ``redis.asyncio`` clients.

    A ``redis.asyncio`` client (its pool, its connections) belongs to the event loop it first ran
    in; from any other it fails ("attached to a different loop", "Event loop is closed"). So the
    adapter keeps a client per event loop, made by ``connect`` on the loop's first call: one adapter
    serves repeated ``asyncio.run`` calls, a loop per thread, and a loop per test.

    A loop's client is closed with its loop: it is tied to an async generator of that loop, which
    ``loop.shutdown_asyncgens()`` closes while the loop can still await the close (``asyncio.run``,
    ``asyncio.Runner``, pytest-asyncio, anyio and uvicorn call it before closing their loop). The
    client of a loop closed without it (a bare ``loop.close()``) is dropped when another loop makes
    its client: nothing in redis-py can close a connection of a closed loop (the transport's
    close needs the loop), so the garbage collector closes its sockets.

    Args:
        connect: Makes a new client (on a loop's first call, in that loop).
        cluster: The clients are ``redis.asyncio.RedisCluster``.
        key_prefix: First part of every key.
        ttl_s: TTL of a session's keys, refreshed on every write.
        events_maxlen: Approximate cap of each session's event stream.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        cluster: bool,
        key_prefix: str = "tracker",
        ttl_s: float = 1800.0,
        events_maxlen: int = 1000,
        url: str | None = None,
        settings: TrackerSettings | None = None,
    ) -> None:
        super().__init__(
            cluster=cluster, key_prefix=key_prefix, ttl_s=ttl_s, events_maxlen=events_maxlen, url=url, settings=settings
        )
        self._connect = connect
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = weakref.WeakKeyDictionary()
        # Loops whose shutdown closed their client. A client made there after that (a call from
        # another async generator's cleanup) is not tied to the loop again: a generator first
        # run after shutdown_asyncgens() would never be closed, and asyncio warns about it.
        self._shut_down: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        # Each loop runs in one thread, but the loops of several threads add and drop their
        # clients in the same mappings.
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The running loop's ``redis.asyncio`` client (made on the loop's first use)."""
        return self._here().client

    def _here(self) -> _LoopClient:
        loop = asyncio.get_running_loop()
        found = self._clients.get(loop)  # every call but a loop's first: no lock
        return found if found is not None else self._open(loop)

    def _open(self, loop: asyncio.AbstractEventLoop) -> _LoopClient:
        client = self._connect()
        here = _LoopClient(client, _register_scripts(client))
        with self._lock:
            # The clients of loops closed without shutting down their async generators (see the
            # class): no call can reach them any more.
            for closed in [other for other in self._clients if other.is_closed()]:
                del self._clients[closed]
            self._clients[loop] = here
            # Without asyncgen hooks (a loop that does not run them) nothing would ever close the
            # generator, and the garbage collector would close it without a loop to await in.
            tie = loop not in self._shut_down and sys.get_asyncgen_hooks().firstiter is not None
        if tie:
            here.closer = self._close_with_loop(loop, here)
            _start(here.closer)
        return here

    async def _close_with_loop(self, loop: asyncio.AbstractEventLoop, here: _LoopClient) -> AsyncGenerator[None, None]:
        """Waits at its ``yield`` until closed (the loop's shutdown, or :meth:`close`), then closes the client."""
        try:
            yield
        finally:
            with self._lock:
                if self._clients.get(loop) is here:  # still held: not close() (it lets go first), the loop ends
                    del self._clients[loop]
                    self._shut_down.add(loop)
            await here.client.aclose()

    async def _execute(self, batch: list[Command], here: _LoopClient) -> list[Any]:
        client = here.client
        if self.programs.cluster:
            # redis.asyncio's RedisCluster picks a command's node before it loads the slot map: a
            # command sent while the map is empty (first use, or after the client reset it on
            # MOVED) goes to a random node, and the MOVED storm that follows makes it close
            # connections other callers are using. Loading the map first (a no-op once loaded)
            # keeps every command on its slot's node.
            await client.initialize()
        if len(batch) == 1 or (self.programs.cluster and _has_script(batch)):
            return [await self._one(command, client, here.scripts) for command in batch]
        pipe = client.pipeline(transaction=False)
        for command in batch:
            if isinstance(command, Script):
                await here.scripts[command.name](keys=command.keys, args=command.args, client=pipe)
            else:
                self._queue(command, pipe)
        return list(await pipe.execute())

    @staticmethod
    def _queue(command: tuple[Any, ...], target: Any) -> Any:
        name, *args = command
        if name == "ZADD":
            return target.zadd(args[0], args[1])
        return target.execute_command(name, *args)

    async def _one(self, command: Command, target: Any, scripts: dict[str, Any]) -> Any:
        if isinstance(command, Script):
            return await scripts[command.name](keys=command.keys, args=command.args, client=target)
        return await self._queue(command, target)

    async def _drive(self, program: Program[T]) -> T:
        here = self._here()
        try:
            batch = next(program)
            while True:
                batch = program.send(await self._execute(batch, here))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        except redis.RedisError as exc:
            raise _translate(exc, self.url) from exc

    async def create(
        self,
        session: SessionInfo,
        nodes: Sequence[NodeSpec] = (),
        signatures: Sequence[str | None] | None = None,
        structure: Tree | None = None,
    ) -> None:
        await self._drive(self.programs.create(session, nodes, signatures, structure))

    async def get(self, session_id: str) -> SessionInfo | None:
        return await self._drive(self.programs.get(session_id))

    async def get_structure(self, session_id: str) -> Tree | None:
        return await self._drive(self.programs.get_structure(session_id))

    async def transition(
        self, session_id: str, target: SessionStatus, allowed_from: frozenset[SessionStatus], now: datetime
    ) -> TransitionOutcome:
        return await self._drive(self.programs.transition(session_id, target, allowed_from, now))

    async def resume(
        self,
        session_id: str,
        allowed_from: frozenset[SessionStatus],
        retry_failed: bool,
        task_id_base: str,
        now: datetime,
        nodes: Sequence[str] | None = None,
    ) -> ResumeOutcome:
        program = self.programs.resume(session_id, allowed_from, retry_failed, task_id_base, now, nodes)
        return await self._drive(program)

    async def set_progress(self, session_id: str, progress_percent: float, now: datetime) -> SessionInfo:
        return await self._drive(self.programs.set_progress(session_id, progress_percent, now))

    async def record_node(self, session_id: str, event: NodeEvent, now: datetime) -> NodeOutcome:
        return await self._drive(self.programs.record_node(session_id, event, now))

    async def record_nodes(
        self, session_id: str, events: Sequence[NodeEvent], now: datetime, request_id: str | None = None
    ) -> BatchOutcome:
        return await self._drive(self.programs.record_nodes(session_id, events, now, request_id))

    async def record_status(self, session_id: str, events: Sequence[NodeEvent], now: datetime) -> dict[str, Any]:
        return await self._drive(self.programs.record_status(session_id, events, now))

    async def heartbeat(self, worker: str, now: datetime, sessions: Sequence[str] = ()) -> None:
        await self._drive(self.programs.heartbeat(worker, now, sessions))

    async def reap_lost(
        self, now: datetime, stale_after_s: float, max_runtime_s: float | None = None, requeued: bool = False
    ) -> list[NodeOutcome]:
        return await self._drive(self.programs.reap_lost(now, stale_after_s, max_runtime_s, requeued))

    async def get_nodes(
        self, session_id: str, status: NodeStatus | None = None, cursor: str | None = None, limit: int = 100
    ) -> NodePage:
        return await self._drive(self.programs.get_nodes(session_id, status, cursor, limit))

    async def list_sessions(
        self, status: SessionStatus | None = None, cursor: str | None = None, limit: int = 50
    ) -> SessionPage:
        return await self._drive(self.programs.list_sessions(status, cursor, limit))

    async def delete(self, session_id: str) -> bool:
        return await self._drive(self.programs.delete(session_id))

    async def remove_expired(self, now: datetime, timeout_s: float) -> int:
        return await self._drive(self.programs.remove_expired(now, timeout_s))

    async def end_stalled(self, now: datetime, stalled_after_s: float, reason: str) -> list[BatchOutcome]:
        return await self._drive(self.programs.end_stalled(now, stalled_after_s, reason))

    async def read_events(
        self, session_id: str, after: str | None = None, limit: int = 100, block_ms: int | None = None
    ) -> list[SessionEvent]:
        return await self._drive(self.programs.read_events(session_id, after, limit, block_ms))

    async def close(self) -> None:
        """Close the running loop's client; the loop's next call makes a new one.

        The clients of other loops are closed with their loops.
        """
        with self._lock:
            here = self._clients.pop(asyncio.get_running_loop(), None)
        if here is None:
            return
        if here.closer is not None:
            await here.closer.aclose()  # its finally closes the client
        else:
            await here.client.aclose()
