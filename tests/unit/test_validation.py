"""The JSON text every result, signature and metadata value is stored as."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker import validation
from tracker.errors import TrackerValidationError

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(_json_values)
def test_stored_text_is_what_json_dumps_gives_with_the_same_options(value: Any) -> None:
    expected = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    assert validation.compact_json(value) == expected
    assert validation.json_text(value, "result", 10**9) == expected


def _cycle() -> list[Any]:
    looped: list[Any] = []
    looped.append(looped)
    return looped


@pytest.mark.parametrize(
    ("value", "why"),
    [(_cycle(), "not JSON-serialisable"), ({"a": math.nan}, "Out of range"), ({1j: 1}, "keys must be"),
     (object(), "not JSON"), ("\ud800", "surrogate"), ("é" * 60, "100-byte cap")],
)  # fmt: skip
def test_what_cannot_be_stored_as_json_is_refused_with_the_reason(value: Any, why: str) -> None:
    with pytest.raises(TrackerValidationError, match=why) as caught:
        validation.json_text(value, "result", 100)
    assert caught.value.field == "result"
