"""The public surface is what docs/api.md lists: a new export without a line there fails here."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def documented() -> dict[str, set[str]]:
    """Module -> the names its section of docs/api.md lists (first column of its table)."""
    sections: dict[str, set[str]] = {}
    module = None
    for line in API_DOC.read_text().splitlines():
        if line.startswith("## "):
            heading = re.fullmatch(r"## `([a-z_.]+)`", line)
            module = heading.group(1) if heading else None
            if module is not None:
                sections[module] = set()
        elif module is not None and (row := re.match(r"\| `([A-Za-z_]+)` \|", line)):
            sections[module].add(row.group(1))
    return sections


@pytest.mark.parametrize("module", ["tracker", "tracker.celery", "tracker.web"])
def test_every_export_is_documented_and_every_documented_name_exported(module: str) -> None:
    exported = set(importlib.import_module(module).__all__)
    listed = documented()[module]
    assert exported - listed == set(), f"exported by {module} but missing from docs/api.md"
    assert listed - exported == set(), f"in docs/api.md but not exported by {module}"


def test_every_exported_name_exists() -> None:
    for module in ("tracker", "tracker.celery", "tracker.web"):
        imported = importlib.import_module(module)
        assert all(hasattr(imported, name) for name in imported.__all__), module


def documented_verbs() -> list[str]:
    """The first column of docs/api.md's table of the manager's verbs."""
    text = API_DOC.read_text().split("## The manager's verbs", 1)[1]
    return re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.M)


def test_both_managers_have_the_documented_verbs_with_one_signature() -> None:
    from tracker import SessionManager
    from tracker.storage.memory import InMemoryStorageAdapter

    manager = SessionManager(InMemoryStorageAdapter())
    verbs = documented_verbs()
    assert verbs

    def public_verbs(obj: object) -> set[str]:
        plumbing = {"get_instance", "set_instance", "reset_instance", "start_cleanup_scheduler", "cleanup"}
        plumbing |= {"stop_cleanup_scheduler"}
        return {
            name
            for name in dir(obj)
            if not name.startswith("_") and callable(getattr(obj, name)) and name not in plumbing
        } - {"settings", "storage", "sync", "operations", "clock", "astorage", "manager"}

    assert public_verbs(manager) == set(verbs)
    assert public_verbs(manager.sync) == set(verbs)
    for name in verbs:
        awaited, blocking = getattr(manager, name), getattr(manager.sync, name)
        assert inspect.iscoroutinefunction(awaited) and not inspect.iscoroutinefunction(blocking), name
        assert inspect.signature(awaited) == inspect.signature(blocking), name
        assert awaited.__doc__ and awaited.__doc__ == blocking.__doc__, name
