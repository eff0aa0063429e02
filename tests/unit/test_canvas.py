"""JSON Canvas files: valid ones load, bad ones get a clear error naming the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tracker.canvas import CanvasError, load_canvas


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "x.canvas"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def node(i: str, **extra: object) -> dict[str, object]:
    return {"id": i, "type": "text", "x": 0, "y": 0, "width": 10, "height": 10, "text": f"node {i}", **extra}


def test_loads_nodes_and_edges(tmp_path: Path) -> None:
    group = {"id": "g", "type": "group", "x": 0, "y": 0, "width": 1, "height": 1, "label": "box"}
    edge = {"id": "e", "fromNode": "a", "toNode": "b"}
    canvas = load_canvas(write(tmp_path, {"nodes": [node("a"), node("b"), group], "edges": [edge]}))
    assert [n.id for n in canvas.work_nodes] == ["a", "b"]
    assert canvas.edges[0].from_node == "a"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ({"nodes": [node("a"), node("a")]}, "unique"),
        ({"nodes": [node("a")], "edges": [{"id": "e", "fromNode": "a", "toNode": "zz"}]}, "does not exist"),
        ({"nodes": [{"id": "a", "type": "text", "x": 0, "y": 0, "width": 1, "height": 1}]}, "needs 'text'"),
        ({"nodes": [{"id": "a", "type": "video", "x": 0, "y": 0, "width": 1, "height": 1}]}, "type"),
        ([1, 2], "JSON Canvas"),
    ],
)
def test_bad_files_are_refused_clearly(tmp_path: Path, content: object, message: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(CanvasError, match=message) as caught:
        load_canvas(path)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CanvasError, match="cannot read"):
        load_canvas(tmp_path / "nope.canvas")
