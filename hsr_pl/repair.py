"""Repair a model that another tool pruned, from Python: ``hsr_pl.repair.repair(original, pruned, output)``.

The same flow as ``hsr-pl validate --config configs/repair.yaml``: score the heads of the original
model (or read a head-score file), take the masks from the pruned checkpoint, restore, and save
the repaired model with its ``realignment.json`` into a new folder. Without ``eval_sets`` the
callbacks run at the start of a zero-step ``fit`` (no generation at all); with them, inside
``validate``, which then also prints the repaired model's evaluation table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from hsr_pl.callbacks import ExportPretrained, PrunedCheckpoint, SafetyHeadAttribution, SafetyRealignment
from hsr_pl.data import VLGuardDataModule
from hsr_pl.module import LVLMModule

__all__ = ["repair"]


def repair(
    original: str,
    pruned: str,
    output: str,
    *,
    train_path: str,
    image_root: str | None = None,
    scores_path: str | None = None,
    top_h: int = 10,
    attribution: Mapping[str, Any] | None = None,
    realignment: Mapping[str, Any] | None = None,
    eval_sets: Sequence[Mapping[str, Any]] | None = None,
    dtype: str = "float32",
    accelerator: str = "auto",
    devices: int | str = 1,
    overwrite: bool = False,
    num_samples: int = 128,
    heads_path: str | None = None,
) -> dict:
    """Realign ``pruned`` (a checkpoint pruned by any tool) against ``original`` and save it to ``output``.

    Args:
        train_path / image_root: VLGuard-format calibration data (utility, safety splits).
        scores_path: a ``{"<layer>-<head>": score}`` file; default: scan the original model with
            SafetyHeadAttribution (``attribution`` holds its arguments, e.g. ``{"positions": "response"}``).
        realignment: arguments of SafetyRealignment (``method``, ``selection``, ``importance`` …).
        heads_path: the deprecated name of ``scores_path`` (one line says so).
        eval_sets: evaluation sets as in VLGuardDataModule; evaluates the repaired model.
    Returns:
        the realignment manifest written beside the weights (``realignment.json``).
    """
    if heads_path is not None:
        if scores_path is not None:
            raise ValueError("repair(): give scores_path or its deprecated name heads_path, not both")
        import sys

        print(f"hsr-pl: repair(heads_path=...) is deprecated and will be removed; write scores_path={heads_path!r}",
              file=sys.stderr)
        scores_path = heads_path
    evaluate = bool(eval_sets)
    when = "validation_start" if evaluate else "fit_start"
    callbacks: list[pl.Callback] = []
    if scores_path is None:
        settings = {"positions": "response", "num_samples": num_samples, **dict(attribution or {})}
        callbacks.append(SafetyHeadAttribution(top_h=top_h, when=when, heatmap=False, **settings))
    callbacks.append(PrunedCheckpoint(pruned, when=when))
    options = {"num_samples": num_samples, **dict(realignment or {})}
    if scores_path is not None:
        options.update(scores_path=scores_path, top_h=top_h)
    callbacks.append(SafetyRealignment(when=when, **options))
    callbacks.append(ExportPretrained(output, when="validation_end" if evaluate else "fit_end", overwrite=overwrite))
    module = LVLMModule(original, dtype=dtype)
    data = VLGuardDataModule(train_path=train_path, image_root=image_root, eval_sets=list(eval_sets or []),
                             num_samples=num_samples)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, logger=False, enable_checkpointing=False, max_steps=0,
        enable_model_summary=False, callbacks=callbacks, default_root_dir=str(Path(output).parent),
    )
    if evaluate:
        trainer.validate(module, datamodule=data, verbose=False)
    else:
        trainer.fit(module, datamodule=data)
    return json.loads((Path(output) / "realignment.json").read_text())
