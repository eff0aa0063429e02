"""The dashboard in headless Chromium: log in, dispatch a batch, watch it finish without reloading.

The batch is dispatched for real (``tracker.celery.dispatch`` on an in-memory broker); its node
results are then written by a background thread, as the worker's signal handlers would write
them, with small pauses so that the page has something to follow live. Redis is the store.
A screenshot is left in ``artifacts/dashboard.png``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, group

from tests.conftest import make_store
from tests.web.conftest import TOKEN, serve_in_thread
from tracker import NodeError, SessionManager, TrackerSettings
from tracker.celery import dispatch, install, uninstall
from tracker.manager import utc_now
from tracker.web import WebSettings, create_app

pytestmark = pytest.mark.browser

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
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

# Records every value the progress bars take, so the test can tell live updates from a final state.
WATCH_BARS = """
window.__progress = [];
new MutationObserver((records) => {
  for (const record of records) {
    const target = record.target;
    if (target.getAttribute && target.getAttribute("role") === "progressbar") {
      window.__progress.push(Number(target.getAttribute("aria-valuenow")));
    }
  }
}).observe(document.body, { subtree: true, attributes: true, attributeFilter: ["aria-valuenow"] });
window.__notReloaded = true;
"""


@pytest.fixture
def chromium() -> str:
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs the Debian package)")
        pytest.skip("chromium is not installed")
    return CHROMIUM if os.path.exists(CHROMIUM) else str(shutil.which("chromium"))


@pytest.fixture
def redis_manager(redis_url: str, key_prefix: str) -> Iterator[SessionManager]:
    store = make_store("redis", redis_url, key_prefix)
    yield SessionManager(storage=store, settings=TrackerSettings())
    store.close()


@pytest.fixture
def celery_app(redis_manager: SessionManager) -> Iterator[Celery]:
    app = Celery("dashboard-test", broker="memory://", set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    install(app, redis_manager, beat=False)  # dispatch refuses an app without the tracker

    @app.task(name="tests.web.dashboard.work", shared=False)  # type: ignore[untyped-decorator]
    def work(n: int) -> int:
        return n * n

    yield app
    uninstall(app)
    app.close()


def finish_nodes(manager: SessionManager, session_id: str, node_ids: list[str], pause_s: float) -> None:
    """What the worker's signal handlers would record: each node starts, then completes (one fails)."""
    for i, node_id in enumerate(node_ids):
        manager.sync._record_node(session_id, node_id, "running", attempt=1, worker="celery@browser-test")
        time.sleep(pause_s)
        if node_id == "n3":
            error = NodeError(type="ValueError", message="row 42: price is negative")
            manager.sync.add_node_result(session_id, node_id, status="failed", error=error)
        else:
            manager.sync.add_node_result(session_id, node_id, i * i)


def test_dashboard_follows_a_batch_live(chromium: str, redis_manager: SessionManager, celery_app: Celery) -> None:
    from playwright.sync_api import expect, sync_playwright

    app = create_app(redis_manager, TrackerSettings(api_token=TOKEN), celery_app, web_settings=WebSettings())
    node_ids = [f"n{i}" for i in range(6)]
    stream_requests: list[str] = []
    with serve_in_thread(app) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            page.on("request", lambda request: stream_requests.append(request.url))
            stream_answers: list[tuple[str, int]] = []
            page.on("response", lambda response: stream_answers.append((response.url, response.status)))
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            # Given the dashboard, logged in with the API token
            page.goto(f"{server.url}/dashboard?refresh=1")
            expect(page.locator("#login")).to_be_visible()
            page.fill("#login-token", TOKEN)
            page.click("#login button[type=submit]")
            expect(page.locator("#login")).to_be_hidden()
            page.evaluate(WATCH_BARS)

            # When a batch is dispatched ...
            work = celery_app.tasks["tests.web.dashboard.work"]
            sid = dispatch(
                group(work.s(i) for i in range(len(node_ids))),
                canvas_path="browser.canvas",
                node_ids=node_ids,
                manager=redis_manager,
                app=celery_app,
            )
            row = page.locator(f'tr[data-session-id="{sid}"]')
            expect(row).to_be_visible(timeout=10_000)
            expect(row.locator(".status")).to_have_text("pending")
            row.click()
            # ... and its nodes finish one by one while the page is open
            feeder = threading.Thread(target=finish_nodes, args=(redis_manager, sid, node_ids, 0.25), daemon=True)
            feeder.start()

            # Then the bar reaches 100 % and the status changes, without a reload
            bar = row.locator("[role=progressbar]")
            expect(bar).to_have_attribute("aria-valuenow", "100", timeout=20_000)
            expect(row.locator(".status")).to_have_text("partial_failure")
            expect(row.locator(".counts")).to_contain_text("5 / 1 / 0 / 0 of 6")
            feeder.join(timeout=10)
            assert page.evaluate("window.__notReloaded") is True
            seen = page.evaluate("window.__progress")
            assert any(0 < value < 100 for value in seen), f"no intermediate progress seen: {seen}"
            assert any(f"/sessions/{sid}/events" in url and code == 200 for url, code in stream_answers), stream_answers
            # 6 "running" and 6 result events at least reached the page through the stream
            assert page.evaluate("window.trackerDashboard.eventsApplied") >= 12
            assert not any(TOKEN in url for url in stream_requests), "the token must never travel in a URL"

            # And the node table shows each node, the failure with its error
            nodes = page.locator("#nodes tbody tr")
            expect(nodes).to_have_count(6, timeout=10_000)
            failed = page.locator('#nodes tbody tr[data-node-id="n3"]')
            expect(failed.locator(".status")).to_have_text("failed")
            expect(failed.locator(".error-cell")).to_have_text("ValueError: row 42: price is negative")
            expect(page.locator("#detail-summary")).to_contain_text("partial_failure")

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()


@dataclass
class Dashboard:
    """A signed-in dashboard page, the page errors it raised, and the session-list reads it made."""

    page: Any
    errors: list[str]
    list_reads: list[str]


@contextlib.contextmanager
def signed_in(chromium: str, manager: SessionManager) -> Iterator[Dashboard]:
    """The dashboard of an app on ``manager``, in headless Chromium, refreshing its list once a
    minute (so that what changes on it comes from the event streams), signed in with the token."""
    from playwright.sync_api import sync_playwright

    app = create_app(manager, TrackerSettings(api_token=TOKEN), None, web_settings=WebSettings())
    with serve_in_thread(app) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            dashboard = Dashboard(page, [], [])
            page.on("pageerror", lambda exc: dashboard.errors.append(str(exc)))
            page.on("request", lambda r: dashboard.list_reads.append(r.url) if "/sessions?" in r.url else None)
            page.goto(f"{server.url}/dashboard?refresh=60")
            page.fill("#login-token", TOKEN)
            page.click("#login button[type=submit]")
            yield dashboard
        finally:
            browser.close()


def test_dashboard_shows_skipped_nodes_live(chromium: str, redis_manager: SessionManager) -> None:
    from playwright.sync_api import expect

    # Given a chain of 4 nodes that has not started, on a page that refreshes its list only once a minute
    sid = redis_manager.sync.create_session("chain.canvas", 4)
    with signed_in(chromium, redis_manager) as dashboard:
        page, errors, list_reads = dashboard.page, dashboard.errors, dashboard.list_reads
        row = page.locator(f'tr[data-session-id="{sid}"]')
        expect(row).to_be_visible(timeout=10_000)
        row.click()
        expect(row.locator(".counts")).to_have_text("0 / 0 / 0 / 4 of 4")
        page.wait_for_function(f"window.trackerDashboard.streams.has('{sid}')", timeout=10_000)
        reads_before = len(list_reads)

        # When its first link fails and the two links after it are skipped
        redis_manager.sync._record_node(sid, "n0", "running", attempt=1, worker="celery@browser-test")
        error = NodeError(type="ValueError", message="first link broke")
        redis_manager.sync.add_node_result(sid, "n0", status="failed", error=error)
        for node_id in ("n1", "n2"):
            redis_manager.sync._record_node(sid, node_id, "skipped", reason="skipped: node n0 failed")

        # Then the events alone (no list refresh) count them: skipped, not pending, not running
        summary = page.locator("#detail-summary")
        expect(row.locator(".counts")).to_have_text("0 / 1 / 0 / 1 of 4", timeout=10_000)
        expect(summary.locator('dt:text-is("skipped") + dd')).to_have_text("2")
        expect(summary.locator('dt:text-is("pending") + dd')).to_have_text("1")
        expect(row.locator("[role=progressbar]")).to_have_attribute("aria-valuenow", "75")
        assert len(list_reads) == reads_before, list_reads

        # And the node table shows each skipped node in the skipped colour, with the node that caused it
        skipped = page.locator('#nodes tbody tr[data-node-id="n1"]')
        expect(skipped.locator(".status")).to_have_text("skipped", timeout=10_000)
        expect(skipped.locator(".status")).to_have_class("status status-skipped")
        expect(skipped.locator(".error-cell")).to_have_text("skipped: node n0 failed")
        colours = page.evaluate(
            """() => Object.fromEntries([...document.querySelectorAll("#nodes tbody tr .status")]
              .map((badge) => [badge.textContent, getComputedStyle(badge).color]))"""
        )
        assert colours["skipped"] == "rgb(109, 76, 159)", colours  # --skip
        assert colours["skipped"] != colours["failed"]

        # And the node filter offers skipped nodes alone
        page.select_option("#node-filter", "skipped")
        expect(page.locator("#nodes tbody tr")).to_have_count(2)
        expect(page.locator("#nodes tbody tr .status")).to_have_text(["skipped", "skipped"])

        # When the last node completes, the session ends with exact counters
        redis_manager.sync.add_node_result(sid, "n3", 3)
        expect(row.locator(".status")).to_have_text("partial_failure", timeout=10_000)
        expect(summary.locator('dt:text-is("skipped") + dd')).to_have_text("2")
        expect(summary.locator('dt:text-is("pending") + dd')).to_have_text("0")
        expect(row.locator(".counts")).to_have_text("1 / 1 / 0 / 0 of 4")
        assert errors == []


def test_dashboard_counts_retrying_nodes_apart_from_running_live(chromium: str, redis_manager: SessionManager) -> None:
    from playwright.sync_api import expect

    # Given a session of 3 nodes, on a page that refreshes its list only once a minute
    sid = redis_manager.sync.create_session("retry.canvas", 3)
    with signed_in(chromium, redis_manager) as dashboard:
        page, errors, list_reads = dashboard.page, dashboard.errors, dashboard.list_reads
        row = page.locator(f'tr[data-session-id="{sid}"]')
        expect(row).to_be_visible(timeout=10_000)
        row.click()
        page.wait_for_function(f"window.trackerDashboard.streams.has('{sid}')", timeout=10_000)
        reads_before = len(list_reads)
        summary = page.locator("#detail-summary")

        def counts() -> dict[str, str]:
            return {
                label: summary.locator(f'dt:text-is("{label}") + dd').inner_text()
                for label in ("running", "retrying", "pending")
            }

        # When n0 fails an attempt and waits for Celery's retry while n1 runs
        redis_manager.sync._record_node(sid, "n0", "running", attempt=1, worker="celery@browser-test")
        error = NodeError(type="ConnectionError", message="upstream busy")
        redis_manager.sync._record_node(sid, "n0", "retrying", attempt=1, error=error)
        redis_manager.sync._record_node(sid, "n1", "running", attempt=1, worker="celery@browser-test")

        # Then the events alone (no list refresh) count n0 as retrying, not running
        expect(summary.locator('dt:text-is("running") + dd')).to_have_text("1", timeout=10_000)
        expect(summary.locator('dt:text-is("retrying") + dd')).to_have_text("1")
        expect(summary.locator('dt:text-is("pending") + dd')).to_have_text("1")
        retrying_badge = page.locator('#nodes tbody tr[data-node-id="n0"] .status')
        expect(retrying_badge).to_have_text("retrying", timeout=10_000)
        colours = page.evaluate(
            """() => ({
              count: getComputedStyle(document.querySelector("#detail-summary dd.count-retrying")).color,
              badge: getComputedStyle(document.querySelector('#nodes tr[data-node-id="n0"] .status')).color,
              running: getComputedStyle(document.querySelector('#nodes tr[data-node-id="n1"] .status')).color,
            })"""
        )
        assert colours["count"] == colours["badge"] == "rgb(0, 131, 143)", colours  # --retry
        assert colours["badge"] != colours["running"]

        # When its next attempt starts, it leaves retrying for running; when it completes, running
        redis_manager.sync._record_node(sid, "n0", "running", attempt=2, worker="celery@browser-test")
        expect(summary.locator('dt:text-is("running") + dd')).to_have_text("2", timeout=10_000)
        assert counts() == {"running": "2", "retrying": "0", "pending": "1"}
        redis_manager.sync.add_node_result(sid, "n0", 1, attempt=2)
        expect(summary.locator('dt:text-is("running") + dd')).to_have_text("1", timeout=10_000)
        assert counts() == {"running": "1", "retrying": "0", "pending": "1"}
        assert len(list_reads) == reads_before, list_reads
        assert errors == []


def test_dashboard_shows_the_pickup_hint_while_no_worker_reports(chromium: str, redis_manager: SessionManager) -> None:
    from playwright.sync_api import expect

    # Given a session created 45 s ago that no worker has reported on, and one created now
    then = datetime.now(UTC) - timedelta(seconds=45)
    redis_manager.clock = lambda: then
    stuck = redis_manager.sync.create_session("stuck.canvas", 2)
    redis_manager.clock = utc_now
    young = redis_manager.sync.create_session("young.canvas", 2)
    with signed_in(chromium, redis_manager) as dashboard:
        page, errors = dashboard.page, dashboard.errors
        hint = page.locator("#detail-hint")

        # When the young one is opened: no hint
        page.locator(f'tr[data-session-id="{young}"]').click()
        expect(page.locator("#detail-id")).to_have_text(young, timeout=10_000)
        expect(hint).to_be_hidden()

        # When the stuck one is opened: the hint, above its counts, also once its stream's snapshot came
        page.locator(f'tr[data-session-id="{stuck}"]').click()
        expect(page.locator("#detail-id")).to_have_text(stuck)
        expect(hint).to_be_visible()
        expect(hint).to_contain_text("no worker has picked up any node for 4")
        expect(hint).to_contain_text(
            "s: is a worker running, with the tracker installed in its app (tracker.celery.install(app))?"
        )
        # (the snapshot is remembered with its event id: it has replaced the listing's copy)
        page.wait_for_function(f"window.trackerDashboard.lastIds.has('{stuck}')", timeout=10_000)
        expect(hint).to_be_visible()
        above = page.evaluate(
            "() => document.querySelector('#detail-hint').compareDocumentPosition("
            "document.querySelector('#detail-summary')) & Node.DOCUMENT_POSITION_FOLLOWING"
        )
        assert above

        # When a worker reports its first node, the hint goes, live
        redis_manager.sync._record_node(stuck, "n0", "running", attempt=1, worker="celery@browser-test")
        expect(page.locator(f'tr[data-session-id="{stuck}"] .status')).to_have_text("running", timeout=10_000)
        expect(hint).to_be_hidden()
        assert errors == []
