"""``tracker.web.serve``: what ``tracker serve`` runs, as a real process; and a store outage mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.servers import free_port, redis_process
from tests.web.conftest import serve_in_thread
from tests.web.sse import events
from tracker import SessionManager, TrackerSettings
from tracker.storage.redis import RedisStorageAdapter
from tracker.web import WebSettings, create_app


def test_serve_runs_uvicorn_until_terminated() -> None:
    # Given serve() in a process of its own (in-memory store, no token)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    code = f"from tracker.web import serve; serve('127.0.0.1', {port}, log_level='warning')"
    process = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        # When it is up, it answers the API, the dashboard and the OpenAPI document
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/v1/parallel/sessions", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, "serve() exited early"
                assert time.monotonic() < deadline, "serve() did not start listening"
                time.sleep(0.1)
        assert response.status_code == 200
        assert response.json() == {"sessions": [], "next_cursor": None}
        assert httpx.get(f"http://127.0.0.1:{port}/dashboard").status_code == 200
        assert "ParallelTaskStatus" in httpx.get(f"http://127.0.0.1:{port}/openapi.json").text
    finally:
        # Then SIGTERM stops it (uvicorn shuts down gracefully, then re-raises the signal)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) in (0, -signal.SIGTERM)


async def test_a_store_outage_mid_stream_ends_the_response_cleanly(tmp_path: Path) -> None:
    # Given a stream open on a Redis of our own
    with redis_process(tmp_path / "redis") as redis_server:
        settings = TrackerSettings(redis_url=redis_server.url, redis_retries=0, redis_socket_timeout_s=1)
        manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings), settings=settings)
        sid = manager.sync.create_session("batch.canvas", 2)
        app = create_app(manager, TrackerSettings(), web_settings=WebSettings(sse_block_ms=200))
        with serve_in_thread(app) as server:
            async with (
                httpx.AsyncClient(base_url=server.url, timeout=10) as http,
                asyncio.timeout(20),
                http.stream("GET", f"/api/v1/parallel/sessions/{sid}/events") as response,
            ):
                stream = events(response)
                first = await anext(stream)
                # When Redis goes away
                redis_server.stop()
                # Then the response simply ends (the browser reconnects with its Last-Event-ID), no `end`
                rest = [message async for message in stream]
        manager.storage.close()
    assert first.event == "snapshot"
    assert rest == []
