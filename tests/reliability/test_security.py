"""Scenario 8, security: pickle refused, ids checked before Redis, caps hold, token everywhere, no secret in logs."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import group
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from tests.reliability import appmod
from tests.reliability.conftest import MakeWorker, StartRedis
from tests.reliability.helpers import TERMINAL, all_nodes, command_calls, redis_dump, text, wait_for
from tests.web.conftest import serve_in_thread
from tracker import (
    NodeError,
    SessionManager,
    TrackerSettings,
    TrackerValidationError,
)
from tracker.celery import dispatch
from tracker.storage.redis import RedisStorageAdapter
from tracker.web import WebSettings, create_app

TOKEN = f"tok-{uuid.uuid4().hex}"
API = "/api/v1/parallel"

#: Ids that must never reach Redis: key-pattern and hash-tag characters, separators, control
#: characters, non-ASCII and a 10 KB id.
BAD_IDS = ["*", "a*b", "{x}", "{", "}", "a:b", "line\nbreak", "\r", "é", "日本", "\u202e", "x" * 10240, "", " "]


def redis_manager(url: str, key_prefix: str, **options: Any) -> SessionManager:
    settings = TrackerSettings(redis_url=url, key_prefix=key_prefix, **options)
    return SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)


class Unpickled:
    """Unpickling this creates ``path``: proof that someone deserialised a pickle."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_a_pickled_celery_message_is_refused_and_never_runs(
    make_worker: MakeWorker, redis_url: str, rel_queue: str, tmp_path: Path
) -> None:
    # Given a worker (accept_content=["json"]) consuming this test's queue
    worker = make_worker(redis_url)
    worker.wait_ready()
    unpickled, ran, after = tmp_path / "unpickled", tmp_path / "ran", tmp_path / "after"

    # When two pickled messages reach its queue (one whose unpickling creates a file), then a JSON one
    appmod.app.send_task("rel.mark", args=[Unpickled(unpickled)], queue=rel_queue, serializer="pickle")
    appmod.app.send_task("rel.mark", args=[str(ran)], queue=rel_queue, serializer="pickle")
    appmod.app.send_task("rel.mark", args=[str(after)], queue=rel_queue)

    # Then the JSON one runs, the pickled ones were refused unread: nothing was unpickled, nothing ran
    wait_for(after.exists, 60, "the JSON message to run")
    wait_for(lambda: worker.output.count("untrusted content of type pickle") >= 2, 30, "two refusals in the log")
    assert not unpickled.exists()
    assert not ran.exists()
    # and the configuration the project ships for its workers is as strict as this test app's
    from workers import config

    assert config.accept_content == config.result_accept_content == ["json"]
    assert config.task_serializer == config.result_serializer == config.event_serializer == "json"


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_ids_with_key_characters_are_refused_before_any_redis_command(
    start_redis: StartRedis, key_prefix: str, flavour: str
) -> None:
    # Given a manager on a redis-server of this test's own, and that server's command counters at zero
    server = start_redis()
    manager = redis_manager(server.url, key_prefix)
    observer = redis.Redis(port=server.port)
    observer.config_resetstat()
    good = str(uuid.uuid4())

    def calls(bad: str) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
        made = [
            ("get_session_status", (bad,), {}),
            ("add_node_result", (bad, "n", 1), {}),
            ("create_session", ("c.canvas", 1), {"session_id": bad}),
            ("update_status", (bad, "running"), {}),
            ("update_progress", (bad, 5), {}),
            ("get_nodes", (bad,), {}),
            ("read_events", (bad,), {}),
            ("read_events", (good,), {"after": bad}),
            ("_reopen_session", (bad,), {}),
            ("delete_session", (bad,), {}),
            ("is_session_expired", (bad,), {}),
        ]
        if bad != "a:b":
            # ':' is fine in a node id (a field, never part of a key) and in a worker process id
            # ("<host>:<pid>", part of a key but under a fixed prefix); every other bad id is refused.
            made += [
                ("add_node_result", (good, bad, 1), {}),
                ("_record_node", (good, bad, "running"), {}),
                ("_heartbeat", (bad,), {}),
            ]
        return made

    def call(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if flavour == "sync":
            return getattr(manager.sync, method)(*args, **kwargs)
        return loop.run_until_complete(getattr(manager, method)(*args, **kwargs))

    # When every call that takes an id gets each bad id
    refused = 0
    loop = asyncio.new_event_loop()
    try:
        for bad in BAD_IDS:
            for method, args, kwargs in calls(bad):
                with pytest.raises(TrackerValidationError):
                    call(method, args, kwargs)
                refused += 1
    finally:
        loop.close()

    # Then each was refused, and the server received no command at all from the manager
    assert refused == sum(len(calls(bad)) for bad in BAD_IDS)
    calls_seen = command_calls(observer)
    assert set(calls_seen) <= {"config|resetstat", "info"}, calls_seen
    observer.close()
    manager.storage.close()


def test_node_ids_are_fields_never_keys(start_redis: StartRedis, key_prefix: str) -> None:
    """``:`` and ``@`` are allowed in node ids (paths, ``host:port``): they never become part of a key."""
    server = start_redis()
    manager = redis_manager(server.url, key_prefix)
    sid = manager.sync.create_session("c.canvas", 2)
    manager.sync.add_node_result(sid, "stage:1/part@2", {"ok": 1})
    keys = {text(key) for key in redis.Redis(port=server.port).keys("*")}
    assert all("stage" not in key for key in keys)
    assert {k.rsplit(":", 1)[-1] for k in keys if sid in k} == {"session", "nodes", "events", "by_status"}
    manager.storage.close()


def test_the_size_caps_hold_and_a_refused_result_changes_nothing(start_redis: StartRedis, key_prefix: str) -> None:
    # Given a session, and the store as it is
    server = start_redis()
    manager = redis_manager(server.url, key_prefix, max_result_bytes=1024, max_error_chars=100)
    client = redis.Redis(port=server.port)
    sid = manager.sync.create_session("c.canvas", 3)
    before = redis_dump(client, key_prefix)

    # When results, metadata and labels over their caps are sent, Then each is refused and nothing changed
    for call in (
        lambda: manager.sync.add_node_result(sid, "a", "x" * 2000),
        lambda: manager.sync.add_node_result(sid, "a", {"k": ["é" * 600]}),  # 1200 bytes in UTF-8
        lambda: manager.sync.create_session("c.canvas", 1, metadata={"k": "x" * 17000}),
        lambda: manager.sync._record_node(sid, "a", "running", task_id="t" * 256),
        lambda: manager.sync.create_session("c" * 1025, 1),
    ):
        with pytest.raises(TrackerValidationError):
            call()
    assert redis_dump(client, key_prefix) == before

    # When an error and a reason are far over their cap, Then they are cut, not stored whole
    manager.sync._record_node(sid, "b", "failed", error=NodeError(type="E" * 1000, message="m" * 100_000))
    manager.sync._record_node(sid, "c", "cancelled", reason="r" * 100_000)
    nodes = all_nodes(manager, sid)
    assert nodes["b"].error is not None and len(nodes["b"].error.message) == 100
    assert len(nodes["b"].error.type) <= 255
    assert nodes["c"].reason is not None and len(nodes["c"].reason) == 100
    assert max(len(v) for v in client.hvals(f"{key_prefix}:{{{sid}}}:nodes")) < 1024
    client.close()
    manager.storage.close()


def test_no_secret_reaches_the_logs_or_the_http_answers(
    start_redis: StartRedis,
    make_worker: MakeWorker,
    key_prefix: str,
    rel_queue: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a store that needs a password, a worker and a web app that know it, and an API token
    password = f"pw-{uuid.uuid4().hex}"
    store = start_redis("--appendonly", "yes", password=password)
    assert password in store.url
    worker = make_worker(store.url, env_extra={"TRACKER_API_TOKEN": TOKEN})
    manager = redis_manager(store.url, key_prefix, api_token=TOKEN, redis_retries=1)
    app = create_app(manager, manager.settings, appmod.app, web_settings=WebSettings(dashboard=False))
    caplog.set_level(logging.DEBUG)
    answers: list[str] = []
    loop = asyncio.new_event_loop()  # one loop: the app's asyncio Redis client stays bound to it

    async def get(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        answers.append(f"{response.status_code} {response.headers} {response.text}")
        return response

    # When a batch runs, with one result over the size cap
    worker.wait_ready()
    calls = [appmod.step.s(i).set(queue=rel_queue) for i in range(3)] + [appmod.big.s(128 * 1024).set(queue=rel_queue)]
    sid = dispatch(group(calls), canvas_path="secrets.canvas", app=appmod.app, manager=manager)
    wait_for(lambda: manager.sync.get_session_status(sid)["status"] in TERMINAL, 60, "the batch to end")
    assert loop.run_until_complete(get(f"{API}/status/{sid}")).status_code == 200
    # and the store goes away while slow nodes run (the handlers give up and log) and a client asks
    slow = dispatch(group(appmod.step.s(i, sleep_s=1.0).set(queue=rel_queue) for i in range(2)), canvas_path="s.canvas",
                    app=appmod.app, manager=manager)  # fmt: skip
    wait_for(lambda: manager.sync.get_session_status(slow)["running_nodes"] >= 1, 60, "a slow node to start")
    store.stop()
    assert loop.run_until_complete(get(f"{API}/status/{slow}")).status_code == 503
    wait_for(lambda: "could not record node" in worker.output, 60, "the handlers to give up and log it")
    worker.stop()

    # Then the oversized result was not stored, yet its node completed
    store.start()
    status = manager.sync.get_session_status(sid)
    assert (status["status"], status["completed_nodes"]) == ("completed", 4)
    oversized = [n for n in all_nodes(manager, sid).values() if n.reason and "result not stored" in n.reason]
    assert len(oversized) == 1 and oversized[0].result is None
    # And neither the Redis password nor the API token appears in any log line or HTTP answer
    logs = worker.output + "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert "could not record node" in logs and "503" in "\n".join(answers)
    for secret in (password, TOKEN):
        assert secret not in logs
        assert not any(secret in answer for answer in answers)
    loop.run_until_complete(manager.cleanup())
    loop.close()


def session_app(start_redis: StartRedis, key_prefix: str, **web: Any) -> tuple[SessionManager, Any, str, str]:
    """An app with a token on a Redis store holding one completed and one running session."""
    server = start_redis()
    manager = redis_manager(server.url, key_prefix)
    done = manager.sync.create_session("done.canvas", 1)
    manager.sync.add_node_result(done, "a", 1)
    running = manager.sync.create_session("running.canvas", 2)
    manager.sync.add_node_result(running, "a", 1)
    app = create_app(manager, TrackerSettings(api_token=TOKEN), appmod.app, web_settings=WebSettings(**web))
    return manager, app, done, running


#: Routes that answer without the token: the dashboard's shell (no data in it), its login and the API's schema.
# The dashboard's shell at each of its addresses, its files, its login and whether it needs one
# (no data in any of them), the favicon and the OpenAPI pages.
PUBLIC = {"/dashboard", "/dashboard/workers", "/dashboard/sessions/{session_id}", "/dashboard/static/{name:path}",
          "/dashboard/state", "/dashboard/login", "/dashboard/logout", "/favicon.ico", "/openapi.json",
          "/docs", "/docs/oauth2-redirect", "/redoc"}  # fmt: skip


def walk(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, BaseRoute]]:
    """Every route with its full path, inside included routers too (FastAPI >= 0.165 includes them lazily)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from walk(included.routes, prefix + route.include_context.prefix)  # type: ignore[attr-defined]
        else:
            yield prefix + getattr(route, "path", ""), route


async def test_the_api_token_is_enforced_on_every_route(start_redis: StartRedis, key_prefix: str) -> None:
    # Given an app with a token, and every route it serves
    manager, app, done, _ = session_app(start_redis, key_prefix, sse_block_ms=50)
    every = list(walk(app.routes))
    routes = [(path, method) for path, route in every if isinstance(route, APIRoute) for method in route.methods or ()]
    assert len([path for path, _ in routes if path.startswith(API)]) >= 6
    assert {path for path, _ in every if not path.startswith(API)} <= PUBLIC

    def url(path: str) -> str:
        return path.replace("{task_id}", done).replace("{session_id}", done).replace("{name}", "dashboard.js")

    wrong: list[dict[str, Any]] = [
        {},
        {"headers": {"Authorization": f"Bearer {TOKEN}x"}},
        {"headers": {"Authorization": f"Basic {TOKEN}"}},
        {"headers": {"Authorization": TOKEN}},
        {"params": {"token": TOKEN, "access_token": TOKEN, "api_token": TOKEN}},
        {"headers": {"Cookie": f"tracker_dashboard={TOKEN}"}},
    ]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        for path, method in routes:
            if not path.startswith(API):
                continue
            # When an API route is called without the token, or with it anywhere but the header
            for attempt in wrong:
                answer = await http.request(method, url(path), **attempt)
                # Then it is refused before anything is read or done
                assert answer.status_code == 401, (method, path, attempt, answer.text)
                assert done not in answer.text
            # And with the bearer token it is served
            answer = await http.request(method, url(path), headers={"Authorization": f"Bearer {TOKEN}"})
            assert answer.status_code not in {401, 403}, (method, path, answer.text)
    manager.storage.close()


def _stream(port: int, path: str) -> tuple[socket.socket, int]:
    """Open an event stream with a raw socket; return it and the HTTP status."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    request = f"GET {path} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    sock.sendall(request.encode())
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(1024)
        if not chunk:
            break
        head += chunk
    return sock, int(head.split(b" ", 2)[1])


def _reset(sock: socket.socket) -> None:
    """Close abruptly (RST), as a client that crashed or lost its network would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_the_sse_cap_holds_under_bursts_and_abrupt_disconnects(start_redis: StartRedis, key_prefix: str) -> None:
    # Given a server capped at 3 event streams, and a session still running
    manager, app, _, running = session_app(start_redis, key_prefix, sse_max_connections=3, sse_block_ms=200)
    path = f"{API}/sessions/{running}/events"
    with serve_in_thread(app) as server:
        port = int(server.url.rsplit(":", 1)[1])
        for round_ in range(8):
            # When 10 clients ask at the same moment
            opened: list[tuple[socket.socket, int]] = []
            lock = threading.Lock()

            def connect(opened: list[tuple[socket.socket, int]] = opened, lock: threading.Lock = lock) -> None:
                pair = _stream(port, path)
                with lock:
                    opened.append(pair)

            threads = [threading.Thread(target=connect) for _ in range(10)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            # Then exactly 3 get a stream and the others a 503
            statuses = sorted(status for _, status in opened)
            assert statuses == [200] * 3 + [503] * 7, (round_, statuses)
            # When every client vanishes without closing properly, Then all 3 places come back
            for sock, _ in opened:
                _reset(sock)

            def three_again() -> bool:
                pairs = [_stream(port, path) for _ in range(3)]
                ok = all(status == 200 for _, status in pairs)
                for sock, _ in pairs:
                    _reset(sock)
                return ok

            wait_for(three_again, 10, "the stream slots to come back after abrupt disconnects")
    manager.storage.close()
