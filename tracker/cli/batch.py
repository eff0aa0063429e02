"""Send a ``.canvas`` file as one tracked session: one task per work node."""

from __future__ import annotations

from pathlib import Path

from celery import Celery, group

from tracker.canvas import Canvas, CanvasError, load_canvas
from tracker.celery import dispatch
from tracker.manager import SessionManager


def load_work(path: str | Path) -> Canvas:
    """Load ``path`` and check it has work to do.

    Raises:
        CanvasError: unreadable, not JSON Canvas, or no work nodes (only groups, or empty).
    """
    canvas = load_canvas(path)
    if not canvas.work_nodes:
        raise CanvasError(str(path), "it has no work nodes (text, file or link nodes) to run")
    return canvas


def dispatch_canvas_file(path: str | Path, *, app: Celery, manager: SessionManager, task: str) -> tuple[str, int]:
    """Send one ``task`` per work node of the canvas at ``path`` (node ids are the canvas ids).

    Each task receives its node as a JSON dict (``{"id", "type", "text", ...}``), by name, so the
    task only has to be registered on the workers, not here.

    Returns:
        The session id and the number of nodes sent.

    Raises:
        CanvasError: see :func:`load_work`.
    """
    canvas = load_work(path)
    nodes = canvas.work_nodes
    batch = group([app.signature(task, args=(node.model_dump(exclude_none=True),)) for node in nodes], app=app)
    session_id = dispatch(
        batch,
        canvas_path=str(path),
        node_ids=[node.id for node in nodes],
        metadata={"edges": len(canvas.edges), "task": task},
        manager=manager,
        app=app,
    )
    return session_id, len(nodes)
