"""The reads behind the dashboard's views, over HTTP on each store: workers by heartbeat, one node,
and a session's canvas layout (served only from inside ``TRACKER_CANVAS_DIR``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.web.conftest import TOKEN, AppFactory, asgi_client
from tracker import NodeError, NodeSpec, SessionManager, TrackerSettings
from tracker.manager import utc_now
from tracker.web import WebSettings, create_app
from tracker.web.api import MAX_CANVAS_BYTES
from tracker.web.auth import COOKIE_NAME, make_cookie_value

BASE = "/api/v1/parallel"
W1, W2 = "celery@host-a:101", "celery@host-b:202"


# -- workers --------------------------------------------------------------------------------------


async def beat_ago(manager: SessionManager, worker: str, seconds: float) -> None:
    """A heartbeat of ``worker`` ``seconds`` ago by the manager's clock (set back to the real one after)."""
    then = datetime.now(UTC) - timedelta(seconds=seconds)
    manager.clock = lambda: then
    try:
        await manager._heartbeat(worker)
    finally:
        manager.clock = utc_now


async def test_workers_newest_first_alive_or_silent_with_their_nodes(
    client: httpx.AsyncClient, web_manager: SessionManager
) -> None:
    # Given W1 silent for 90 s while holding a node, W2 running two nodes now
    sid = await web_manager.create_session("w.canvas", 3)
    await web_manager._record_node(sid, "a", "running", worker=W1)
    await beat_ago(web_manager, W1, 90)
    await web_manager._record_node(sid, "c", "running", worker=W2)
    await web_manager._record_node(sid, "b", "running", worker=W2)

    # When the workers are read
    response = await client.get(f"{BASE}/workers")

    # Then W2 comes first and is alive; W1 was seen 90 s ago, past TRACKER_WORKER_STALE_AFTER_S (30)
    assert response.status_code == 200, response.text
    w2, w1 = response.json()
    assert set(w2) == {"worker", "last_seen_at", "seen_s_ago", "alive", "running", "nodes"}
    assert (w2["worker"], w2["alive"], w2["running"]) == (W2, True, 2)
    assert w2["nodes"] == [{"session_id": sid, "node_id": "b"}, {"session_id": sid, "node_id": "c"}]
    assert 0 <= w2["seen_s_ago"] < 5
    assert (w1["worker"], w1["alive"], w1["running"]) == (W1, False, 1)
    assert 90 <= w1["seen_s_ago"] < 95
    seen = datetime.fromisoformat(w1["last_seen_at"])
    assert abs((datetime.now(UTC) - seen).total_seconds() - 90) < 5


async def test_workers_alive_follows_the_servers_stale_setting(
    make_app: AppFactory, web_manager: SessionManager
) -> None:
    await beat_ago(web_manager, W1, 45)
    settings = TrackerSettings(worker_stale_after_s=60)
    async with asgi_client(create_app(web_manager, settings, None, web_settings=WebSettings())) as http:
        assert [w["alive"] for w in (await http.get(f"{BASE}/workers")).json()] == [True]
    async with asgi_client(make_app()) as http:
        assert [w["alive"] for w in (await http.get(f"{BASE}/workers")).json()] == [False]


async def test_workers_limit(client: httpx.AsyncClient, web_manager: SessionManager) -> None:
    assert (await client.get(f"{BASE}/workers")).json() == []
    for i, worker in enumerate((W1, W2)):
        await beat_ago(web_manager, worker, 10 - i)
    assert [w["worker"] for w in (await client.get(f"{BASE}/workers", params={"limit": 1})).json()] == [W2]
    for bad in (0, 1001, "many"):
        response = await client.get(f"{BASE}/workers", params={"limit": bad})
        assert response.status_code == 422, bad


# -- one node -------------------------------------------------------------------------------------


async def test_one_node(client: httpx.AsyncClient, web_manager: SessionManager) -> None:
    sid = await web_manager.create_session("one.canvas", 3, nodes=[NodeSpec(node_id="a"), NodeSpec(node_id="b")])
    await web_manager._record_node(sid, "a", "running", worker=W1, task_id="t-a", attempt=1)
    await web_manager._record_node(sid, "a", "failed", worker=W1, error=NodeError(type="ValueError", message="bad"))
    await web_manager.add_node_result(sid, "dir/c", {"rows": 3})

    response = await client.get(f"{BASE}/sessions/{sid}/nodes/a")

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["node_id"], body["status"], body["worker"], body["task_id"], body["attempts"]) == (
        "a", "failed", W1, "t-a", 1
    )  # fmt: skip
    assert body["error"] == {"type": "ValueError", "message": "bad"}
    assert body["started_at"] and body["finished_at"] and body["execution_time_ms"] is not None
    listed = (await client.get(f"{BASE}/sessions/{sid}/nodes")).json()["nodes"]
    assert body == next(node for node in listed if node["node_id"] == "a")
    # a node id with '/' (as such, or percent-encoded) and a pending node
    for path in ("dir/c", "dir%2Fc"):
        found = await client.get(f"{BASE}/sessions/{sid}/nodes/{path}")
        assert (found.status_code, found.json()["result"]) == (200, {"rows": 3}), path
    assert (await client.get(f"{BASE}/sessions/{sid}/nodes/b")).json()["status"] == "pending"


async def test_one_node_errors(client: httpx.AsyncClient, web_manager: SessionManager) -> None:
    sid = await web_manager.create_session("one.canvas", 2, nodes=[NodeSpec(node_id="a")])

    unknown_node = await client.get(f"{BASE}/sessions/{sid}/nodes/zz")
    assert unknown_node.status_code == 404
    assert unknown_node.json()["detail"] == f"node 'zz' not found in session '{sid}' (never recorded there)"
    unknown_session = await client.get(f"{BASE}/sessions/{uuid.uuid4()}/nodes/a")
    assert unknown_session.status_code == 404
    assert "session" in unknown_session.json()["detail"] and "not found" in unknown_session.json()["detail"]
    for path in (f"{sid}/nodes/a%20b", f"{sid}/nodes/{'x' * 201}", f"{sid}/nodes/a*", "not-a-uuid/nodes/a"):
        response = await client.get(f"{BASE}/sessions/{path}")
        assert response.status_code == 422, path
        assert response.json()["detail"]


# -- canvas layout --------------------------------------------------------------------------------

LONG_TEXT = "A very long first line " + "x" * 100


def canvas_text(**extra: Any) -> str:
    nodes = [
        {"id": "extract", "type": "text", "x": 0, "y": 0, "width": 250, "height": 60, "text": "\n# Extract\nrows"},
        {"id": "load", "type": "file", "x": 300, "y": 0, "width": 250, "height": 60, "file": "jobs/load.py"},
        {"id": "docs", "type": "link", "x": 600, "y": 0, "width": 250, "height": 60, "url": "https://example.org/x"},
        {"id": "long", "type": "text", "x": 0, "y": 100, "width": 250, "height": 60, "text": LONG_TEXT},
        {"id": "box", "type": "group", "x": -20, "y": -20, "width": 900, "height": 200, "label": "ETL", "color": "4"},
        {"id": "bare", "type": "group", "x": 0, "y": 300, "width": 10, "height": 10},
    ]
    edges = [
        {"id": "e1", "fromNode": "extract", "toNode": "load", "fromSide": "right"},
        {"id": "e2", "fromNode": "load", "toNode": "docs", "label": "then"},
    ]
    return json.dumps({"nodes": nodes, "edges": edges, **extra})


@pytest.fixture
def canvas_dir(tmp_path: Path) -> Path:
    """``TRACKER_CANVAS_DIR`` of the test: ``flows/etl.canvas`` inside, ``outside.canvas`` next to it."""
    root = tmp_path / "canvases"
    (root / "flows").mkdir(parents=True)
    (root / "flows" / "etl.canvas").write_text(canvas_text(), encoding="utf-8")
    (tmp_path / "outside.canvas").write_text(canvas_text(), encoding="utf-8")
    return root


async def layout_of(make_app: AppFactory, manager: SessionManager, canvas_path: str, **web: Any) -> httpx.Response:
    sid = await manager.create_session(canvas_path, 2)
    async with asgi_client(make_app(**web)) as http:
        return await http.get(f"{BASE}/sessions/{sid}/canvas")


async def test_canvas_layout(make_app: AppFactory, web_manager: SessionManager, canvas_dir: Path) -> None:
    response = await layout_of(make_app, web_manager, "flows/etl.canvas", canvas_dir=canvas_dir)

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"nodes", "edges"}
    assert body["nodes"][0] == {
        "id": "extract", "type": "text", "x": 0, "y": 0, "width": 250, "height": 60, "label": "# Extract"
    }  # fmt: skip
    labels = {node["id"]: node["label"] for node in body["nodes"]}
    assert (
        labels
        == {
            "extract": "# Extract",  # the first line with text
            "load": "load.py",  # the file's name
            "docs": "https://example.org/x",
            "long": LONG_TEXT[:79] + "…",  # at most 80 characters
            "box": "ETL",
            "bare": "",
        }
    )
    assert len(labels["long"]) == 80
    assert next(n for n in body["nodes"] if n["id"] == "box")["x"] == -20
    assert body["edges"] == [{"from_node": "extract", "to_node": "load"}, {"from_node": "load", "to_node": "docs"}]


async def test_canvas_by_absolute_path_inside_the_dir(
    make_app: AppFactory, web_manager: SessionManager, canvas_dir: Path
) -> None:
    absolute = str(canvas_dir / "flows" / "etl.canvas")
    response = await layout_of(make_app, web_manager, absolute, canvas_dir=canvas_dir)
    assert response.status_code == 200, response.text
    assert len(response.json()["nodes"]) == 6


async def test_canvas_dir_defaults_to_the_working_directory(
    make_app: AppFactory, web_manager: SessionManager, canvas_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(canvas_dir)
    assert (await layout_of(make_app, web_manager, "flows/etl.canvas")).status_code == 200
    assert (await layout_of(make_app, web_manager, "../outside.canvas")).status_code == 404


def test_canvas_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert WebSettings().canvas_dir is None
    monkeypatch.setenv("TRACKER_CANVAS_DIR", str(tmp_path))
    assert WebSettings().canvas_dir == tmp_path


async def test_a_canvas_outside_the_dir_is_never_read(
    make_app: AppFactory, web_manager: SessionManager, canvas_dir: Path, tmp_path: Path
) -> None:
    # Given a symlink inside the dir to the file outside it, and one to a directory outside
    (canvas_dir / "escape.canvas").symlink_to(tmp_path / "outside.canvas")
    (canvas_dir / "up").symlink_to(tmp_path)
    escapes = [
        "../outside.canvas",
        "flows/../../outside.canvas",
        str(tmp_path / "outside.canvas"),
        "escape.canvas",
        "up/outside.canvas",
    ]
    for path in escapes:
        response = await layout_of(make_app, web_manager, path, canvas_dir=canvas_dir)
        assert response.status_code == 404, path
        assert response.json() == {"detail": "the session's canvas file is not under TRACKER_CANVAS_DIR"}, path


async def test_a_canvas_that_cannot_be_served_is_404_saying_why(
    make_app: AppFactory, web_manager: SessionManager, canvas_dir: Path
) -> None:
    (canvas_dir / "notes.txt").write_text(canvas_text(), encoding="utf-8")
    (canvas_dir / "to-notes.canvas").symlink_to(canvas_dir / "notes.txt")
    (canvas_dir / "broken.canvas").write_text("{not json", encoding="utf-8")
    (canvas_dir / "wrong.canvas").write_text(json.dumps({"nodes": [{"id": "a", "type": "text"}]}), encoding="utf-8")
    (canvas_dir / "latin1.canvas").write_bytes(b'{"nodes": [], "edges": [], "by": "Ren\xe9"}')
    (canvas_dir / "deep.canvas").write_text("[" * 100_000, encoding="utf-8")
    (canvas_dir / "long.canvas").write_text(f'{{"nodes": [], "edges": [], "n": {"9" * 5000}}}', encoding="utf-8")
    (canvas_dir / "dir.canvas").mkdir()
    (canvas_dir / "huge.canvas").touch()
    os.truncate(canvas_dir / "huge.canvas", MAX_CANVAS_BYTES + 1)  # sparse: its size is what counts
    cases = {
        "notes.txt": "the session's canvas path does not name a .canvas file",
        "batch": "the session's canvas path does not name a .canvas file",
        "to-notes.canvas": "the session's canvas path leads to a file that is not a .canvas file",
        "missing.canvas": "the session's canvas file does not exist (any more)",
        "dir.canvas": "the session's canvas path is not a regular file",
        "huge.canvas": "the session's canvas file is larger than 16 MiB",
        "broken.canvas": "the session's canvas file is not valid JSON Canvas 1.0",
        "wrong.canvas": "the session's canvas file is not valid JSON Canvas 1.0",
        "latin1.canvas": "the session's canvas file is not valid JSON Canvas 1.0",
        "deep.canvas": "the session's canvas file is not valid JSON Canvas 1.0",
        "long.canvas": "the session's canvas file is not valid JSON Canvas 1.0",
    }
    for path, detail in cases.items():
        response = await layout_of(make_app, web_manager, path, canvas_dir=canvas_dir)
        assert (response.status_code, response.json()) == (404, {"detail": detail}), path


async def test_canvas_of_an_unknown_or_malformed_session(
    client: httpx.AsyncClient, make_app: AppFactory, canvas_dir: Path
) -> None:
    unknown = await client.get(f"{BASE}/sessions/{uuid.uuid4()}/canvas")
    assert unknown.status_code == 404
    assert "not found" in unknown.json()["detail"]
    assert (await client.get(f"{BASE}/sessions/not-a-uuid/canvas")).status_code == 422


async def test_a_large_canvas_is_read_off_the_event_loop(
    make_app: AppFactory, web_manager: SessionManager, canvas_dir: Path
) -> None:
    # Given a canvas of 20 000 nodes (a few MiB), and a ticker on the event loop
    nodes = [
        {"id": f"n{i}", "type": "text", "x": i, "y": 0, "width": 10, "height": 10, "text": "t" * 50}
        for i in range(20_000)
    ]
    (canvas_dir / "large.canvas").write_text(json.dumps({"nodes": nodes, "edges": []}), encoding="utf-8")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        response = await layout_of(make_app, web_manager, "large.canvas", canvas_dir=canvas_dir)
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker

    # Then it is served whole, and the loop kept running while it was read and validated
    assert response.status_code == 200
    assert len(response.json()["nodes"]) == 20_000
    assert ticks > 10, ticks  # read on the loop, it would tick none


# -- access ---------------------------------------------------------------------------------------


async def test_the_reads_take_the_bearer_or_the_dashboard_cookie(
    make_app: AppFactory, web_manager: SessionManager, canvas_dir: Path
) -> None:
    sid = await web_manager.create_session(os.path.join("flows", "etl.canvas"), 2, nodes=[NodeSpec(node_id="a")])
    await web_manager._heartbeat(W1)
    paths = ["workers", f"sessions/{sid}/nodes/a", f"sessions/{sid}/canvas"]
    async with asgi_client(make_app(token=TOKEN, canvas_dir=canvas_dir)) as http:
        # Without credentials, or with wrong ones: 401 before anything is read
        for path in paths:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                response = await http.get(f"{BASE}/{path}", headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
        assert (await http.get(f"{BASE}/sessions/{uuid.uuid4()}/canvas")).status_code == 401
        # With the bearer token
        for path in paths:
            response = await http.get(f"{BASE}/{path}", headers={"Authorization": f"Bearer {TOKEN}"})
            assert response.status_code == 200, path
        # With the dashboard's cookie alone
        http.cookies.set(COOKIE_NAME, make_cookie_value(SecretStr(TOKEN), ttl_s=3600))
        for path in paths:
            assert (await http.get(f"{BASE}/{path}")).status_code == 200, path


async def test_openapi_describes_the_reads(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    paths = document["paths"]
    for path in ("/workers", "/sessions/{session_id}/nodes/{node_id}", "/sessions/{session_id}/canvas"):
        operation = paths[f"{BASE}{path}"]["get"]
        assert {"200", "422"} <= set(operation["responses"]), path
    schemas = document["components"]["schemas"]
    assert set(schemas["WorkerStatus"]["properties"]) == {
        "worker", "last_seen_at", "seen_s_ago", "alive", "running", "nodes"
    }  # fmt: skip
    assert set(schemas["CanvasLayout"]["properties"]) == {"nodes", "edges"}
    assert set(schemas["CanvasNodeView"]["properties"]) == {"id", "type", "x", "y", "width", "height", "label"}
