"""What every command shares: exit codes, error messages, the manager and the Celery app.

Errors are turned into one-line messages and documented exit codes here, in one place
(:class:`TrackerGroup`); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import importlib
import logging
import traceback
from dataclasses import dataclass, field
from enum import IntEnum
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import click
from celery import Celery
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from tracker import errors
from tracker.manager import SessionManager
from tracker.states import SessionStatus
from tracker.storage.memory import InMemoryStorageAdapter

#: The Celery app used when neither ``--app`` nor ``celery -A`` names one.
DEFAULT_APP = "workers.app:app"


class ExitCode(IntEnum):
    """What the process exit status means (listed in ``tracker --help``)."""

    #: Done; for ``status`` / ``watch`` / ``run --wait``: the session is running or completed.
    OK = 0
    #: The session ended ``failed``, ``partial_failure`` or ``cancelled``; also an unexpected error.
    SESSION_FAILED = 1
    #: Bad usage: arguments, session id, canvas file, configuration, or an action the state forbids.
    USAGE = 2
    #: No such session (never created, expired or removed).
    NOT_FOUND = 3
    #: The store (Redis) or the Celery broker cannot be reached.
    UNREACHABLE = 4
    #: Interrupted (Ctrl-C): the shell's 128 + SIGINT.
    INTERRUPTED = 130


EXIT_CODES_HELP = """\b
Exit codes:
  0  success; for status, watch and run --wait: the session is running or completed
  1  the session ended failed, partial_failure or cancelled (or an unexpected error)
  2  usage: bad arguments, session id, canvas file or settings, or an action the
     session's state does not allow (e.g. cancelling a completed session)
  3  session not found (never created, expired or removed)
  4  Redis or the Celery broker is unreachable
  130  interrupted (Ctrl-C)"""

#: Ended statuses that are not a success: exit code 1.
ENDED_BADLY = frozenset({SessionStatus.PARTIAL_FAILURE, SessionStatus.FAILED, SessionStatus.CANCELLED})


def outcome_code(status: str) -> ExitCode:
    """The exit code that reports a session's status: 1 when it ended without completing every node."""
    return ExitCode.SESSION_FAILED if status in ENDED_BADLY else ExitCode.OK


class CliError(click.ClickException):
    """A failure shown as ``Error: <message>`` (plus optional detail lines) with a chosen exit code.

    Args:
        message: One line a person understands.
        exit_code: See :class:`ExitCode`.
        details: Lines printed under the message as they are (``Hint: ...``, ``Cause: ...``).
    """

    def __init__(self, message: str, exit_code: ExitCode, *details: str) -> None:
        super().__init__(message)
        self._exit_code = int(exit_code)
        self.details = details

    @property
    def exit_code(self) -> int:  # type: ignore[override]  # click declares a class variable; this varies
        """The process exit status."""
        return self._exit_code

    def show(self, file: IO[Any] | None = None) -> None:
        """Print the message and its details to stderr."""
        click.secho(f"Error: {self.format_message()}", err=True, fg="red", file=file)
        for line in self.details:
            click.echo(line, err=True, file=file)


def masked_url(url: str | None) -> str:
    """``url`` with its password replaced by ``***`` (safe to print)."""
    if not url:
        return "<unset>"
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
    except ValueError:
        return "<unparsable URL>"


_MEMORY_HINT = (
    "TRACKER_REDIS_URL is not set, so this command looked in an empty in-memory store of its own. "
    "Set it to the Redis your workers use, e.g. export TRACKER_REDIS_URL=redis://127.0.0.1:6379/0"
)


def _state_hint(exc: errors.InvalidStateTransitionError, prog: str) -> str:
    """What a person can do about a move the session's status does not allow."""
    if exc.to_status == SessionStatus.CANCELLED:
        return "it has ended: there is nothing left to cancel"
    if exc.from_status == SessionStatus.COMPLETED:
        return "every node completed: there is nothing to resume"
    return f"`{prog} status {exc.session_id}` shows where it is"


def translate(exc: BaseException, state: CliState | None, command: str | None = None) -> click.ClickException:
    """The message, hint and exit code a person sees for ``exc``, raised by ``command`` (its name)."""
    memory = state is not None and state.uses_memory_store
    prog = state.prog if state is not None else "tracker"
    if isinstance(exc, errors.TrackerError) and exc.hint:  # the error knows what to do (a resume refused...)
        return CliError(str(exc), ExitCode.USAGE, f"Hint: {exc.hint}")
    if isinstance(exc, errors.SessionNotFoundError):
        where = state.store_description() if state is not None else None
        return CliError(
            f"no session {exc.session_id} (never created, expired or removed)" + (f" in {where}" if where else ""),
            ExitCode.NOT_FOUND,
            f"Hint: {_MEMORY_HINT}" if memory else f"Hint: `{prog} list` shows the sessions that exist there.",
        )
    if isinstance(exc, errors.InvalidStateTransitionError):
        return CliError(
            f"session {exc.session_id} is {exc.from_status}: it cannot become {exc.to_status}",
            ExitCode.USAGE,
            f"Hint: {_state_hint(exc, prog)}",
        )
    if isinstance(exc, errors.WrongCeleryAppError):
        named = exc.app_path or "module:attr"
        command = f"celery -A {named} sessions" if prog.startswith("celery") else f"tracker -A {named}"
        return CliError(
            f"{exc}: nothing was changed",
            ExitCode.USAGE,
            f"Hint: name the app that dispatched it: {command} ... (or TRACKER_CELERY_APP={named}), "
            "run from a directory it can be imported from",
        )
    if isinstance(exc, errors.StorageUnavailableError):
        cause = f"Cause: {exc.__cause__}" if exc.__cause__ is not None else f"Cause: {exc}"
        if "unreachable" in str(exc) or exc.url is None:
            problem = "is unreachable: is redis-server running? check TRACKER_REDIS_URL"
        else:
            problem = "refused the command: check TRACKER_REDIS_URL (password, database number)"
        return CliError(f"Redis at {masked_url(exc.url)} {problem}", ExitCode.UNREACHABLE, cause)
    if isinstance(exc, OperationalError):
        broker = state.broker_uri() if state is not None else "<unknown>"
        return CliError(
            f"the Celery broker at {broker} is unreachable: is it running? check the app's broker_url "
            "(workers.app reads CELERY_BROKER_URL, then TRACKER_REDIS_URL)",
            ExitCode.UNREACHABLE,
            f"Cause: {exc}",
        )
    if isinstance(exc, ValidationError):
        name, problem = _first_error(exc)
        return CliError(
            f"invalid TRACKER_* setting: {name}: {problem}",
            ExitCode.USAGE,
            f"Hint: fix {name}, or unset it for its default",
        )
    if isinstance(exc, errors.TrackerValidationError) and exc.field == "session_id":
        hint = f"a session id is the UUID that dispatch returned; `{prog} list` shows them"
        return CliError(str(exc), ExitCode.USAGE, f"Hint: {hint}")
    if isinstance(exc, errors.TrackerError):
        usage = f"{prog} {command}" if command else prog
        return CliError(str(exc), ExitCode.USAGE, f"Hint: `{usage} --help` shows what it takes")
    return CliError(
        f"unexpected {type(exc).__name__}: {exc}",
        ExitCode.SESSION_FAILED,
        "Hint: run with --debug to see the traceback.",
    )


def _first_error(exc: ValidationError) -> tuple[str, str]:
    """The environment variable of a settings error, and what is wrong with it."""
    first = exc.errors()[0]
    return "TRACKER_" + "_".join(str(p) for p in first["loc"]).upper(), first["msg"]


@dataclass
class CliState:
    """The group's options, shared by its commands (``ctx.obj``).

    Args:
        debug: Show tracebacks and the library's debug logs.
        app_spec: ``module:attr`` of the Celery app (``--app``); None: the default.
        celery_app: The app Celery's own CLI loaded (``celery -A ... sessions``), when run that way.
        prog: How the user calls this CLI (``tracker`` or ``celery sessions``), for hints.
    """

    debug: bool = False
    app_spec: str | None = None
    celery_app: Celery | None = None
    #: How the user calls this CLI (``tracker`` or ``celery sessions``), for hints.
    prog: str = "tracker"
    _manager: SessionManager | None = field(default=None, repr=False)

    def manager(self) -> SessionManager:
        """The process-wide manager (Redis when ``TRACKER_REDIS_URL`` is set)."""
        if self._manager is None:
            self._manager = SessionManager.get_instance()
        return self._manager

    @property
    def uses_memory_store(self) -> bool:
        """True when the manager was made and keeps sessions in this process only."""
        return self._manager is not None and isinstance(self._manager.storage, InMemoryStorageAdapter)

    def store_description(self) -> str | None:
        """Where this command looked for sessions (``Redis at <url>, key prefix <p>``), None before it looked."""
        if self._manager is None:
            return None
        if self.uses_memory_store:
            return "the in-memory store of this process"
        url = getattr(self._manager.storage, "url", None)
        return f"Redis at {masked_url(url)}, key prefix {self._manager.settings.key_prefix!r}"

    def require_shared_store(self, command: str) -> SessionManager:
        """The manager, refusing an in-memory store (workers in other processes could not see it).

        Raises:
            CliError: exit 2 with what to set.
        """
        manager = self.manager()
        if isinstance(manager.storage, InMemoryStorageAdapter):
            raise CliError(
                f"`{command}` needs the Redis your workers use, and TRACKER_REDIS_URL is not set",
                ExitCode.USAGE,
                "Hint: export TRACKER_REDIS_URL=redis://127.0.0.1:6379/0 (or try `tracker demo`, which needs nothing)",
            )
        return manager

    def app(self) -> Celery:
        """The Celery app: Celery's own (``celery -A``), else ``--app``, else :data:`DEFAULT_APP`.

        Raises:
            CliError: exit 2 when the app cannot be imported or configured.
        """
        if self.celery_app is None:
            self.celery_app = load_app(self.app_spec or DEFAULT_APP)
        return self.celery_app

    def named_app(self) -> Celery | None:
        """The app the user named (``celery -A``, ``--app``, ``TRACKER_CELERY_APP``), None when none was."""
        return self.app() if self.celery_app is not None or self.app_spec else None

    def default_app(self) -> Celery | None:
        """:data:`DEFAULT_APP` when it can be loaded here, else None."""
        try:
            return self.app()
        except CliError:
            return None

    def session_app(self, session_id: str) -> Celery:
        """The app to cancel or resume ``session_id`` with: the one named, else the one that
        dispatched it (by its recorded import path), else the default; always one whose broker
        dispatched the session.

        Raises:
            WrongCeleryAppError: none publishes to that broker.
        """
        from tracker.celery.origin import dispatching_app

        metadata = self.manager().sync.get_session(session_id).metadata
        app = dispatching_app(session_id, metadata, self.named_app(), fallback=self.default_app)
        self.celery_app = app  # what broker_uri() names if sending through it fails
        return app

    def app_if_available(self) -> Celery | None:
        """Like :meth:`app`, but None (with a warning) when the default app cannot be loaded."""
        if self.celery_app is not None or self.app_spec:
            return self.app()
        try:
            return self.app()
        except CliError as exc:
            click.echo(f"Warning: {exc.format_message()}; cancel and resume will use Celery's default app", err=True)
            return None

    def broker_uri(self) -> str:
        """The broker URL of the loaded app, password masked."""
        if self.celery_app is None:
            return "<unknown>"
        url = self.celery_app.conf.broker_url
        if isinstance(url, str):
            return masked_url(url)
        try:
            return str(self.celery_app.connection().as_uri())  # unset: Celery's default broker
        except Exception:  # a broken URL must not hide the error being reported
            return "<unknown>"


def load_app(spec: str) -> Celery:
    """Import ``module:attr`` (or ``module``, as ``celery -A`` does) and read its configuration.

    Raises:
        CliError: exit 2, naming the app and what went wrong.
    """
    from celery.app.utils import find_app

    hint = "run tracker from your project's directory, or name the app with --app module:attr"
    module_name, _, attribute = spec.partition(":")
    if attribute:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # any import-time failure of the user's module
            raise CliError(
                f"cannot load the Celery app {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})",
                ExitCode.USAGE,
                f"Hint: {hint}",
            ) from exc
        found: Any = module
        for name in attribute.split("."):
            found = getattr(found, name, None)
        if found is None:
            raise CliError(
                f"cannot load the Celery app {spec!r}: module {module_name!r} has no attribute {attribute!r}",
                ExitCode.USAGE,
                f"Hint: name the app object, as in --app {module_name}:app",
            )
    try:
        app = find_app(spec)
        if not isinstance(app, Celery):
            raise CliError(f"{spec} is a {type(app).__name__}, not a Celery app", ExitCode.USAGE, f"Hint: {hint}")
        app.conf.broker_url  # noqa: B018 - loads a lazy config_from_object now, so a missing module shows here
    except CliError:
        raise
    except Exception as exc:  # any import-time failure of the user's module
        raise CliError(
            f"cannot load the Celery app {spec!r} ({type(exc).__name__}: {exc})", ExitCode.USAGE, f"Hint: {hint}"
        ) from exc
    return app


class TrackerGroup(click.Group):
    """A click group that turns library errors into messages and exit codes (tracebacks with ``--debug``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Commands in the order they were added (a newcomer's order), not alphabetical."""
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; translate what it raises."""
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            # Not click's "Aborted!" and 1: 1 says the session did not complete.
            click.echo(err=True)  # ends the terminal's ^C line
            raise click.exceptions.Exit(ExitCode.INTERRUPTED) from None
        except Exception as exc:
            state = ctx.obj if isinstance(ctx.obj, CliState) else None
            if state is not None and state.debug:
                click.echo(traceback.format_exc(), err=True)
            raise translate(exc, state, ctx.invoked_subcommand) from exc


def setup_debug_logging(debug: bool) -> None:
    """With ``--debug``: the library's own log records go to stderr."""
    if debug:
        logger = logging.getLogger("tracker")
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
