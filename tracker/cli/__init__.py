"""The ``tracker`` command line, also reachable as ``celery -A proj sessions ...``.

``main`` is the ``tracker`` console script; ``celery_command`` is the same commands as a Celery
sub-command (``[project.entry-points."celery.commands"] sessions``), using the app Celery loaded.
"""

from __future__ import annotations

import click

from tracker import __version__
from tracker.cli.base import EXIT_CODES_HELP, CliState, ExitCode, TrackerGroup, setup_debug_logging
from tracker.cli.commands import COMMANDS

__all__ = ["ExitCode", "celery_command", "main"]

_ENVIRONMENT_HELP = """\b
Settings (environment):
  TRACKER_REDIS_URL       the Redis that holds sessions; workers and this CLI must share it
                          (unset: an in-memory store, useful only for `tracker demo`)
  TRACKER_KEY_PREFIX      prefix of every Redis key (default: tracker)
  TRACKER_SESSION_TIMEOUT_S seconds without change after which a session expires (default: 1800)"""

_debug_option = click.option(
    "--debug", is_flag=True, envvar="TRACKER_DEBUG", help="Show tracebacks and debug logs (also TRACKER_DEBUG=1)."
)


@click.group(
    name="tracker",
    cls=TrackerGroup,
    epilog=f"{_ENVIRONMENT_HELP}\n\n{EXIT_CODES_HELP}",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "-A",
    "--app",
    "app_spec",
    metavar="MODULE:ATTR",
    envvar="TRACKER_CELERY_APP",
    help="The Celery app that run, cancel and resume send with (default: workers.app:app; also TRACKER_CELERY_APP).",
)
@_debug_option
@click.version_option(__version__, "-V", "--version", prog_name="tracker")
@click.pass_context
def main(ctx: click.Context, app_spec: str | None, debug: bool) -> None:
    """Track batches of Celery work as sessions: run them, follow them live, cancel and resume them.

    New here? `tracker demo` runs a whole batch in this process, with nothing to set up.
    """
    setup_debug_logging(debug)
    ctx.obj = CliState(debug=debug, app_spec=app_spec, prog=ctx.command_path)


@click.group(
    name="sessions",
    cls=TrackerGroup,
    epilog=f"{_ENVIRONMENT_HELP}\n\n{EXIT_CODES_HELP}",
    context_settings={"max_content_width": 100},
)
@_debug_option
@click.pass_context
def celery_command(ctx: click.Context, debug: bool) -> None:
    """Tracker sessions of this app: run, status, list, watch, workers, cancel, resume, cleanup, serve, demo."""
    setup_debug_logging(debug)
    # Celery's group loaded the -A app into its CLIContext; without -A it holds Celery's default
    # app, which knows nothing of the project, so the tracker default (workers.app) is used then.
    spec = ctx.parent.params.get("app") if ctx.parent is not None else None
    celery_app = getattr(ctx.obj, "app", None) if spec is not None else None
    prog = f"celery -A {spec} sessions" if isinstance(spec, str) else ctx.command_path
    ctx.obj = CliState(debug=debug, celery_app=celery_app, prog=prog)


for _command in COMMANDS:
    main.add_command(_command)
    celery_command.add_command(_command)
