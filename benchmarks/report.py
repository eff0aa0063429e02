"""What a benchmark returns, how it is judged against its target, and how the table is printed."""

from __future__ import annotations

import math
import operator
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}


@dataclass(frozen=True)
class Target:
    """A bound on one figure of a row: ``ratio <= 1.05``, ``ours <= 2``...

    Args:
        on: Which figure is judged: the ratio, or our own value.
        op: ``"<="``, ``">="`` or ``"<"``.
        value: The bound.
    """

    on: Literal["ratio", "ours"]
    op: Literal["<=", ">=", "<"]
    value: float

    def met(self, row: Row) -> bool | None:
        figure = row.ratio if self.on == "ratio" else row.ours
        if figure is None or math.isnan(figure):
            return None
        return _OPS[self.op](figure, self.value)

    def __str__(self) -> str:
        return f"{self.on} {self.op} {self.value:g}"


@dataclass
class Row:
    """One line of the table.

    ``ours`` and ``baseline`` are in ``unit``; ``ratio`` is ours / baseline unless ``note`` says
    otherwise (e.g. a rate ratio). Rows without a target are informational.
    """

    name: str
    unit: str
    ours: float | None
    baseline: float | None = None
    ratio: float | None = None
    baseline_name: str = ""
    target: Target | None = None
    note: str = ""

    @property
    def passed(self) -> bool | None:
        return self.target.met(self) if self.target is not None else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = str(self.target) if self.target else None
        data["passed"] = self.passed
        return data


@dataclass
class Section:
    """What one benchmark produced: its rows and the raw figures behind them."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "seconds": round(self.seconds, 2),
            "rows": [row.to_json() for row in self.rows],
            "details": self.details,
        }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free interval for the median of what ``values`` were drawn from.

    The k-th smallest and k-th largest values bound the median with probability
    ``1 - 2 * P(Binomial(n, 1/2) < k)``, whatever the distribution (order statistics). The
    narrowest such interval that reaches ``confidence`` is returned as ``(low, high, coverage)``;
    with too few values for that, the widest one (all of them) and its lower coverage.
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")
    k, below = 1, 0  # below: how many of the 2**n outcomes put fewer than k values under the median
    while True:
        below += math.comb(n, k - 1)
        if k >= (n + 1) // 2 or 1 - 2 * (below + math.comb(n, k)) / 2**n < confidence:
            break
        k += 1
    return float(ordered[k - 1]), float(ordered[n - k]), 1 - 2 * below / 2**n


def interval_row(values: Sequence[float], of: str) -> Row:
    """The row under a median ratio: the interval that holds the median (see :func:`median_interval`)."""
    low, high, coverage = median_interval(values)
    return Row(
        f"its median's {coverage:.0%} interval, from the {of} alone: low, high",
        "ratio",
        low,
        high,
        baseline_name="high",
        note="order statistics of the ratios: no assumption on their distribution",
    )


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if magnitude < 1 else f"{value:.2f}"


def _verdict(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: ""}[passed]


def table(sections: Sequence[Section], title: str) -> Table:
    """The results as a rich table: one row per measured figure."""
    grid = Table(title=title, title_justify="left", show_lines=False)
    for column, justify in (
        ("#", "left"),
        ("measure", "left"),
        ("ours", "right"),
        ("baseline", "right"),
        ("unit", "left"),
        ("ratio", "right"),
        ("target", "left"),
        ("", "left"),
    ):
        grid.add_column(column, justify=justify)  # type: ignore[arg-type]
    for section in sections:
        for i, row in enumerate(section.rows):
            grid.add_row(*_cells(section.name if i == 0 else "", row))
        grid.add_section()
    return grid


def _cells(label: str, row: Row) -> list[str]:
    """One table row's cells, shared by the terminal and the Markdown table."""
    baseline = _number(row.baseline)
    if row.baseline_name and row.baseline is not None:
        baseline = f"{baseline} ({row.baseline_name})"
    target = str(row.target) if row.target else ""
    return [label, row.name, _number(row.ours), baseline, row.unit, _number(row.ratio), target, _verdict(row.passed)]


def markdown(sections: Sequence[Section]) -> str:
    """The same table as Markdown (what goes in the README)."""
    lines = [
        "| # | measure | ours | baseline | unit | ratio | target | |",
        "|---|---|---:|---:|---|---:|---|---|",
    ]
    for section in sections:
        for i, row in enumerate(section.rows):
            lines.append("| " + " | ".join(_cells(section.name if i == 0 else "", row)) + " |")
    return "\n".join(lines)


def print_table(sections: Sequence[Section], title: str) -> None:
    Console(width=160).print(table(sections, title))
