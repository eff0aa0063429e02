"""The public surface is what docs/api.md lists: a new export without a line there fails here."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def documented() -> dict[str, set[str]]:
    """Module -> the names its section of docs/api.md lists (first column of its table)."""
    sections: dict[str, set[str]] = {}
    module = None
    for line in API_DOC.read_text().splitlines():
        heading = re.fullmatch(r"## `([a-z_.]+)`", line)
        if heading:
            module = heading.group(1)
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
