"""The dashboard in headless Chromium against a real server and Redis: one test per thing it must
show (issue 27), each leaving screenshots in ``artifacts/screenshots/``.

Node results are written as the worker's signal handlers would write them (``record_nodes``);
cancel and resume go through ``tracker.celery`` on an in-memory broker.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, group

from tests.conftest import make_store
from tests.servers import redis_process
from tests.web.browser import (
    CHROMIUM_ARGS,
    MAP_COLOURS,
    PHONE,
    PIXEL_OF_NODE,
    WIDE,
    chromium_path,
    dashboard,
    run_nodes,
    start_nodes,
    wait_until,
)
from tests.web.conftest import TOKEN
from tracker import NodeError, NodeSpec, SessionManager, TrackerSettings
from tracker.celery import dispatch, install, uninstall
from tracker.manager import utc_now
from tracker.storage.base import ChildLink

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module; each test opens its own context."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def redis_manager(redis_url: str, key_prefix: str) -> Iterator[SessionManager]:
    store = make_store("redis", redis_url, key_prefix)
    yield SessionManager(storage=store, settings=TrackerSettings())
    store.close()


@pytest.fixture
def celery_app(redis_manager: SessionManager) -> Iterator[Celery]:
    app = Celery("dashboard-test", broker="memory://", set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_backend=None)
    install(app, redis_manager, beat=False)  # dispatch refuses an app without the tracker

    @app.task(name="tests.web.dashboard.work", shared=False)  # type: ignore[untyped-decorator]
    def work(n: int) -> int:
        return n * n

    yield app
    uninstall(app)
    app.close()


def legend(page: Any) -> dict[str, int]:
    """The session view's counts, by status, as its legend shows them."""
    found = page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll("#legend li")]
          .map((li) => [li.dataset.status, Number(li.querySelector(".count").textContent)]))"""
    )
    return {k: int(v) for k, v in found.items()}


def segment_widths(page: Any) -> dict[str, float]:
    """Each status's share of the stacked bar, in % of its width."""
    found = page.evaluate(
        """() => { const bar = document.getElementById("stack"); const w = bar.getBoundingClientRect().width;
          return Object.fromEntries([...bar.children].map((s) => [s.className.replace("seg-", ""),
            100 * s.getBoundingClientRect().width / w])); }"""
    )
    return {k: float(v) for k, v in found.items()}


def dispatch_batch(
    app: Celery, manager: SessionManager, size: int, path: str = "batch.canvas"
) -> tuple[str, list[str]]:
    work = app.tasks["tests.web.dashboard.work"]
    node_ids = [f"n{i}" for i in range(size)]
    sid = dispatch(group(work.s(i) for i in range(size)), canvas_path=path, node_ids=node_ids, manager=manager, app=app)
    return sid, node_ids


# -- 1. the batch at a glance -------------------------------------------------------------------


def test_the_batch_at_a_glance_moves_live_with_counts_rate_eta_and_a_node_map(
    browser: Any, redis_manager: SessionManager, celery_app: Celery
) -> None:
    from playwright.sync_api import expect

    # Given a dispatched batch of 240 nodes, its page open
    sid, node_ids = dispatch_batch(celery_app, redis_manager, 240, "reports/nightly.canvas")
    with dashboard(browser, redis_manager, path=f"/dashboard/sessions/{sid}") as board:
        page = board.page
        page.evaluate("window.__notReloaded = true")
        expect(page.locator("#detail-canvas")).to_have_text("reports/nightly.canvas")
        page.wait_for_function(f"window.trackerDashboard.streams.has('{sid}')")
        page.wait_for_function("window.trackerDashboard.nodesLoaded")

        # When its nodes run and finish in waves while the page is open (some fail, 40 keep running)
        fail = {n: "ValueError" for n in node_ids[5:200:20]}
        stop = threading.Event()

        def waves() -> None:
            for start in range(0, 200, 20):
                if stop.is_set():
                    return
                run_nodes(redis_manager, sid, node_ids[start : start + 20], fail=fail)
                time.sleep(0.15)
            start_nodes(redis_manager, sid, node_ids[200:240])

        feeder = threading.Thread(target=waves, daemon=True)
        feeder.start()

        # Then the stacked bar and its legend reach the exact counts, without a reload
        expect(page.locator('#legend li[data-status="running"] .count')).to_have_text("40", timeout=20_000)
        wait_until(lambda: legend(page)["completed"] == 190, what="190 completed")
        feeder.join(timeout=10)
        counts = legend(page)
        assert counts == {
            "completed": 190,
            "failed": 10,
            "skipped": 0,
            "lost": 0,
            "cancelled": 0,
            "running": 40,
            "retrying": 0,
            "pending": 0,
        }, counts
        widths = segment_widths(page)
        assert abs(widths["completed"] - 100 * 190 / 240) < 1, widths
        assert abs(widths["running"] - 100 * 40 / 240) < 1, widths
        assert page.evaluate("window.__notReloaded") is True
        # ... with the rate, the ETA and the elapsed time
        figures = page.locator("#figures")
        expect(figures.locator('[data-figure="rate"] dd')).to_contain_text("nodes/s")
        expect(figures.locator('[data-figure="elapsed"] dd')).to_have_text(re.compile(r"^\d+ s$"))
        expect(figures.locator('[data-figure="ETA"] dd')).not_to_have_text("ended")

        # And the node map paints every node in its status's colour (one canvas, no element per node)
        page.wait_for_timeout(300)
        assert page.evaluate(PIXEL_OF_NODE, "n0") == MAP_COLOURS["completed"]
        assert page.evaluate(PIXEL_OF_NODE, node_ids[5]) == MAP_COLOURS["failed"]
        assert page.evaluate(PIXEL_OF_NODE, node_ids[230]) == MAP_COLOURS["running"]
        assert page.locator("#map-wrap *").count() <= 3
        board.shot("session-running-1280")
        page.set_viewport_size(PHONE)
        page.wait_for_timeout(200)
        board.shot("session-running-390")
        page.set_viewport_size(WIDE)

        # When the mouse is over a failed node's cell: its id and status; a click opens its detail
        box = page.locator("#node-map").bounding_box()
        cell = page.evaluate(
            """(id) => { const m = window.trackerMap, step = m.cell + m.gap;
              const i = window.trackerDashboard.order.indexOf(id);
              return [(i % m.cols) * step + m.cell / 2, Math.floor(i / m.cols) * step + m.cell / 2]; }""",
            node_ids[5],
        )
        page.mouse.move(box["x"] + cell[0], box["y"] + cell[1])
        expect(page.locator("#map-tip")).to_have_text(f"{node_ids[5]} · failed · ValueError")
        page.mouse.click(box["x"] + cell[0], box["y"] + cell[1])
        detail = page.locator("#node-detail")
        expect(detail).to_be_visible()
        expect(page.locator("#node-detail-id")).to_have_text(node_ids[5])
        fields = page.locator("#node-detail-fields")
        expect(fields).to_contain_text("ValueError: n5: valueerror on row 5")
        expect(fields).to_contain_text("celery@browser-test:101")
        expect(fields.locator('dt:text-is("attempts") + dd')).to_have_text("1")
        expect(fields.locator('dt:text-is("started") + dd')).not_to_have_text("—")
        assert detail.evaluate("(e) => e.getBoundingClientRect().top < window.innerHeight")
        # ... and a completed node's detail shows its result
        page.locator('#nodes tbody tr[data-node-id="n1"] a').click()
        expect(page.locator("#node-detail-result")).to_have_text('{\n  "n": 1\n}')

        # And its row in the list shows its bar, rate and ETA too
        page.click("#back")
        label = page.locator(f'tr[data-session-id="{sid}"] .progress-cell .label')
        expect(label).to_have_text(re.compile(r"^83\.3 % · [0-9.]+/s"))
        assert board.errors == []


def test_a_cancelled_session_shows_its_cancelled_nodes_and_a_partial_failure_its_failures(
    browser: Any, redis_manager: SessionManager, celery_app: Celery
) -> None:
    from playwright.sync_api import expect

    # Given a batch of 300: 160 finished (9 failed), 9 running, then cancelled (131 never ran)
    sid, node_ids = dispatch_batch(celery_app, redis_manager, 300, "imports/catalogue.canvas")
    fail = {n: ("TimeoutError" if i % 2 else "KeyError") for i, n in enumerate(node_ids[3:160:18])}
    run_nodes(redis_manager, sid, node_ids[:160], fail=fail)
    start_nodes(redis_manager, sid, node_ids[160:169])
    from tracker.celery import cancel_session

    cancel_session(sid, app=celery_app, manager=redis_manager)
    with dashboard(browser, redis_manager, path=f"/dashboard/sessions/{sid}") as board:
        page = board.page
        expect(page.locator("#detail-status")).to_have_text("cancelled")
        page.wait_for_function("window.trackerDashboard.nodesLoaded")

        # Then the bar is not one grey block: each part has its share, the cancelled ones too
        info = redis_manager.sync.get_session(sid)
        expected = {
            "completed": info.completed_nodes,
            "failed": info.failed_nodes,
            "cancelled": info.cancelled_nodes,
        }
        counts = legend(page)
        assert {k: counts[k] for k in expected} == expected, counts
        assert sum(counts.values()) == 300, counts
        widths = segment_widths(page)
        assert abs(widths["cancelled"] - 100 * info.cancelled_nodes / 300) < 1, widths
        assert abs(widths["completed"] - 100 * info.completed_nodes / 300) < 1, widths

        # And a cancelled node that never ran shows no attempt
        page.select_option("#node-filter", "cancelled")
        page.fill("#node-search", "n299")
        never_ran = page.locator('#nodes tbody tr[data-node-id="n299"]')
        expect(never_ran.locator("td").nth(2)).to_have_text("0")
        board.shot("session-cancelled-1280")
        assert board.errors == []


# -- 1. a JSON Canvas file drawn as itself ------------------------------------------------------


def test_a_canvas_file_session_is_drawn_from_its_layout_and_coloured_live(
    browser: Any, redis_manager: SessionManager, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    # Given a .canvas file of 6 work nodes in a group, and a session dispatched from it
    nodes = [{"id": "box", "type": "group", "x": -20, "y": -40, "width": 980, "height": 340, "label": "ETL"}]
    for i, name in enumerate(["extract", "clean", "enrich", "score", "load", "report"]):
        nodes.append(
            {
                "id": name,
                "type": "text",
                "text": f"{name.title()}\nstep {i}",
                "x": 160 * i,
                "y": 60 * (i % 2),
                "width": 140,
                "height": 80,
            }
        )
    edges = [
        {"id": f"e{i}", "fromNode": a["id"], "toNode": b["id"]}
        for i, (a, b) in enumerate(itertools.pairwise(nodes[1:]))
    ]
    (tmp_path / "etl.canvas").write_text(json.dumps({"nodes": nodes, "edges": edges}))
    sid = redis_manager.sync.create_session("etl.canvas", 6, nodes=[NodeSpec(node_id=n["id"]) for n in nodes[1:]])
    run_nodes(redis_manager, sid, ["extract", "clean"], fail={"clean": "ValueError"})
    start_nodes(redis_manager, sid, ["enrich"])

    with dashboard(browser, redis_manager, path=f"/dashboard/sessions/{sid}", canvas_dir=tmp_path) as board:
        page = board.page
        # Then the map is the canvas itself, each node in its status's colour
        expect(page.locator("#map-mode")).to_be_visible()
        page.wait_for_function("window.trackerDashboard.nodesLoaded && window.trackerMap.mode === 'canvas'")
        assert page.evaluate(PIXEL_OF_NODE, "extract") == MAP_COLOURS["completed"]
        assert page.evaluate(PIXEL_OF_NODE, "clean") == MAP_COLOURS["failed"]
        assert page.evaluate(PIXEL_OF_NODE, "enrich") == MAP_COLOURS["running"]
        assert page.evaluate(PIXEL_OF_NODE, "report") == MAP_COLOURS["pending"]

        # When a node completes, its box changes colour live
        page.wait_for_function(f"window.trackerDashboard.streams.has('{sid}')")
        redis_manager.sync.add_node_result(sid, "enrich", {"rows": 12})
        page.wait_for_function(f"({PIXEL_OF_NODE})('enrich') === '{MAP_COLOURS['completed']}'", timeout=10_000)
        # And hovering a box names its node
        box = page.locator("#node-map").bounding_box()
        at = page.evaluate(
            """() => { const m = window.trackerMap;
              const n = window.trackerDashboard.layout.nodes.find((x) => x.id === "score");
              return [m.ox + (n.x + n.width / 2) * m.scale, m.oy + (n.y + n.height / 2) * m.scale]; }"""
        )
        page.mouse.move(box["x"] + at[0], box["y"] + at[1])
        expect(page.locator("#map-tip")).to_have_text("score · pending")
        board.shot("canvas-file-1280")
        page.set_viewport_size(PHONE)
        page.locator("#map-panel").scroll_into_view_if_needed()
        page.wait_for_timeout(200)
        board.shot("canvas-file-390")
        assert board.errors == []


# -- 2. acting in place -------------------------------------------------------------------------


def test_cancel_and_resume_from_the_page_with_a_confirmation_and_the_token(
    browser: Any, redis_manager: SessionManager, celery_app: Celery
) -> None:
    from playwright.sync_api import expect

    # Given a running batch of 12 nodes, 4 done (2 of them failed with two causes)
    sid, node_ids = dispatch_batch(celery_app, redis_manager, 12)
    run_nodes(redis_manager, sid, node_ids[:4], fail={"n1": "KeyError", "n2": "TimeoutError"})
    with dashboard(browser, redis_manager, path=f"/dashboard/sessions/{sid}", celery_app=celery_app) as board:
        page = board.page
        expect(page.locator("#detail-status")).to_have_text("running")

        # When Cancel is pressed, a confirmation says what it does and asks for the token
        page.click("#act-cancel")
        dialog = page.locator("#confirm")
        expect(dialog).to_be_visible()
        expect(page.locator("#confirm-text")).to_contain_text("8 unfinished nodes become cancelled")
        # ... Back changes nothing
        page.click("#confirm-cancel")
        expect(dialog).to_be_hidden()
        assert redis_manager.sync.get_session(sid).status == "running"
        # ... a wrong token is refused, and nothing changes
        page.click("#act-cancel")
        page.fill("#confirm-token", "not-the-token")
        page.click("#confirm-ok")
        expect(page.locator("#confirm-error")).to_have_text("Wrong token.")
        assert redis_manager.sync.get_session(sid).status == "running"
        # ... the token cancels it
        page.fill("#confirm-token", TOKEN)
        page.click("#confirm-ok")
        expect(dialog).to_be_hidden()
        expect(page.locator("#detail-status")).to_have_text("cancelled", timeout=10_000)
        assert redis_manager.sync.get_session(sid).cancelled_nodes == 8

        # Then failures are grouped by cause, each with "resume this group"
        groups = page.locator("#failures tbody tr")
        expect(groups).to_have_count(2, timeout=10_000)
        expect(page.locator('#failures tr[data-error-type="KeyError"] td').nth(1)).to_have_text("1")

        # When one group is resumed (the token is remembered for this page only)
        page.locator('#failures tr[data-error-type="TimeoutError"] button').click()
        expect(page.locator("#confirm-text")).to_contain_text("1 nodes failed with TimeoutError")
        expect(page.locator("#confirm-token")).to_have_value(TOKEN)
        page.click("#confirm-ok")
        # Then only that node is re-sent: the session runs again, the other failure keeps its cause
        expect(page.locator("#detail-status")).to_have_text("running", timeout=10_000)
        assert redis_manager.sync.get_nodes(sid, "pending").nodes[0].node_id == "n2"
        assert [n.node_id for n in redis_manager.sync.get_nodes(sid, "failed").nodes] == ["n1"]

        # When it is cancelled again and "Resume unfinished" is chosen: the failure stays, the rest goes back
        page.click("#act-cancel")
        page.click("#confirm-ok")
        expect(page.locator("#detail-status")).to_have_text("cancelled", timeout=10_000)
        page.click("#act-resume-unfinished")
        page.click("#confirm-ok")
        expect(page.locator("#detail-status")).to_have_text("running", timeout=10_000)
        info = redis_manager.sync.get_session(sid)
        assert (info.failed_nodes, info.completed_nodes, info.cancelled_nodes) == (1, 2, 0)
        # And "Resume failed" re-sends the failed node too
        page.click("#act-cancel")
        page.click("#confirm-ok")
        expect(page.locator("#detail-status")).to_have_text("cancelled", timeout=10_000)
        page.click("#act-resume-failed")
        expect(page.locator("#confirm-text")).to_contain_text("Re-sends the 1 failed or lost nodes")
        page.click("#confirm-ok")
        expect(page.locator("#detail-status")).to_have_text("running", timeout=10_000)
        assert redis_manager.sync.get_session(sid).failed_nodes == 0
        # And "Terminate" asks before it kills
        page.click("#act-terminate")
        expect(page.locator("#confirm-text")).to_contain_text("killed in their worker processes")
        page.click("#confirm-cancel")
        assert board.errors == []


def test_child_sessions_show_as_a_tree_with_their_own_progress(browser: Any, redis_manager: SessionManager) -> None:
    from playwright.sync_api import expect

    # Given a parent whose node opened two children, one of which opened a grandchild
    def open_child(parent_id: str, node_id: str, path: str, count: int) -> str:
        # As tracker.celery.dispatch does inside a tracked task: tell the parent's node, then create.
        child = str(uuid.uuid4())
        link = redis_manager.operations.child_event(parent_id, node_id, ChildLink(child))
        redis_manager.sync._record_nodes(parent_id, [link])
        return redis_manager.sync.create_session(path, count, session_id=child, parent=(parent_id, node_id))

    parent = redis_manager.sync.create_session("parent.canvas", 2)
    start_nodes(redis_manager, parent, ["p0"])
    child_a = open_child(parent, "p0", "child-a.canvas", 4)
    child_b = open_child(parent, "p0", "child-b.canvas", 2)
    start_nodes(redis_manager, child_a, ["a0"])
    grandchild = open_child(child_a, "a0", "grandchild.canvas", 3)
    run_nodes(redis_manager, child_a, ["a1", "a2"])
    run_nodes(redis_manager, grandchild, ["g0"])
    with dashboard(browser, redis_manager, path=f"/dashboard/sessions/{parent}") as board:
        page = board.page
        tree = page.locator("#children")
        expect(tree).to_be_visible(timeout=10_000)
        a = tree.locator(f'li[data-session-id="{child_a}"]')
        expect(a.locator(".child")).to_contain_text("child-a.canvas")
        expect(a.locator(".child")).to_contain_text("50 %")
        expect(tree.locator(f'li[data-session-id="{child_b}"] .child')).to_contain_text("0 %")
        # When the child's children are opened: the grandchild, with its own progress
        a.locator("summary").click()
        expect(a.locator(f'li[data-session-id="{grandchild}"] .child')).to_contain_text("33.3")
        # And a child links to its own page, which links back to its parent
        a.locator(".child a").first.click()
        expect(page.locator("#detail-canvas")).to_have_text("child-a.canvas")
        expect(page.locator("#detail-parent a")).to_have_text(parent[:8])
        assert board.errors == []


# -- 3. correct lists ---------------------------------------------------------------------------


def test_lists_filter_page_sort_and_search_exactly_and_deep_links_keep_the_view(
    browser: Any, redis_manager: SessionManager
) -> None:
    from playwright.sync_api import expect

    # Given 70 sessions: every 7th failed, the rest pending; and one of 300 nodes with 6 failed
    failed_ids = []
    for i in range(70):
        sid = redis_manager.sync.create_session(f"list/{i:02d}.canvas", 1)
        if i % 7 == 0:
            run_nodes(redis_manager, sid, ["n0"], fail={"n0": "ValueError"})
            failed_ids.append(sid)
    tagged = redis_manager.sync.create_session("etl/extract.canvas", 1, tags=["team:data"])
    big = redis_manager.sync.create_session("nodes.canvas", 300)
    ids = [f"n{i:03d}" for i in range(300)]
    fail = {n: "ValueError" for n in ids[7::50]}
    run_nodes(redis_manager, big, ids[:12] + ids[24:], fail=fail)
    for i, n in enumerate(ids[12:24]):  # distinct run times to sort by
        started = utc_now() - timedelta(seconds=60)
        redis_manager.sync._record_node(
            big, n, "completed", i, started_at=started, at=started + timedelta(seconds=i + 1)
        )

    with dashboard(browser, redis_manager, refresh_s=0.5) as board:
        page = board.page
        rows = page.locator("#sessions tbody tr")
        expect(rows).to_have_count(50, timeout=10_000)
        more = page.locator("#sessions-more")
        # "More sessions" stays shown across refreshes and adds the rest, once
        page.wait_for_timeout(1200)
        expect(more).to_be_visible()
        more.click()
        expect(rows).to_have_count(72)
        expect(more).to_be_hidden()
        page.wait_for_timeout(1200)
        expect(rows).to_have_count(72)
        expect(more).to_be_hidden()

        # When filtered by tag, then by canvas path prefix: that session alone
        page.fill("#tag-filter", "team:data")
        page.press("#tag-filter", "Enter")
        expect(rows).to_have_count(1)
        expect(rows.first).to_have_attribute("data-session-id", tagged)
        page.fill("#tag-filter", "")
        page.fill("#path-filter", "etl/")
        page.press("#path-filter", "Enter")
        expect(rows).to_have_count(1)
        expect(rows.first).to_have_attribute("data-session-id", tagged)
        page.fill("#path-filter", "")
        page.press("#path-filter", "Enter")

        # When the list is filtered by status: exactly the 10 failed ones, and the address says so
        page.select_option("#status-filter", "failed")
        expect(rows).to_have_count(10)
        assert sorted(
            page.eval_on_selector_all("#sessions tbody tr", "(r) => r.map((x) => x.dataset.sessionId)")
        ) == sorted(failed_ids)
        assert "status=failed" in page.url
        # ... and a row that stops matching (a pending session starts) leaves at the next refresh
        page.select_option("#status-filter", "pending")
        expect(rows).to_have_count(61)
        first = rows.first.get_attribute("data-session-id")
        start_nodes(redis_manager, str(first), ["n0"])
        expect(rows).to_have_count(60, timeout=10_000)
        expect(page.locator(f'#sessions tr[data-session-id="{first}"]')).to_have_count(0)

        # When the 300-node session's failed nodes are asked for: all 6, on one page
        board.go(f"/dashboard/sessions/{big}?status=failed&refresh=0.5")
        page.wait_for_function("window.trackerDashboard.nodesLoaded")
        nodes = page.locator("#nodes tbody tr")
        expect(nodes).to_have_count(6)
        expect(page.locator("#nodes-range")).to_have_text("1\u20136 of 6")
        expect(page.locator("#node-filter")).to_have_value("failed")
        # ... searched by id
        page.select_option("#node-filter", "")
        page.fill("#node-search", "n25")
        expect(page.locator("#nodes-range")).to_have_text("1\u201310 of 10")
        page.fill("#node-search", "n257")
        expect(nodes).to_have_count(1)
        expect(nodes.first).to_have_attribute("data-node-id", "n257")
        # ... or by its error, or its worker
        page.fill("#node-search", "VALUEERROR on row")
        expect(nodes).to_have_count(6)
        page.fill("#node-search", "browser-test:101")
        expect(page.locator("#nodes-range")).to_have_text("1\u2013100 of 288")
        # ... sorted by run time, longest first
        page.fill("#node-search", "")
        page.click('#nodes thead button[data-sort="time"]')
        page.click('#nodes thead button[data-sort="time"]')
        expect(nodes.first).to_have_attribute("data-node-id", "n023")
        assert "sort=-time" in page.url
        # ... paged exactly
        page.click("#nodes-more")
        expect(page.locator("#nodes-range")).to_have_text("101\u2013200 of 300")

        # When a node of row 31 is opened, its detail is scrolled into view
        page.click("#nodes-prev")
        page.locator("#nodes tbody tr").nth(30).locator("a").click()
        detail = page.locator("#node-detail")
        expect(detail).to_be_visible()
        assert detail.evaluate(
            "(e) => { const r = e.getBoundingClientRect(); return r.top >= 0 && r.top < innerHeight; }"
        )
        chosen = page.locator("#node-detail-id").inner_text()

        # And a reload keeps the session, the sort and the open node (a deep link)
        page.reload()
        page.wait_for_function("window.trackerDashboard.nodesLoaded")
        expect(page.locator("#detail-id")).to_have_text(big)
        expect(page.locator("#node-detail-id")).to_have_text(chosen)
        expect(page.locator('#nodes thead th[aria-sort="descending"] button')).to_have_text("Time (ms)")
        assert board.errors == []


# -- 4. workers ---------------------------------------------------------------------------------


def test_the_workers_view_shows_live_workers_what_they_hold_and_when_they_were_seen(
    browser: Any, redis_manager: SessionManager
) -> None:
    from playwright.sync_api import expect

    # Given two workers: one running 3 nodes now, one that went silent 2 minutes ago
    sid = redis_manager.sync.create_session("workers.canvas", 5)
    start_nodes(redis_manager, sid, ["w0", "w1", "w2"], worker="celery@alpha:11")
    then = utc_now() - timedelta(minutes=2)
    redis_manager.clock = lambda: then
    redis_manager.sync._heartbeat("celery@beta:22")
    redis_manager.clock = utc_now
    redis_manager.sync._heartbeat("celery@alpha:11", [sid])
    with dashboard(browser, redis_manager) as board:
        page = board.page
        page.click("#nav-workers")
        assert page.url.endswith("/dashboard/workers")
        alpha = page.locator('#workers tr[data-worker="celery@alpha:11"]')
        expect(alpha.locator(".status")).to_have_text("alive", timeout=10_000)
        expect(alpha.locator("td").nth(3)).to_have_text("3")
        expect(alpha.locator("td").nth(4)).to_have_text("w0, w1, w2")
        beta = page.locator('#workers tr[data-worker="celery@beta:22"]')
        expect(beta.locator(".status")).to_have_text("silent")
        expect(beta.locator("td").nth(2)).to_contain_text("2 min")
        # When alpha finishes a node, the view follows (it refreshes on its own)
        run_nodes(redis_manager, sid, ["w0"], worker="celery@alpha:11")
        expect(alpha.locator("td").nth(3)).to_have_text("2", timeout=10_000)
        # And a held node links to its session
        alpha.locator("a", has_text="w1").click()
        expect(page.locator("#detail-id")).to_have_text(sid)
        expect(page.locator("#node-detail-id")).to_have_text("w1")
        board.go("/dashboard/workers")
        board.shot("workers-1280")
        assert board.errors == []


# -- 5. honest states ---------------------------------------------------------------------------


def test_an_outage_is_shown_as_offline_with_the_data_greyed_and_its_age(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    # Given a dashboard on a Redis of its own
    with redis_process(tmp_path) as redis:
        store = make_store("redis", redis.url, "dash")
        manager = SessionManager(storage=store, settings=TrackerSettings())
        sid = manager.sync.create_session("outage.canvas", 3)
        try:
            with dashboard(browser, manager, refresh_s=0.5) as board:
                page = board.page
                expect(page.locator(f'tr[data-session-id="{sid}"]')).to_be_visible()
                # When Redis goes down
                redis.stop()
                banner = page.locator("#offline")
                expect(banner).to_be_visible(timeout=10_000)
                # Then a short message, the data greyed out and how old it is; no exception text
                expect(banner).to_contain_text("the server cannot reach its store")
                expect(page.locator("#offline-age")).to_have_text(re.compile(r"updated \d+ s ago"), timeout=5_000)
                assert "Error" not in banner.inner_text() and len(banner.inner_text()) < 120
                assert "stale" in (page.locator("#main").get_attribute("class") or "")
                assert len(page.locator("#connection").inner_text()) < 30
                board.shot("offline-1280")
                # When it is back (empty: this server keeps nothing on disk), so is the page, live
                redis.start()
                expect(banner).to_be_hidden(timeout=15_000)
                assert "stale" not in (page.locator("#main").get_attribute("class") or "")
                after = manager.sync.create_session("after-the-outage.canvas", 1)
                expect(page.locator(f'tr[data-session-id="{after}"]')).to_be_visible(timeout=10_000)
                # When the web server itself goes away: the same banner, with its own reason
                board.server.server.should_exit = True
                expect(banner).to_contain_text("the server cannot be reached", timeout=10_000)
        finally:
            store.close()


def test_logged_out_pages_show_nothing_and_the_favicon_is_served(browser: Any, redis_manager: SessionManager) -> None:
    from playwright.sync_api import expect

    sid = redis_manager.sync.create_session("secret-batch.canvas", 2)
    with dashboard(browser, redis_manager, path=f"/dashboard/sessions/{sid}") as board:
        page = board.page
        expect(page.locator("#detail-canvas")).to_have_text("secret-batch.canvas")
        # A reload keeps the login and offers to log out
        page.reload()
        expect(page.locator("#logout")).to_be_visible()
        expect(page.locator("#detail-canvas")).to_have_text("secret-batch.canvas")
        # When the login cookie is gone (expired): the next read's 401 clears the page
        page.context.clear_cookies()
        expect(page.locator("#login")).to_be_visible(timeout=10_000)
        assert "secret-batch" not in page.content()
        page.fill("#login-token", TOKEN)
        page.click("#login button[type=submit]")
        expect(page.locator("#detail-canvas")).to_have_text("secret-batch.canvas")
        # When logged out: nothing of the data stays on the page
        page.click("#logout")
        expect(page.locator("#login")).to_be_visible()
        assert "secret-batch" not in page.content()
        assert sid not in page.content()
        expect(page.locator("#main")).to_be_hidden()
        # And after a reload, logged out, nothing either
        page.reload()
        expect(page.locator("#login")).to_be_visible()
        page.wait_for_timeout(500)
        assert "secret-batch" not in page.content()
        # The favicon is there, on the page and at /favicon.ico
        icon = page.request.get(f"{board.server.url}/favicon.ico")
        assert icon.status == 200 and icon.headers["content-type"] == "image/svg+xml"
        assert page.request.get(f"{board.server.url}/dashboard/static/favicon.svg").status == 200
        assert page.locator('link[rel="icon"]').count() == 1


# -- the live follow of counts the events alone carry --------------------------------------------


def test_skipped_and_retrying_nodes_are_counted_live_from_the_events_alone(
    browser: Any, redis_manager: SessionManager
) -> None:
    from playwright.sync_api import expect

    # Given a chain of 4 nodes that has not started, on a page that refreshes only once a minute
    sid = redis_manager.sync.create_session("chain.canvas", 4)
    with dashboard(browser, redis_manager, path=f"/dashboard/sessions/{sid}", refresh_s=60) as board:
        page = board.page
        page.wait_for_function(f"window.trackerDashboard.streams.has('{sid}')")
        page.wait_for_function("window.trackerDashboard.nodesLoaded")
        reads = len([r for r in board.requests if "/status/" in r])

        # When n0 fails an attempt and waits for a retry, then fails; n1 and n2 are skipped
        redis_manager.sync._record_node(sid, "n0", "running", attempt=1, worker="celery@browser-test:1")
        error = NodeError(type="ConnectionError", message="upstream busy")
        redis_manager.sync._record_node(sid, "n0", "retrying", attempt=1, error=error)
        expect(page.locator('#legend li[data-status="retrying"] .count')).to_have_text("1", timeout=10_000)
        badge = page.locator('#nodes tbody tr[data-node-id="n0"] .status')
        expect(badge).to_have_text("retrying")
        redis_manager.sync._record_node(sid, "n0", "running", attempt=2, worker="celery@browser-test:1")
        expect(page.locator('#legend li[data-status="running"] .count')).to_have_text("1", timeout=10_000)
        expect(page.locator('#legend li[data-status="retrying"] .count')).to_have_text("0")
        redis_manager.sync.add_node_result(
            sid, "n0", status="failed", error=NodeError(type="ValueError", message="broke")
        )
        for node_id in ("n1", "n2"):
            redis_manager.sync._record_node(sid, node_id, "skipped", reason="skipped: node n0 failed")

        # Then the events alone count them: skipped, not pending, not running
        expect(page.locator('#legend li[data-status="skipped"] .count')).to_have_text("2", timeout=10_000)
        assert legend(page) == {
            "completed": 0,
            "failed": 1,
            "skipped": 2,
            "lost": 0,
            "cancelled": 0,
            "running": 0,
            "retrying": 0,
            "pending": 1,
        }
        skipped = page.locator('#nodes tbody tr[data-node-id="n1"]')
        expect(skipped.locator(".status")).to_have_text("skipped")
        expect(skipped.locator(".error-cell")).to_have_text("skipped: node n0 failed")
        assert len([r for r in board.requests if "/status/" in r]) == reads

        # When the last node completes, the session ends with exact counts
        redis_manager.sync.add_node_result(sid, "n3", 3)
        expect(page.locator("#detail-status")).to_have_text("partial_failure", timeout=10_000)
        assert legend(page)["pending"] == 0 and legend(page)["completed"] == 1
        assert board.errors == []


def test_the_pickup_hint_shows_while_no_worker_reports(browser: Any, redis_manager: SessionManager) -> None:
    from playwright.sync_api import expect

    then = datetime.now(UTC) - timedelta(seconds=45)
    redis_manager.clock = lambda: then
    stuck = redis_manager.sync.create_session("stuck.canvas", 2)
    redis_manager.clock = utc_now
    young = redis_manager.sync.create_session("young.canvas", 2)
    with dashboard(browser, redis_manager, path=f"/dashboard/sessions/{young}") as board:
        page = board.page
        hint = page.locator("#detail-hint")
        expect(page.locator("#detail-canvas")).to_have_text("young.canvas")
        expect(hint).to_be_hidden()
        board.go(f"/dashboard/sessions/{stuck}")
        expect(hint).to_contain_text("no worker has picked up any node for 4")
        page.wait_for_function(f"window.trackerDashboard.lastIds.has('{stuck}')", timeout=10_000)
        expect(hint).to_be_visible()
        redis_manager.sync._record_node(stuck, "n0", "running", attempt=1, worker="celery@browser-test:1")
        expect(page.locator("#detail-status")).to_have_text("running", timeout=10_000)
        expect(hint).to_be_hidden()
        assert board.errors == []


# -- 6. everyone can use it ---------------------------------------------------------------------


def test_phone_layout_keyboard_and_axe_core(browser: Any, redis_manager: SessionManager, celery_app: Celery) -> None:
    from playwright.sync_api import expect

    # Given sessions in every state, with long canvas paths
    running, ids = dispatch_batch(
        celery_app, redis_manager, 40, "pipelines/very/long/path/to/nightly-catalogue-import.canvas"
    )
    run_nodes(redis_manager, running, ids[:25], fail={"n3": "ValueError", "n9": "TimeoutError"})
    start_nodes(redis_manager, running, ids[25:30])
    done = redis_manager.sync.create_session("done.canvas", 3)
    run_nodes(redis_manager, done, ["a", "b", "c"], fail={"b": "KeyError"})
    for viewport, name in ((PHONE, "390"), (WIDE, "1280")):
        with dashboard(browser, redis_manager, viewport=viewport) as board:
            page = board.page
            rows = page.locator("#sessions tbody tr")
            expect(rows).to_have_count(2, timeout=10_000)
            # Then nothing scrolls sideways, and each row's status and progress are on screen
            width = page.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
            assert width[0] <= width[1], width
            for cell in (".status-cell", ".progress-cell"):
                right = rows.first.locator(cell).evaluate("(e) => e.getBoundingClientRect().right")
                assert right <= viewport["width"], (cell, right)
            assert board.axe_serious() == [], "sessions list"
            board.shot(f"sessions-{name}")

            # When the keyboard alone is used: Tab reaches the first session's link, with a visible focus
            page.keyboard.press("Tab")  # skip link
            for _ in range(12):
                page.keyboard.press("Tab")
                if page.evaluate("document.activeElement.closest('#sessions tbody') !== null"):
                    break
            outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
            assert outline not in ("none", ""), outline
            page.keyboard.press("Enter")
            expect(page.locator("#detail")).to_be_visible()
            page.wait_for_function("window.trackerDashboard.nodesLoaded")
            width = page.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
            assert width[0] <= width[1], width
            assert board.axe_serious() == [], "session view"
            board.shot(f"session-partial-failure-{name}")
            board.go("/dashboard/workers")
            expect(page.locator("#workers-view")).to_be_visible()
            assert board.axe_serious() == [], "workers view"
            assert board.errors == []


# -- 7. thousands of nodes ----------------------------------------------------------------------


def test_a_5000_node_map_and_a_20000_node_session_updating_at_60_fps(
    browser: Any, redis_manager: SessionManager
) -> None:
    # Given a session of 5,000 nodes in every state
    sid = redis_manager.sync.create_session("thumbnails.canvas", 5000)
    ids = [f"img-{i:05d}" for i in range(5000)]
    run_nodes(redis_manager, sid, ids[:3600], fail={n: "IOError" for n in ids[:3600:97]})
    start_nodes(redis_manager, sid, ids[3600:3800])
    for viewport, name in ((WIDE, "1280"), (PHONE, "390")):
        with dashboard(browser, redis_manager, viewport=viewport, path=f"/dashboard/sessions/{sid}") as board:
            page = board.page
            page.wait_for_function("window.trackerDashboard.nodesLoaded", timeout=30_000)
            assert page.evaluate(PIXEL_OF_NODE, ids[0]) == MAP_COLOURS["failed"]
            assert page.evaluate(PIXEL_OF_NODE, ids[1]) == MAP_COLOURS["completed"]
            assert page.evaluate(PIXEL_OF_NODE, ids[3700]) == MAP_COLOURS["running"]
            page.locator("#map-panel").scroll_into_view_if_needed()
            board.shot(f"map-5000-{name}")

    # When a 20,000-node session updates (2,000 node events a second) with its page open
    big = redis_manager.sync.create_session("big.canvas", 20000)
    ids = [f"n{i:05d}" for i in range(20000)]
    run_nodes(redis_manager, big, ids[:10000])
    with dashboard(browser, redis_manager, path=f"/dashboard/sessions/{big}") as board:
        page = board.page
        page.wait_for_function("window.trackerDashboard.nodesLoaded", timeout=60_000)
        page.wait_for_function(f"window.trackerDashboard.streams.has('{big}')")
        page.evaluate(
            """() => { window.__frames = []; let last = performance.now();
              const step = (t) => { window.__frames.push(t - last); last = t; requestAnimationFrame(step); };
              requestAnimationFrame(step); }"""
        )
        before = page.evaluate("window.trackerDashboard.eventsApplied")
        started = time.monotonic()
        for start in range(10000, 13000, 100):  # 200 events every 0.1 s, for 3 s
            run_nodes(redis_manager, big, ids[start : start + 100])
            time.sleep(0.1)
        written = time.monotonic() - started
        # Then it ends exact (events it fell behind on come back as a snapshot and a fresh read) ...
        done = "document.querySelector('#legend li[data-status=\"completed\"] .count').textContent === '13000'"
        page.wait_for_function(done, timeout=60_000)
        page.wait_for_function(f"({PIXEL_OF_NODE})('{ids[12999]}') === '{MAP_COLOURS['completed']}'", timeout=30_000)
        frames = page.evaluate("window.__frames.splice(1)")
        applied = page.evaluate("window.trackerDashboard.eventsApplied") - before
        elapsed = time.monotonic() - started
        p50 = statistics.median(frames)
        p95 = sorted(frames)[int(len(frames) * 0.95)]
        print(
            f"\n20,000-node session: 6,000 node events written in {written:.1f} s, {applied} applied by the page, "
            f"exact after {elapsed:.1f} s; {len(frames)} frames: p50 {p50:.1f} ms, p95 {p95:.1f} ms, "
            f"max {max(frames):.1f} ms"
        )
        # ... and it kept drawing frames all along (the map repaints only changed cells): 60 fps
        # (16.7 ms) at the median on an idle machine; the bound leaves room for a loaded one
        assert p50 < 50 and max(frames) < 1000, (p50, p95, max(frames))
        assert board.errors == []


def test_a_phone_scrolls_a_wide_failures_table_not_the_page(browser: Any, redis_manager: SessionManager) -> None:
    # Given an ended session whose failures by cause have a cause too long to wrap, and actions
    sid = redis_manager.sync.create_session("done.canvas", 3)
    long_cause = "ACatalogueImportErrorNameTooLongToWrap"
    run_nodes(redis_manager, sid, ["a", "b", "c"], fail={"b": "KeyError", "c": long_cause})

    # When it is opened on a phone
    with dashboard(browser, redis_manager, viewport=PHONE, path=f"/dashboard/sessions/{sid}") as board:
        page = board.page
        page.wait_for_function("window.trackerDashboard.nodesLoaded")
        failures = page.locator("#failures")
        failures.locator("tbody tr").first.wait_for()

        # Then the page does not scroll sideways: the table scrolls inside its section
        width = page.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
        assert width[0] <= width[1], width
        assert failures.evaluate("(e) => e.scrollWidth > e.clientWidth")
        board.shot("session-failures-390")
        assert board.errors == []


def test_a_session_removed_while_open_says_so_and_offers_nothing(browser: Any, redis_manager: SessionManager) -> None:
    from playwright.sync_api import expect

    # Given a running session open in the dashboard, with its cancel buttons
    sid = redis_manager.sync.create_session("removed.canvas", 3)
    run_nodes(redis_manager, sid, ["a"])
    start_nodes(redis_manager, sid, ["b"])
    with dashboard(browser, redis_manager, path=f"/dashboard/sessions/{sid}") as board:
        page = board.page
        page.wait_for_function("window.trackerDashboard.nodesLoaded")
        expect(page.locator("#act-cancel")).to_be_visible()

        # When the session is removed from the store (deleted, or expired)
        assert redis_manager.sync.delete_session(sid)

        # Then the page says so, greys what it last knew, and offers no action on it
        missing = page.locator("#detail-missing")
        expect(missing).to_be_visible(timeout=15_000)
        expect(missing).to_contain_text("was removed")
        expect(page.locator("#detail")).to_have_class(re.compile(r"\bstale\b"))
        for action in ("#act-cancel", "#act-terminate", "#act-resume-failed", "#act-resume-unfinished"):
            expect(page.locator(action)).to_be_hidden()
        board.shot("session-removed-1280")


def test_a_server_without_a_token_offers_no_action(browser: Any, redis_manager: SessionManager) -> None:
    from playwright.sync_api import expect

    # Given a server without TRACKER_API_TOKEN (it refuses every action) and an ended session
    # whose failures could be resumed
    sid = redis_manager.sync.create_session("tokenless.canvas", 3)
    run_nodes(redis_manager, sid, ["a", "b", "c"], fail={"b": "KeyError"})

    # When the session is open
    with dashboard(browser, redis_manager, token=None, login=False, path=f"/dashboard/sessions/{sid}") as board:
        page = board.page
        page.wait_for_function("window.trackerDashboard.nodesLoaded")
        expect(page.locator("#failures tbody tr")).to_have_count(1)

        # Then no action is offered: neither resume above, nor resume of a cause
        for action in ("#act-cancel", "#act-terminate", "#act-resume-failed", "#act-resume-unfinished"):
            expect(page.locator(action)).to_be_hidden()
        assert page.locator("#failures button").count() == 0
        assert board.errors == []
