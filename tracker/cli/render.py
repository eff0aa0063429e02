"""What the commands show: a live progress bar that follows a session, and rich tables."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import PurePath
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from tracker.errors import SessionNotFoundError
from tracker.hints import pickup_hint
from tracker.manager import SessionManager, nodes_of
from tracker.models import FailureGroup, NodeResult, WorkerStatus
from tracker.states import TERMINAL_STATUSES, NodeStatus

#: Node details (failures, slowest nodes) are read only for sessions up to this many nodes.
MAX_DETAIL_NODES = 10_000
#: Failed nodes announced one by one above the progress bar; later ones only count.
MAX_FAILURE_LINES = 20
#: How long one event read waits for news (Redis ``XREAD BLOCK``), in milliseconds.
EVENT_WAIT_MS = 1000
#: While events come, the status (its rate and ETA) is read again at most this often, in seconds.
STATUS_EVERY_S = 1.0
#: Nodes of a worker ``tracker workers`` names in its table (``--json`` has those the store read).
WORKER_NODES_LISTED = 5
#: Node results whose counters an event does not carry: seeing one, :func:`follow` re-reads the status.
_UNCOUNTED_IN_EVENTS = frozenset({NodeStatus.CANCELLED, NodeStatus.SKIPPED})

_STYLES = {
    "pending": "dim",
    "running": "cyan",
    "completed": "green",
    "partial_failure": "yellow",
    "failed": "red",
    "cancelled": "magenta",
    # Not partial_failure's yellow: a node waiting for its retry is in flight, not a result.
    "retrying": "bright_yellow",
    "lost": "red",
    "skipped": "blue",
}


def styled(status: str) -> Text:
    """A status word in its colour."""
    return Text(status, style=_STYLES.get(status, ""))


def follow(
    manager: SessionManager,
    session_id: str,
    console: Console,
    *,
    timeout_s: float | None = None,
    wait_ms: int = EVENT_WAIT_MS,
    after: str | None = None,
) -> dict[str, Any]:
    """Show a progress bar fed by the session's event stream until the session ends.

    Each event carries the session's counters, so the bar is exact after every event, and
    replaying old events (when following starts late) is harmless. Failed nodes are announced
    above the bar as they fail. While the session stays pending longer than
    ``pickup_hint_after_s``, the pickup hint (:func:`tracker.hints.pickup_hint`) is printed once.

    Args:
        manager: Where the session lives.
        session_id: The session to follow.
        console: Where to draw.
        timeout_s: Stop following after this many seconds even if the session has not ended.
        wait_ms: How long each event read waits for news, in milliseconds.
        after: Read the event stream after this event id (see :func:`newest_event_id`), not from
            its start: failures of an earlier run are then not announced again.

    Returns:
        The session's status dict when following stopped (ended, or at the timeout).

    Raises:
        SessionNotFoundError: the session does not exist or disappeared meanwhile.
    """
    status = manager.sync.get_session_status(session_id)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    announced = 0
    hinted = False
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[finished]}/{task.fields[nodes]} {task.percentage:5.1f} %"),
        TextColumn("[green]{task.fields[ok]} ok[/] [red]{task.fields[failed]} failed[/]"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[pace]}"),
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("", total=100, ok=0, failed=0, finished=0, nodes=status["node_count"], pace="")
        read_at = time.monotonic()
        _show(progress, bar, status)
        last_id = after
        while status["status"] not in TERMINAL_STATUSES:
            if not hinted and (hint := session_hint(manager, status)) is not None:
                progress.console.print(Text(f"Hint: {hint}", style="yellow"))
                hinted = True
            if deadline is not None and time.monotonic() >= deadline:
                break
            events = manager.sync.read_events(session_id, after=last_id, limit=1000, block_ms=wait_ms)
            for event in events:
                last_id = event.id
                if event.node_id and event.node_status in (NodeStatus.FAILED, NodeStatus.LOST):
                    announced += 1
                    if announced <= MAX_FAILURE_LINES:
                        progress.console.print(
                            Text.assemble(("  ✗ ", "red"), f"node {event.node_id} {event.node_status}")
                        )
                    elif announced == MAX_FAILURE_LINES + 1:
                        progress.console.print("  … more failures: see the summary")
            if any(event.node_status in _UNCOUNTED_IN_EVENTS or event.type == "added" for event in events) or (
                events and time.monotonic() - read_at >= STATUS_EVERY_S
            ):
                # Events carry the completed and failed counters only: read the others (a
                # node_count that grew, the rate and ETA) once.
                status = manager.sync.get_session_status(session_id)
                read_at = time.monotonic()
            elif events:
                latest = events[-1]
                status = {
                    **status,
                    "status": latest.status.value,
                    "progress_percent": latest.progress_percent,
                    "completed_nodes": latest.completed_nodes,
                    "failed_nodes": latest.failed_nodes,
                }
            else:  # nothing new: re-read, in case events were trimmed or the session stalled
                status = manager.sync.get_session_status(session_id)
            _show(progress, bar, status)
        status = manager.sync.get_session_status(session_id)
        _show(progress, bar, status)
    return status


def newest_event_id(manager: SessionManager, session_id: str) -> str | None:
    """The id of the session's newest event, None when its stream is empty (pass it to :func:`follow`'s ``after``).

    Streams are capped (``TRACKER_EVENTS_MAXLEN``), so this reads at most about that many events.
    """
    newest: str | None = None
    while True:
        batch = manager.sync.read_events(session_id, after=newest, limit=1000)
        if batch:
            newest = batch[-1].id
        if len(batch) < 1000:
            return newest


def session_hint(manager: SessionManager, status: dict[str, Any]) -> str | None:
    """The pickup hint for a session's status dict, at the manager's time, or None."""
    created_at = datetime.fromisoformat(status["created_at"])
    return pickup_hint(status["status"], created_at, manager.clock(), manager.settings.pickup_hint_after_s)


def finished_nodes(status: dict[str, Any]) -> int:
    """Nodes with a result: completed, failed (lost included), cancelled and skipped (what progress counts)."""
    return sum(
        int(status.get(key) or 0) for key in ("completed_nodes", "failed_nodes", "cancelled_nodes", "skipped_nodes")
    )


def _show(progress: Progress, bar: Any, status: dict[str, Any]) -> None:
    # The bar is the session's progress: the nodes with a result and the running nodes' reported fractions.
    total = int(status["node_count"])
    progress.update(
        bar,
        description=f"[{_STYLES.get(status['status'], '')}]{status['status']}[/]",
        completed=float(status["progress_percent"]) if total else 100,
        finished=finished_nodes(status),
        nodes=total,
        ok=status["completed_nodes"],
        failed=status["failed_nodes"],
        pace=pace(status),
    )


def pace(status: dict[str, Any], now: datetime | None = None) -> str:
    """``"4.0/s, ETA 12 s"`` for a running session whose rate is known ("" otherwise): the ETA
    counts down from the status's ``eta_at`` to ``now`` (default: the wall clock)."""
    rate = status.get("rate_per_s")
    if status["status"] in TERMINAL_STATUSES or not rate:
        return ""
    text = f"{rate:.1f}/s" if rate >= 0.1 else f"{rate * 60:.1f}/min"
    eta_at = status.get("eta_at")
    if eta_at:
        left = (datetime.fromisoformat(eta_at) - (now or datetime.now(UTC))).total_seconds()
        text += f", ETA {_span(left)}" if left >= 0 else ", ETA unknown (overdue)"
    return text


def _span(seconds: float) -> str:
    """``"42 s"``, ``"7 min"``, ``"3.2 h"``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _moment(value: str | None) -> str:
    if not value:
        return "-"
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration_s(status: dict[str, Any]) -> float | None:
    """Seconds from the session's start to its end (to now while it runs); None before it starts."""
    if not status.get("started_at"):
        return None
    start = datetime.fromisoformat(status["started_at"])
    end = datetime.fromisoformat(status["finished_at"]) if status.get("finished_at") else datetime.now(UTC)
    return max(0.0, (end - start).total_seconds())


def node_counts(status: dict[str, Any]) -> Text:
    """``"38 completed, 4 failed, 0 running, 0 pending (of 42)"`` plus lost/retrying/cancelled/skipped when any.

    Retrying nodes (waiting for Celery's retry) are not among the running ones: they are named
    apart, after them, in their own colour.
    """
    parts: list[str | Text] = [f"{status['completed_nodes']} completed", f"{status['failed_nodes']} failed"]
    if status.get("lost_nodes"):
        parts[-1] = f"{parts[-1]} ({status['lost_nodes']} lost)"
    parts.append(f"{status.get('running_nodes', 0)} running")
    if status.get("retrying_nodes"):
        parts.append(Text(f"{status['retrying_nodes']} retrying", style=_STYLES["retrying"]))
    parts.append(f"{status.get('pending_nodes', 0)} pending")
    if status.get("cancelled_nodes"):
        parts.append(f"{status['cancelled_nodes']} cancelled")
    if status.get("skipped_nodes"):
        parts.append(f"{status['skipped_nodes']} skipped")
    counts = Text(", ").join(Text(part) if isinstance(part, str) else part for part in parts)
    counts.append(f" (of {status['node_count']})")
    return counts


def status_table(status: dict[str, Any]) -> Table:
    """One session's status as a two-column table."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    took = duration_s(status)
    table.add_row("Session", status["session_id"])
    table.add_row("Canvas", status["canvas_path"])
    table.add_row("Status", styled(status["status"]))
    table.add_row("Progress", f"{float(status['progress_percent']):.1f} %")
    table.add_row("Nodes", node_counts(status))
    if status.get("failure_types"):
        table.add_row("Failures", f"{status['failure_types']} cause(s): see `failures {status['session_id']}`")
    if status.get("rate_per_s"):
        eta = pace(status) if status["status"] not in TERMINAL_STATUSES else f"{status['rate_per_s']:.1f}/s"
        table.add_row("Rate", eta)
    if status.get("tags"):
        table.add_row("Tags", ", ".join(status["tags"]))
    if status.get("children"):
        table.add_row("Children", f"{status['children']} child session(s), {status['children_open']} open")
    if status.get("parent_session_id"):
        table.add_row("Parent", f"{status['parent_session_id']} (node {status['parent_node_id']})")
    table.add_row("Created", _moment(status.get("created_at")))
    table.add_row("Started", _moment(status.get("started_at")))
    table.add_row("Finished", _moment(status.get("finished_at")))
    table.add_row("Duration", "-" if took is None else f"{took:.1f} s")
    return table


def all_nodes(manager: SessionManager, session_id: str) -> list[NodeResult]:
    """Every node result of the session (page by page)."""
    return list(nodes_of(manager, session_id))


def _error_text(node: NodeResult) -> str:
    if node.error is not None:
        return f"{node.error.type}: {node.error.message}" if node.error.message else node.error.type
    return node.reason or "-"


def failures_table(nodes: list[NodeResult]) -> Table | None:
    """The failed and lost nodes with their errors; None when there are none."""
    failed = [n for n in nodes if n.status in (NodeStatus.FAILED, NodeStatus.LOST)]
    if not failed:
        return None
    table = Table(title=f"Failures ({len(failed)})", title_justify="left", title_style="bold red")
    table.add_column("Node", overflow="fold")
    table.add_column("Status")
    table.add_column("Attempts", justify="right")
    table.add_column("Error", overflow="fold")
    for node in sorted(failed, key=lambda n: n.node_id):
        table.add_row(node.node_id, styled(node.status.value), str(node.attempts), _error_text(node))
    return table


def failure_groups_table(groups: list[FailureGroup]) -> Table:
    """A session's failures by cause (``get_failures``): one row per error type, most first."""
    total = sum(group.count for group in groups)
    table = Table(title=f"Failures by cause ({total} node(s))", title_justify="left", title_style="bold red")
    table.add_column("Cause", no_wrap=True)
    table.add_column("Nodes", justify="right")
    table.add_column("First message", overflow="fold", ratio=2)
    table.add_column("Seen (UTC)", no_wrap=True)
    table.add_column("Some nodes", overflow="fold", ratio=1)
    for group in groups:
        seen = f"{group.first_at:%H:%M:%S}-{group.last_at:%H:%M:%S}"
        more = " …" if group.count > len(group.node_ids) else ""
        table.add_row(group.error_type, str(group.count), group.first_message or "-", seen,
                      " ".join(group.node_ids) + more)  # fmt: skip
    return table


def slowest_table(nodes: list[NodeResult], count: int) -> Table | None:
    """The ``count`` nodes that took longest; None when no node has a duration yet."""
    timed = sorted((n for n in nodes if n.execution_time_ms is not None), key=lambda n: -(n.execution_time_ms or 0))
    if not timed or count <= 0:
        return None
    table = Table(title=f"Slowest nodes (top {min(count, len(timed))})", title_justify="left", title_style="bold")
    table.add_column("Node", overflow="fold")
    table.add_column("Status")
    table.add_column("Time", justify="right")
    table.add_column("Worker", overflow="fold")
    for node in timed[:count]:
        table.add_row(
            node.node_id, styled(node.status.value), f"{(node.execution_time_ms or 0) / 1000:.2f} s", node.worker or "-"
        )
    return table


def print_report(
    console: Console, manager: SessionManager, status: dict[str, Any], *, slowest: int = 0, failures: bool = True
) -> None:
    """The status table, then (for sessions of at most :data:`MAX_DETAIL_NODES` nodes) failures and slowest nodes."""
    console.print(status_table(status))
    wants_nodes = (failures and int(status["failed_nodes"]) > 0) or slowest > 0
    if not wants_nodes or int(status["node_count"]) > MAX_DETAIL_NODES:
        return
    nodes = all_nodes(manager, status["session_id"])
    for table in (slowest_table(nodes, slowest), failures_table(nodes) if failures else None):
        if table is not None:
            console.print()
            console.print(table)
    if failures and status.get("failure_types"):
        console.print()
        console.print(failure_groups_table(manager.sync.get_failures(status["session_id"])))
    if status.get("children"):
        console.print()
        console.print(children_table(manager, status["session_id"]))


def children_table(manager: SessionManager, session_id: str) -> Table:
    """The child sessions the session's nodes' tasks opened: each one's node, status and counts."""
    children = manager.sync.get_children(session_id)
    table = Table(title=f"Child sessions ({len(children)})", title_justify="left")
    table.add_column("Node")
    table.add_column("Status")
    table.add_column("Finished", justify="right")
    table.add_column("Child session", overflow="fold")
    for child in children:
        try:
            status = manager.sync.get_session_status(child.session_id)
            finished = f"{finished_nodes(status)}/{status['node_count']}"
        except SessionNotFoundError:
            finished = "removed"
        table.add_row(child.node_id, styled(child.status), finished, child.session_id)
    return table


def ending_line(status: dict[str, Any]) -> Text:
    """``Session <id> ended partial_failure: 38 completed, 4 failed of 42 in 5.1 s.`` (or ``is running``).

    Skipped nodes are named too when there are any (``…, 4 failed, 2 skipped of 42``).
    """
    took = duration_s(status)
    verb = "ended" if status["status"] in TERMINAL_STATUSES else "is"
    tail = f" in {took:.1f} s" if took is not None and verb == "ended" else ""
    counts = f"{status['completed_nodes']} completed, {status['failed_nodes']} failed"
    if status.get("skipped_nodes"):
        counts += f", {status['skipped_nodes']} skipped"
    counts += f" of {status['node_count']}"
    return Text.assemble(
        f"Session {status['session_id']} {verb} ", styled(status["status"]), f": {counts}{tail}.", style="bold"
    )


def sessions_table(sessions: list[dict[str, Any]], width: int = 80) -> Table:
    """A listing: one row per session, newest first (``status ID`` shows the rest).

    Args:
        sessions: Status dicts.
        width: The console's width; below 100 columns the creation time is left out.
    """
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("Session", no_wrap=True, min_width=36)
    table.add_column("Status", no_wrap=True, min_width=15)
    table.add_column("Done", justify="right", no_wrap=True)
    # The only column that may give way (people copy the id whole): its width shrinks to what is
    # left, and each name (a cell that never wraps) is cut there with an ellipsis. Folded, names
    # broke mid-word at 80 columns.
    table.add_column("Canvas", overflow="ellipsis", min_width=8)
    wide = width >= 100
    if wide:
        table.add_column("Created (UTC)", no_wrap=True)
    for s in sessions:
        done = finished_nodes(s)
        row: list[str | Text] = [s["session_id"], styled(s["status"]), f"{done}/{s['node_count']}"]
        row.append(Text(PurePath(s["canvas_path"]).name or s["canvas_path"], no_wrap=True, overflow="ellipsis"))
        if wide:
            row.append(datetime.fromisoformat(s["created_at"]).astimezone(UTC).strftime("%Y-%m-%d %H:%M"))
        table.add_row(*row)
    return table


def workers_table(workers: list[WorkerStatus]) -> Table:
    """Worker processes by heartbeat (``list_workers``), newest first: alive or silent, when last
    seen, how many nodes each runs, and the first of them (``session/node``: the session's short id)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("Worker", no_wrap=True)
    table.add_column("State", no_wrap=True)
    table.add_column("Last seen (UTC)", no_wrap=True)
    table.add_column("Running", justify="right", no_wrap=True)
    table.add_column("First nodes", overflow="fold")
    for worker in workers:
        state = Text("alive", style="green") if worker.alive else Text("silent", style="red")
        seen = f"{worker.last_seen_at.astimezone(UTC):%H:%M:%S} ({_span(worker.seen_s_ago)} ago)"
        shown = " ".join(f"{node.session_id[:8]}/{node.node_id}" for node in worker.nodes[:WORKER_NODES_LISTED])
        more = " …" if worker.running > min(len(worker.nodes), WORKER_NODES_LISTED) else ""
        table.add_row(worker.worker, state, seen, str(worker.running), (shown or "-") + more)
    return table
