"""Listing a session's nodes by status over HTTP: full pages, the cursor going on from the last."""

from __future__ import annotations

import httpx

from tests.web.sse import parse_all
from tracker import NodeSpec, SessionManager

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
