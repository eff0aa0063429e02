"""JSON Canvas 1.0 files (``.canvas``): nodes and edges, validated with pydantic.

See https://jsoncanvas.org/spec/1.0/. Only the fields the spec names are accepted, with the
spec's types; a bad file raises :class:`CanvasError` naming the file and the problem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tracker.errors import TrackerValidationError


class CanvasError(TrackerValidationError):
    """A ``.canvas`` file could not be read or is not valid JSON Canvas."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__("canvas file", path, reason)


class CanvasNode(BaseModel):
    """One node: a text card, a file, a link, or a group box."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = Field(min_length=1)
    type: Literal["text", "file", "link", "group"]
    x: int
    y: int
    width: int
    height: int
    color: str | None = None
    text: str | None = None
    file: str | None = None
    subpath: str | None = None
    url: str | None = None
    label: str | None = None

    @model_validator(mode="after")
    def _content_for_type(self) -> CanvasNode:
        required = {"text": "text", "file": "file", "link": "url"}.get(self.type)
        if required and getattr(self, required) is None:
            raise ValueError(f"a {self.type} node needs '{required}'")
        return self


class CanvasEdge(BaseModel):
    """A connection between two nodes."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    id: str = Field(min_length=1)
    from_node: str = Field(alias="fromNode")
    to_node: str = Field(alias="toNode")
    label: str | None = None


class Canvas(BaseModel):
    """A whole canvas. Node and edge ids are unique; edges join existing nodes."""

    model_config = ConfigDict(frozen=True)

    nodes: list[CanvasNode] = Field(default_factory=list)
    edges: list[CanvasEdge] = Field(default_factory=list)

    @model_validator(mode="after")
    def _ids(self) -> Canvas:
        ids = [n.id for n in self.nodes]
        if len(set(ids)) != len(ids):
            raise ValueError("node ids must be unique")
        known = set(ids)
        for edge in self.edges:
            if edge.from_node not in known or edge.to_node not in known:
                raise ValueError(f"edge {edge.id!r} joins a node that does not exist")
        return self

    @property
    def work_nodes(self) -> list[CanvasNode]:
        """The nodes that are work (every node but group boxes), in file order."""
        return [n for n in self.nodes if n.type != "group"]


def load_canvas(path: str | Path) -> Canvas:
    """Read and validate a ``.canvas`` file.

    Raises:
        CanvasError: missing or unreadable file, not JSON, or not JSON Canvas.
    """
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CanvasError(where, f"cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise CanvasError(where, f"not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CanvasError(where, f"not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (RecursionError, ValueError) as exc:  # nested too deep; an integer too long to read
        raise CanvasError(where, f"not JSON that can be read ({type(exc).__name__})") from None
    try:
        return Canvas.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        place = ".".join(str(p) for p in first["loc"]) or "top level"
        raise CanvasError(where, f"not JSON Canvas 1.0 ({place}: {first['msg']})") from None
