"""A write's reply reads back as the session written.

The Redis adapter reads a session from each ``record_nodes`` reply with one decoder, checked here
to give back the session written, whatever its values.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker.errors import StorageUnavailableError
from tracker.models import SessionInfo, ms_from_utc, rate_and_eta, utc_from_ms
from tracker.states import RateWindow, SessionStatus
from tracker.storage.redis.codec import session_from_values

SID = "a301b679-db8d-4ca7-8cdc-dbd6f986a5a4"

scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False) | st.text(max_size=8)
# What a store can hold: metadata is checked to be JSON (no infinities) before it is written.
stored_json = st.recursive(
    scalars.filter(lambda v: not (isinstance(v, float) and math.isinf(v))),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
zones = st.sampled_from([UTC, timezone(timedelta(hours=-5, minutes=-30))])
moments = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1), timezones=zones)


@st.composite
def stored_sessions(draw: st.DrawFn) -> tuple[SessionInfo, RateWindow | None]:
    """Any session as a store holds it (aware datetimes, progress to 2 decimals, metadata that
    passed the JSON checks), with the rate window it was read from."""
    counts = draw(st.lists(st.integers(0, 10**6), min_size=8, max_size=8))
    parent = draw(
        st.none() | st.tuples(st.just("0b0c1a3e-58c3-4cc9-8a4a-3f0e8f6c1d2e"), st.sampled_from(["n1", "a:b"]))
    )
    finished_at = draw(st.none() | moments)
    window = draw(
        st.none() | st.lists(st.integers(0, 2 * 10**12), min_size=6, max_size=6).map(lambda v: RateWindow(*v))
    )
    info = SessionInfo(
        session_id=SID,
        canvas_path=draw(st.text(min_size=1, max_size=20)),
        node_count=counts[0],
        status=draw(st.sampled_from(list(SessionStatus))),
        progress_percent=draw(st.integers(0, 10000).map(lambda n: n / 100)),
        completed_nodes=counts[1],
        failed_nodes=counts[2],
        running_nodes=counts[3],
        lost_nodes=counts[4],
        cancelled_nodes=counts[5],
        skipped_nodes=counts[6],
        retrying_nodes=counts[7],
        created_at=draw(moments),
        updated_at=draw(moments),
        started_at=draw(st.none() | moments),
        finished_at=finished_at,
        metadata=draw(st.dictionaries(st.text(max_size=6), stored_json, max_size=4)),
        run=draw(st.integers(1, 1000)),
        children=counts[1] % 50,
        children_open=counts[2] % 50,
        parent_session_id=parent[0] if parent else None,
        parent_node_id=parent[1] if parent else None,
        failure_types=counts[3] % 20,
        tags=draw(st.lists(st.sampled_from(["nightly", "customer:42", "a.b"]), max_size=3, unique=True)),
        **rate_and_eta(window, counts[0], finished_at),
    )
    return info, window


def _ms(moment: datetime | None) -> bytes:
    return b"" if moment is None else str(round(moment.timestamp() * 1000)).encode()


TIMES = {"created_at", "updated_at", "started_at", "finished_at", "eta_at"}


def _values(info: SessionInfo, window: RateWindow | None) -> list[object]:
    """A record_nodes reply's session values: numbers as integers, the rest as bytes."""
    return [
        info.status.value.encode(), info.node_count, info.completed_nodes, info.failed_nodes, info.running_nodes,
        info.lost_nodes, info.cancelled_nodes, info.skipped_nodes, info.retrying_nodes,
        str(info.progress_percent).encode(), _ms(info.started_at), _ms(info.finished_at), _ms(info.updated_at),
        info.canvas_path.encode(), _ms(info.created_at), json.dumps(info.metadata, separators=(",", ":")).encode(),
        info.run, info.children, info.children_open,
        f"{info.parent_session_id}|{info.parent_node_id}".encode() if info.parent_session_id else b"",
        info.failure_types, b"" if window is None else window.text().encode(), " ".join(info.tags).encode(),
    ]  # fmt: skip


@given(stored_sessions())
def test_a_record_reply_reads_back_as_the_session_written(stored: tuple[SessionInfo, RateWindow | None]) -> None:
    info, window = stored
    values = _values(info, window)
    for reply in (values, [v.decode() if isinstance(v, bytes) else v for v in values]):  # decode_responses clients
        got = session_from_values(SID, reply)
        assert got.model_dump(exclude=TIMES) == info.model_dump(exclude=TIMES)
        for name in TIMES:  # the store keeps milliseconds
            assert _ms(getattr(got, name)) == _ms(getattr(info, name)), name


def test_a_status_this_version_does_not_know_is_an_error_not_a_session() -> None:
    values = [b"paused", 3, 0, 0, 0, 0, 0, 0, 0, b"0", b"", b"", b"1767225600000", b"c", b"1767225600000", b"{}", 1,
              0, 0, b"", 0, b"", b""]  # fmt: skip
    with pytest.raises(StorageUnavailableError, match="paused"):
        session_from_values(SID, values)


@given(st.integers(0, round(datetime(9999, 1, 1, tzinfo=UTC).timestamp() * 1000)))
def test_a_stored_millisecond_reads_back_exactly(ms: int) -> None:
    # No float rounding (which strays after about the year 2300): the stored millisecond itself.
    moment = utc_from_ms(ms)
    assert moment is not None
    assert ms_from_utc(moment) == ms
    assert moment.microsecond == ms % 1000 * 1000
