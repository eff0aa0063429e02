"""Input checks done before anything reaches a store. Each raises TrackerValidationError."""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from tracker.errors import TrackerValidationError

E = TypeVar("E", bound=StrEnum)

#: Longest canvas path accepted.
MAX_CANVAS_PATH_CHARS = 1024
#: Longest node id accepted.
MAX_NODE_ID_CHARS = 200
#: Longest encoded metadata accepted.
MAX_METADATA_BYTES = 16 * 1024
#: Longest task id or worker name accepted (they are stored in a ``|``-separated node record).
MAX_LABEL_CHARS = 255
#: Highest attempt number accepted: far beyond any retry count, and exact as a Lua number.
MAX_ATTEMPT = 2**31 - 1

_NODE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]+")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def session_id(value: object) -> str:
    """Return ``value`` if it is a canonical (lowercase, hyphenated) UUID string.

    Raises:
        TrackerValidationError: anything else, before it can become part of a key.
    """
    if isinstance(value, str) and _CANONICAL_UUID.fullmatch(value):
        return value  # the common case, checked on every call: one regular expression
    if not isinstance(value, str) or len(value) != 36:
        raise TrackerValidationError("session_id", value, "expected a 36-character UUID")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise TrackerValidationError("session_id", value, "expected a UUID") from None
    if str(parsed) != value:
        raise TrackerValidationError("session_id", value, "expected a lowercase hyphenated UUID")
    return value


def node_id(value: object, sid: str | None = None) -> str:
    """Return ``value`` if it is a usable node id (1-200 chars of ``[A-Za-z0-9._:@/+=-]``)."""
    if not isinstance(value, str) or not value:
        raise TrackerValidationError("node_id", value, "expected a non-empty string", sid)
    if len(value) > MAX_NODE_ID_CHARS:
        raise TrackerValidationError("node_id", value, f"longer than {MAX_NODE_ID_CHARS} characters", sid)
    if not _NODE_ID.fullmatch(value):
        raise TrackerValidationError("node_id", value, "only letters, digits and . _ : @ / + = - are allowed", sid)
    return value


def canvas_path(value: object) -> str:
    """Return ``value`` if it is a non-empty path of printable characters, at most 1024 long."""
    if not isinstance(value, str) or not value.strip():
        raise TrackerValidationError("canvas_path", value, "expected a non-empty string")
    if len(value) > MAX_CANVAS_PATH_CHARS:
        raise TrackerValidationError("canvas_path", value, f"longer than {MAX_CANVAS_PATH_CHARS} characters")
    if not value.isprintable():
        raise TrackerValidationError("canvas_path", value, "contains control characters")
    return value


def path_filter(value: object) -> str:
    """Return ``value`` if it can be a canvas path prefix to list by: a string of 1 to 1024
    characters (one no session's path starts with finds none)."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_CANVAS_PATH_CHARS or not is_utf8(value):
        raise TrackerValidationError(
            "path", value, f"expected a canvas path prefix of 1-{MAX_CANVAS_PATH_CHARS} characters"
        )
    return value


def is_utf8(text: str) -> bool:
    """True when ``text`` can be stored as UTF-8: it holds no lone surrogate (what Python decodes
    an undecodable file name byte to, e.g. ``'\\udcff'`` from ``os.listdir``)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def storable_text(text: str) -> str:
    """Free text (an exception's message) as UTF-8 can hold it: a lone surrogate becomes its
    ``\\udcff`` escape, so that a task failing on an undecodable file name is still recorded."""
    return text if is_utf8(text) else text.encode("utf-8", "backslashreplace").decode()


def node_count(value: object, maximum: int) -> int:
    """Return ``value`` if it is a whole number from 1 to ``maximum`` (a batch of nothing never ends)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise TrackerValidationError("node_count", value, f"expected a whole number from 1 to {maximum}")
    return value


#: Longest duration accepted, in seconds (a hundred years): any longer one is a mistake, and
#: overflows the dates it is added to.
MAX_SECONDS = 100 * 365 * 86400


def positive_seconds(value: object, field: str) -> float:
    """Return ``value`` as a float if it is a number of seconds > 0, at most ``MAX_SECONDS``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_SECONDS:
        raise TrackerValidationError(field, value, f"expected a number of seconds > 0, at most {MAX_SECONDS}")
    return float(value)


def progress(value: object, sid: str | None = None) -> float:
    """Return ``value`` as a float if it is a finite number within 0..100."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TrackerValidationError("progress_percent", value, "expected a number", sid)
    try:
        number = float(value)
    except OverflowError:
        raise TrackerValidationError("progress_percent", value, "must be a finite number within 0..100", sid) from None
    if math.isnan(number) or math.isinf(number) or not 0.0 <= number <= 100.0:
        raise TrackerValidationError("progress_percent", value, "must be a finite number within 0..100", sid)
    return number


def fraction(done: object, total: object = None, sid: str | None = None) -> float:
    """How far a task is, as a fraction within 0..1, rounded to 4 decimals: ``done / total``, or
    ``done`` itself when ``total`` is None.

    Raises:
        TrackerValidationError: not finite numbers, ``total`` not above 0, ``done`` outside 0..total.
    """
    limit = 1.0 if total is None else _finite(total, "total", sid)
    if limit <= 0:
        raise TrackerValidationError("total", total, "must be above 0", sid)
    value = _finite(done, "done", sid)
    if not 0.0 <= value <= limit:
        within = "0..1 (a fraction), or give total" if total is None else f"0..total ({total})"
        raise TrackerValidationError("done", done, f"must be within {within}", sid)
    return round(value / limit, 4)


def _finite(value: object, field: str, sid: str | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TrackerValidationError(field, value, "expected a number", sid)
    try:
        number = float(value)
    except OverflowError:
        raise TrackerValidationError(field, value, "must be a finite number", sid) from None
    if not math.isfinite(number):
        raise TrackerValidationError(field, value, "must be a finite number", sid)
    return number


#: The options of every JSON text stored, in one encoder (``json.dumps`` builds one per call).
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)
_encode = _JSON.encode


def compact_json(value: Any) -> str:
    """``value`` (already checked by :func:`json_text`) as the compact JSON text that is stored."""
    return _encode(value)


def json_text(value: Any, field: str, max_bytes: int, sid: str | None = None) -> str:
    """Encode ``value`` as compact JSON (no NaN), refusing what does not fit in ``max_bytes``."""
    try:
        text = _encode(value)
        # ASCII (the common case) is its own UTF-8; other text is encoded to be measured, and a
        # lone surrogate fails there (it cannot be stored).
        size = len(text) if text.isascii() else len(text.encode())
    except (TypeError, ValueError, RecursionError) as exc:
        # ValueError includes UnicodeEncodeError: a lone surrogate cannot be stored as UTF-8.
        raise TrackerValidationError(field, value, f"not JSON-serialisable ({exc})", sid) from None
    if size > max_bytes:
        raise TrackerValidationError(field, f"<{size} bytes>", f"larger than the {max_bytes}-byte cap", sid)
    return text


def metadata(value: object) -> dict[str, Any]:
    """Return ``value`` if it is a JSON object of at most 16 KiB (None means empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TrackerValidationError("metadata", value, "expected a JSON object with string keys")
    json_text(value, "metadata", MAX_METADATA_BYTES)
    return value


_WORKER_ID = re.compile(r"[A-Za-z0-9@._:-]{1,255}")


def worker_id(value: object) -> str:
    """Return ``value`` if it can name a worker process in a key (``celery@host:1234``)."""
    if not isinstance(value, str) or not _WORKER_ID.fullmatch(value):
        raise TrackerValidationError("worker", value, "expected 1-255 characters of [A-Za-z0-9@._:-]")
    return value


def is_worker_id(value: object) -> bool:
    """True when :func:`worker_id` accepts ``value``."""
    return isinstance(value, str) and _WORKER_ID.fullmatch(value) is not None


_EVENT_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")


def event_id(value: object) -> str:
    """Return ``value`` if it is a stream event id (``<ms>-<seq>``), as sent in ``Last-Event-ID``."""
    if not isinstance(value, str) or not _EVENT_ID.fullmatch(value):
        raise TrackerValidationError("event id", value, "expected '<milliseconds>-<sequence>'")
    return value


def attempt(value: object, sid: str | None = None) -> int | None:
    """Return ``value`` if it is None or a whole number within 1..MAX_ATTEMPT."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ATTEMPT:
        raise TrackerValidationError("attempt", value, f"expected a whole number within 1..{MAX_ATTEMPT}", sid)
    return value


def moment(value: object, field: str, sid: str | None = None) -> datetime | None:
    """Return ``value`` if it is None or a timezone-aware datetime."""
    if value is None:
        return None
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise TrackerValidationError(field, value, "expected a timezone-aware datetime", sid)
    return value


def label(value: object, field: str, sid: str | None = None) -> str | None:
    """Return ``value`` if it is None or a task id / worker name: at most 255 characters, no ``|``."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_LABEL_CHARS or "|" in value or not is_utf8(value):
        raise TrackerValidationError(
            field, value, f"expected a UTF-8 string of at most {MAX_LABEL_CHARS} characters without '|'", sid
        )
    return value


def optional_text(value: object, field: str, max_chars: int, sid: str | None = None) -> str | None:
    """Return ``value`` cut to ``max_chars`` if it is a string (None stays None), as
    :func:`storable_text`."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TrackerValidationError(field, value, "expected a string", sid)
    return storable_text(value[:max_chars])


def flag(value: object, field: str) -> bool:
    """Return ``value`` if it is True or False (not any value Python would take as one)."""
    if not isinstance(value, bool):
        raise TrackerValidationError(field, value, "expected True or False")
    return value


def cursor(value: object) -> str | None:
    """Return ``value`` if it is None or a string (the store checks it is a cursor it handed out)."""
    if value is not None and not isinstance(value, str):
        raise TrackerValidationError("cursor", value, "expected the next_cursor of a previous page")
    return value


def block_ms(value: object, sid: str | None = None) -> int | None:
    """Return ``value`` if it is None or a whole number of milliseconds >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TrackerValidationError("block_ms", value, "expected a whole number of milliseconds >= 0", sid)
    return value


def member(enum: type[E], value: object, field: str, sid: str | None = None) -> E:
    """Return ``value`` as a member of ``enum``, refusing names it does not have."""
    if type(value) is enum:
        return value
    if isinstance(value, str):  # only text is looked up: the enum's error shows any other value's repr whole
        try:
            return enum(str(value))
        except ValueError:
            pass
    allowed = ", ".join(m.value for m in enum)
    raise TrackerValidationError(field, value, f"expected one of: {allowed}", sid)


_TAG = re.compile(r"[A-Za-z0-9_.:@/+=-]{1,64}")

#: Most tags one session may have.
MAX_TAGS = 10


def tag(value: object) -> str:
    """Return ``value`` if it is a tag: 1-64 letters, digits or ``_.:@/+=-`` (``customer:42``)."""
    if not isinstance(value, str) or not _TAG.fullmatch(value):
        raise TrackerValidationError("tag", value, "expected 1-64 letters, digits or _.:@/+=- (e.g. customer:42)")
    return value


def tags(value: object, sid: str | None = None) -> list[str]:
    """Return ``value`` as a list of distinct tags (in order), at most ``MAX_TAGS``; None: none."""
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple | set | frozenset):
        raise TrackerValidationError("tags", value, "expected a list of tags, e.g. ['nightly', 'customer:42']", sid)
    found = list(dict.fromkeys(tag(t) for t in value))
    if len(found) > MAX_TAGS:
        raise TrackerValidationError("tags", len(found), f"at most {MAX_TAGS} tags", sid)
    return found
