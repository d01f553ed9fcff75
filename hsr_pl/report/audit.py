"""The safety audit's report: original vs compressed on the same prompts, one table, JSON, a plot.

:func:`build_audit` turns the per-prompt verdicts of both models
(:func:`hsr_pl.evaluation.per_prompt.evaluate_per_prompt`) into the summary: rates per set, per
category and per judge for each model, the change with a paired bootstrap interval
(:func:`hsr_pl.evaluation.paired.paired_bootstrap`), utility and over-refusal change, the judges'
pairwise κ per model, and one verdict line per judge. See docs/audit.md for every column.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hsr_pl.evaluation.paired import paired_bootstrap, verdict
from hsr_pl.evaluation.per_prompt import category_flags, judge_agreement, rates
from hsr_pl.evaluation.runner import headline

__all__ = ["audit_table", "build_audit", "closing_line", "print_audit", "save_audit_png"]


def _f(flags: Sequence[bool]) -> list[float]:
    return [1.0 if f else 0.0 for f in flags]


def build_audit(
    original: Mapping[str, Mapping[str, Any]],
    compressed: Mapping[str, Mapping[str, Any]],
    *,
    names: tuple[str, str] = ("original", "compressed"),
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """The audit summary of two per-prompt evaluations of the same sets (JSON-ready)."""
    if set(original) != set(compressed):
        raise ValueError(f"the two evaluations cover different sets: {sorted(original)} vs {sorted(compressed)}")
    harmful = [s for s, r in original.items() if r["kind"] == "harmful"]
    benign = [s for s, r in original.items() if r["kind"] == "benign"]
    judges = list(original[harmful[0]]["flags"]) if harmful else []
    refusers = list(original[benign[0]]["flags"]) if benign else []
    options = {"resamples": resamples, "seed": seed, "level": level}

    def change(sets: Sequence[str], judge: str) -> dict[str, float]:
        return paired_bootstrap([_f(original[s]["flags"][judge]) for s in sets],
                                [_f(compressed[s]["flags"][judge]) for s in sets], **options)

    asr: dict[str, Any] = {}
    for judge in judges:
        overall = change(harmful, judge)
        per_set = {s: change([s], judge) for s in harmful}
        categories = {}
        for s in harmful:
            if original[s]["categories"]:
                a, b = category_flags(original[s], judge), category_flags(compressed[s], judge)
                categories[s] = {c: {**paired_bootstrap([_f(a[c])], [_f(b[c])], **options), "n": len(a[c])}
                                 for c in a if a[c]}
        asr[judge] = {**overall, "verdict": verdict(overall, f"ASR [{judge}]"), "sets": per_set,
                      "categories": categories}
    over_refusal = {j: {**change(benign, j), "sets": {s: change([s], j) for s in benign}} for j in refusers}
    results = {"original": rates(original), "compressed": rates(compressed)}  # by role: the names may be equal
    utility = {}
    for s, row in results["original"].items():
        if row["kind"] == "utility":
            for key, before in row.items():
                if key not in ("kind", "n"):
                    after = results["compressed"][s].get(key)
                    utility[f"{s}/{key}"] = {"before": before, "after": after,
                                             "delta": None if after is None else after - before}
    head = headline(results["original"], judges[0]) if judges else {}
    head2 = headline(results["compressed"], judges[0]) if judges else {}
    mean_utility = {"before": head.get("utility"), "after": head2.get("utility")}
    mean_utility["delta"] = (None if None in mean_utility.values() else mean_utility["after"] - mean_utility["before"])
    rose = [j for j in judges if asr[j]["low"] > 0]
    return {
        "models": {"original": names[0], "compressed": names[1]},
        "judges": judges, "harmful_sets": harmful, "benign_sets": benign, **options,
        "n": {s: original[s]["n"] for s in original},
        "asr": asr, "over_refusal": over_refusal, "utility": utility, "utility_mean": mean_utility,
        "agreement": {"original": judge_agreement(original), "compressed": judge_agreement(compressed)},
        "verdicts": [asr[j]["verdict"] for j in judges],
        "asr_rose_under": rose, "repair_worth_running": bool(rose),
        "results": results,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _delta(change: Mapping[str, float]) -> str:
    if any(math.isnan(change[k]) for k in ("delta", "low", "high")):
        return "-"
    return f"{100 * change['delta']:+.1f} [{100 * change['low']:+.1f}, {100 * change['high']:+.1f}]"


def audit_table(summary: Mapping[str, Any]) -> Table:
    """Rows: every (judge, set) ASR, per category, then over-refusal and utility; columns: both models and the change."""
    models = summary["models"]
    level = int(round(100 * summary["level"]))
    table = Table(title=f"Safety audit: {escape(models['original'])} -> {escape(models['compressed'])}",
                  box=box.SIMPLE_HEAD)
    for header in ("metric", "set / category", "n", "original %", "compressed %", f"change, points [{level} % interval]"):
        table.add_column(header, justify="left" if header in ("metric", "set / category") else "right")
    for judge in summary["judges"]:
        row = summary["asr"][judge]
        table.add_row(escape(f"ASR [{judge}]"), "mean of harmful sets", str(sum(summary["n"][s] for s in summary["harmful_sets"])),
                      _pct(row["before"]), _pct(row["after"]), _delta(row))
        for s, change in row["sets"].items():
            table.add_row("", escape(s), str(summary["n"][s]), _pct(change["before"]), _pct(change["after"]), _delta(change))
            for c, cat in row["categories"].get(s, {}).items():
                table.add_row("", f"  {escape(c)}", str(cat["n"]), _pct(cat["before"]), _pct(cat["after"]), _delta(cat))
    for judge, row in summary["over_refusal"].items():
        table.add_row(escape(f"over-refusal [{judge}]"), "mean of benign sets",
                      str(sum(summary["n"][s] for s in summary["benign_sets"])), _pct(row["before"]), _pct(row["after"]),
                      _delta(row))
    for key, row in summary["utility"].items():
        s, metric = key.split("/", 1)
        table.add_row(escape(metric), escape(s), str(summary["n"][s]), _pct(row["before"]), _pct(row["after"]),
                      "-" if row["delta"] is None else f"{100 * row['delta']:+.1f}")
    return table


def agreement_table(summary: Mapping[str, Any]) -> Table:
    """Cohen's κ of every judge pair on the harmful prompts, original / compressed."""
    judges = summary["judges"]
    table = Table(title="Judge agreement on the harmful prompts: Cohen's κ (original / compressed)", box=box.SIMPLE_HEAD)
    table.add_column("judge")
    for j in judges:
        table.add_column(escape(j), justify="right")
    a, b = summary["agreement"]["original"]["kappa"], summary["agreement"]["compressed"]["kappa"]

    def k(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.2f}"

    for i, j in enumerate(judges):
        table.add_row(escape(j), *[f"{k(a[i][m])} / {k(b[i][m])}" for m in range(len(judges))])
    return table


def closing_line(summary: Mapping[str, Any], command: str | None) -> str:
    """Whether repair is worth running (ASR rose measurably under some judge), with the command."""
    if summary["repair_worth_running"]:
        judges = ", ".join(summary["asr_rose_under"])
        tail = f": {command}" if command else ""
        return f"ASR rose measurably under {judges}; repair is worth running{tail}"
    return "no judge measured an ASR rise; repair is not needed on these sets"


def print_audit(summary: Mapping[str, Any], console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 132))  # the interval column needs room
    console.print(audit_table(summary))
    if len(summary["judges"]) > 1:
        console.print(agreement_table(summary))
    for line in summary["verdicts"]:
        console.print(escape(line))


def save_audit_png(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """ASR per judge, original vs compressed, with the change's interval; needs matplotlib (``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = summary["judges"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    xs = range(len(judges))
    left.bar([x - 0.2 for x in xs], [100 * summary["asr"][j]["before"] for j in judges], width=0.4, label="original")
    left.bar([x + 0.2 for x in xs], [100 * summary["asr"][j]["after"] for j in judges], width=0.4, label="compressed")
    left.set_xticks(list(xs), judges, fontsize=8)
    left.set_ylabel("ASR, mean of harmful sets (%)")
    left.set_ylim(0, 105)
    left.legend()
    deltas = [100 * summary["asr"][j]["delta"] for j in judges]
    low = [d - 100 * summary["asr"][j]["low"] for d, j in zip(deltas, judges)]
    high = [100 * summary["asr"][j]["high"] - d for d, j in zip(deltas, judges)]
    right.errorbar(list(xs), deltas, yerr=[low, high], fmt="o", capsize=5)
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_xticks(list(xs), judges, fontsize=8)
    right.set_ylabel(f"ASR change, points ({int(round(100 * summary['level']))} % interval)")
    fig.suptitle(f"{summary['models']['original']} -> {summary['models']['compressed']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")  # atomic: an earlier audit.png stays whole until the new one is
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
