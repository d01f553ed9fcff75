"""Dense → pruned → realigned: the stage table, the one-line verdict, and the PNG plots."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["closing_line", "print_stage_table", "save_curve_png", "save_stage_png", "stage_table"]

STAGES = ("dense", "pruned", "realigned")


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f} %"


def stage_table(summary: Mapping[str, Any]) -> Table:
    """Rows: the stages (and baselines); columns: ASR per harmful set under each judge, utility, over-refusal, RSR."""
    judges = summary["judges"]
    sets = summary["harmful_sets"]
    table = Table(title=f"HSR on {summary.get('model', 'the model')}: {summary['method']} {100 * summary['sparsity']:.0f} %",
                  title_justify="left")
    table.add_column("stage")
    for judge in judges:
        for name in sets:
            table.add_column(f"ASR {name.removeprefix('harmful_')}\n[{judge}]", justify="right")
    table.add_column("utility", justify="right")
    table.add_column("over-\nrefusal", justify="right")
    table.add_column(f"RSR\n[{summary['judge']}]", justify="right")
    table.add_column("restored", justify="right")
    for stage in STAGES:
        row = summary[stage]
        cells = [_pct(row["judges"][j].get(f"asr_{n.removeprefix('harmful_')}")) for j in judges for n in sets]
        restored = "" if stage != "realigned" else (
            f"{summary['restored_params']:,} ({1e4 * summary['restored_ratio_lm']:.2f} ‱)")
        rsr = _pct(summary["rsr"]) if stage == "realigned" else ""
        table.add_row(stage, *cells, _pct(row["utility"]), _pct(row["over_refusal"]), rsr, restored)
    for name, base in summary.get("baselines", {}).items():
        cells = [_pct(base["judges"].get(j, {}).get(f"asr_{n.removeprefix('harmful_')}")) for j in judges for n in sets]
        table.add_row(f"[dim]baseline {name}[/dim]", *cells, _pct(base.get("utility")), _pct(base.get("over_refusal")),
                      _pct(base["rsr"]), f"{base['restored_params']:,}")
    table.caption = closing_line(summary)
    return table


def closing_line(summary: Mapping[str, Any]) -> str:
    """What happened, in words, under the headline judge."""
    judge = summary["judge"]
    dense, pruned, realigned = (summary[s] for s in STAGES)
    return (
        f"{summary['method']} at {100 * summary['sparsity']:.0f} % raised the attack success rate [{judge}] from "
        f"{_pct(dense['asr'])} to {_pct(pruned['asr'])}; HSR restored {summary['restored_params']:,} weights "
        f"({1e4 * summary['restored_ratio_lm']:.2f} ‱ of the language model) in {len(summary['heads'])} heads and brought "
        f"it to {_pct(realigned['asr'])}: {_pct(summary['rsr'])} of the lost safety restored; utility "
        f"{_pct(pruned['utility'])} → {_pct(realigned['utility'])}, over-refusal {_pct(pruned['over_refusal'])} → "
        f"{_pct(realigned['over_refusal'])}."
    )


def print_stage_table(summary: Mapping[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(stage_table(summary))


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
    ax.set_title(f"{summary['method']} {100 * summary['sparsity']:.0f} %: dense, pruned, realigned")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
