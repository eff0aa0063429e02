"""The SSE route: snapshot, live events, exact replay after a dropped connection, pings, the cap.

Live streams run against a real uvicorn server (httpx's ASGI transport buffers whole responses);
streams that end by themselves (ended sessions) are read through the ASGI transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.conftest import make_store
from tests.web.conftest import AppFactory, LiveServer, asgi_client
from tests.web.sse import Message, events, messages, parse_all
from tracker import SessionManager, TrackerSettings
from tracker.web import create_app

BASE = "/api/v1/parallel"
Live = Callable[..., AbstractContextManager[LiveServer]]


def stream_ids(manager: SessionManager, session_id: str, after: str | None = None) -> list[str]:
    """Every entry id of the session's stream after ``after``, read straight from the store."""
    return [e.id for e in manager.sync.read_events(session_id, after=after, limit=1000)]


@contextmanager
def feeding(manager: SessionManager, session_id: str, node_ids: list[str], pause_s: float = 0.02) -> Iterator[None]:
    """Record node results from a background thread (as workers would), with small pauses."""

    def feed() -> None:
        for node_id in node_ids:
            time.sleep(pause_s)
            manager.sync.add_node_result(session_id, node_id, {"node": node_id})

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(timeout=10)


async def read_until(stream: AsyncIterator[Message], stop: Callable[[Message], bool]) -> list[Message]:
    """Dispatched events of ``stream`` up to and including the first one ``stop`` accepts."""
    got: list[Message] = []
    async for message in stream:
        got.append(message)
        if stop(message):
            break
    return got


# -- first connection -----------------------------------------------------------------------


async def test_first_connection_gets_a_snapshot_then_every_event_then_end(
    web_manager: SessionManager, live: Live
) -> None:
    # Given a pending session
    sid = web_manager.sync.create_session("batch.canvas", 4)
    with live() as server:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=10) as http,
            asyncio.timeout(20),
            http.stream("GET", f"{BASE}/sessions/{sid}/events") as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            # When its nodes complete while we listen
            with feeding(web_manager, sid, ["a", "b", "c", "d"]):
                got = [m async for m in events(response)]

    # Then: the snapshot first, with the id of the newest entry at that time ...
    snapshot, *changes, end = got
    assert snapshot.event == "snapshot"
    assert snapshot.data["task_id"] == sid
    assert snapshot.data["status"] == "pending"
    # ... then every later entry exactly once, in order, with the stream entry id as SSE id ...
    assert [m.id for m in changes] == stream_ids(web_manager, sid, after=snapshot.id)
    assert {m.data["node_id"] for m in changes if m.event == "node"} == {"a", "b", "c", "d"}
    assert changes[-1].data["status"] == "completed"
    assert changes[-1].data["progress_percent"] == 100.0
    # ... then ``end``, without an id (a reconnect would still resume after the last real one)
    assert end.event == "end"
    assert end.id is None
    assert end.data == {"status": "completed", "reason": "ended"}


async def test_ended_session_without_last_event_id_is_a_snapshot_and_end(
    make_app: AppFactory, web_manager: SessionManager
) -> None:
    sid = await web_manager.create_session("batch.canvas", 1)
    await web_manager.add_node_result(sid, "only", 1)
    async with asgi_client(make_app()) as http:
        response = await http.get(f"{BASE}/sessions/{sid}/events")
    got = parse_all(response.text)
    assert [m.event for m in got] == ["snapshot", "end"]
    assert got[0].data["status"] == "completed"
    assert got[0].id == stream_ids(web_manager, sid)[-1]
    assert "retry: 2000" in response.text


async def test_a_running_sessions_snapshot_has_its_rate_and_eta(web_manager: SessionManager, live: Live) -> None:
    # Given 10 nodes: one started, one finished a second later and one a second after that (the
    # events say when they happened: a little ahead of now here, so that nothing is overdue)
    sid = web_manager.sync.create_session("paced.canvas", 10)
    now = datetime.now(UTC)
    web_manager.sync._record_node(sid, "a", "running", at=now + timedelta(seconds=1))
    web_manager.sync._record_node(sid, "a", "completed", at=now + timedelta(seconds=2))
    web_manager.sync._record_node(sid, "b", "completed", at=now + timedelta(seconds=3))
    with live() as server:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=10) as http,
            asyncio.timeout(20),
            http.stream("GET", f"{BASE}/sessions/{sid}/events") as response,
        ):
            snapshot = await anext(events(response))
    # Then the snapshot says 2 nodes in the 2 s from the start to the last finish, and the 8 left
    # in 8 s from that finish
    assert snapshot.event == "snapshot"
    assert snapshot.data["rate_per_s"] == pytest.approx(1.0)
    assert snapshot.data["eta_s"] == pytest.approx(11, abs=1)


# -- replay ---------------------------------------------------------------------------------


@pytest.mark.parametrize("resume_with", ["header", "query"])
async def test_reconnect_after_a_drop_loses_and_repeats_nothing(
    web_manager: SessionManager, live: Live, resume_with: str
) -> None:
    sid = web_manager.sync.create_session("batch.canvas", 6)
    received: list[Message] = []
    with live() as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            # Given a client that saw the snapshot and the first two nodes ...
            async with asyncio.timeout(20), http.stream("GET", f"{BASE}/sessions/{sid}/events") as response:
                with feeding(web_manager, sid, ["n0", "n1"]):
                    received += await read_until(events(response), lambda m: m.data.get("node_id") == "n1")
            # ... whose connection then dropped, while three more nodes finished
            for node_id in ("n2", "n3", "n4"):
                web_manager.sync.add_node_result(sid, node_id, node_id)

            # When it reconnects with the last id it saw (and the last node finishes meanwhile)
            last_seen = received[-1].id
            assert last_seen is not None
            headers = {"Last-Event-ID": last_seen} if resume_with == "header" else {}
            params = {"last_event_id": last_seen} if resume_with == "query" else {}
            async with (
                asyncio.timeout(20),
                http.stream("GET", f"{BASE}/sessions/{sid}/events", headers=headers, params=params) as response,
            ):
                with feeding(web_manager, sid, ["n5"]):
                    replayed = [m async for m in events(response)]

    # Then: no second snapshot, and every entry after the snapshot arrived exactly once, in order
    snapshot = received[0]
    assert snapshot.event == "snapshot"
    assert all(m.event != "snapshot" for m in replayed)
    ids = [m.id for m in received[1:] + replayed if m.event != "end"]
    assert ids == stream_ids(web_manager, sid, after=snapshot.id)
    assert len(ids) == len(set(ids))
    assert {m.data["node_id"] for m in received[1:] + replayed if m.event == "node"} == {f"n{i}" for i in range(6)}
    assert replayed[-1].event == "end"


async def test_reconnect_after_the_end_gets_only_end(make_app: AppFactory, web_manager: SessionManager) -> None:
    sid = await web_manager.create_session("batch.canvas", 1)
    await web_manager.add_node_result(sid, "only", 1, status="failed")
    newest = stream_ids(web_manager, sid)[-1]
    async with asgi_client(make_app()) as http:
        response = await http.get(f"{BASE}/sessions/{sid}/events", headers={"Last-Event-ID": newest})
    assert [(m.event, m.data) for m in parse_all(response.text)] == [("end", {"status": "failed", "reason": "ended"})]


async def test_replay_from_the_middle_of_an_ended_session(make_app: AppFactory, web_manager: SessionManager) -> None:
    sid = await web_manager.create_session("batch.canvas", 3)
    for node_id in ("a", "b", "c"):
        await web_manager.add_node_result(sid, node_id, 1)
    ids = stream_ids(web_manager, sid)
    async with asgi_client(make_app()) as http:
        response = await http.get(f"{BASE}/sessions/{sid}/events", headers={"Last-Event-ID": ids[1]})
    got = parse_all(response.text)
    assert [m.id for m in got[:-1]] == ids[2:]
    assert got[-1].event == "end"


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_an_id_older_than_the_capped_stream_gets_a_fresh_snapshot(
    kind: str, redis_url: str, key_prefix: str
) -> None:
    # Given a stream capped at ~10 entries that has seen many more (Redis trims whole macro nodes)
    store = make_store(kind, redis_url, key_prefix, events_maxlen=10)
    manager = SessionManager(storage=store, settings=TrackerSettings(events_maxlen=10))
    sid = manager.sync.create_session("batch.canvas", 1)
    first_id = stream_ids(manager, sid)[0]
    for i in range(250):
        manager.sync.update_progress(sid, i * 0.2)
    manager.sync.add_node_result(sid, "only", 1)
    retained = stream_ids(manager, sid)
    assert first_id not in retained

    async with asgi_client(create_app(manager, TrackerSettings())) as http:
        # When a client comes back with an id that was trimmed away
        stale = await http.get(f"{BASE}/sessions/{sid}/events", headers={"Last-Event-ID": first_id})
        # Or with one still in the stream
        fresh = await http.get(f"{BASE}/sessions/{sid}/events", headers={"Last-Event-ID": retained[-3]})

    # Then the first gets a new snapshot at the newest id; the second gets an exact replay
    got = parse_all(stale.text)
    assert [m.event for m in got] == ["snapshot", "end"]
    assert got[0].id == retained[-1]
    assert got[0].data["status"] == "completed"
    assert [m.id for m in parse_all(fresh.text) if m.event != "end"] == retained[-2:]
    store.close()


# -- errors ---------------------------------------------------------------------------------


async def test_stream_errors(make_app: AppFactory, web_manager: SessionManager) -> None:
    sid = await web_manager.create_session("batch.canvas", 1)
    async with asgi_client(make_app()) as http:
        assert (await http.get(f"{BASE}/sessions/{uuid.uuid4()}/events")).status_code == 404
        for bad in ("abc", "1-2-3", "-1", "9" * 30):
            response = await http.get(f"{BASE}/sessions/{sid}/events", headers={"Last-Event-ID": bad})
            assert response.status_code == 422, bad
            response = await http.get(f"{BASE}/sessions/{sid}/events", params={"last_event_id": bad})
            assert response.status_code == 422, bad


async def test_a_session_removed_while_streaming_ends_the_stream(web_manager: SessionManager, live: Live) -> None:
    sid = web_manager.sync.create_session("batch.canvas", 2)
    with live() as server:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=10) as http,
            asyncio.timeout(20),
            http.stream("GET", f"{BASE}/sessions/{sid}/events") as response,
        ):
            stream = events(response)
            first = await read_until(stream, lambda m: m.event == "snapshot")
            web_manager.sync.delete_session(sid)
            rest = [m async for m in stream]
    assert first[0].event == "snapshot"
    assert [(m.event, m.data["reason"]) for m in rest] == [("end", "not_found")]


# -- keep-alive, cap, event loop ------------------------------------------------------------


async def test_idle_streams_get_keep_alive_pings(web_manager: SessionManager, live: Live) -> None:
    sid = web_manager.sync.create_session("batch.canvas", 2)
    with live(sse_ping_s=0.2) as server:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=10) as http,
            http.stream("GET", f"{BASE}/sessions/{sid}/events") as response,
        ):
            pings = await count_pings(response, seconds=1.2)
    assert pings >= 3


async def count_pings(response: httpx.Response, seconds: float) -> int:
    """Keep-alive comments received within ``seconds`` on a stream that has nothing else to say."""
    pings = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in messages(response):
                assert not message.is_event or message.event == "snapshot"
                pings += sum("ping" in c for c in message.comments)
    return pings


async def test_concurrent_streams_are_capped_and_slots_come_back(web_manager: SessionManager, live: Live) -> None:
    sid = web_manager.sync.create_session("batch.canvas", 2)
    url = f"{BASE}/sessions/{sid}/events"
    with live(sse_max_connections=2) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            # Given two open streams (the cap) on a session that is still going
            async with http.stream("GET", url) as one, http.stream("GET", url) as two:
                assert (one.status_code, two.status_code) == (200, 200)
                # When a third one asks: refused, with a hint when to retry
                refused = await http.get(url)
                assert refused.status_code == 503
                assert refused.headers["retry-after"] == "5"
                assert "too many event streams" in refused.json()["detail"]
                # And waiting streams never block the event loop: other requests are served at once
                started = time.monotonic()
                assert (await http.get(f"{BASE}/status/{sid}")).status_code == 200
                assert time.monotonic() - started < 0.5
            # Then once the clients went away, their places come back
            deadline = time.monotonic() + 5
            while True:
                async with http.stream("GET", url) as again:
                    if again.status_code == 200:
                        break
                assert time.monotonic() < deadline, "the stream slots were never released"
                await asyncio.sleep(0.1)


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_reader_lapped_by_the_writers_gets_a_fresh_snapshot_not_a_gap(
    kind: str, redis_url: str, key_prefix: str
) -> None:
    from tracker.web.events import plan_start, session_stream

    # Given an open stream (capped at ~10 entries) that has sent its snapshot
    store = make_store(kind, redis_url, key_prefix, events_maxlen=10)
    manager = SessionManager(storage=store, settings=TrackerSettings(events_maxlen=10))
    sid = manager.sync.create_session("batch.canvas", 300)
    stream = session_stream(manager, sid, await plan_start(manager, sid, None), block_ms=50, batch=5, retry_ms=0)
    assert (await anext(stream)).comment
    assert (await anext(stream)).event == "snapshot"

    # When the writers add far more entries than the cap before the reader reads on
    for i in range(200):
        await manager._record_node(sid, f"n{i:03d}", "completed", i)

    # Then the reader's next event is a snapshot with the exact counts, not entries after a gap
    nxt = await anext(stream)
    assert nxt.event == "snapshot", nxt
    assert '"completed_nodes":200' in nxt.data
    assert nxt.id == stream_ids(manager, sid)[-1]
    await stream.aclose()
    store.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_snapshot_is_never_followed_by_an_entry_older_than_it(
    kind: str, redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracker.web.events import plan_start

    # Given a session that changes while a new stream reads its snapshot (a node ends between the
    # read of the stream's newest id and the read of the session)
    store = make_store(kind, redis_url, key_prefix)
    manager = SessionManager(storage=store)
    sid = manager.sync.create_session("batch.canvas", 3)
    await manager._record_node(sid, "a", "completed", 1)
    read = manager.get_session
    reads = 0

    async def read_while_a_node_ends(session_id: str) -> object:
        nonlocal reads
        reads += 1
        if reads == 2:  # the first read checks that the session exists; the second is the snapshot
            await manager._record_node(sid, "b", "completed", 2)
        return await read(session_id)

    monkeypatch.setattr(manager, "get_session", read_while_a_node_ends)

    # When the stream's start is planned
    start = await plan_start(manager, sid, None)

    # Then the snapshot is the state at its id: no entry follows it that it already holds
    assert start.snapshot is not None and start.snapshot.completed_nodes == 2
    assert stream_ids(manager, sid, after=start.after) == []
    assert start.after == stream_ids(manager, sid)[-1]
    store.close()
