"""The JSON API and the event stream, as an ``APIRouter`` to mount in any FastAPI app.

Every route is under ``/api/v1/parallel``. Tracker errors become HTTP answers inside the router
itself (:class:`TrackerRoute`), so they do so in the user's app too, without app-level handlers:

=================================  ====
``SessionNotFoundError``           404
``NodeNotFoundError``              404
``TrackerValidationError``         422
``InvalidStateTransitionError``    409
``SessionExistsError``             409
``WrongCeleryAppError``            409
``StorageUnavailableError``        503
=================================  ====
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path as FilePath
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response, status
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, StringConstraints
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from tracker import validation
from tracker.canvas import CanvasError, CanvasNode, load_canvas
from tracker.config import TrackerSettings
from tracker.errors import (
    InvalidStateTransitionError,
    NodeNotFoundError,
    SessionExistsError,
    SessionNotFoundError,
    StorageUnavailableError,
    TrackerError,
    TrackerValidationError,
    WrongCeleryAppError,
)
from tracker.hints import pickup_hint
from tracker.manager import SessionManager
from tracker.models import (
    ChildSession,
    FailureGroup,
    NodePage,
    NodeResult,
    ParallelTaskStatus,
    SessionInfo,
    WorkerStatus,
)
from tracker.states import NodeStatus, SessionStatus
from tracker.web.auth import read_access, write_access
from tracker.web.events import StreamLimiter, plan_start, session_stream
from tracker.web.settings import WebSettings

logger = logging.getLogger(__name__)

#: Where the routes live.
API_PREFIX = "/api/v1/parallel"

#: A node id (what :func:`tracker.validation.node_id` accepts).
NODE_ID_PATTERN = r"^[A-Za-z0-9._:@/+=-]{1,200}$"
#: A stream entry id, ``<milliseconds>-<sequence>`` (what :func:`tracker.validation.event_id` accepts).
EVENT_ID_PATTERN = r"^[0-9]{1,20}(-[0-9]{1,20})?$"

#: Largest canvas file ``GET …/canvas`` reads, in bytes.
MAX_CANVAS_BYTES = 16 * 1024 * 1024
#: Longest label of a node in a canvas layout, in characters.
MAX_CANVAS_LABEL_CHARS = 80

_ERROR_STATUS: tuple[tuple[type[TrackerError], int], ...] = (
    (SessionNotFoundError, status.HTTP_404_NOT_FOUND),
    (NodeNotFoundError, status.HTTP_404_NOT_FOUND),
    (TrackerValidationError, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (InvalidStateTransitionError, status.HTTP_409_CONFLICT),
    (SessionExistsError, status.HTTP_409_CONFLICT),
    (WrongCeleryAppError, status.HTTP_409_CONFLICT),
    (StorageUnavailableError, status.HTTP_503_SERVICE_UNAVAILABLE),
)


def http_error(exc: TrackerError) -> HTTPException:
    """The HTTP answer for a tracker error (500 only for an error this table does not know)."""
    for error_type, code in _ERROR_STATUS:
        if isinstance(exc, error_type):
            headers = {"Retry-After": "5"} if code == status.HTTP_503_SERVICE_UNAVAILABLE else None
            detail = f"{exc}; {exc.hint}" if exc.hint else str(exc)
            return HTTPException(code, detail=detail, headers=headers)
    return HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, detail="internal error")


class TrackerRoute(APIRoute):
    """An ``APIRoute`` that answers tracker errors with their HTTP status and a JSON ``detail``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Wrap FastAPI's handler so that a :class:`~tracker.errors.TrackerError` becomes an HTTPException."""
        handler = super().get_route_handler()

        async def translated(request: Request) -> Response:
            try:
                return await handler(request)
            except TrackerError as exc:
                if isinstance(exc, StorageUnavailableError):
                    logger.warning("%s %s: %s", request.method, request.url.path, exc)
                raise http_error(exc) from exc

        return translated


class SessionList(BaseModel):
    """One page of sessions, newest first."""

    sessions: list[ParallelTaskStatus]
    #: Pass back as ``cursor`` for the next page; null on the last page.
    next_cursor: str | None = None


class ResumeResult(BaseModel):
    """What a resume did."""

    #: Nodes whose tasks were sent again.
    resent_nodes: int = Field(ge=0)
    #: The session after the resume.
    session: ParallelTaskStatus


class CanvasNodeView(BaseModel):
    """A node of a canvas layout: where it is drawn, and a short label."""

    #: The canvas node id: a work node's is its node id in the session.
    id: str
    type: Literal["text", "file", "link", "group"]
    x: int
    y: int
    width: int
    height: int
    #: The first line of a text node, a file node's file name, a link's URL, a group's label ('' for none).
    label: str


class CanvasEdgeView(BaseModel):
    """An edge of a canvas layout."""

    from_node: str
    to_node: str


class CanvasLayout(BaseModel):
    """A session's JSON Canvas file, reduced to what draws it: boxes, labels and arrows."""

    nodes: list[CanvasNodeView]
    edges: list[CanvasEdgeView]


class CanvasUnavailable(Exception):
    """A session's canvas file is not served; the message says why, in one sentence (a 404's detail)."""


class ErrorDetail(BaseModel):
    """The body of every error answer."""

    #: A message; for a malformed request, FastAPI's list of validation errors.
    detail: str | list[dict[str, Any]]


SessionIdPath = Annotated[UUID, Path(description="The session id (a UUID).")]
TaskIdPath = Annotated[UUID, Path(description="The session id (a UUID), called task id by the seed's API.")]
Cursor = Annotated[
    str | None,
    Query(pattern=r"^[0-9]{1,18}$", description="The `next_cursor` of the previous page; omit for the first page."),
]
#: A page of nodes by status continues after a node id; without a status, at a scan position.
NodeCursor = Annotated[
    str | None,
    Query(
        pattern=NODE_ID_PATTERN,
        description="The `next_cursor` of the previous page (same status filter); omit for the first page.",
    ),
]


def _errors(
    *codes: int, not_found: str = "No such session (never created, expired or removed)."
) -> dict[int | str, dict[str, Any]]:
    reasons = {
        401: "Missing or wrong bearer token (only when the server has a token).",
        403: "Mutations are disabled: the server has no API token.",
        404: not_found,
        409: "The session's status does not allow this.",
        422: "Malformed id, cursor, filter or Last-Event-ID.",
        503: "The store (or, for cancel and resume, the broker) is unavailable; or too many event streams.",
    }
    return {code: {"model": ErrorDetail, "description": reasons[code]} for code in codes}


@dataclass
class WebContext:
    """What the routes need, resolved once when the router is built."""

    manager: SessionManager
    settings: TrackerSettings
    web: WebSettings
    celery_app: Any = None


def _sid(value: UUID) -> str:
    # FastAPI accepts any UUID spelling (upper case, no hyphens); the store wants the canonical one.
    return str(value)


def create_router(
    manager: SessionManager | None = None,
    settings: TrackerSettings | None = None,
    celery_app: Any = None,
    *,
    web_settings: WebSettings | None = None,
) -> APIRouter:
    """The tracker's JSON API and event streams, ready to ``include_router`` in your FastAPI app.

    Args:
        manager: The session manager; default :meth:`SessionManager.get_instance` (Redis when
            ``TRACKER_REDIS_URL`` is set).
        settings: Tracker settings (the API token); default the manager's.
        celery_app: The Celery app cancel and resume publish with; default the app that dispatched
            the session (by its recorded import path), else Celery's current app. Either must
            publish to the session's broker, or the request is answered 409.
        web_settings: Stream limits; default read from the environment. Its CORS and dashboard
            settings are :func:`~tracker.web.create_app`'s: in your own app, add your CORS middleware.

    Returns:
        A router with every route under ``/api/v1/parallel``.
    """
    manager = manager if manager is not None else SessionManager.get_instance()
    ctx = WebContext(manager, settings or manager.settings, web_settings or WebSettings(), celery_app)
    token = ctx.settings.api_token
    limiter = StreamLimiter(ctx.web.sse_max_connections)
    router = APIRouter(
        prefix=API_PREFIX,
        tags=["tracker"],
        route_class=TrackerRoute,
        dependencies=[Depends(read_access(token))],
        responses=_errors(401),
    )
    mutation = [Depends(write_access(token))]

    def view(info: SessionInfo, now: datetime | None = None) -> ParallelTaskStatus:
        # The hint is a pure rule on what was read (no store call), so listings show it too.
        now = now if now is not None else ctx.manager.clock()
        return ParallelTaskStatus.from_session(
            info, pickup_hint(info.status, info.created_at, now, ctx.settings.pickup_hint_after_s)
        )

    @router.get(
        "/status/{task_id}",
        response_model=ParallelTaskStatus,
        responses=_errors(404, 422, 503),
        summary="Status of a session",
    )
    async def get_status(task_id: TaskIdPath) -> ParallelTaskStatus:
        """The session's status and counters: one store read, whatever the node count."""
        return view(await ctx.manager.get_session(_sid(task_id)))

    @router.get("/sessions", response_model=SessionList, responses=_errors(422, 503), summary="List sessions")
    async def list_sessions(
        status_filter: Annotated[SessionStatus | None, Query(alias="status", description="Only this status.")] = None,
        tag: Annotated[
            str | None, Query(pattern=r"^[A-Za-z0-9_.:@/+=-]{1,64}$", description="Only sessions with this tag.")
        ] = None,
        path: Annotated[
            str | None,
            Query(
                min_length=1,
                max_length=1024,
                description="Only sessions whose canvas path starts with this (then listed by path, newest first).",
            ),
        ] = None,
        cursor: Cursor = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> SessionList:
        """A page of sessions, newest first, optionally only those in one status, with one tag, or
        whose canvas path starts with a prefix (then by path, newest first within one). A tag or a
        path reads its own index (the page costs the page); the status, and a path given with a
        tag, sift that page, which may then be short."""
        page = await ctx.manager.list_sessions(status_filter, cursor, limit, tag=tag, path=path)
        now = ctx.manager.clock()
        return SessionList(sessions=[view(info, now) for info in page.sessions], next_cursor=page.next_cursor)

    @router.get(
        "/sessions/{session_id}/nodes",
        response_model=NodePage,
        responses=_errors(404, 422, 503),
        summary="Node results of a session",
    )
    async def get_nodes(
        session_id: SessionIdPath,
        status_filter: Annotated[NodeStatus | None, Query(alias="status", description="Only this node status.")] = None,
        cursor: NodeCursor = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> NodePage:
        """A page of the session's node results (status, result, error, attempts, worker, timings).

        With `status`, a page holds `limit` nodes whenever that many are in that status (node id
        order), read from the store's status index: its cost is the page's, not the session's.
        """
        return await ctx.manager.get_nodes(_sid(session_id), status_filter, cursor, limit)

    @router.get(
        "/sessions/{session_id}/nodes/{node_id:path}",
        response_model=NodeResult,
        responses=_errors(404, 422, 503, not_found="No such session, or the session has no record of this node."),
        summary="One node of a session",
    )
    async def get_node(
        session_id: SessionIdPath,
        node_id: Annotated[str, Path(pattern=NODE_ID_PATTERN, description="The node id (it may hold `/`).")],
    ) -> NodeResult:
        """One node's status, result or error, attempts, worker and times: one store read. 404 when
        the session has no record of it (not created with it, and no event of it recorded yet)."""
        return await ctx.manager.get_node(_sid(session_id), node_id)

    @router.get(
        "/sessions/{session_id}/children",
        response_model=list[ChildSession],
        responses=_errors(404, 422, 503),
        summary="Child sessions of a session",
    )
    async def get_children(session_id: SessionIdPath) -> list[ChildSession]:
        """The child sessions its nodes' tasks opened (a batch dispatched from inside a tracked
        task), by node: each one's id, its node, and its status (`open` until it ended)."""
        sid = _sid(session_id)
        await ctx.manager.get_session(sid)  # 404 for an unknown session
        return await ctx.manager.get_children(sid)

    @router.get(
        "/sessions/{session_id}/failures",
        response_model=list[FailureGroup],
        responses=_errors(404, 422, 503),
        summary="Failures of a session by cause",
    )
    async def get_failures(session_id: SessionIdPath) -> list[FailureGroup]:
        """The session's failed and lost nodes grouped by error type, most nodes first: how many,
        the first message, first and last seen, a few node ids. Re-run one group with
        `POST …/resume?error_type=<type>`."""
        return await ctx.manager.get_failures(_sid(session_id))

    @router.get(
        "/sessions/{session_id}/canvas",
        response_model=CanvasLayout,
        responses=_errors(
            404, 422, 503, not_found="No such session, or its canvas file is not served (the detail says why)."
        ),
        summary="Canvas layout of a session",
    )
    async def get_canvas(session_id: SessionIdPath) -> CanvasLayout:
        """The layout of the JSON Canvas file the session was dispatched from (`tracker run
        FILE.canvas`): each node's box and a short label, and the edges; a work node's id is its
        node id in the session. Served only from a `.canvas` file of at most 16 MiB that resolves
        inside `TRACKER_CANVAS_DIR` (default: the server's working directory); otherwise 404, the
        detail saying why."""
        info = await ctx.manager.get_session(_sid(session_id))
        try:
            # Resolving and reading a file blocks: a thread, so the event loop keeps serving.
            return await asyncio.to_thread(canvas_layout, info.canvas_path, ctx.web.canvas_dir)
        except CanvasUnavailable as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None

    @router.get(
        "/workers",
        response_model=list[WorkerStatus],
        responses=_errors(422, 503),
        summary="Worker processes by heartbeat",
    )
    async def list_workers(
        limit: Annotated[int, Query(ge=1, le=1000, description="List at most this many workers.")] = 200,
    ) -> list[WorkerStatus]:
        """The worker processes the tracker has heard from, newest heartbeat first: when each was
        last seen (`seen_s_ago` by the server's clock), whether that is within
        `TRACKER_WORKER_STALE_AFTER_S` (`alive`: the reaper's rule), how many nodes it runs now and
        up to 20 of them, sorted. A dead worker stays listed, not alive, until a reaper took its nodes."""
        workers = await ctx.manager.list_workers(limit)
        now = ctx.manager.clock()
        return [worker.seen_at(now, ctx.settings.worker_stale_after_s) for worker in workers]

    @router.get(
        "/sessions/{session_id}/events",
        response_class=EventSourceResponse,
        responses={
            200: {
                "description": "Server-Sent Events: `snapshot`, then one event per stream entry, then `end`.",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            **_errors(404, 422, 503),
        },
        summary="Live events of a session (SSE)",
    )
    async def stream_events(
        session_id: SessionIdPath,
        last_event_id: Annotated[
            str,
            Header(alias="Last-Event-ID", pattern=EVENT_ID_PATTERN, description="Resume after this event id."),
        ] = "",
        last_event_id_query: Annotated[
            str,
            Query(
                alias="last_event_id",
                pattern=EVENT_ID_PATTERN,
                description="Resume after this event id, for clients that cannot set `Last-Event-ID`.",
            ),
        ] = "",
    ) -> EventSourceResponse:
        """The session's event stream; reconnect with ``Last-Event-ID`` to get exactly what was missed.

        Without ``Last-Event-ID`` a ``snapshot`` comes first. Streams keep about the last 1000
        events: a client whose id is older than that gets a fresh ``snapshot`` instead.
        """
        sid = _sid(session_id)
        # An empty value means none: the header wins over the query parameter.
        after = last_event_id or last_event_id_query or None
        if after is not None:
            validation.event_id(after)
        start = await plan_start(ctx.manager, sid, after, hint_after_s=ctx.settings.pickup_hint_after_s)
        slot = limiter.try_acquire()
        if slot is None:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail=f"too many event streams open (the limit is {limiter.max_streams}); retry later",
                headers={"Retry-After": "5"},
            )
        content = session_stream(
            ctx.manager,
            sid,
            start,
            block_ms=ctx.web.sse_block_ms,
            batch=ctx.web.sse_batch,
            retry_ms=ctx.web.sse_retry_ms,
            slot=slot,
        )
        # The slot is released when the generator ends; the background task covers a response
        # torn down before the generator ever started.
        return EventSourceResponse(content, ping=ctx.web.sse_ping_s, background=BackgroundTask(slot.release))

    @router.post(
        "/sessions/{session_id}/cancel",
        response_model=ParallelTaskStatus,
        dependencies=mutation,
        responses=_errors(403, 404, 409, 422, 503),
        summary="Cancel a session",
    )
    async def cancel(
        session_id: SessionIdPath,
        terminate: Annotated[bool, Query(description="Also kill nodes that are running now.")] = False,
    ) -> ParallelTaskStatus:
        """Cancel the session: unfinished nodes become ``cancelled``, queued tasks are revoked."""
        from tracker.celery import cancel_session

        info = await _broker_call(
            cancel_session, _sid(session_id), app=ctx.celery_app, manager=ctx.manager, terminate=terminate
        )
        return view(info)

    @router.post(
        "/sessions/{session_id}/resume",
        response_model=ResumeResult,
        dependencies=mutation,
        responses=_errors(403, 404, 409, 422, 503),
        summary="Resume a session",
    )
    async def resume(
        session_id: SessionIdPath,
        retry_failed: Annotated[bool, Query(description="Also re-send nodes that failed.")] = True,
        node: Annotated[
            list[Annotated[str, StringConstraints(pattern=NODE_ID_PATTERN)]] | None,
            Query(description="Re-send only these nodes (repeat the parameter), and what did not complete after them."),
        ] = None,
        error_type: Annotated[
            str | None,
            Query(
                min_length=1,
                max_length=255,
                description="Re-send only the nodes failed with this cause (see `/failures`), and what follows them.",
            ),
        ] = None,
    ) -> ResumeResult:
        """Take an ended (not completed) session back to ``running`` and re-send what did not complete,
        with its structure (a chain link with its parent's result, a chord body with every header
        result); with `node` or `error_type` (or both), only those nodes and what did not complete
        after them. 409 when the session completed, for a node the session does not have or that
        completed, a cause no node failed with, or when a result the re-sent part needs was not
        stored (nothing changes then)."""
        from tracker.celery import resume_session

        sid = _sid(session_id)
        resent = await _broker_call(
            resume_session,
            sid,
            app=ctx.celery_app,
            manager=ctx.manager,
            retry_failed=retry_failed,
            nodes=node,
            error_type=error_type,
        )
        info = await ctx.manager.get_session(sid)
        return ResumeResult(resent_nodes=resent, session=view(info))

    return router


def canvas_layout(canvas_path: str, canvas_dir: FilePath | None) -> CanvasLayout:
    """The layout of the canvas file at ``canvas_path``, resolved against ``canvas_dir`` (None: the
    working directory); blocking, so run it in a thread.

    A session's canvas path is text its creator chose, so it is served only when it names a
    ``.canvas`` file whose real path (``..`` and symlinks resolved) lies inside ``canvas_dir``,
    of at most :data:`MAX_CANVAS_BYTES`, that :func:`tracker.canvas.load_canvas` accepts.

    Raises:
        CanvasUnavailable: it is not served; the message says why.
    """
    if not canvas_path.endswith(".canvas"):
        raise CanvasUnavailable("the session's canvas path does not name a .canvas file")
    try:
        base = os.path.realpath(canvas_dir if canvas_dir is not None else os.getcwd())
        # An absolute canvas path replaces the base in the join; either way the real path decides.
        real = FilePath(os.path.realpath(os.path.join(base, canvas_path)))
    except (OSError, ValueError):
        raise CanvasUnavailable("the session's canvas path cannot be resolved") from None
    if not real.is_relative_to(base):
        raise CanvasUnavailable("the session's canvas file is not under TRACKER_CANVAS_DIR")
    if real.suffix != ".canvas":
        raise CanvasUnavailable("the session's canvas path leads to a file that is not a .canvas file")
    try:
        found = real.stat()
    except OSError:
        raise CanvasUnavailable("the session's canvas file does not exist (any more)") from None
    if not stat.S_ISREG(found.st_mode):
        raise CanvasUnavailable("the session's canvas path is not a regular file")
    if found.st_size > MAX_CANVAS_BYTES:
        raise CanvasUnavailable(f"the session's canvas file is larger than {MAX_CANVAS_BYTES // 2**20} MiB")
    try:
        canvas = load_canvas(real)
    except CanvasError:
        raise CanvasUnavailable("the session's canvas file is not valid JSON Canvas 1.0") from None
    box = {"id", "type", "x", "y", "width", "height"}
    return CanvasLayout(
        nodes=[CanvasNodeView(**node.model_dump(include=box), label=_label(node)) for node in canvas.nodes],
        edges=[CanvasEdgeView(from_node=edge.from_node, to_node=edge.to_node) for edge in canvas.edges],
    )


def _label(node: CanvasNode) -> str:
    """A canvas node's short label (see :class:`CanvasNodeView`), cut to :data:`MAX_CANVAS_LABEL_CHARS`."""
    if node.type == "text":
        text = next((line.strip() for line in (node.text or "").splitlines() if line.strip()), "")
    elif node.type == "file":
        text = PurePosixPath(node.file or "").name
    elif node.type == "link":
        text = node.url or ""
    else:
        text = node.label or ""
    return text if len(text) <= MAX_CANVAS_LABEL_CHARS else text[: MAX_CANVAS_LABEL_CHARS - 1] + "…"


async def _broker_call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking Celery call in a worker thread (it publishes to the broker).

    Raises:
        HTTPException: 503 when the broker cannot be reached (tracker errors pass through).
    """
    from kombu.exceptions import OperationalError

    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except (OperationalError, ConnectionError) as exc:
        logger.warning("broker call %s failed: %s", function.__name__, exc)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"the broker is unavailable ({exc})",
            headers={"Retry-After": "5"},
        ) from exc
