"""A safety audit of a compressed model, from Python or one command.

``hsr_pl.audit.audit(original, compressed, eval_sets=...)`` evaluates both checkpoints on the same
sets with the same judges and returns the audit summary (also written as ``audit.json`` beside
``audit.png``); the same flow as ``hsr-pl validate --config configs/models/audit_llava_next.yaml``.
From a shell, with the evaluation sets of an evaluation config::

    python -m hsr_pl.audit /models/original /models/compressed --eval-config configs/eval_vlguard_test.yaml

A bad input (missing folder, checkpoints of different models) ends as one line and exit status 2,
before any generation.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from hsr_pl.callbacks import SafetyAudit
from hsr_pl.data import VLGuardDataModule
from hsr_pl.module import LVLMModule

__all__ = ["audit", "main"]


def audit(
    original: str,
    compressed: str,
    *,
    eval_sets: Sequence[Mapping[str, Any]] | None = None,
    data: pl.LightningDataModule | None = None,
    judges: Sequence[str | Mapping[str, Any]] = ("keyword-gcg",),
    refusal: str | None = None,
    max_new_tokens: int = 64,
    output_dir: str = "runs/audit",
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    dtype: str = "float32",
    accelerator: str = "auto",
    devices: int | str = 1,
    eval_batch_size: int = 8,
    repair_train_path: str | None = None,
) -> dict:
    """Audit ``compressed`` against ``original`` (both checkpoint folders) and return the summary.

    Args:
        eval_sets: evaluation sets as in :class:`hsr_pl.data.VLGuardDataModule` (or pass ``data``).
        judges / refusal / max_new_tokens: as in :class:`hsr_pl.module.LVLMModule`.
        resamples / seed / level: the paired bootstrap of every change.
    """
    if data is None:
        if not eval_sets:
            raise ValueError("audit() needs eval_sets=[...] (as in VLGuardDataModule) or data=<a data module>")
        data = VLGuardDataModule(eval_sets=list(eval_sets), eval_batch_size=eval_batch_size)
    callback = SafetyAudit(compressed, resamples=resamples, seed=seed, level=level, output_dir=output_dir,
                           repair_train_path=repair_train_path)
    module = LVLMModule(original, dtype=dtype, judges=list(judges), refusal=refusal, max_new_tokens=max_new_tokens)
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[callback], default_root_dir=output_dir)
    trainer.validate(module, datamodule=data, verbose=False)
    return callback.summary


def _eval_sets(path: str) -> tuple[list[dict], list | None]:
    """``data.init_args.eval_sets`` (and ``model.init_args.judges``) of an evaluation config."""
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ValueError(f"--eval-config {path!r}: {exc.strerror}; give an evaluation config such as "
                         "configs/eval_vlguard_test.yaml") from None
    sets = ((config.get("data") or {}).get("init_args") or {}).get("eval_sets")
    if not sets:
        raise ValueError(f"--eval-config {path!r} has no data.init_args.eval_sets; give an evaluation config")
    judges = ((config.get("model") or {}).get("init_args") or {}).get("judges")
    return list(sets), judges


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hsr_pl.audit", description=__doc__.splitlines()[0])
    parser.add_argument("original", help="folder of the original checkpoint")
    parser.add_argument("compressed", help="folder of the compressed checkpoint (any format repair mode reads)")
    parser.add_argument("--eval-config", required=True, help="an evaluation config (configs/eval_*.yaml)")
    parser.add_argument("--judges", nargs="+", help="judge names (default: the config's, else keyword-gcg)")
    parser.add_argument("--output", default="runs/audit", help="folder for audit.json and audit.png")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--devices", default="1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        sets, judges = _eval_sets(args.eval_config)
        devices = int(args.devices) if args.devices.isdigit() else args.devices
        audit(args.original, args.compressed, eval_sets=sets, judges=args.judges or judges or ["keyword-gcg"],
              max_new_tokens=args.max_new_tokens, output_dir=args.output, dtype=args.dtype, devices=devices,
              seed=args.seed)
    except (ValueError, OSError) as exc:
        text = str(exc).strip().splitlines()
        print(f"hsr-pl audit: error: {text[0] if text else type(exc).__name__}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
