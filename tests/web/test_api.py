"""The JSON routes against the real ASGI app, on the in-memory and the Redis store: every route, every error code."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI

from tests.servers import free_port
from tests.web.conftest import TOKEN, AppFactory, asgi_client
from tracker import NodeError, SessionManager, SessionStatus, TrackerSettings
from tracker.manager import utc_now
from tracker.storage.redis import RedisStorageAdapter
from tracker.web import WebSettings, create_app, create_router

BASE = "/api/v1/parallel"


async def new_session(manager: SessionManager, node_count: int = 3, **kwargs: object) -> str:
    return await manager.create_session(canvas_path="batch.canvas", node_count=node_count, **kwargs)  # type: ignore[arg-type]


# -- status ---------------------------------------------------------------------------------


async def test_status_of_a_session(client: httpx.AsyncClient, web_manager: SessionManager) -> None:
    # Given a running session with one node done
    sid = await new_session(web_manager, 4, metadata={"owner": "ops"})
    await web_manager.add_node_result(sid, "n0", {"rows": 3})

    # When
    response = await client.get(f"{BASE}/status/{sid}")

    # Then
    assert response.status_code == 200
    body = response.json()
    assert body["task_id"] == sid
    assert body["status"] == "running"
    assert body["progress_percent"] == 25.0
    assert (body["completed_nodes"], body["failed_nodes"], body["node_count"]) == (1, 0, 4)
    assert body["pending_nodes"] == 3
    assert body["canvas_path"] == "batch.canvas"
    assert body["metadata"] == {"owner": "ops"}


async def test_status_counts_skipped_nodes(client: httpx.AsyncClient, web_manager: SessionManager) -> None:
    # Given a chain of 4: the first link failed, the two after it are skipped, the last is pending
    sid = await new_session(web_manager, 4)
    await web_manager.add_node_result(sid, "n0", status="failed", error=NodeError(type="ValueError", message="x"))
    for node_id in ("n1", "n2"):
        await web_manager._record_node(sid, node_id, "skipped", reason="skipped: node n0 failed")

    # When
    body = (await client.get(f"{BASE}/status/{sid}")).json()

    # Then skipped nodes have their own counter, count towards progress and are not pending
    assert (body["skipped_nodes"], body["failed_nodes"], body["pending_nodes"]) == (2, 1, 1)
    assert body["progress_percent"] == 75.0
    assert body["status"] == "running"
    listed = (await client.get(f"{BASE}/sessions")).json()["sessions"]
    assert next(s for s in listed if s["task_id"] == sid)["skipped_nodes"] == 2


PICKUP_HINT = (
    "no worker has picked up any node for {} s: is a worker running, "
    "with the tracker installed in its app (tracker.celery.install(app))?"
)


async def created_ago(manager: SessionManager, seconds: float) -> str:
    """A session created ``seconds`` ago by the manager's clock (set back to the real one after)."""
    then = datetime.now(UTC) - timedelta(seconds=seconds)
    manager.clock = lambda: then
    try:
        return await new_session(manager, 2)
    finally:
        manager.clock = utc_now


async def test_a_session_no_worker_picked_up_has_a_hint(make_app: AppFactory, web_manager: SessionManager) -> None:
    # Given a session pending for 45 s, one created now, one 45 s old whose first node runs
    stuck = await created_ago(web_manager, 45)
    young = await new_session(web_manager)
    started = await created_ago(web_manager, 45)
    await web_manager._record_node(started, "n0", "running")

    async with asgi_client(make_app()) as client:
        # When their status is read, one by one and in the listing
        bodies = {sid: (await client.get(f"{BASE}/status/{sid}")).json() for sid in (stuck, young, started)}
        listed = {s["task_id"]: s for s in (await client.get(f"{BASE}/sessions")).json()["sessions"]}

    # Then only the pending one older than TRACKER_PICKUP_HINT_AFTER_S (30 s) has the hint
    hint = bodies[stuck]["hint"]
    assert hint in {PICKUP_HINT.format(seconds) for seconds in range(45, 50)}, hint
    assert (bodies[young]["hint"], bodies[started]["hint"]) == (None, None)
    assert listed[stuck]["hint"] == hint
    assert (listed[young]["hint"], listed[started]["hint"]) == (None, None)
    # and the server's own setting decides when it shows
    settings = TrackerSettings(pickup_hint_after_s=60)
    async with asgi_client(create_app(web_manager, settings, None, web_settings=WebSettings())) as client:
        assert (await client.get(f"{BASE}/status/{stuck}")).json()["hint"] is None


async def test_status_accepts_any_uuid_spelling(client: httpx.AsyncClient, web_manager: SessionManager) -> None:
    sid = await new_session(web_manager)
    response = await client.get(f"{BASE}/status/{sid.upper().replace('-', '')}")
    assert response.status_code == 200
    assert response.json()["task_id"] == sid


async def test_status_of_an_unknown_session_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get(f"{BASE}/status/{uuid.uuid4()}")
    assert response.status_code == 404
    assert "not found" in response.json()["detail"]


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "1234", "g" * 36, "%00"])
async def test_malformed_ids_are_422(client: httpx.AsyncClient, bad_id: str) -> None:
    for path in (f"status/{bad_id}", f"sessions/{bad_id}/nodes", f"sessions/{bad_id}/events"):
        response = await client.get(f"{BASE}/{path}")
        assert response.status_code == 422, path
        assert response.json()["detail"]


# -- sessions list --------------------------------------------------------------------------


async def test_sessions_are_paged_without_loss_or_repeat(
    client: httpx.AsyncClient, web_manager: SessionManager
) -> None:
    created = {await new_session(web_manager) for _ in range(7)}
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        params: dict[str, str | int] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        response = await client.get(f"{BASE}/sessions", params=params)
        assert response.status_code == 200
        page = response.json()
        assert len(page["sessions"]) <= 3
        seen += [s["task_id"] for s in page["sessions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(created)


async def test_sessions_filter_by_status(client: httpx.AsyncClient, web_manager: SessionManager) -> None:
    pending = await new_session(web_manager)
    running = await new_session(web_manager)
    await web_manager.update_status(running, SessionStatus.RUNNING)

    response = await client.get(f"{BASE}/sessions", params={"status": "running", "limit": 1000})

    assert response.status_code == 200
    ids = [s["task_id"] for s in response.json()["sessions"]]
    assert running in ids
    assert pending not in ids
    assert all(s["status"] == "running" for s in response.json()["sessions"])


async def test_sessions_filter_by_tag_and_canvas_path_prefix(
    client: httpx.AsyncClient, web_manager: SessionManager
) -> None:
    etl = await web_manager.create_session("pipelines/etl.canvas", 1, tags=["nightly", "customer:42"])
    report = await web_manager.create_session("pipelines/report.canvas", 1, tags=["customer:42"])
    await web_manager.create_session("adhoc.canvas", 1)

    async def listed(**params: str) -> list[str]:
        response = await client.get(f"{BASE}/sessions", params=params)
        assert response.status_code == 200, response.text
        return sorted(s["task_id"] for s in response.json()["sessions"])

    assert await listed(tag="customer:42") == sorted([etl, report])
    assert await listed(tag="nightly") == [etl]
    assert await listed(path="pipelines/") == sorted([etl, report])
    assert await listed(path="pipelines/report.canvas") == [report]
    assert await listed(path="pipelines/r") == [report]
    assert await listed(tag="nightly", path="pipelines/report.canvas") == []
    shown = (await client.get(f"{BASE}/status/{etl}")).json()
    assert (shown["tags"], shown["rate_per_s"], shown["eta_s"]) == (["nightly", "customer:42"], None, None)


@pytest.mark.parametrize(
    "params",
    [
        {"status": "done"},
        {"limit": 0},
        {"limit": 1001},
        {"limit": "x"},
        {"cursor": "not-a-cursor"},
        {"tag": "has space"},
        {"tag": "x" * 65},
        {"path": ""},
    ],
)
async def test_sessions_bad_query_is_422(client: httpx.AsyncClient, params: dict[str, object]) -> None:
    response = await client.get(f"{BASE}/sessions", params=params)  # type: ignore[arg-type]
    assert response.status_code == 422
    assert response.json()["detail"]


# -- nodes ----------------------------------------------------------------------------------


async def test_nodes_are_paged_and_filtered(client: httpx.AsyncClient, web_manager: SessionManager) -> None:
    # Given 5 nodes: 3 completed, 2 failed with an error
    sid = await new_session(web_manager, 5)
    for i in range(3):
        await web_manager.add_node_result(sid, f"ok{i}", i)
    for i in range(2):
        await web_manager.add_node_result(
            sid, f"bad{i}", status="failed", error=NodeError(type="ValueError", message=f"boom {i}")
        )

    # When paging through every node two at a time
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        params: dict[str, str | int] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(f"{BASE}/sessions/{sid}/nodes", params=params)).json()
        seen += [n["node_id"] for n in page["nodes"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break

    # Then every node comes once; the filter keeps only failed ones, with their errors
    assert sorted(seen) == ["bad0", "bad1", "ok0", "ok1", "ok2"]
    failed = (await client.get(f"{BASE}/sessions/{sid}/nodes", params={"status": "failed"})).json()["nodes"]
    assert sorted(n["node_id"] for n in failed) == ["bad0", "bad1"]
    assert {n["error"]["type"] for n in failed} == {"ValueError"}
    assert sorted(n["error"]["message"] for n in failed) == ["boom 0", "boom 1"]


async def test_nodes_filter_skipped(client: httpx.AsyncClient, web_manager: SessionManager) -> None:
    sid = await new_session(web_manager, 3)
    await web_manager.add_node_result(sid, "n0", status="failed", error=NodeError(type="ValueError", message="x"))
    await web_manager._record_node(sid, "n1", "skipped", reason="skipped: node n0 failed")

    response = await client.get(f"{BASE}/sessions/{sid}/nodes", params={"status": "skipped"})

    assert response.status_code == 200
    nodes = response.json()["nodes"]
    assert [(n["node_id"], n["status"], n["reason"]) for n in nodes] == [("n1", "skipped", "skipped: node n0 failed")]


async def test_nodes_errors(client: httpx.AsyncClient, web_manager: SessionManager) -> None:
    assert (await client.get(f"{BASE}/sessions/{uuid.uuid4()}/nodes")).status_code == 404
    sid = await new_session(web_manager)
    assert (await client.get(f"{BASE}/sessions/{sid}/nodes", params={"status": "exploded"})).status_code == 422
    assert (await client.get(f"{BASE}/sessions/{sid}/nodes", params={"limit": 5000})).status_code == 422


# -- store outage ---------------------------------------------------------------------------


async def test_store_outage_is_503_not_a_traceback() -> None:
    # Given an app on a Redis nobody listens to
    settings = TrackerSettings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_retries=0, redis_socket_timeout_s=0.5
    )
    manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
    async with asgi_client(create_app(manager)) as http:
        # When / Then
        for path in (f"status/{uuid.uuid4()}", "sessions", f"sessions/{uuid.uuid4()}/nodes"):
            response = await http.get(f"{BASE}/{path}")
            assert response.status_code == 503, path
            assert "unreachable" in response.json()["detail"]
            assert response.headers["retry-after"] == "5"
    await manager.cleanup()


# -- auth -----------------------------------------------------------------------------------


async def test_without_a_token_reads_are_open_and_mutations_are_403(
    client: httpx.AsyncClient, web_manager: SessionManager
) -> None:
    sid = await new_session(web_manager)
    assert (await client.get(f"{BASE}/status/{sid}")).status_code == 200
    for action in ("cancel", "resume"):
        response = await client.post(f"{BASE}/sessions/{sid}/{action}", headers={"Authorization": "Bearer anything"})
        assert response.status_code == 403
        assert "TRACKER_API_TOKEN" in response.json()["detail"]
    assert (await client.post("/dashboard/login", json={"token": "x"})).status_code == 403
    assert (await web_manager.get_session(sid)).status is SessionStatus.PENDING


async def test_with_a_token_every_route_needs_the_bearer(make_app: AppFactory, web_manager: SessionManager) -> None:
    sid = await new_session(web_manager)
    routes = [
        ("GET", f"status/{sid}"),
        ("GET", "sessions"),
        ("GET", f"sessions/{sid}/nodes"),
        ("GET", f"sessions/{sid}/events"),
        ("POST", f"sessions/{sid}/cancel"),
        ("POST", f"sessions/{sid}/resume"),
    ]
    async with asgi_client(make_app(token=TOKEN)) as http:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
                response = await http.request(method, f"{BASE}/{path}", headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await http.get(f"{BASE}/status/{sid}", headers=auth)).status_code == 200
        assert (await http.get(f"{BASE}/sessions", headers=auth)).status_code == 200
        # Auth comes before validation: nothing is revealed to a caller without the token.
        assert (await http.get(f"{BASE}/status/nope")).status_code in (401, 422)


async def test_dashboard_cookie_reads_but_never_mutates(make_app: AppFactory, web_manager: SessionManager) -> None:
    sid = await new_session(web_manager)
    async with asgi_client(make_app(token=TOKEN)) as http:
        # A wrong token gets no cookie
        wrong = await http.post("/dashboard/login", json={"token": "nope"})
        assert wrong.status_code == 401
        assert "set-cookie" not in wrong.headers
        body = '{"token": "' + TOKEN + '\\ud800"}'  # JSON text holding a lone surrogate once decoded
        undecodable = await http.post("/dashboard/login", content=body, headers={"Content-Type": "application/json"})
        assert (undecodable.status_code, "set-cookie" in undecodable.headers) == (401, False)

        # The right one gets an HttpOnly, SameSite=Strict cookie that is not the token
        login = await http.post("/dashboard/login", json={"token": TOKEN})
        assert login.status_code == 204
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        assert TOKEN not in cookie

        # Reads pass with the cookie alone; mutations do not
        assert (await http.get(f"{BASE}/status/{sid}")).status_code == 200
        assert (await http.post(f"{BASE}/sessions/{sid}/cancel")).status_code == 401

        # Logout forgets it
        assert (await http.post("/dashboard/logout")).status_code == 204
        assert (await http.get(f"{BASE}/status/{sid}")).status_code == 401


async def test_forged_or_expired_cookies_are_refused(make_app: AppFactory, web_manager: SessionManager) -> None:
    from pydantic import SecretStr

    from tracker.web.auth import COOKIE_NAME, make_cookie_value

    sid = await new_session(web_manager)
    expired = make_cookie_value(SecretStr(TOKEN), ttl_s=60, now_s=0)
    other_key = make_cookie_value(SecretStr("another-token"), ttl_s=3600)
    valid = make_cookie_value(SecretStr(TOKEN), ttl_s=3600)
    tampered = str(int(valid.split(".")[0]) + 1000) + "." + valid.split(".")[1]
    async with asgi_client(make_app(token=TOKEN)) as http:
        for value in (expired, other_key, tampered, "garbage", TOKEN):
            http.cookies.set(COOKIE_NAME, value)
            assert (await http.get(f"{BASE}/status/{sid}")).status_code == 401, value
        http.cookies.set(COOKIE_NAME, valid)
        assert (await http.get(f"{BASE}/status/{sid}")).status_code == 200


# -- CORS, OpenAPI, mounting ----------------------------------------------------------------


async def test_cors_is_off_by_default_and_configurable(make_app: AppFactory) -> None:
    preflight = {"Origin": "https://ops.example", "Access-Control-Request-Method": "GET"}
    async with asgi_client(make_app()) as http:
        response = await http.options(f"{BASE}/sessions", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    async with asgi_client(make_app(cors_origins=["https://ops.example"])) as http:
        response = await http.options(f"{BASE}/sessions", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://ops.example"
        other = await http.options(f"{BASE}/sessions", headers={**preflight, "Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"


async def test_openapi_names_parallel_task_status_with_the_seed_enum(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    status = schemas["ParallelTaskStatus"]["properties"]["status"]
    enum = schemas[status["$ref"].rsplit("/", 1)[1]]["enum"]
    assert enum == ["pending", "running", "completed", "partial_failure", "failed", "cancelled"]
    get_status = doc["paths"]["/api/v1/parallel/status/{task_id}"]["get"]
    assert get_status["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ParallelTaskStatus"
    }
    assert {"401", "404", "422", "503"} <= set(get_status["responses"])
    assert (
        "text/event-stream"
        in doc["paths"]["/api/v1/parallel/sessions/{session_id}/events"]["get"]["responses"]["200"]["content"]
    )


async def test_openapi_knows_skipped_nodes(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    assert schemas["ParallelTaskStatus"]["properties"]["skipped_nodes"]["type"] == "integer"
    assert "skipped" in schemas["NodeStatus"]["enum"]
    assert schemas["NodeResult"]["properties"]["status"]["$ref"] == "#/components/schemas/NodeStatus"
    nodes = doc["paths"]["/api/v1/parallel/sessions/{session_id}/nodes"]["get"]
    status = next(p for p in nodes["parameters"] if p["name"] == "status")
    assert {"$ref": "#/components/schemas/NodeStatus"} in status["schema"]["anyOf"]


async def test_openapi_knows_retrying_nodes_and_the_hint(client: httpx.AsyncClient) -> None:
    properties = (await client.get("/openapi.json")).json()["components"]["schemas"]["ParallelTaskStatus"]["properties"]
    assert properties["retrying_nodes"]["type"] == "integer"
    assert {"type": "string"} in properties["hint"]["anyOf"] and {"type": "null"} in properties["hint"]["anyOf"]


async def test_openapi_describes_every_field_of_the_status_and_requires_them(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["ParallelTaskStatus"]
    # Every field an answer carries is required, the seed's first among them, and each says what it is
    assert {"task_id", "status", "progress_percent", "completed_nodes", "failed_nodes"} <= set(schema["required"])
    assert set(schema["required"]) == set(schema["properties"])
    undescribed = [name for name, field in schema["properties"].items() if not field.get("description")]
    assert undescribed == []
    assert schema["properties"]["completed_nodes"]["description"] == "Nodes whose latest result is ``completed``."


async def test_router_mounted_in_a_users_app_maps_errors_itself(web_manager: SessionManager) -> None:
    # Given the router in someone else's app, under a prefix, with no exception handlers of ours
    app = FastAPI()
    app.include_router(create_router(web_manager, TrackerSettings()), prefix="/tracker")
    sid = await new_session(web_manager)
    async with asgi_client(app) as http:
        assert (await http.get(f"/tracker{BASE}/status/{sid}")).status_code == 200
        missing = await http.get(f"/tracker{BASE}/status/{uuid.uuid4()}")
        assert missing.status_code == 404
        assert missing.json()["detail"].startswith("session")
        bad_cursor = await http.get(f"/tracker{BASE}/sessions", params={"cursor": "x"})
        assert bad_cursor.status_code == 422


# -- dashboard files ------------------------------------------------------------------------


async def test_dashboard_page_and_files(make_app: AppFactory) -> None:
    async with asgi_client(make_app(token=TOKEN)) as http:
        page = await http.get("/dashboard")  # public shell: no data in it, so no token needed
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "dashboard/static/dashboard.js" in page.text
        js = await http.get("/dashboard/static/dashboard.js")
        assert js.status_code == 200
        assert js.headers["content-type"].startswith("text/javascript")
        assert "innerHTML" not in js.text  # every value is written as text
        assert (await http.get("/dashboard/static/dashboard.css")).status_code == 200
        for name in ("index.html", "../api.py", "..%2Fapi.py", "nothing.js"):
            assert (await http.get(f"/dashboard/static/{name}")).status_code == 404, name


async def test_dashboard_can_be_left_out(make_app: AppFactory) -> None:
    async with asgi_client(make_app(dashboard=False)) as http:
        assert (await http.get("/dashboard")).status_code == 404
