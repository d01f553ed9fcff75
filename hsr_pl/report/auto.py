"""What ``budget: auto`` did, for people: the per-round table, the closing lines and the plot.

Reads the JSON-able summary of :meth:`hsr_pl.realign.auto.AutoOutcome.summary` (as stored in
``realignment.json`` under ``auto`` and in StageEvaluation's ``summary.json``), so a saved file
can be re-plotted without the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hsr_pl.io import atomic_path

from .stages import wide_console

__all__ = ["auto_lines", "auto_table", "print_auto_table", "save_auto_png"]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _rows(summary: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [summary["dense"], summary["pruned"], *summary["rounds"], *summary.get("bisection", [])]


def _rsr(point: Mapping[str, Any], summary: Mapping[str, Any]) -> float | None:
    rise = summary["pruned"]["asr"] - summary["dense"]["asr"]
    return None if rise <= 0 else (summary["pruned"]["asr"] - point["asr"]) / rise


def auto_lines(summary: Mapping[str, Any]) -> list[str]:
    """The closing lines: why it stopped (last), and, when the target was not met, the residual damage."""
    final = summary["final"]
    lines = [f"automatic budget: kept {final['restored']:,} restored weights ({final['label']}); dev ASR "
             f"{_pct(final['asr'])} % (dense {_pct(summary['dense']['asr'])} %, pruned {_pct(summary['pruned']['asr'])} %)"]
    if summary.get("residual"):
        lines.append(summary["residual"])
    lines.append(f"stopped: {summary['stop']['reason']}")
    return lines


def auto_table(summary: Mapping[str, Any], title: str = "automatic budget (dev sets, values in %)") -> Table:
    """One row per measured state: dense, pruned, each round, each bisection try."""
    judges = list(summary["dense"].get("asr_by_judge", {}))
    head = summary.get("judge") or (judges[0] if judges else "headline")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    table.add_column("state", no_wrap=True)
    table.add_column("restored", justify="right")
    for i, _ in enumerate(judges):
        table.add_column(f"ASR [{i + 1}]", justify="right")
    table.add_column(f"RSR [{head}]", justify="right")
    table.add_column("util", justify="right")
    table.add_column("over-ref.", justify="right")
    table.add_column("refusal NLL", justify="right")
    table.add_column("s", justify="right")
    final = summary["final"]
    for row in _rows(summary):
        cells = [_pct(row.get("asr_by_judge", {}).get(j)) for j in judges]
        rsr = _rsr(row, summary) if row["label"] not in ("dense", "pruned") else None
        loss = row.get("refusal_loss")
        style = "bold" if row is final or (row["label"] == final["label"] and row["restored"] == final["restored"]) else None
        table.add_row(row["label"], f"{row['restored']:,}", *cells, _pct(rsr), _pct(row.get("utility")),
                      _pct(row.get("over_refusal")), "-" if loss is None else f"{loss:.4f}", f"{row.get('seconds', 0):.1f}",
                      style=style)
    legend = ", ".join(f"[{i + 1}] {j}" for i, j in enumerate(judges))
    table.caption = escape(f"judges {legend}. " + ". ".join(auto_lines(summary)) + ".")
    return table


def print_auto_table(summary: Mapping[str, Any], console: Console | None = None) -> None:
    table = auto_table(summary)
    wide_console(console, table).print(table)


def save_auto_png(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """Dev ASR, utility and over-refusal against restored weights, with the stop marked.

    Needs matplotlib (the ``plot`` extra): an ImportError tells the caller to skip the plot.
    """
    import matplotlib  # optional: the plot extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: the plot extra

    points = sorted(([summary["pruned"]] + list(summary["rounds"]) + list(summary.get("bisection", []))),
                    key=lambda p: p["restored"])
    xs = [p["restored"] for p in points]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    ax.plot(xs, [100 * p["asr"] for p in points], marker="o", label=f"dev ASR [{summary.get('judge') or 'headline judge'}]", linewidth=2)
    for key, name in (("utility", "dev utility"), ("over_refusal", "dev over-refusal")):
        ys = [(x, 100 * p[key]) for x, p in zip(xs, points) if p.get(key) is not None]
        if ys:
            ax.plot([x for x, _ in ys], [y for _, y in ys], marker=".", label=name, linewidth=1.2)
    ax.axhline(100 * summary["dense"]["asr"], color="grey", linestyle="--", linewidth=0.8, label="dense dev ASR")
    ax.axvline(summary["final"]["restored"], color="black", linestyle=":", linewidth=1.0, label="kept")
    ax.set_xlabel("restored weights")
    ax.set_ylabel("%")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(("stopped: " + summary["stop"]["reason"])[:110], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
