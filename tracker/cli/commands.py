"""The commands: demo, run, status, list, watch, failures, workers, cancel, resume, cleanup, serve."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from tracker.cli.base import CliError, CliState, ExitCode, masked_url, outcome_code
from tracker.cli.batch import dispatch_canvas_file
from tracker.cli.render import (
    ending_line,
    failure_groups_table,
    follow,
    newest_event_id,
    print_report,
    session_hint,
    sessions_table,
    workers_table,
)
from tracker.models import SessionInfo
from tracker.states import TERMINAL_STATUSES, SessionStatus

#: ``tracker demo`` stops following (and exits 1) if its batch has not ended after this long.
DEMO_TIMEOUT_S = 120.0

pass_state = click.make_pass_decorator(CliState)

session_id_argument = click.argument("session_id", metavar="ID")


def _out() -> Console:
    return Console(highlight=False)


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _finish(ctx: click.Context, console: Console, state: CliState, status: dict[str, Any]) -> None:
    """Report a session that was followed, then exit with the code its status calls for."""
    console.print()
    print_report(console, state.manager(), status, slowest=5)
    console.print()
    console.print(ending_line(status))
    ctx.exit(outcome_code(status["status"]))


@click.command()
@click.option(
    "--canvas",
    "canvas_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Run this .canvas file instead of the sample shipped with tracker.",
)
@click.option(
    "--concurrency", type=click.IntRange(1, 64), default=6, show_default=True, help="Worker threads of the demo worker."
)
@pass_state
@click.pass_context
def demo(ctx: click.Context, state: CliState, canvas_file: Path | None, concurrency: int) -> None:
    """Run a whole batch end to end, with nothing to set up.

    Starts a Celery worker inside this process (threads), sends the sample canvas (42 nodes that
    take 0.2-1.5 s each; 4 of them fail on purpose) as one session, shows a live progress bar and
    ends with a summary: status, counters, slowest nodes and failures.

    Uses an in-memory broker and store, or Redis as both when TRACKER_REDIS_URL is set (then
    `tracker list` in another shell sees the demo's session too).

    Exits 0 once the batch has ended, whatever its status: the sample ends partial_failure by
    design. (`tracker run --wait` exits 1 for a session that ends partial_failure.)
    """
    from tracker.config import TrackerSettings
    from tracker.demo import NODE_TASK, embedded, sample_canvas

    console = _out()
    settings = TrackerSettings()
    with sample_canvas() as sample:
        path = canvas_file or sample
        where = f"Redis at {masked_url(settings.redis_url)}" if settings.redis_url else "in-memory broker and store"
        with embedded(settings, concurrency=concurrency, verbose=state.debug) as runtime:
            session_id, count = dispatch_canvas_file(path, app=runtime.app, manager=runtime.manager, task=NODE_TASK)
            console.print(
                f"[bold]tracker demo[/]: {count} nodes from {path.name}, a worker with {concurrency} threads "
                f"in this process, {where}."
            )
            console.print(f"Session {session_id}")
            status = follow(runtime.manager, session_id, console, timeout_s=DEMO_TIMEOUT_S)
            console.print()
            print_report(console, runtime.manager, status, slowest=5)
    console.print()
    console.print(ending_line(status))
    if status["status"] not in TERMINAL_STATUSES:
        raise CliError(f"the demo batch did not end within {DEMO_TIMEOUT_S:.0f} s", ExitCode.SESSION_FAILED)


@click.command()
@click.argument("canvas_file", metavar="FILE.canvas", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--wait", is_flag=True, help="Follow the session with a progress bar until it ends (see exit codes).")
@click.option(
    "--task",
    default="workers.process_node",
    show_default=True,
    help="Celery task to run once per node; it receives the node as a JSON dict.",
)
@pass_state
@click.pass_context
def run(ctx: click.Context, state: CliState, canvas_file: Path, wait: bool, task: str) -> None:
    """Send a JSON Canvas file as one tracked batch: one task per node.

    Prints the new session's id on stdout (so `ID=$(tracker run batch.canvas)` works). Workers of
    the Celery app (--app, default workers.app:app) run the tasks; they and this command must use
    the same Redis (TRACKER_REDIS_URL).

    With --wait, shows a progress bar until the session ends and exits 1 if it ended
    failed, partial_failure or cancelled.
    """
    manager = state.require_shared_store("tracker run")
    app = state.app()
    session_id, count = dispatch_canvas_file(canvas_file, app=app, manager=manager, task=task)
    click.echo(session_id)
    err = _err()
    err.print(f"Sent {count} nodes of {canvas_file} as session {session_id}.")
    if not wait:
        err.print(f"Follow it with: {state.prog} watch {session_id}")
        return
    _finish(ctx, err, state, follow(manager, session_id, err))


@click.command()
@session_id_argument
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON (the same fields as the web API).")
@pass_state
@click.pass_context
def status(ctx: click.Context, state: CliState, session_id: str, as_json: bool) -> None:
    """Show one session's status, counters and failures.

    Shows status, progress, node counters, times and, when nodes failed, their errors; a hint
    when the session has stayed pending longer than TRACKER_PICKUP_HINT_AFTER_S seconds.
    Exits 1 when the session ended failed, partial_failure or cancelled, 0 otherwise.
    """
    manager = state.manager()
    info = manager.sync.get_session_status(session_id)
    if as_json:
        _echo_json(info)
    else:
        console = _out()
        print_report(console, manager, info)
        hint = session_hint(manager, info)
        if hint is not None:
            console.print(Text(f"Hint: {hint}", style="yellow"))
    ctx.exit(outcome_code(info["status"]))


@click.command(name="list")
@click.option(
    "--status",
    "status_filter",
    type=click.Choice([s.value for s in SessionStatus]),
    help="Only sessions in this status.",
)
@click.option("--tag", help="Only sessions dispatched with this tag (dispatch(..., tags=[...])).")
@click.option("--path", help="Only sessions whose canvas path starts with this (listed by path, then newest first).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Show at most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of status objects.")
@pass_state
def list_(
    state: CliState, status_filter: str | None, tag: str | None, path: str | None, limit: int, as_json: bool
) -> None:
    """List sessions, newest first.

    --tag and --path read their own index (a tag's sessions; canvas paths by prefix, listed by
    path); --status, and --path given with --tag, sift what they find.
    """
    manager = state.manager()
    found: list[SessionInfo] = []
    cursor: str | None = None
    while len(found) < limit:
        page = manager.sync.list_sessions(status_filter, cursor=cursor, limit=min(1000, limit), tag=tag, path=path)
        found += page.sessions
        cursor = page.next_cursor
        if cursor is None:
            break
    sessions = [s.to_dict() for s in found[:limit]]
    if as_json:
        _echo_json(sessions)
        return
    console = _out()
    if not sessions:
        filters = [f"status {status_filter}"] * bool(status_filter) + [f"tag {tag}"] * bool(tag)
        filters += [f"path {path}"] * bool(path)
        console.print("No sessions." + (f" (none with {', '.join(filters)})" if filters else ""))
        if state.uses_memory_store:
            console.print("TRACKER_REDIS_URL is not set: this looked in an empty in-memory store of its own.")
        return
    console.print(sessions_table(sessions, console.width))


@click.command()
@session_id_argument
@pass_state
@click.pass_context
def watch(ctx: click.Context, state: CliState, session_id: str) -> None:
    """Follow a session live until it ends.

    Draws a progress bar fed by the session's event stream, announces failed nodes as they fail
    (and, once, a hint when no worker has picked up any node for TRACKER_PICKUP_HINT_AFTER_S
    seconds), and ends with a summary. Exits 1 when the session ended failed, partial_failure or
    cancelled, 0 when it completed.
    """
    console = _out()
    manager = state.manager()
    _finish(ctx, console, state, follow(manager, session_id, console))


@click.command()
@session_id_argument
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON (the same fields as the web API).")
@pass_state
def failures(state: CliState, session_id: str, as_json: bool) -> None:
    """Show a session's failed and lost nodes grouped by cause.

    One line per error type, most nodes first: how many nodes failed with it, the first message,
    when it was first and last seen, and a few node ids. Re-run one group with
    `resume ID --error TYPE`.
    """
    groups = state.manager().sync.get_failures(session_id)
    if as_json:
        _echo_json([group.to_dict() for group in groups])
        return
    console = _out()
    if not groups:
        console.print(f"Session {session_id} has no failed or lost nodes.")
        return
    console.print(failure_groups_table(groups))
    console.print(f"Re-run one group with: {state.prog} resume {session_id} --error {groups[0].error_type}")


@click.command()
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=200, show_default=True, help="Show at most this many workers."
)
@click.option("--json", "as_json", is_flag=True, help="Print the workers as JSON (the same fields as the web API).")
@pass_state
def workers(state: CliState, limit: int, as_json: bool) -> None:
    """List the worker processes the tracker has heard from, newest heartbeat first.

    Each is alive when it was seen within TRACKER_WORKER_STALE_AFTER_S seconds, silent otherwise
    (a reaper will mark its running nodes lost, and then forget it); with how many nodes it runs
    now and the first of them.
    """
    manager = state.manager()
    found = manager.sync.list_workers(limit)
    now = manager.clock()
    listed = [worker.seen_at(now, manager.settings.worker_stale_after_s) for worker in found]
    if as_json:
        _echo_json([worker.to_dict() for worker in listed])
        return
    console = _out()
    if not listed:
        console.print("No workers: none has sent a heartbeat (or a reaper forgot the dead ones).")
        if state.uses_memory_store:
            console.print("TRACKER_REDIS_URL is not set: this looked in an empty in-memory store of its own.")
        return
    console.print(workers_table(listed))


@click.command()
@session_id_argument
@click.option("--terminate", is_flag=True, help="Also kill tasks already running (Celery's revoke terminate=True).")
@pass_state
def cancel(state: CliState, session_id: str, terminate: bool) -> None:
    """Cancel a session and revoke its unfinished tasks.

    The session ends cancelled; nodes not started yet are revoked. Nodes already running finish
    unless --terminate is given; their results are still recorded.
    """
    from tracker.celery import cancel_session

    manager = state.manager()
    manager.sync.get_session(session_id)  # unknown id: exit 3 before loading the Celery app
    info = cancel_session(session_id, app=state.session_app(session_id), manager=manager, terminate=terminate)
    _out().print(f"Session {session_id} cancelled: {info.cancelled_nodes} unfinished node(s) revoked.")


@click.command()
@session_id_argument
@click.option(
    "--retry-failed/--only-unfinished",
    default=True,
    show_default=True,
    help="Also re-run the nodes that failed, or only those that never finished.",
)
@click.option(
    "--node",
    "nodes",
    multiple=True,
    help="Re-run only this node (repeat for more), and what did not complete after it.",
)
@click.option(
    "--error",
    "error_type",
    help="Re-run only the nodes that failed with this cause (see `failures ID`), and what did not complete after them.",
)
@click.option("--wait", is_flag=True, help="Follow the session until it ends again (exit codes as for run --wait).")
@pass_state
@click.pass_context
def resume(
    ctx: click.Context,
    state: CliState,
    session_id: str,
    retry_failed: bool,
    nodes: tuple[str, ...],
    error_type: str | None,
    wait: bool,
) -> None:
    """Run a session's unfinished and failed nodes again.

    Re-sends them under the same session id (with --only-unfinished, failed nodes stay failed).
    With --node or --error, only those nodes (and what did not complete after them: the rest of
    their chain, their chord's body) run again; every other node keeps its result. Completed
    nodes never run again. Works on a cancelled, failed, partial_failure or stalled session.
    """
    from tracker.celery import resume_session

    manager = state.manager()
    manager.sync.get_session(session_id)  # unknown id: exit 3 before loading the Celery app
    # --wait follows the new run only: the stream's earlier events announce the failures of the
    # runs before, of nodes that are now sent again.
    after = newest_event_id(manager, session_id) if wait else None
    sent = resume_session(
        session_id,
        app=state.session_app(session_id),
        manager=manager,
        retry_failed=retry_failed,
        nodes=list(nodes) or None,
        error_type=error_type,
    )
    console = _out()
    console.print(f"Session {session_id} resumed: {sent} node(s) sent again.")
    if wait:
        _finish(ctx, console, state, follow(manager, session_id, console, after=after))


@click.command()
@pass_state
def cleanup(state: CliState) -> None:
    """Reap the nodes of dead workers, then remove expired sessions, now.

    A worker process silent for TRACKER_WORKER_STALE_AFTER_S seconds is reaped by the first pass
    that finds it silent that long again (a live one beats meanwhile). Its running nodes become
    lost, or pending again when the app acknowledges late (its messages come back from the
    broker). A session that has not ended expires after TRACKER_SESSION_TIMEOUT_S seconds without
    change, an ended one after TRACKER_FINISHED_TTL_S seconds. Beat does
    both every minute when workers.app runs with -B; this is one pass, by hand (the callbacks it
    causes are sent when the app loads).
    """
    from tracker.celery import maintain

    started = time.monotonic()
    manager = state.manager()
    app = state.app_if_available()
    if app is not None:
        done = maintain(app, manager)
        lost, stalled, removed = done["lost"], done["stalled"], done["removed"]
    else:
        lost, stalled, removed = len(manager.sync.reap_lost_nodes()), 0, manager.sync.cleanup_expired_sessions()
    elapsed = time.monotonic() - started
    _out().print(
        f"Reaped {lost} node(s) of dead worker processes; ended {stalled} stalled session(s); "
        f"removed {removed} expired session(s) in {elapsed:.2f} s."
    )


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="TCP port.")
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
    help="uvicorn's log level.",
)
@pass_state
def serve(state: CliState, host: str, port: int, log_level: str) -> None:
    """Serve the web API and the live dashboard.

    Serves the API, live event streams and the dashboard (/dashboard) until Ctrl-C. Needs the web
    extra: pip install 'celery-session-tracker[web]'. Set TRACKER_API_TOKEN to allow cancel and
    resume over HTTP.
    """
    try:
        from tracker.web import serve as serve_web
    except ImportError as exc:
        raise CliError(
            f"the web extra is not installed ({exc})", ExitCode.USAGE, "Hint: pip install 'celery-session-tracker[web]'"
        ) from exc
    manager = state.manager()
    if state.uses_memory_store:
        _err().print("Warning: TRACKER_REDIS_URL is not set: serving an empty in-memory store.")
    # Cancel and resume go through the app named here, else each session's own (its recorded
    # import path), else the default app, loaded now so that it is Celery's current app.
    named = state.named_app()
    if named is None:
        state.app_if_available()
    serve_web(host, port, manager=manager, celery_app=named, log_level=log_level)


#: Every command, in the order ``--help`` lists them.
COMMANDS: tuple[click.Command, ...] = (
    demo,
    run,
    status,
    list_,
    watch,
    failures,
    workers,
    cancel,
    resume,
    cleanup,
    serve,
)
