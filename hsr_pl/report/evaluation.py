"""The evaluation summary table printed at the end of ``validate``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rich.console import Console
from rich.table import Table

__all__ = ["eval_table", "print_eval_table"]


def _fmt(value) -> str:
    value = float(value)
    return "nan" if value != value else f"{100 * value:.1f} %"


def eval_table(rows: Iterable[tuple[str, str, Mapping[str, object], int]]) -> Table:
    """One row per evaluation set: its kind, n, and every metric (names carry the judge)."""
    rows = list(rows)
    columns: list[str] = []
    for _, _, values, _ in rows:
        columns.extend(name for name in values if name not in columns)
    table = Table(title="hsr-pl evaluation (greedy decoding)", header_style="bold")
    table.add_column("set")
    table.add_column("kind")
    table.add_column("n", justify="right")
    for name in columns:
        table.add_column(name, justify="right")
    for eval_set, kind, values, count in rows:
        table.add_row(eval_set, kind, str(count), *(_fmt(values[c]) if c in values else "" for c in columns))
    return table


def print_eval_table(rows, console: Console | None = None) -> None:
    (console or Console()).print(eval_table(rows))
