"""The example node task: real work on the content of one JSON Canvas node."""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from typing import Any

from celery import current_task, group, shared_task

from tracker.celery import dispatch, report_progress

#: ``#sleep=0.5`` in a node's text: take that many seconds (to show progress in demos).
_SLEEP = re.compile(r"#sleep=(\d+(?:\.\d+)?)")
#: ``#fail`` (optionally ``#fail=reason``) in a node's text: fail on purpose.
_FAIL = re.compile(r"#fail(?:=(\S+))?")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
#: Steps of a ``#sleep`` node's work, each reported with ``report_progress``.
STEPS = 4
#: ``#parts=3`` in a node's text: its work goes on in a child batch of that many parts (a child
#: session), which the node waits for.
_PARTS = re.compile(r"#parts=(\d+)")


class NodeContentError(ValueError):
    """The node's content asked to fail (``#fail``)."""


def analyse(node: dict[str, Any]) -> dict[str, Any]:
    """Summarise one canvas node: words, lines, most common words and a content digest."""
    content = node.get("text") or node.get("file") or node.get("url") or ""
    failing = _FAIL.search(content)
    if failing:
        raise NodeContentError(f"node {node.get('id')}: {failing.group(1) or 'failed on purpose'}")
    sleep = _SLEEP.search(content)
    if sleep:
        # The "work" in steps, each reported: the session's progress moves while the node runs.
        for step in range(1, STEPS + 1):
            time.sleep(min(float(sleep.group(1)), 30.0) / STEPS)
            report_progress(step, STEPS)
    words = [w.lower() for w in _WORD.findall(_SLEEP.sub("", content))]
    return {
        "node_id": node.get("id"),
        "type": node.get("type"),
        "words": len(words),
        "lines": content.count("\n") + 1 if content else 0,
        "top_words": [w for w, _ in Counter(words).most_common(3)],
        "sha256": hashlib.sha256(content.encode()).hexdigest()[:16],
    }


@shared_task(name="workers.process_node")
def process_node(node: dict[str, Any]) -> dict[str, Any]:
    """Process one canvas node (a JSON dict); returns its summary. A ``#parts=n`` node sends its
    parts as a child batch: dispatched from inside a tracked task, it is that node's child session."""
    summary = analyse(node)
    parts = _PARTS.search(node.get("text") or "")
    if parts:
        app = current_task.app
        pieces = [
            {"id": f"{node.get('id')}.part{i}", "type": "text", "text": f"Part {i} of {node.get('id')} #sleep=0.3"}
            for i in range(1, int(parts.group(1)) + 1)
        ]
        batch = group([app.signature("workers.process_node", args=(piece,)) for piece in pieces], app=app)
        dispatch(batch, canvas_path=f"{node.get('id')}.parts", node_ids=[p["id"] for p in pieces], app=app)
    return summary


@shared_task(name="workers.batch_done")
def batch_done(status: dict[str, Any]) -> str:
    """An example completion callback: receives the final session status dict."""
    return f"session {status['session_id']} ended {status['status']}"
