"""The status dict is built without pydantic's serializer on the hot path; it must be the same dict.

``SessionInfo.to_dict()`` is hand-written (every write returns it) and the Redis adapter builds
``add_node_result``'s dict straight from its script's reply: both are checked here against what
pydantic itself produces, keys and order included.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker.errors import StorageUnavailableError
from tracker.models import SessionInfo
from tracker.states import SessionStatus
from tracker.storage.redis import _session_values, _status_values

SID = "a301b679-db8d-4ca7-8cdc-dbd6f986a5a4"

scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
# What a store can hold: metadata is checked to be JSON (no infinities) before it is written.
stored_json = st.recursive(
    scalars.filter(lambda v: not (isinstance(v, float) and math.isinf(v))),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
zones = st.sampled_from([UTC, timezone(timedelta(hours=-5, minutes=-30))])
moments = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1), timezones=zones)


@given(
    status=st.sampled_from(list(SessionStatus)),
    counts=st.lists(st.integers(0, 10**6), min_size=6, max_size=6),
    progress=st.floats(0, 100),
    created=moments,
    updated=moments,
    started=st.none() | moments,
    finished=st.none() | moments | st.datetimes(min_value=datetime(1970, 1, 2)),  # naive too
    metadata=st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    path=st.text(min_size=1, max_size=20),
)
def test_to_dict_is_pydantics_json_dump(
    status: SessionStatus,
    counts: list[int],
    progress: float,
    created: datetime,
    updated: datetime,
    started: datetime | None,
    finished: datetime | None,
    metadata: dict[str, Any],
    path: str,
) -> None:
    info = SessionInfo(
        session_id=SID, canvas_path=path, node_count=counts[0], status=status, progress_percent=progress,
        completed_nodes=counts[1], failed_nodes=counts[2], running_nodes=counts[3], lost_nodes=counts[4],
        cancelled_nodes=counts[5], created_at=created, updated_at=updated, started_at=started,
        finished_at=finished, metadata=metadata,
    )  # fmt: skip
    expected = info.model_dump(mode="json")
    got = info.to_dict()
    assert got == expected
    assert list(got) == list(expected)
    assert json.dumps(got) == json.dumps(expected)


def _ms(moment: datetime) -> bytes:
    return str(round(moment.timestamp() * 1000)).encode()


@given(
    status=st.sampled_from(list(SessionStatus)),
    counts=st.lists(st.integers(0, 10**6), min_size=6, max_size=6),
    progress=st.integers(0, 10000).map(lambda n: str(n / 100).encode()),
    created=moments,
    updated=moments,
    started=st.none() | moments,
    finished=st.none() | moments,
    metadata=st.dictionaries(st.text(max_size=6), stored_json, max_size=4),
    path=st.text(min_size=1, max_size=20),
)
def test_status_from_a_reply_is_the_models_dict(
    status: SessionStatus,
    counts: list[int],
    progress: bytes,
    created: datetime,
    updated: datetime,
    started: datetime | None,
    finished: datetime | None,
    metadata: dict[str, Any],
    path: str,
) -> None:
    # A record_nodes reply's session values: numbers as integers, the rest as bytes.
    values = [
        status.value.encode(), *counts, progress, _ms(started) if started else b"", _ms(finished) if finished else b"",
        _ms(updated), path.encode(), _ms(created), json.dumps(metadata, separators=(",", ":")).encode(),
    ]  # fmt: skip
    for reply in (values, [v.decode() if isinstance(v, bytes) else v for v in values]):  # decode_responses clients
        expected = _session_values(SID, reply).to_dict()
        got = _status_values(SID, reply)
        assert got == expected
        assert list(got) == list(expected)


def test_a_status_this_version_does_not_know_is_an_error_not_a_dict() -> None:
    values = [b"paused", 3, 0, 0, 0, 0, 0, b"0", b"", b"", b"1767225600000", b"c", b"1767225600000", b"{}"]
    with pytest.raises(StorageUnavailableError, match="paused"):
        _status_values(SID, values)
