"""Web fixtures: the real ASGI app on each store, httpx clients, and a real uvicorn server for streams."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from tests.conftest import make_store
from tests.servers import free_port
from tracker import SessionManager, TrackerSettings
from tracker.storage.base import SessionStorageAdapter
from tracker.web import WebSettings, create_app

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(params=["memory", "redis"])
def web_store(request: pytest.FixtureRequest, redis_url: str, key_prefix: str) -> Iterator[SessionStorageAdapter]:
    """Each adapter (the web tests use a real clock: stream ids are real time anyway)."""
    adapter = make_store(request.param, redis_url, key_prefix)
    yield adapter
    adapter.close()


@pytest.fixture
def web_manager(web_store: SessionStorageAdapter) -> SessionManager:
    """A manager without a token in its settings (the app's settings decide auth)."""
    return SessionManager(storage=web_store, settings=TrackerSettings())


AppFactory = Callable[..., FastAPI]


@pytest.fixture
def make_app(web_manager: SessionManager) -> AppFactory:
    """Build the app on the test's manager: ``make_app(token=..., celery_app=..., **web_settings)``."""

    def build(token: str | None = None, celery_app: Any = None, **web: Any) -> FastAPI:
        settings = TrackerSettings(api_token=token)
        return create_app(web_manager, settings, celery_app, web_settings=WebSettings(**web))

    return build


def asgi_client(app: FastAPI, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client calling the ASGI app directly (responses are buffered whole)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tracker.test", **kwargs)


@pytest.fixture
async def client(make_app: AppFactory) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app without a token."""
    async with asgi_client(make_app()) as http:
        yield http


@dataclass
class LiveServer:
    """An app served by uvicorn on a loopback port, in a thread of its own."""

    url: str
    server: uvicorn.Server


@contextlib.contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[LiveServer]:
    """Serve ``app`` until the block ends; open streams are cut after one second at shutdown."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}", server=server)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def live(make_app: AppFactory) -> Callable[..., contextlib.AbstractContextManager[LiveServer]]:
    """``with live(**app_options) as server:`` serves a fresh app with uvicorn."""

    def start(**options: Any) -> contextlib.AbstractContextManager[LiveServer]:
        return serve_in_thread(make_app(**options))

    return start
