"""Reading Redis replies into the tracker's models, and the text a script call sends.

One decoder per reply: the session hash (``HGETALL``) and the session values every
``record_nodes`` call answers (in ``SESSION_FIELDS`` order), a node's record, an event entry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from tracker import errors, models, validation
from tracker.states import NodeStatus, RateWindow, SessionStatus
from tracker.storage.base import ChildLink, NodeEvent


def text(value: Any) -> str:
    """A reply item as text (redis-py answers bytes unless told to decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def flat_dict(flat: Sequence[Any]) -> dict[str, str]:
    """A flat ``[field, value, ...]`` reply (``HGETALL`` in a script) as a dict of text."""
    items = [text(v) for v in flat]
    return dict(zip(items[0::2], items[1::2], strict=True))


def utc(ms: int) -> datetime:
    """Stored epoch milliseconds as an aware UTC datetime."""
    value = models.utc_from_ms(ms)
    assert value is not None
    return value


def moment(value: str) -> datetime | None:
    """A stored millisecond timestamp ('' for none) as a datetime."""
    return utc(int(value)) if value else None


def session_from_hash(session_id: str, fields: dict[str, str]) -> models.SessionInfo:
    """A session from its hash (``HGETALL``, or a script's reply of it)."""
    created = utc(int(fields["created_ms"]))
    updated = utc(int(fields["updated_ms"]))
    parent_sid, _, parent_node = fields.get("parent", "").partition("|")
    status = session_status(fields["status"])
    finished = moment(fields.get("finished_ms", ""))
    node_count = int(fields["node_count"])
    return models.SessionInfo(
        session_id=session_id,
        canvas_path=fields["canvas_path"],
        node_count=node_count,
        status=status,
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
        started_at=moment(fields.get("started_ms", "")),
        finished_at=finished,
        metadata=json.loads(fields.get("metadata") or "{}"),
        run=int(fields.get("run") or 1),
        children=int(fields.get("children") or 0),
        children_open=int(fields.get("children_open") or 0),
        parent_session_id=parent_sid or None,
        parent_node_id=parent_node or None,
        failure_types=int(fields.get("failure_types") or 0),
        tags=fields.get("tags", "").split(),
        **models.rate_and_eta(RateWindow.parse(fields.get("rate", "")), node_count, finished),
    )


def session_status(value: Any) -> SessionStatus:
    """A stored session status; one this version does not know is the store's error, not ours."""
    try:
        return SessionStatus(text(value))
    except ValueError:
        raise errors.StorageUnavailableError(f"unexpected session status {text(value)!r} in the store") from None


def session_from_values(session_id: str, values: Sequence[Any]) -> models.SessionInfo:
    """A session from the values every ``record_nodes`` reply carries, in ``SESSION_FIELDS``
    order: numbers as integers, the rest as bytes."""
    (status, node_count, completed, failed, running, lost, cancelled, skipped, retrying, progress,
     started_ms, finished_ms, updated_ms, canvas_path, created_ms, metadata, run, children, children_open,
     parent, failure_types, rate, tags) = values  # fmt: skip
    parent_sid, _, parent_node = text(parent).partition("|") if parent else ("", "", "")
    finished = utc(int(finished_ms)) if finished_ms else None
    return models.SessionInfo(
        session_id=session_id,
        canvas_path=text(canvas_path),
        node_count=node_count,
        status=session_status(status),
        progress_percent=float(progress),
        completed_nodes=completed,
        failed_nodes=failed,
        running_nodes=running,
        retrying_nodes=retrying,
        lost_nodes=lost,
        cancelled_nodes=cancelled,
        skipped_nodes=skipped,
        created_at=utc(int(created_ms)),
        updated_at=utc(int(updated_ms)),
        started_at=utc(int(started_ms)) if started_ms else None,
        finished_at=finished,
        metadata=json.loads(metadata) if metadata and metadata != b"{}" else {},
        run=run,
        children=children,
        children_open=children_open,
        parent_session_id=parent_sid or None,
        parent_node_id=parent_node or None,
        failure_types=failure_types,
        tags=text(tags).split() if tags else [],
        **models.rate_and_eta(RateWindow.parse(text(rate)) if rate else None, node_count, finished),
    )


def failure_group(error_type: str, entry: str) -> models.FailureGroup:
    """A failure group as the failures hash keeps it (``common.lua``: regroup)."""
    group = json.loads(entry)
    nodes = group.get("nodes")
    return models.FailureGroup(
        error_type=error_type,
        count=group["count"],
        first_message=group.get("message") or "",
        first_at=utc(int(group["first_ms"])),
        last_at=utc(int(group["last_ms"])),
        node_ids=nodes if isinstance(nodes, list) else [],  # cjson writes an empty list as {}
    )


def callbacks(reply: list[Any]) -> dict[str, Any]:
    """The callbacks a ``record_nodes`` reply tells its caller to send (see the script's contract)."""
    failed_node = text(reply[6])
    return {"succeeded": text(reply[5]) == "1", "first_failure": failed_node or None}


def node_from_record(node_id: str, record: str) -> models.NodeResult:
    """A node from its stored record: ``status|attempts|started|finished|task|worker|payload``."""
    status, attempts, started, finished, task_id, worker, payload = record.split("|", 6)
    details = json.loads(payload) if payload else {}
    error = details.get("error")
    return models.NodeResult(
        node_id=node_id,
        status=NodeStatus(status),
        result=details.get("result"),
        error=models.NodeError(type=error[0], message=error[1]) if error else None,
        attempts=int(attempts),
        task_id=task_id or None,
        worker=worker or None,
        started_at=moment(started),
        finished_at=moment(finished),
        reason=details.get("reason"),
        progress=details.get("progress") if status == NodeStatus.RUNNING else None,
        waiting=bool(details.get("waiting")) and status == NodeStatus.RUNNING,
    )


def record_payload(event: NodeEvent) -> str:
    """The JSON payload of a node's record (result, error, reason), '' when it has none."""
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


def child_from_entry(child_id: str, entry: str) -> models.ChildSession:
    """A child session as its parent's children hash keeps it: ``node|attempt|policy|state``."""
    node_id, attempt, policy, state = entry.split("|")
    return models.ChildSession(
        session_id=child_id, node_id=node_id, attempt=int(attempt), child_failure=policy, status=state
    )


def child_payload(link: ChildLink) -> tuple[str, str]:
    """The wire status and payload of a child session's event (``record_nodes.lua``: with_children)."""
    validation.session_id(link.child_id)
    if link.ended is None:
        return "child_open", f"{link.child_id}|{link.attempt}|{link.policy}"
    return "child_end", f"{link.child_id}|{SessionStatus(link.ended).value}"


def progress_payload(fraction: float) -> str:
    """The payload of a running node that reported how far it is (what ``common.lua`` reads back)."""
    return '{"progress":' + repr(float(fraction)) + "}"


def record_field(value: str | None, name: str) -> str:
    """A label as a field of a node's record, which separates its fields with '|'."""
    if value is None:
        return ""
    if "|" in value or len(value) > 255:
        raise errors.TrackerValidationError(name, value, "must be at most 255 characters without '|'")
    return value


def event_from_entry(entry_id: Any, fields: dict[Any, Any]) -> models.SessionEvent:
    """An entry of a session's event stream."""
    f = {text(k): text(v) for k, v in fields.items()}
    at = models.utc_from_ms(int(f["at"]))
    assert at is not None
    return models.SessionEvent(
        id=text(entry_id),
        type=f["t"],
        status=SessionStatus(f["s"]),
        progress_percent=float(f["p"]),
        completed_nodes=int(f["c"]),
        failed_nodes=int(f["f"]),
        node_id=f.get("n"),
        node_status=NodeStatus(f["ns"]) if "ns" in f else None,
        at=at,
    )


def ms_int(moment: datetime) -> int:
    """A datetime as the milliseconds the store keeps."""
    value = models.ms_from_utc(moment)
    assert value is not None
    return value
