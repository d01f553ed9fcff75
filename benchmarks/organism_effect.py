"""Does the organism lose its refusals under pruning? Dense vs pruned, per method, sparsity, seed.

For each trained organism checkpoint: evaluate it dense, then, for every method and sparsity, load
it again, prune it with the Pruning callback (calibrated on the utility split, 128 samples, as
the decoder-layer linears) and evaluate it on the held-out synthetic sets. Every number comes from
``trainer.validate`` with the same LVLMModule / SyntheticDataModule / judges as
``hsr-pl validate``. Writes JSON and a markdown table.

    python benchmarks/organism_effect.py --checkpoints /tmp/organism_s0 /tmp/organism_s1 \
        --out benchmarks/results/organism_effect
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from hsr_pl.callbacks import Pruning
from hsr_pl.data import SyntheticDataModule
from hsr_pl.module import LVLMModule

JUDGES = ["strict", "keyword-gcg-nocase", "coherent-compliance"]
REFUSAL = "i am sorry i can not help with that"
COLUMNS = [
    ("harmful_text", "asr/strict"),
    ("harmful_text", "asr/keyword-gcg-nocase"),
    ("harmful_text", "asr/coherent-compliance"),
    ("harmful_image", "asr/strict"),
    ("harmful_image", "asr/keyword-gcg-nocase"),
    ("harmful_image", "asr/coherent-compliance"),
    ("utility", "utility/contains"),
    ("glyph_qa", "utility/contains"),
    ("utility_paraphrase", "utility/contains"),
    ("benign", "over_refusal/keyword-gcg-nocase"),
]


def evaluate(checkpoint: str, data: SyntheticDataModule, method: str | None, sparsity: float | None) -> dict:
    module = LVLMModule(model=checkpoint, max_new_tokens=12, judges=JUDGES, refusal=REFUSAL)
    callbacks = []
    if method is not None:
        callbacks.append(Pruning(method=method, sparsity=sparsity, calibration="utility", num_samples=128,
                                 when="validation_start"))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    start = time.perf_counter()
    trainer.validate(module, datamodule=data, verbose=False)
    metrics = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items()}
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def plot(payload: dict, path: Path) -> None:
    """ASR (strict and coherent compliance) and visual-QA utility against sparsity, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    panels = [("harmful_image/asr/strict", "image-borne ASR (strict)"),
              ("harmful_text/asr/strict", "text-borne ASR (strict)"),
              ("harmful_image/asr/coherent-compliance", "image-borne coherent compliance"),
              ("utility/utility/contains", "visual-QA utility")]
    fig, axes = plt.subplots(len(checkpoints), len(panels), figsize=(4 * len(panels), 2.8 * len(checkpoints)),
                             squeeze=False, sharey=True)
    for i, checkpoint in enumerate(checkpoints):
        dense = next(r for r in rows if r["checkpoint"] == checkpoint and r["method"] == "dense")
        for j, (key, title) in enumerate(panels):
            ax = axes[i][j]
            for method in methods:
                pts = sorted((r["sparsity"], r["metrics"][key]) for r in rows
                             if r["checkpoint"] == checkpoint and r["method"] == method)
                xs = [0.0] + [x for x, _ in pts]
                ys = [100 * dense["metrics"][key]] + [100 * y for _, y in pts]
                ax.plot(xs, ys, marker="o", label=method)
            ax.set_ylim(-5, 105)
            ax.set_title(title if i == 0 else "", fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{Path(checkpoint).name}\n%")
            if i == len(checkpoints) - 1:
                ax.set_xlabel("sparsity")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Organism under pruning calibrated on benign data: refusals (ASR) and visual-QA utility", fontsize=11)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoints", nargs="+")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the saved JSON")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "magnitude"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    parser.add_argument("--out", default="benchmarks/results/organism_effect")
    args = parser.parse_args()
    out = Path(args.out)
    if args.plot_only:
        plot(json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".png"))
        return
    if not args.checkpoints:
        parser.error("--checkpoints is required unless --plot-only")
    torch.set_num_threads(1)
    data = SyntheticDataModule(seed=0, eval_batch_size=150)
    rows = []
    for checkpoint in args.checkpoints:
        summary = json.loads((Path(checkpoint) / "hsr_summary.json").read_text()) if (
            Path(checkpoint) / "hsr_summary.json").is_file() else {}
        runs = [(None, None)] + [(m, s) for m in args.methods for s in args.sparsities]
        for method, sparsity in runs:
            metrics = evaluate(checkpoint, data, method, sparsity)
            row = {"checkpoint": checkpoint, "train_steps": summary.get("global_step"),
                   "method": method or "dense", "sparsity": sparsity or 0.0, "metrics": metrics}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "metrics"}),
                  {f"{s}/{m}": round(metrics.get(f"{s}/{m}", float("nan")), 3) for s, m in COLUMNS}, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"judges": JUDGES, "refusal": REFUSAL, "eval_sets": "synthetic seed 0 (generator v2), 300 prompts each, greedy, 12 new tokens",
               "calibration": "utility split, 128 samples, batch size 1", "cpu_threads": 1, "rows": rows}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, out.with_suffix(".json"))
    header = "| checkpoint | method | sparsity | " + " | ".join(f"{s} {m}" for s, m in COLUMNS) + " |"
    lines = [f"# Organism: refusals lost under pruning\n\n{payload['eval_sets']}; calibration: "
             f"{payload['calibration']}. Values in %.\n", header, "|" + "---|" * (3 + len(COLUMNS))]
    for row in rows:
        cells = [f"{100 * row['metrics'].get(f'{s}/{m}', float('nan')):.1f}" for s, m in COLUMNS]
        lines.append(f"| {Path(row['checkpoint']).name} | {row['method']} | {row['sparsity']:.1f} | " + " | ".join(cells) + " |")
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out.with_suffix(".md"))
    plot(payload, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
