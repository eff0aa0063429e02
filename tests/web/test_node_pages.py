"""Listing a session's nodes by status over HTTP: full pages, the cursor going on from the last."""

from __future__ import annotations

import httpx

from tests.web.sse import parse_all
from tracker import NodeSpec, SessionManager
from tracker.storage.base import ChildLink

BASE = "/api/v1/parallel"


async def test_pages_of_failed_nodes_are_full_among_many_others(
    client: httpx.AsyncClient, web_manager: SessionManager
) -> None:
    # Given 300 nodes of which 8, spread out, failed and the rest completed
    ids = [f"n{i:03d}" for i in range(300)]
    sid = await web_manager.create_session("pages.canvas", 300, nodes=[NodeSpec(node_id=n) for n in ids])
    failed = ids[7::37][:8]
    for n in ids:
        await web_manager._record_node(sid, n, "failed" if n in failed else "completed")

    # When a client collects them two at a time
    pages, cursor = [], None
    while True:
        params = {"status": "failed", "limit": 2} | ({"cursor": cursor} if cursor else {})
        response = await client.get(f"{BASE}/sessions/{sid}/nodes", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append([node["node_id"] for node in body["nodes"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break

    # Then four requests brought two failed nodes each, in node id order
    assert pages == [sorted(failed)[i : i + 2] for i in range(0, 8, 2)]
    # and a cursor no page handed out is a 422
    bad = await client.get(f"{BASE}/sessions/{sid}/nodes", params={"status": "failed", "cursor": "no such!"})
    assert bad.status_code == 422


async def test_a_running_nodes_reported_progress_shows_in_its_node_the_status_and_the_stream(
    client: httpx.AsyncClient, web_manager: SessionManager
) -> None:
    # Given 2 nodes running, one of which reported a quarter of its work
    sid = await web_manager.create_session("long.canvas", 2, nodes=[NodeSpec(node_id=n) for n in ("a", "b")])
    for node_id in ("a", "b"):
        await web_manager._record_node(sid, node_id, "running", task_id=f"t-{node_id}", attempt=1)
    report = web_manager.operations.node_event(sid, "a", "running", task_id="t-a", attempt=1, progress=0.25)
    await web_manager._record_nodes(sid, [report])

    # Then the node, the status and the session's event stream say so
    nodes = (await client.get(f"{BASE}/sessions/{sid}/nodes", params={"status": "running"})).json()["nodes"]
    assert {node["node_id"]: node["progress"] for node in nodes} == {"a": 0.25, "b": None}
    assert (await client.get(f"{BASE}/status/{sid}")).json()["progress_percent"] == 12.5
    # (read once the session ended: a stream of a running session does not end, and this transport
    # hands over whole responses)
    for node_id in ("a", "b"):
        await web_manager.add_node_result(sid, node_id, 1)
    stream = await client.get(f"{BASE}/sessions/{sid}/events", headers={"Last-Event-ID": "0-1"})
    changes = [(m.event, m.data["node_id"], m.data["node_status"], m.data["progress_percent"])
               for m in parse_all(stream.text) if m.data.get("node_id")]  # fmt: skip
    assert changes[2:] == [
        ("progress", "a", "running", 12.5),  # not a node event: the dashboard counts running nodes from those
        ("node", "a", "completed", 50.0),
        ("node", "b", "completed", 100.0),
    ]


async def test_a_sessions_children_and_a_childs_parent_are_shown(
    client: httpx.AsyncClient, web_manager: SessionManager
) -> None:
    # Given a parent whose node p opened a child session
    sid = await web_manager.create_session("p.canvas", 1, nodes=[NodeSpec(node_id="p")])
    await web_manager._record_node(sid, "p", "running", task_id="t-p", attempt=1)
    child = "5d2f8a2e-7c1b-4d0e-9a57-3f4b6c8e1d20"
    await web_manager._record_nodes(sid, [web_manager.operations.child_event(sid, "p", ChildLink(child))])
    await web_manager.create_session("c.canvas", 1, session_id=child, parent=(sid, "p"))

    # Then the parent lists it, and both statuses say how they are linked
    listed = await client.get(f"{BASE}/sessions/{sid}/children")
    assert listed.status_code == 200
    assert listed.json() == [
        {"session_id": child, "node_id": "p", "attempt": 1, "child_failure": "fail", "status": "open"}
    ]
    parent_status = (await client.get(f"{BASE}/status/{sid}")).json()
    assert (parent_status["children"], parent_status["children_open"]) == (1, 1)
    child_status = (await client.get(f"{BASE}/status/{child}")).json()
    assert (child_status["parent_session_id"], child_status["parent_node_id"]) == (sid, "p")
    missing = await client.get(f"{BASE}/sessions/0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e/children")
    assert missing.status_code == 404
