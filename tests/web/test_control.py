"""Cancel and resume over HTTP, through tracker.celery, on an in-memory broker (no worker needed:
the tasks only have to be published and revoked)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import celery._state
import pytest
from celery import Celery, chain, group

from tests.servers import free_port
from tests.web.conftest import TOKEN, AppFactory, asgi_client
from tracker import NodeStatus, SessionManager, SessionStatus
from tracker.celery import dispatch, install, uninstall

BASE = "/api/v1/parallel"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


#: An app a module holds, as a project's is: the web app imports it by the path its sessions
#: record. Its broker (the tests' Redis) is set by the test that uses it.
project_app = Celery("web-project", set_as_current=False)
project_app.conf.update(task_serializer="json", accept_content=["json"], result_backend=None)


@pytest.fixture
def celery_app() -> Iterator[Celery]:
    app = Celery("web-tests", broker="memory://", set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_backend=None)

    @app.task(name="tests.web.add", shared=False)  # type: ignore[untyped-decorator]
    def add(x: int, y: int) -> int:
        return x + y

    install(app, beat=False)
    yield app
    uninstall(app)
    app.close()


def dispatch_batch(celery_app: Celery, manager: SessionManager, size: int = 3) -> str:
    add = celery_app.tasks["tests.web.add"]
    return dispatch(
        group(add.s(i, i) for i in range(size)),
        canvas_path="batch.canvas",
        node_ids=[f"n{i}" for i in range(size)],
        manager=manager,
        app=celery_app,
    )


async def test_cancel_then_resume(make_app: AppFactory, web_manager: SessionManager, celery_app: Celery) -> None:
    # Given a dispatched batch of 3 whose first node finished
    sid = dispatch_batch(celery_app, web_manager)
    await web_manager.add_node_result(sid, "n0", 0)
    async with asgi_client(make_app(token=TOKEN, celery_app=celery_app)) as http:
        # When it is cancelled
        cancelled = await http.post(f"{BASE}/sessions/{sid}/cancel", headers=AUTH)

        # Then the session and its unfinished nodes are cancelled
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["task_id"] == sid
        nodes = (await http.get(f"{BASE}/sessions/{sid}/nodes", headers=AUTH)).json()["nodes"]
        assert {n["node_id"]: n["status"] for n in nodes} == {"n0": "completed", "n1": "cancelled", "n2": "cancelled"}

        # When it is resumed, only the two unfinished nodes are sent again
        resumed = await http.post(f"{BASE}/sessions/{sid}/resume", headers=AUTH)
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["resent_nodes"] == 2
        assert resumed.json()["session"]["status"] == "running"
    pending = await web_manager.get_nodes(sid, NodeStatus.PENDING)
    assert sorted(n.node_id for n in pending.nodes) == ["n1", "n2"]


async def test_cancel_and_resume_errors(make_app: AppFactory, web_manager: SessionManager, celery_app: Celery) -> None:
    completed = dispatch_batch(celery_app, web_manager, 1)
    await web_manager.add_node_result(completed, "n0", 0)
    async with asgi_client(make_app(token=TOKEN, celery_app=celery_app)) as http:
        for action in ("cancel", "resume"):
            # An ended, completed session can be neither cancelled nor resumed
            conflict = await http.post(f"{BASE}/sessions/{completed}/{action}", headers=AUTH)
            assert conflict.status_code == 409, action
            assert "completed" in conflict.json()["detail"]
            assert (await http.post(f"{BASE}/sessions/{uuid.uuid4()}/{action}", headers=AUTH)).status_code == 404
            assert (await http.post(f"{BASE}/sessions/not-a-uuid/{action}", headers=AUTH)).status_code == 422
            assert (await http.post(f"{BASE}/sessions/{completed}/{action}")).status_code == 401
    assert (await web_manager.get_session(completed)).status is SessionStatus.COMPLETED


async def test_resume_keeps_the_structure_and_refuses_what_it_cannot_build(
    make_app: AppFactory, web_manager: SessionManager, celery_app: Celery
) -> None:
    add = celery_app.tasks["tests.web.add"]
    ids = ["a", "b", "c"]
    kept = dispatch(chain(add.s(1, 1), add.s(1), add.s(2)), canvas_path="c", node_ids=ids, manager=web_manager,
                    app=celery_app)  # fmt: skip
    await web_manager._record_node(kept, "a", "completed", result=2)
    await web_manager._record_node(kept, "b", "failed")
    lost = dispatch(chain(add.s(1, 1), add.s(1), add.s(2)), canvas_path="c", node_ids=ids, manager=web_manager,
                    app=celery_app)  # fmt: skip
    await web_manager._record_node(lost, "a", "completed", reason="result not stored: too large")
    await web_manager._record_node(lost, "b", "failed")
    before = await web_manager.get_session_status(lost)
    async with asgi_client(make_app(token=TOKEN, celery_app=celery_app)) as http:
        refused = await http.post(f"{BASE}/sessions/{lost}/resume", headers=AUTH)
        resumed = await http.post(f"{BASE}/sessions/{kept}/resume", headers=AUTH)
    assert refused.status_code == 409
    assert "cannot be resumed: the result of node a" in refused.json()["detail"]
    assert refused.json()["detail"].endswith("is not stored: dispatch the batch again")  # with what to do
    assert await web_manager.get_session_status(lost) == before
    # b and the c it skipped are sent again, after a's stored result
    assert resumed.status_code == 200
    assert resumed.json()["resent_nodes"] == 2
    nodes = {n.node_id: n.status for n in (await web_manager.get_nodes(kept)).nodes}
    assert nodes == {"a": NodeStatus.COMPLETED, "b": NodeStatus.PENDING, "c": NodeStatus.PENDING}


async def test_an_unreachable_broker_is_503(make_app: AppFactory, web_manager: SessionManager) -> None:
    # Given a session dispatched through a broker nobody listens to (its send failed: it is failed)
    dead = Celery("dead-broker", broker=f"redis://127.0.0.1:{free_port()}/0", set_as_current=False)
    dead.conf.update(task_publish_retry=False, broker_transport_options={"max_retries": 0})
    install(dead, beat=False)
    with pytest.raises(Exception, match=r"(?i)connect|refused"):
        dispatch(group(dead.signature("t.x"), dead.signature("t.y")), canvas_path="dead.canvas", manager=web_manager)
    (session,) = (await web_manager.list_sessions()).sessions
    assert session.status is SessionStatus.FAILED

    # When it is resumed over HTTP through that same app, still unreachable
    async with asgi_client(make_app(token=TOKEN, celery_app=dead)) as http:
        response = await http.post(f"{BASE}/sessions/{session.session_id}/resume", headers=AUTH)

    # Then the answer says the broker is unavailable
    assert response.status_code == 503
    assert "broker" in response.json()["detail"]
    uninstall(dead)
    dead.close()


async def test_cancel_through_another_broker_is_refused_and_changes_nothing(
    make_app: AppFactory, web_manager: SessionManager, celery_app: Celery
) -> None:
    # Given a session dispatched through one broker, and a web app whose Celery app has another
    sid = dispatch_batch(celery_app, web_manager, 2)
    other = Celery("other-broker", broker=f"redis://127.0.0.1:{free_port()}/0", set_as_current=False)

    # When it is cancelled and resumed over HTTP
    async with asgi_client(make_app(token=TOKEN, celery_app=other)) as http:
        cancel = await http.post(f"{BASE}/sessions/{sid}/cancel", headers=AUTH)
        resume = await http.post(f"{BASE}/sessions/{sid}/resume", headers=AUTH)

    # Then both are refused (409), naming the broker the app uses, and nothing changed
    for response in (cancel, resume):
        assert response.status_code == 409
        assert "through another broker" in response.json()["detail"]
        assert f"redis://localhost:{other.conf.broker_url.rsplit(':', 1)[1].split('/')[0]}" in response.json()["detail"]
    status = await web_manager.get_session_status(sid)
    assert (status["status"], status["cancelled_nodes"]) == ("pending", 0)
    other.close()


async def test_without_an_app_the_web_app_cancels_through_the_one_that_dispatched_the_session(
    make_app: AppFactory, web_manager: SessionManager, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a session dispatched by an app a module holds, and Celery's current app on another broker
    monkeypatch.setitem(project_app.conf, "broker_url", redis_url)
    elsewhere = Celery("elsewhere", broker="memory://", set_as_current=False)
    monkeypatch.setattr(celery._state, "default_app", elsewhere)
    monkeypatch.setattr(celery._state._tls, "current_app", elsewhere)
    install(project_app, beat=False)
    try:
        sid = dispatch(group(project_app.signature("t.x") for _ in range(2)), canvas_path="p.canvas",
                       manager=web_manager)  # fmt: skip
    finally:
        uninstall(project_app)
    assert (await web_manager.get_session(sid)).metadata["dispatched_by"]["app"] == f"{__name__}:project_app"

    # When the web app, given no Celery app, cancels it
    async with asgi_client(make_app(token=TOKEN)) as http:
        response = await http.post(f"{BASE}/sessions/{sid}/cancel", headers=AUTH)

    # Then it went through the app that dispatched it (Celery's current app has another broker)
    assert response.status_code == 200, response.text
    assert (await web_manager.get_session_status(sid))["status"] == "cancelled"


async def test_failures_by_cause_and_a_resume_of_one_cause_or_chosen_nodes(
    make_app: AppFactory, web_manager: SessionManager, celery_app: Celery
) -> None:
    # Given a batch of 4: two nodes timed out, one raised ValueError, one completed
    sid = dispatch_batch(celery_app, web_manager, 4)
    await web_manager.add_node_result(sid, "n0", None, status="failed", error=TimeoutError("slow 1"))
    await web_manager.add_node_result(sid, "n1", None, status="failed", error=TimeoutError("slow 2"))
    await web_manager.add_node_result(sid, "n2", None, status="failed", error=ValueError("bad"))
    await web_manager.add_node_result(sid, "n3", 6)
    async with asgi_client(make_app(token=TOKEN, celery_app=celery_app)) as http:
        # Then its failures come by cause, most first
        found = await http.get(f"{BASE}/sessions/{sid}/failures", headers=AUTH)
        assert found.status_code == 200, found.text
        assert [(g["error_type"], g["count"], g["first_message"], g["node_ids"]) for g in found.json()] == [
            ("TimeoutError", 2, "slow 1", ["n0", "n1"]),
            ("ValueError", 1, "bad", ["n2"]),
        ]
        status = (await http.get(f"{BASE}/status/{sid}", headers=AUTH)).json()
        assert (status["failure_types"], status["eta_s"]) == (2, 0.0)
        assert (await http.get(f"{BASE}/sessions/{uuid.uuid4()}/failures", headers=AUTH)).status_code == 404

        # Bad subsets are refused (409: not with this session; 422: malformed) and change nothing
        for query in ("node=nope", "node=n3", "error_type=KeyError", "node=n3&error_type=TimeoutError"):
            refused = await http.post(f"{BASE}/sessions/{sid}/resume?{query}", headers=AUTH)
            assert refused.status_code == 409, (query, refused.text)
            assert "cannot be resumed" in refused.json()["detail"]
        for query in ("node=", "node=has%20space", "error_type="):
            malformed = await http.post(f"{BASE}/sessions/{sid}/resume?{query}", headers=AUTH)
            assert malformed.status_code == 422, (query, malformed.text)
        assert (await web_manager.get_session(sid)).run == 1

        # When only the timeouts are resumed, only they are sent again
        resumed = await http.post(f"{BASE}/sessions/{sid}/resume?error_type=TimeoutError", headers=AUTH)
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["resent_nodes"] == 2
    pending = await web_manager.get_nodes(sid, NodeStatus.PENDING)
    assert sorted(n.node_id for n in pending.nodes) == ["n0", "n1"]
    assert [g.error_type for g in await web_manager.get_failures(sid)] == ["ValueError"]

    # And chosen nodes of another session, with `node`, and with a cause too
    other = dispatch_batch(celery_app, web_manager, 3)
    await web_manager.add_node_result(other, "n0", None, status="failed", error=ValueError("x"))
    await web_manager.add_node_result(other, "n1", None, status="failed", error=ValueError("y"))
    await web_manager.add_node_result(other, "n2", None, status="failed", error=KeyError("z"))
    async with asgi_client(make_app(token=TOKEN, celery_app=celery_app)) as http:
        resumed = await http.post(f"{BASE}/sessions/{other}/resume?node=n1", headers=AUTH)
        assert resumed.json()["resent_nodes"] == 1
        assert [n.node_id for n in (await web_manager.get_nodes(other, NodeStatus.PENDING)).nodes] == ["n1"]
        await web_manager.add_node_result(other, "n1", None, status="failed", error=ValueError("y"))
        both = await http.post(f"{BASE}/sessions/{other}/resume?node=n0&error_type=KeyError", headers=AUTH)
        assert both.json()["resent_nodes"] == 2
    assert [n.node_id for n in (await web_manager.get_nodes(other, NodeStatus.PENDING)).nodes] == ["n0", "n2"]
