"""Scenario 7b: schemathesis across the HTTP API, on Redis, served by uvicorn: a refused call changes nothing.

``tests/web/test_schema.py`` checks that no generated request gets a 5xx (in-memory store). This
run adds what a store of its own allows: the whole Redis keyspace of the app is dumped before and
after each generated request, and every refused request (4xx) and every read (GET) must leave it
byte for byte unchanged. Half of the requests are aimed at sessions that exist (in every state,
cancel and resume included), so refusals come from the state machine and not only from unknown ids.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import schemathesis
from celery import Celery
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection, positive_data_acceptance, response_schema_conformance
from schemathesis.core.parameters import ParameterLocation

from tests.reliability.helpers import redis_dump
from tests.servers import redis_process
from tests.web.conftest import serve_in_thread
from tracker import InMemoryStorageAdapter, NodeError, SessionManager, TrackerSettings
from tracker.storage.redis import RedisStorageAdapter
from tracker.web import WebSettings, create_app

TOKEN = "fuzz-http-token"
PREFIX = "fuzzhttp"


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


class Target:
    """The served app's store, and the sessions generated requests are pointed at."""

    def __init__(self, manager: SessionManager, client: redis.Redis) -> None:
        self.manager = manager
        self.client = client
        self.turn = itertools.count()
        #: (method, path template, status code) -> requests, printed at the end (-s)
        self.tally: Counter[tuple[str, str, int]] = Counter()
        self.ended: list[str] = []
        self.live: list[str] = []
        for status in ("completed", "failed", "partial_failure"):
            sid = manager.sync.create_session("fuzz.canvas", 2, metadata={"k": [1, "v"]})
            manager.sync.add_node_result(sid, "a", {"ok": True}, status="failed" if status == "failed" else "completed")
            second = "completed" if status == "completed" else "failed"
            manager.sync.add_node_result(sid, "b", status=second, error=NodeError(type="ValueError", message="x"))
            self.ended.append(sid)
        for _ in range(2):
            self.live.append(manager.sync.create_session("fuzz.canvas", 3))

    def aim(self, case: schemathesis.Case[Any]) -> None:
        """Point every other request with a well-formed id at an existing session (ended ones for
        event streams: those streams end). Malformed ids are left as generated."""
        turn = next(self.turn)
        params = case.path_parameters or {}
        for name in ("session_id", "task_id"):
            if name in params and turn % 2 == 0 and _is_uuid(params[name]):
                pool = self.ended if case.path.endswith("/events") else self.ended + self.live
                params[name] = pool[turn // 2 % len(pool)]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Target, str]]:
    with redis_process(tmp_path_factory.mktemp("fuzz-http")) as server:
        settings_ = TrackerSettings(redis_url=server.url, key_prefix=PREFIX)
        manager = SessionManager(storage=RedisStorageAdapter.from_settings(settings_), settings=settings_)
        client = redis.Redis(port=server.port)
        with serve_in_thread(build_app(manager)) as live:
            aimed = Target(manager, client)
            yield aimed, live.url
        print(
            "\nfuzz-http:",
            ", ".join(f"{m} {p.rsplit('/', 1)[-1]} {c}: {n}" for (m, p, c), n in sorted(aimed.tally.items())),
        )
        client.close()
        manager.storage.close()


def build_app(manager: SessionManager) -> Any:
    celery_app = Celery("fuzz-http", broker="memory://", set_as_current=False)
    web = WebSettings(sse_block_ms=50, sse_ping_s=1, dashboard=False)
    return create_app(manager, TrackerSettings(api_token=TOKEN), celery_app, web_settings=web)


# The document does not depend on the store: it is read from the same app built on a store of no
# consequence, and the requests go to the app served on Redis.
document = build_app(SessionManager(storage=InMemoryStorageAdapter(), settings=TrackerSettings())).openapi()
config = schemathesis.Config.from_dict({"generation": {"allow-extra-parameters": False}})
schema = schemathesis.openapi.from_dict(document, config=config)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_refused_requests_and_reads_change_nothing(case: schemathesis.Case[Any], target: tuple[Target, str]) -> None:
    aimed, base_url = target
    # Given a generated request (half of them about a session that exists) and the store as it is
    aimed.aim(case)
    before = redis_dump(aimed.client, PREFIX)
    # When it is sent
    response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    aimed.tally[(case.method.upper(), case.path, response.status_code)] += 1
    # Then it conforms to the document and is never a server error (an event stream's events are
    # JSON, which the document describes as plain text: its bodies are checked by tests/web)
    stream = case.path.endswith("/events") and response.status_code == 200
    excluded = [response_schema_conformance] if stream else []
    # A page of nodes continues at a scan position (digits) without `status`, after a node id with
    # it: OpenAPI cannot tie one parameter's form to another's, so the document allows a node id
    # cursor without `status`, which is refused (422) as no page handed it out.
    query = case.query or {}
    if case.path.endswith("/nodes") and "status" not in query and not str(query.get("cursor", "0")).isdigit():
        excluded.append(positive_data_acceptance)
    # A case made invalid in its headers (the bearer left out) is sent with the bearer all the same
    # (above): what the server answers is then about a valid request.
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
        excluded.append(negative_data_rejection)
    case.validate_response(response, excluded_checks=excluded or None)
    assert response.status_code < 500, response.text
    # and a refused request, or any read, changed nothing at all
    if response.status_code >= 400 or case.method.upper() == "GET":
        assert redis_dump(aimed.client, PREFIX) == before, (
            f"{case.method} {case.formatted_path} -> {response.status_code}"
        )
