"""The realignment summary as a rich table: what was restored where, and how much that is."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from .stages import wide_console

__all__ = ["print_realignment", "realignment_line", "realignment_table"]


def realignment_line(summary: Mapping[str, Any]) -> str:
    """One sentence: restored count, both ratios (named), heads, swaps."""
    restored = summary["restored_params"]
    per_myriad = 1e4 * summary["restored_ratio_lm"]
    heads = ", ".join(f"{l_}-{h}" for l_, h in summary.get("heads", [])) or "none (head-free)"
    line = (
        f"restored {restored:,} pruned weights = {per_myriad:.3f} ‱ of the {summary['lm_params']:,} language-model "
        f"parameters ({100 * summary['restored_ratio_pruned']:.3f} % of the {summary['pruned_params']:,} pruned) in heads {heads}"
    )
    if summary.get("swapped_out_params"):
        line += f"; {summary['swapped_out_params']:,} kept weights swapped out to stay N:M"
    return line


def realignment_table(summary: Mapping[str, Any], title: str = "safety realignment") -> Table:
    """Per module: layer, projection, the rule's candidates, the pool, restored, swapped out."""
    table = Table(title=title, title_justify="left", show_footer=True)
    table.add_column("layer.proj", footer="total")
    table.add_column("p", justify="right")
    table.add_column("rule ∩ pruned", justify="right")
    table.add_column("pool", justify="right")
    table.add_column("restored", justify="right", footer=f"{summary['restored_params']:,}")
    table.add_column("swapped out", justify="right", footer=f"{summary.get('swapped_out_params', 0):,}")
    for name, row in summary["modules"].items():
        if not row["restored"] and not row["pool"]:
            continue
        p = row.get("p")
        label = f"{row['layer']}.{row['role']}" if "layer" in row else name
        table.add_row(
            label, "-" if p is None else f"{p:.3f}", f"{row['rule_candidates']:,}", f"{row['pool']:,}",
            f"{row['restored']:,}", f"{row['swapped_out']:,}",
        )
    table.caption = realignment_line(summary)
    return table


def print_realignment(summary: Mapping[str, Any], console: Console | None = None) -> None:
    table = realignment_table(summary)
    wide_console(console, table).print(table)
