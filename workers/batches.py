"""Dispatch a whole ``.canvas`` file as one tracked session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery, Signature, group

from tracker.canvas import load_canvas
from tracker.celery import dispatch
from tracker.manager import SessionManager
from workers.tasks import process_node


def dispatch_canvas(
    path: str | Path,
    *,
    app: Celery | None = None,
    manager: SessionManager | None = None,
    on_complete: Signature | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Load ``path`` and send one ``process_node`` task per work node (node ids = canvas ids).

    Raises:
        CanvasError: the file is missing or not JSON Canvas.
    """
    canvas = load_canvas(path)
    nodes = canvas.work_nodes
    batch = group([process_node.s(n.model_dump(exclude_none=True)) for n in nodes], app=app)
    meta = {"edges": len(canvas.edges), **(metadata or {})}
    return dispatch(
        batch,
        canvas_path=str(path),
        node_ids=[n.id for n in nodes],
        metadata=meta,
        on_complete=on_complete,
        manager=manager,
        app=app,
    )
