"""schemathesis against the app's own OpenAPI document: generated inputs never get a 5xx.

The app runs with a token and a Celery app on an in-memory broker, so that the mutating routes
reach their real code (and not just the 403 of a server without a token). A few sessions exist
(one with a skipped node), so lists have content to validate against the response schemas.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from celery import Celery
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection
from schemathesis.core.parameters import ParameterLocation

from tests.web.conftest import TOKEN
from tracker import InMemoryStorageAdapter, NodeError, SessionManager, TrackerSettings
from tracker.web import WebSettings, create_app


def build_app() -> FastAPI:
    manager = SessionManager(storage=InMemoryStorageAdapter(), settings=TrackerSettings())
    for status in ("completed", "failed"):
        sid = manager.sync.create_session("schema.canvas", 2, metadata={"k": [1, "v"]})
        manager.sync.add_node_result(sid, "a", {"ok": True})
        manager.sync.add_node_result(sid, "b", status=status, error=NodeError(type="ValueError", message="x"))
    chain = manager.sync.create_session("schema.canvas", 3)
    manager.sync.add_node_result(chain, "a", status="failed", error=NodeError(type="ValueError", message="x"))
    manager.sync._record_node(chain, "b", "skipped", reason="skipped: node a failed")
    manager.sync.create_session("schema.canvas", 1)
    celery_app = Celery("schema-tests", broker="memory://", set_as_current=False)
    web = WebSettings(sse_block_ms=50, sse_ping_s=1)
    return create_app(manager, TrackerSettings(api_token=TOKEN), celery_app, web_settings=web)


# Unknown query parameters are ignored, as HTTP APIs usually do; not generating them keeps the
# negative cases to what the document says (malformed ids, enums, cursors, limits, event ids).
config = schemathesis.Config.from_dict({"generation": {"allow-extra-parameters": False}})
schema = schemathesis.openapi.from_asgi("/openapi.json", build_app(), config=config)


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_generated_input_gets_a_server_error(case: schemathesis.Case[Any]) -> None:
    # A case made invalid in its headers (the bearer left out) is sent with the bearer all the same:
    # what the server answers is then about a valid request.
    negative_header = case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER)
    excluded = [negative_data_rejection] if negative_header else None
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, excluded_checks=excluded)
