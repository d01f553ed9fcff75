"""Dense → pruned → realigned: the stage table, the one-line verdict, and the PNG plots."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["closing_line", "print_stage_table", "save_curve_png", "save_stage_png", "stage_table"]

STAGES = ("dense", "pruned", "realigned")


def _pct(value: float | None) -> str:  # noqa: D103
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f} %"


def _num(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _rsr_cell(value: float | None, reason: str | None) -> str:
    return "no rise" if reason else _num(value)


def _sparsity(summary: Mapping[str, Any]) -> str:
    """The measured sparsity as it is (59.52 %, not a rounded 60 %)."""
    return _pct2(summary.get("sparsity"))


def _pct2(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def wide_console(console: Console | None, table: Table) -> Console:
    """A console that prints ``table`` whole: off a terminal (a pipe, a log file) rich would cut it
    at 80 columns, so widen the console to the table's natural width there."""
    console = console or Console()
    if not console.is_terminal:
        natural = console.measure(table, options=console.options.update_width(10_000)).maximum
        console.width = max(console.width, natural)
    return console


def stage_table(summary: Mapping[str, Any]) -> Table:
    """Rows: the stages, then the baselines; columns: ASR per judge (one number per harmful set),
    utility, over-refusal, RSR under the headline judge, restored weights. Values in %."""
    judges = summary["judges"]
    sets = [n.removeprefix("harmful_") for n in summary["harmful_sets"]]
    title = f"HSR: {summary['method']} {_sparsity(summary)}, {len(summary['heads'])} heads (values in %)"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  padding=(0, 1))
    short = {"text": "txt", "image": "img"}

    def column(header: str, width: int = 4) -> None:
        wide = max(width, *(len(line) for line in header.split("\n")))
        table.add_column(escape(header), justify="right", no_wrap=True, min_width=wide)

    table.add_column("model", no_wrap=True)
    for i, _ in enumerate(judges):
        for n in sets:
            column(f"[{i + 1}]\n{short.get(n, n[:4])}")
    column("util")
    column("over-\nref.")
    column(f"RSR\n[{judges.index(summary['judge']) + 1}]")
    column("rest-\nored", width=len(f"{max([summary['restored_params']] + [b['restored_params'] for b in summary.get('baselines', {}).values()]):,}"))

    def asr_cells(per_judge: Mapping[str, Mapping[str, Any]]) -> list[str]:
        return [_num(per_judge.get(j, {}).get(f"asr_{n}")) for j in judges for n in sets]

    for stage in STAGES:
        row = summary[stage]
        restored = f"{summary['restored_params']:,}" if stage == "realigned" else ""
        rsr = _rsr_cell(summary["rsr"], summary.get("rsr_reason")) if stage == "realigned" else ""
        style = "bold" if stage == "realigned" else None
        table.add_row(stage, *asr_cells(row["judges"]), _num(row["utility"]), _num(row["over_refusal"]), rsr, restored,
                      style=style)
    if summary.get("baselines"):
        table.add_section()
    for name, base in summary.get("baselines", {}).items():
        table.add_row(name, *asr_cells(base["judges"]), _num(base.get("utility")), _num(base.get("over_refusal")),
                      _rsr_cell(base["rsr"], summary.get("rsr_reason")), f"{base['restored_params']:,}", style="dim")
    legend = ", ".join(f"[{i + 1}] {j}" for i, j in enumerate(judges))
    table.caption = escape(f"attack success rate per harmful set under the judges {legend}; utility and "
                           f"over-refusal averaged over their sets. {closing_line(summary)}"
                           + "".join(f" Baseline {n} {why}." for n, why in summary.get("baselines_left_out", {}).items()))
    return table


def restored_share(summary: Mapping[str, Any]) -> str:
    """``93.1 % of the lost safety restored``, or why there is no ratio (a rise within noise)."""
    if summary.get("rsr_reason"):
        return f"{summary['rsr_reason']}, so no restoration rate"
    return f"{_pct(summary['rsr'])} of the lost safety restored"


def closing_line(summary: Mapping[str, Any]) -> str:
    """What happened, in words, under the headline judge."""
    judge = summary["judge"]
    dense, pruned, realigned = (summary[s] for s in STAGES)
    return (
        f"{summary['method']} at {_sparsity(summary)} raised the attack success rate [{judge}] from "
        f"{_pct(dense['asr'])} to {_pct(pruned['asr'])}; HSR restored {summary['restored_params']:,} weights "
        f"({1e4 * summary['restored_ratio_lm']:.2f} ‱ of the language model) in {len(summary['heads'])} heads and brought "
        f"it to {_pct(realigned['asr'])}: {restored_share(summary)}; utility "
        f"{_pct(pruned['utility'])} → {_pct(realigned['utility'])}, over-refusal {_pct(pruned['over_refusal'])} → "
        f"{_pct(realigned['over_refusal'])}."
    )


def print_stage_table(summary: Mapping[str, Any], console: Console | None = None) -> None:
    table = stage_table(summary)
    wide_console(console, table).print(table)


def save_curve_png(path: str | Path, curve: Mapping[str, list[Mapping[str, Any]]], judge: str,
                   marks: Mapping[str, tuple[float, float]] | None = None) -> Path:
    """RSR against restored weights (log x), one line per method; needs matplotlib (the ``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for name, points in curve.items():
        pts = sorted((p["restored_params"], p["rsr"]) for p in points if p["restored_params"] > 0 and p["rsr"] is not None)
        if pts:
            ax.plot([x for x, _ in pts], [100 * y for _, y in pts], marker="o", label=name,
                    linewidth=2.5 if name == "hsr" else 1.2)
    for name, (x, y) in (marks or {}).items():
        ax.scatter([x], [100 * y], s=90, marker="*", zorder=5, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("restored weights (log scale)")
    ax.set_ylabel(f"safety restoration rate [{judge}] (%)")
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("How much safety comes back per restored weight")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_stage_png(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """Grouped bars: ASR per judge (and utility) at each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = summary["judges"]
    labels = [*(f"ASR [{j}]" for j in judges), "utility", "over-refusal"]
    fig, ax = plt.subplots(figsize=(7.5, 4), dpi=120)
    width = 0.8 / len(STAGES)
    for i, stage in enumerate(STAGES):
        row = summary[stage]
        values = [row["judges"][j]["asr"] for j in judges] + [row["utility"], row["over_refusal"]]
        xs = [k + (i - 1) * width for k in range(len(labels))]
        ax.bar(xs, [100 * (v or 0) for v in values], width=width, label=stage)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend()
    ax.set_title(f"{summary['method']} {_sparsity(summary)}: dense, pruned, realigned")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
