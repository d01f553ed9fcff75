"""The evaluation summary table printed at the end of ``validate``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["eval_table", "print_eval_table"]


def _fmt(value) -> str:
    value = float(value)
    return "nan" if value != value else f"{100 * value:.1f} %"


def eval_table(rows: Iterable[tuple[str, str, Mapping[str, object], int]]) -> Table:
    """One line per (evaluation set, metric); a metric's name carries its judge."""
    table = Table(title="hsr-pl evaluation (greedy decoding)", header_style="bold")
    # In a narrow (e.g. 80-column, non-tty) console the set name folds; n and values never vanish.
    table.add_column("set", overflow="fold")
    table.add_column("kind", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True, min_width=3)
    table.add_column("metric [judge]", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    for eval_set, kind, values, count in rows:
        for i, (name, value) in enumerate(values.items()):
            first = i == 0
            table.add_row(eval_set if first else "", kind if first else "", str(count) if first else "",
                          Text(name), _fmt(value))
    return table


def print_eval_table(rows, console: Console | None = None) -> None:
    (console or Console()).print(eval_table(rows))
