"""The dashboard in headless Chromium: a real server (uvicorn in a thread) on a real store, a page
signed in with the token, and what the tests need to look at it (screenshots, axe-core, pixels).

axe-core (MPL-2.0) is vendored in ``tests/web/vendor/`` with its licence: it only runs in the tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.web.conftest import TOKEN, LiveServer, serve_in_thread
from tracker import NodeError, SessionManager, TrackerSettings
from tracker.web import WebSettings, create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
#: Screenshots the tests leave (the README shows copies of them, from ``docs/screenshots/``).
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
AXE = Path(__file__).resolve().parent / "vendor" / "axe.min.js"
WIDE = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str:
    """Debian's Chromium; CI installs it, so there a missing one is a failure, not a skip."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed (.ci/run installs the Debian package)")
    pytest.skip("chromium is not installed")


@dataclass
class Dashboard:
    """A signed-in dashboard page, the server behind it, and the page errors it raised."""

    page: Any
    server: LiveServer
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def go(self, path: str) -> None:
        """Open a dashboard address (``/dashboard/...``) as a typed URL would."""
        self.page.goto(f"{self.server.url}{path}")

    def shot(self, name: str) -> Path:
        """Save a screenshot of the page as it is now."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=False)
        return path

    def axe_serious(self) -> list[dict[str, Any]]:
        """axe-core's serious and critical violations on the page as it is (WCAG 2 A and AA rules)."""
        if not self.page.evaluate("typeof window.axe === 'object'"):
            self.page.add_script_tag(path=str(AXE))
        found = self.page.evaluate(
            """async () => (await axe.run(document, {runOnly: ["wcag2a", "wcag2aa", "wcag21aa", "best-practice"]}))
              .violations.filter((v) => v.impact === "serious" || v.impact === "critical")
              .map((v) => ({id: v.id, impact: v.impact, nodes: v.nodes.map((n) => n.target.join(" ")).slice(0, 5)}))"""
        )
        return list(found)


@contextlib.contextmanager
def dashboard(
    browser: Any,
    manager: SessionManager,
    *,
    viewport: dict[str, int] | None = None,
    path: str = "/dashboard",
    celery_app: Any = None,
    token: str | None = TOKEN,
    login: bool = True,
    refresh_s: float = 1.0,
    **web: Any,
) -> Iterator[Dashboard]:
    """The dashboard of an app on ``manager`` in a fresh browser context, signed in with the token."""
    app = create_app(manager, TrackerSettings(api_token=token), celery_app, web_settings=WebSettings(**web))
    with serve_in_thread(app) as server:
        # bypass_csp: axe-core is injected as an inline script, which the page's policy forbids.
        context = browser.new_context(viewport=viewport or WIDE, bypass_csp=True)
        try:
            page = context.new_page()
            board = Dashboard(page, server)
            page.on("pageerror", lambda exc: board.errors.append(str(exc)))
            page.on("request", lambda r: board.requests.append(r.url))
            page.on("console", lambda m: board.console.append(f"{m.type}: {m.text}"))
            sep = "&" if "?" in path else "?"
            page.goto(f"{server.url}{path}{sep}refresh={refresh_s}")
            if login and token is not None:
                page.fill("#login-token", token)
                page.click("#login button[type=submit]")
                page.wait_for_selector("#main:not([hidden])")
            try:
                yield board
            except BaseException:
                # What the page looked like and said when the test failed.
                board.shot(f"failed-{int(time.time())}")
                print("\n".join(["page console:", *board.console[-30:], "page errors:", *board.errors]))
                raise
        finally:
            context.close()


def run_nodes(
    manager: SessionManager,
    sid: str,
    node_ids: Sequence[str],
    *,
    fail: dict[str, str] | None = None,
    worker: str = "celery@browser-test:101",
    batch: int = 500,
) -> None:
    """Record each node starting then finishing, as the worker's signal handlers would, in batches:
    ``fail`` maps node id -> error type for those that fail."""
    fail = fail or {}
    events = []
    for i, node_id in enumerate(node_ids):
        events.append(manager.operations.node_event(sid, node_id, "running", attempt=1, worker=worker))
        if node_id in fail:
            error = NodeError(type=fail[node_id], message=f"{node_id}: {fail[node_id].lower()} on row {i}")
            events.append(manager.operations.node_event(sid, node_id, "failed", error=error, attempt=1, worker=worker))
        else:
            events.append(manager.operations.node_event(sid, node_id, "completed", {"n": i}, attempt=1, worker=worker))
    for start in range(0, len(events), batch):
        manager.sync._record_nodes(sid, events[start : start + batch])


def start_nodes(
    manager: SessionManager, sid: str, node_ids: Sequence[str], worker: str = "celery@browser-test:101"
) -> None:
    """Record the nodes as running on ``worker``."""
    events = [manager.operations.node_event(sid, n, "running", attempt=1, worker=worker) for n in node_ids]
    for start in range(0, len(events), 500):
        manager.sync._record_nodes(sid, events[start : start + 500])


def wait_until(condition: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition()`` until true, failing after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


#: The colour of the map pixel at the centre of a node's cell (grid) or box (canvas), as "r,g,b".
PIXEL_OF_NODE = """(nodeId) => {
  const canvas = document.getElementById("node-map");
  const board = window.trackerDashboard;
  const ratio = window.devicePixelRatio || 1;
  let x, y;
  if (board.mapMode === "canvas" && board.layout) {
    const node = board.layout.nodes.find((n) => n.id === nodeId);
    const box = window.trackerMap;
    x = box.ox + node.x * box.scale;  // on the box's border, drawn in the status's full colour
    y = box.oy + (node.y + node.height / 2) * box.scale;
  } else {
    const map = window.trackerMap;
    const i = board.order.indexOf(nodeId);
    x = (i % map.cols) * (map.cell + map.gap) + map.cell / 2;
    y = Math.floor(i / map.cols) * (map.cell + map.gap) + map.cell / 2;
  }
  const d = canvas.getContext("2d").getImageData(Math.floor(x * ratio), Math.floor(y * ratio), 1, 1).data;
  return `${d[0]},${d[1]},${d[2]}`;
}"""

#: Status -> the map's fill colour (the palette in dashboard.css), as "r,g,b".
MAP_COLOURS = {
    "completed": "0,158,115",
    "failed": "213,94,0",
    "skipped": "204,121,167",
    "lost": "230,159,0",
    "running": "0,114,178",
    "retrying": "86,180,233",
    "pending": "209,213,219",
}
