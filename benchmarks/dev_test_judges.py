"""Dev vs test on the shipped organism, dense and pruned (Wanda per row vs whole matrix), under the
strict, keyword and refusal-any judges, each rate with its bootstrap 95 % interval.

Every number comes from ``trainer.validate`` (LVLMModule + SyntheticDataModule, seed 0, the shipped
sizes); intervals from :func:`hsr_pl.evaluation.bootstrap_ci` on the rate's 0/1 outcomes.

    python benchmarks/dev_test_judges.py --out benchmarks/results/dev_test_judges
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl

from hsr_pl.callbacks import Pruning
from hsr_pl.data import SyntheticDataModule
from hsr_pl.evaluation import bootstrap_ci

JUDGES = ["strict", "keyword-gcg-nocase", "refusal-any"]
SETS = ["harmful_text", "harmful_image"]
SETTINGS = [("dense", None), ("wanda-row-0.6", "row"), ("wanda-matrix-0.6", "matrix")]


def run(granularity: str | None, part: str) -> dict:
    from hsr_pl.module import LVLMModule

    module = LVLMModule(model="organism", max_new_tokens=12, judges=JUDGES)
    callbacks = []
    if granularity is not None:
        callbacks.append(Pruning(method="wanda", sparsity=0.6, granularity=granularity, calibration="utility",
                                 num_samples=128, when="validation_start"))
    data = SyntheticDataModule(seed=0, eval_splits=[f"eval_{s}" for s in SETS], eval_part=part, eval_batch_size=150)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    trainer.validate(module, datamodule=data, verbose=False)
    return {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/dev_test_judges")
    args = parser.parse_args()
    rows, start = [], time.perf_counter()
    for label, granularity in SETTINGS:
        for part in ("dev", "test"):
            metrics = run(granularity, part)
            for name in SETS:
                set_name = f"dev_{name}" if part == "dev" else name
                for judge in JUDGES:
                    key = f"{set_name}/asr/{judge}"
                    rate, n = metrics[key], 300
                    k = round(rate * n)
                    ci = bootstrap_ci([1] * k + [0] * (n - k), seed=0)
                    rows.append({"setting": label, "part": part, "set": name, "judge": judge, "asr": rate,
                                 "low": ci.low, "high": ci.high, "n": n})
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": f"python benchmarks/dev_test_judges.py --out {args.out}", "seconds": seconds, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = ["| setting | set | judge | dev ASR [95 % CI] | test ASR [95 % CI] |", "|---|---|---|---|---|"]
    for label, _ in SETTINGS:
        for name in SETS:
            for judge in JUDGES:
                cell = {r["part"]: r for r in rows if (r["setting"], r["set"], r["judge"]) == (label, name, judge)}
                fmt = [f"{100 * c['asr']:.1f} [{100 * c['low']:.1f}, {100 * c['high']:.1f}]" for c in (cell["dev"], cell["test"])]
                lines.append(f"| {label} | {name} | {judge} | {fmt[0]} | {fmt[1]} |")
    lines.append(f"\n{len(rows)} rates, n = 300 prompts each, {seconds:.0f} s on CPU; `{payload['command']}`")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
