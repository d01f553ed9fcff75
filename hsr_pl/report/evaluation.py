"""The evaluation report printed at the end of ``validate``, and its JSON file.

- :func:`eval_table`: one line per (evaluation set, metric), each metric named by its judge;
- :func:`category_table`: a harmful (or benign) set's rate per category, one column per judge;
- :func:`agreement_table`: a set's judges side by side — each one's rate and their pairwise
  Cohen's κ (raw agreement in brackets), since judges disagree by 15+ points on the same replies;
- :func:`write_eval_json`: all of it, machine-readable.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = [
    "agreement_table",
    "category_table",
    "eval_table",
    "print_eval_breakdowns",
    "print_eval_table",
    "write_eval_json",
]


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


def category_table(summary: Mapping[str, Any]) -> Table | None:
    """Rates per category of one set (None when it has no categories)."""
    per = summary.get("per_category")
    if not per:
        return None
    metric = per[0]["metric"]
    table = Table(title=f"{summary['name']}: {metric} per category", header_style="bold")
    table.add_column("category", overflow="fold")
    table.add_column("n", justify="right", no_wrap=True, min_width=3)
    for judge in per:
        table.add_column(judge["judge"], justify="right", no_wrap=True)
    for category, first in per[0]["categories"].items():
        table.add_row(category, str(first["n"]), *(_fmt(j["categories"][category]["value"]) for j in per))
    return table


def _pct(value: float) -> str:
    return "nan" if value != value else f"{100 * value:.0f}%"


def _kappa(value: float) -> str:
    return "nan" if value != value else f"{value:+.2f}"


def agreement_table(summary: Mapping[str, Any]) -> Table | None:
    """Each judge's rate and the pairwise κ (agreement) matrix of one set (None with < 2 judges)."""
    agreement = summary.get("agreement")
    if not agreement:
        return None
    judges = agreement["judges"]
    title = f"{summary['name']}: judge agreement, Cohen's κ (raw agreement), n={agreement['n']}"
    table = Table(title=title, header_style="bold")
    # Judges are numbered so that the matrix fits an 80-column console with three or four judges.
    table.add_column("judge", overflow="fold")
    table.add_column("rate", justify="right", no_wrap=True)
    for k in range(len(judges)):
        table.add_column(f"[{k + 1}]", justify="right", no_wrap=True)
    for j, name in enumerate(judges):
        cells = [f"{_kappa(agreement['kappa'][j][k])} ({_pct(agreement['agreement'][j][k])})" for k in range(len(judges))]
        table.add_row(f"[{j + 1}] {name}", _fmt(agreement["rate"][j]), *cells)
    return table


def print_eval_breakdowns(summaries: Sequence[Mapping[str, Any]], console: Console | None = None) -> None:
    """Print the per-category and agreement tables of every set that has them."""
    console = console or Console()
    for summary in summaries:
        for table in (category_table(summary), agreement_table(summary)):
            if table is not None:
                console.print(table)


def _json_safe(value: Any) -> Any:
    # JSON has no NaN: undefined values (an empty category, κ of two constant judges) are null.
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_eval_json(path: str | os.PathLike, summaries: Sequence[Mapping[str, Any]], **context: Any) -> Path:
    """Write ``{**context, "sets": summaries}`` as JSON (NaN as null); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe({**context, "sets": list(summaries)}), indent=1) + "\n")
    return path
