"""Does the organism lose its refusals under pruning? Dense vs pruned, per method, sparsity, seed.

For each trained organism checkpoint: evaluate it dense, then, for every method and sparsity, load
it again, prune it with the Pruning callback (calibrated on the utility split, 128 samples, as
SPEC §1) and evaluate it on the held-out synthetic sets. Every number comes from
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "magnitude"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    parser.add_argument("--out", default="benchmarks/results/organism_effect")
    args = parser.parse_args()
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
    out = Path(args.out)
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


if __name__ == "__main__":
    main()
