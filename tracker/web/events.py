"""A session's Redis Stream as Server-Sent Events, with exact replay.

What a client receives on ``GET /api/v1/parallel/sessions/{id}/events``:

1. ``retry: <ms>`` (how long ``EventSource`` waits before reconnecting).
2. On a first connection (no ``Last-Event-ID``): one ``snapshot`` event, the session's full
   :class:`~tracker.models.ParallelTaskStatus`, whose SSE ``id`` is the id of the newest stream
   entry at the time of the snapshot (``0-0`` for an empty stream).
3. Every stream entry after that id, in order, one SSE event each: ``event`` is the entry's type
   (``created``, ``status``, ``progress``, ``node``, ``reset``), ``id`` the stream entry id, ``data``
   the :class:`~tracker.models.SessionEvent` as JSON. Counters in an event are absolute, never
   deltas, so applying one twice is harmless.
4. Once an event with a terminal status has been sent and nothing newer is in the stream, one
   ``end`` event (no ``id``, data ``{"status": ...}``), and the response ends. The dashboard closes
   its ``EventSource`` on ``end``; otherwise the browser reconnects, gets ``end`` again at once.

Replay: a reconnecting client sends the last id it saw (``Last-Event-ID``, sent by ``EventSource``
itself, or the ``last_event_id`` query parameter) and receives exactly the entries after it: none
lost, none repeated, because ids are the stream's own monotonic entry ids.

Streams are capped (``TRACKER_EVENTS_MAXLEN``, about 1000 entries, trimmed approximately). When
the entries right after a client's id have been trimmed away, exact replay is impossible; the
client then gets a fresh ``snapshot`` (with the newest id) and the stream from there. The gap is
detected because a stream that was never trimmed still starts with its ``created`` entry. The
same holds within one connection: a client that falls more than the cap behind the writers gets
a fresh ``snapshot`` where its entries were trimmed, never a silent gap.

Reads never block the event loop: each read waits at most ``sse_block_ms`` inside the store's
asyncio call (``XREAD BLOCK`` on Redis, a worker thread for the in-memory store).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sse_starlette.event import ServerSentEvent

from tracker.errors import SessionNotFoundError, StorageUnavailableError
from tracker.hints import pickup_hint
from tracker.manager import SessionManager
from tracker.models import ParallelTaskStatus, SessionEvent
from tracker.states import SessionStatus

logger = logging.getLogger(__name__)

#: The event id a snapshot of a session with an empty stream carries (before every real id).
ORIGIN_ID = "0-0"

#: Most entries read in one call while looking for the newest id of a stream.
_SCAN_BATCH = 1000
#: Reads of a snapshot at most, to find one that no entry follows.
_SNAPSHOT_TRIES = 3


class StreamSlot:
    """One place among the concurrent event streams; :meth:`release` may be called any number of times."""

    def __init__(self, limiter: StreamLimiter) -> None:
        self._limiter: StreamLimiter | None = limiter

    def release(self) -> None:
        """Give the place back (once, however often it is called)."""
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter.active -= 1


class StreamLimiter:
    """Counts open event streams of one router (one process) and refuses one more than ``max_streams``.

    The event loop is single-threaded, so a plain counter is exact.

    Args:
        max_streams: Most streams open at once.
    """

    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self.active = 0

    def try_acquire(self) -> StreamSlot | None:
        """A slot, or None when every place is taken."""
        if self.active >= self.max_streams:
            return None
        self.active += 1
        return StreamSlot(self)


def _event_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class StreamStart:
    """Where a stream begins: an optional snapshot, then the entries after ``after``."""

    after: str
    status: SessionStatus
    snapshot: ParallelTaskStatus | None = None


async def _newest_id(manager: SessionManager, session_id: str) -> str:
    newest = ORIGIN_ID
    while True:
        batch = await manager.read_events(session_id, after=newest, limit=_SCAN_BATCH)
        if batch:
            newest = batch[-1].id
        if len(batch) < _SCAN_BATCH:
            return newest


async def _trimmed_past(manager: SessionManager, session_id: str, event_id: str) -> bool:
    """The stream has lost entries right after ``event_id`` (trimmed by its cap)."""
    oldest = await manager.read_events(session_id, limit=1)
    return bool(oldest) and oldest[0].type != "created" and _event_key(event_id) < _event_key(oldest[0].id)


async def plan_start(
    manager: SessionManager, session_id: str, last_event_id: str | None, *, hint_after_s: float | None = None
) -> StreamStart:
    """Decide where a new connection's stream starts. Raises before any byte is sent.

    Args:
        manager: The session manager.
        session_id: A validated session id.
        last_event_id: The id the client saw last (validated), or None on a first connection.
        hint_after_s: The snapshot's pickup hint shows after this many seconds pending
            (:func:`tracker.hints.pickup_hint`); default the manager's ``pickup_hint_after_s``.

    Raises:
        SessionNotFoundError: no such session.
        StorageUnavailableError: the store is down.
    """
    info = await manager.get_session(session_id)
    if last_event_id is not None and not await _trimmed_past(manager, session_id, last_event_id):
        return StreamStart(after=last_event_id, status=info.status)
    # Every change appends its entry in the same atomic step: when no entry came after `newest`
    # while the snapshot was read, the snapshot is the state at `newest`, and what follows is newer.
    # A change meanwhile moves `newest` on and the snapshot is read again (a few times at most: a
    # session that changes all the time gets a snapshot newer than its id, whose next entries may
    # then carry counters a little older).
    newest = await _newest_id(manager, session_id)
    info = await manager.get_session(session_id)
    for _ in range(_SNAPSHOT_TRIES):
        later = await manager.read_events(session_id, after=newest, limit=_SCAN_BATCH)
        if not later:
            break
        newest = later[-1].id
        info = await manager.get_session(session_id)  # (read after `newest`: never older than it)
    after_s = hint_after_s if hint_after_s is not None else manager.settings.pickup_hint_after_s
    hint = pickup_hint(info.status, info.created_at, manager.clock(), after_s)
    return StreamStart(after=newest, status=info.status, snapshot=ParallelTaskStatus.from_session(info, hint))


def _sse(event: SessionEvent) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(event.to_dict(), separators=(",", ":")), event=event.type, id=event.id)


def _end(status: SessionStatus | None, reason: str) -> ServerSentEvent:
    payload = {"status": status.value if status else None, "reason": reason}
    return ServerSentEvent(data=json.dumps(payload, separators=(",", ":")), event="end")


async def session_stream(
    manager: SessionManager,
    session_id: str,
    start: StreamStart,
    *,
    block_ms: int,
    batch: int,
    retry_ms: int,
    slot: StreamSlot | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """The SSE events of one connection, from ``start`` until the session has ended.

    Args:
        manager: The session manager.
        session_id: A validated session id.
        start: From :func:`plan_start`.
        block_ms: Longest wait of one read for a new entry.
        batch: Most entries per read.
        retry_ms: Reconnection delay announced to the client.
        slot: Released when the stream ends, however it ends.
    """
    try:
        yield ServerSentEvent(comment=f"session {session_id}", retry=retry_ms)
        snapshot, after, status = start.snapshot, start.after, start.status
        while True:
            if snapshot is not None:
                data = json.dumps(snapshot.to_dict(), separators=(",", ":"))
                yield ServerSentEvent(data=data, event="snapshot", id=after)
                snapshot = None
            try:
                events = await manager.read_events(
                    session_id, after=after, limit=batch, block_ms=None if status.is_terminal else block_ms
                )
                # A client slower than the writers (more than the cap behind) would miss the
                # trimmed entries without knowing: it gets a fresh snapshot instead, as on a reconnect.
                if events and await _trimmed_past(manager, session_id, after):
                    fresh = await plan_start(manager, session_id, None)
                    snapshot, after, status = fresh.snapshot, fresh.after, fresh.status
                    continue
            except SessionNotFoundError:
                yield _end(None, "not_found")
                return
            except StorageUnavailableError as exc:
                # The client reconnects after ``retry_ms`` with its Last-Event-ID: nothing is lost.
                logger.warning("event stream of session %s stopped: %s", session_id, exc)
                return
            if not events:
                if status.is_terminal:
                    yield _end(status, "ended")
                    return
                continue
            for event in events:
                yield _sse(event)
                after, status = event.id, event.status
    finally:
        if slot is not None:
            slot.release()
