"""Listing a session's nodes by status over HTTP: full pages, the cursor going on from the last."""

from __future__ import annotations

import httpx

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
