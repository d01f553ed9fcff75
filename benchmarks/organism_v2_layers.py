"""Where does pruning damage the v2 organism? Dense, pruned, and pruned with one layer restored.

For a trained v2 checkpoint: evaluate it dense, prune it with the Pruning callback (Wanda by
default, calibrated on 128 samples of the benign utility split) and evaluate it, then, for every
decoder layer in turn, take the pruned weights, copy that layer's dense linears back ("un-prune
one layer") and evaluate again. A layer whose restoration removes most of the ASR rise holds the
damage. Every number comes from ``trainer.validate`` with the LVLMModule / SyntheticDataModule /
judges of ``hsr-pl validate``; the dev sets by default (settings are chosen on dev).

    python benchmarks/organism_v2_layers.py --checkpoint hsr_pl/assets/organism_v2 --sparsity 0.7 \
        --out benchmarks/results/organism_v2_layers
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from hsr_pl.callbacks import Pruning
from hsr_pl.data import SyntheticDataModule
from hsr_pl.models.adapters import get_adapter
from hsr_pl.module import LVLMModule

JUDGES = ["refusal-any", "keyword-gcg-nocase", "coherent-compliance"]
COLUMNS = [
    ("harmful_text", "asr/refusal-any"),
    ("harmful_text", "asr/coherent-compliance"),
    ("harmful_image", "asr/refusal-any"),
    ("harmful_image", "asr/coherent-compliance"),
    ("utility", "utility/contains"),
]


def validate(module: LVLMModule, data: SyntheticDataModule, callbacks: list) -> dict:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    start = time.perf_counter()
    trainer.validate(module, datamodule=data, verbose=False)
    metrics = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items()}
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def layer_linears(model: torch.nn.Module, index: int) -> dict[str, torch.nn.Linear]:
    """``{qualified name: Linear}`` of decoder layer ``index`` (attention and MLP projections)."""
    adapter = get_adapter(model)
    layer = adapter.layer(index)
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(m)]: m for m in layer.modules() if isinstance(m, torch.nn.Linear)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--part", default="dev", choices=["dev", "test"])
    parser.add_argument("--eval-num-samples", type=int, default=300)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    data = SyntheticDataModule(version=2, seed=0, eval_batch_size=150, eval_part=args.part,
                               eval_num_samples=args.eval_num_samples,
                               eval_splits=["eval_harmful_text", "eval_harmful_image", "eval_utility"])
    prefix = "dev_" if args.part == "dev" else ""  # dev sets report under their own names
    rows = []
    dense = LVLMModule(model=args.checkpoint, max_new_tokens=16, judges=JUDGES)
    rows.append(("dense", validate(dense, data, [])))
    pruned = LVLMModule(model=args.checkpoint, max_new_tokens=16, judges=JUDGES)
    prune = Pruning(method=args.method, sparsity=args.sparsity, calibration="utility", num_samples=128,
                    when="validation_start")
    rows.append((f"{args.method} {args.sparsity:.0%}", validate(pruned, data, [prune])))
    pruned_state = {k: v.detach().clone() for k, v in pruned.model.state_dict().items()}
    dense.configure_model()
    dense_state = dense.model.state_dict()
    for index in get_adapter(dense.model).layer_indices():
        restored = LVLMModule(model=args.checkpoint, max_new_tokens=16, judges=JUDGES)
        restored.configure_model()
        restored.model.load_state_dict(pruned_state)
        with torch.no_grad():
            for name, linear in layer_linears(restored.model, index).items():
                linear.weight.copy_(dense_state[f"{name}.weight"])
        rows.append((f"restore layer {index}", validate(restored, data, [])))
        print(rows[-1][0], {f"{s}/{m}": round(rows[-1][1][f"{prefix}{s}/{m}"], 3) for s, m in COLUMNS}, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"checkpoint": args.checkpoint, "method": args.method, "sparsity": args.sparsity, "part": args.part,
               "eval_num_samples": args.eval_num_samples, "rows": [{"setting": n, **m} for n, m in rows]}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"# Organism v2: where the {args.method} {args.sparsity:.0%} damage sits — {args.part.upper()} sets", "",
             f"`python benchmarks/organism_v2_layers.py --checkpoint {args.checkpoint} --method {args.method} "
             f"--sparsity {args.sparsity} --part {args.part} --out {args.out}`: dense, pruned, and the pruned model "
             f"with one decoder layer's dense linears restored at a time; the {args.part} sets "
             f"({args.eval_num_samples} prompts each), refusal-any at one word edit (the judge's default), greedy, "
             "16 new tokens. Values in %.", "",
             "| setting | " + " | ".join(f"{s} {m}" for s, m in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, metrics in rows:
        cells = [f"{100 * metrics[f'{prefix}{s}/{m}']:.1f}" for s, m in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
