"""Repair a model that another tool pruned, from Python: ``hsr_pl.repair.repair(original, pruned, output)``.

The same flow as ``hsr-pl validate --config configs/repair.yaml``: score the heads of the original
model (or read a head-score file), take the masks from the pruned checkpoint, restore, and save
the repaired model with its ``realignment.json`` into a new folder. Without ``eval_sets`` the
callbacks run at the start of a zero-step ``fit`` (no generation at all); with them, inside
``validate``, which then also prints the repaired model's evaluation table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from hsr_pl.callbacks import ExportPretrained, PrunedCheckpoint, SafetyHeadAttribution, SafetyRealignment
from hsr_pl.data import VLGuardDataModule, dev_sets
from hsr_pl.evaluation.judges import make_judge
from hsr_pl.evaluation.organism import REFUSAL
from hsr_pl.models.organism import ORGANISM_PACKAGE_PATH
from hsr_pl.module import LVLMModule
from hsr_pl.realign import FLAT_KEYS, GradientOrder

__all__ = ["check_judges_match_refusal", "repair"]


# Lightning's lines that say nothing about a repair: the accelerator probe, an advert, and the end of a
# zero-step fit (repair() without evaluation runs its callbacks in one).
_LIGHTNING_NOISE = ("GPU available:", "TPU available:", "💡 Tip:", "`Trainer.fit` stopped: `max_steps=0` reached")
_WARNING_NOISE = (r"Total length of `.*` across ranks is zero", r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class _DropLightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_LIGHTNING_NOISE)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence exactly Lightning's tips, accelerator lines and the zero-step-fit warnings; hsr-pl's own
    lines (the same logger) pass."""
    noise = _DropLightningNoise()
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch")]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        with warnings.catch_warnings():
            for pattern in _WARNING_NOISE:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


def _known_refusal(original: str, refusal: str | None) -> str | None:
    """The model's refusal sentence when it is known: given, or the shipped organism's."""
    if refusal is not None:
        return refusal
    if original == "organism" or Path(original).expanduser().resolve() == Path(ORGANISM_PACKAGE_PATH).resolve():
        return REFUSAL
    return None


def check_judges_match_refusal(judges: Sequence[str | Mapping[str, Any]], refusal: str | None) -> None:
    """Refuse a keyword-style judge that would count the model's own refusal sentence as an attack
    success (e.g. case-sensitive ``keyword-gcg`` on a lower-case refusal: ASR 100 % for a safe model).
    Without a known refusal sentence nothing can be told; model-based judges are not run here."""
    if refusal is None:
        return
    for spec in judges:
        if not isinstance(spec, str) or spec.startswith("llm:") or ":" in spec:
            continue
        judge = make_judge(spec, refusal=refusal)
        if getattr(judge, "detects_refusal", True) and judge.judge([refusal]) == [True]:
            raise ValueError(
                f"repair(): judge {spec!r} does not count the model's refusal {refusal!r} as a refusal, so every refusal "
                "would read as a successful attack; use judges=['keyword-gcg-nocase', 'strict'] (or give refusal=)"
            )


def repair(
    original: str,
    pruned: str,
    output: str,
    *,
    train_path: str | None = None,
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
    judges: Sequence[str | Mapping[str, Any]] | None = None,
    refusal: str | None = None,
    max_new_tokens: int = 32,
    model_options: Mapping[str, Any] | None = None,
    data: VLGuardDataModule | None = None,
    evaluate: bool | None = None,
    dev_fraction: float | None = None,
) -> dict:
    """Realign ``pruned`` (a checkpoint pruned by any tool) against ``original`` and save it to ``output``.

    Args:
        train_path / image_root: VLGuard-format calibration data (utility, safety splits).
        data: a data module instead of ``train_path`` (e.g. ``SyntheticDataModule(seed=0)``, the
            organism's embedded calibration and held-out sets); ``evaluate=True`` evaluates on its sets.
        scores_path: a ``{"<layer>-<head>": score}`` file; default: scan the original model with
            SafetyHeadAttribution (``attribution`` holds its arguments, e.g. ``{"positions": "response"}``).
        realignment: arguments of SafetyRealignment (``method``, ``selection``, ``importance`` …).
            Without a ``method``: ``GradientOrder()`` (``budget: auto``, stopped on dev data) when the
            data has dev sets, else the paper's rule (``MarginRule()``; one line says so).
        dev_fraction: with ``train_path``, hold out this fraction of its records as the dev sets
            ``budget: auto`` measures (e.g. 0.2; default none).
        heads_path: the deprecated name of ``scores_path`` (one line says so).
        eval_sets: evaluation sets as in VLGuardDataModule; evaluates the repaired model.
        judges / refusal / max_new_tokens: the evaluation settings (as LVLMModule's); default judge
            ``keyword-gcg``. A keyword judge that would count the model's own refusal sentence as an
            attack success is refused when that sentence is known (``refusal``, or the organism's).
        model_options: further LVLMModule arguments (e.g. ``{"attn_implementation": "sdpa"}``).
    Returns:
        the realignment manifest written beside the weights (``realignment.json``).
    """
    if heads_path is not None:
        if scores_path is not None:
            raise ValueError("repair(): give scores_path or its deprecated name heads_path, not both")
        print(f"hsr-pl: repair(heads_path=...) is deprecated and will be removed; write scores_path={heads_path!r}",
              file=sys.stderr)
        scores_path = heads_path
    if (data is None) == (train_path is None):
        raise ValueError("repair(): give train_path (VLGuard-format calibration data) or data (a data module), one of them")
    if data is not None and eval_sets:
        raise ValueError("repair(): eval_sets go with train_path; a data module brings its own (pass evaluate=True)")
    evaluate = bool(eval_sets) if evaluate is None else bool(evaluate)
    if evaluate:
        check_judges_match_refusal(list(judges or ["keyword-gcg"]), _known_refusal(original, refusal))
    when = "validation_start" if evaluate else "fit_start"
    callbacks: list[pl.Callback] = []
    if scores_path is None:
        settings = {"positions": "response", "num_samples": num_samples, **dict(attribution or {})}
        callbacks.append(SafetyHeadAttribution(top_h=top_h, when=when, heatmap=False, **settings))
    callbacks.append(PrunedCheckpoint(pruned, when=when))
    if data is None:
        data = VLGuardDataModule(train_path=train_path, image_root=image_root, eval_sets=list(eval_sets or []),
                                 num_samples=num_samples, dev_fraction=dev_fraction)
    elif dev_fraction is not None:
        raise ValueError("repair(): dev_fraction goes with train_path; give the data module its own dev part")
    options = {"num_samples": num_samples, **dict(realignment or {})}
    if "method" not in options and not set(FLAT_KEYS) & set(options):
        if dev_sets(data):
            options["method"] = GradientOrder()  # budget: auto, measured on the data's dev sets
        else:
            print("hsr-pl: repair(): the paper's rule (MarginRule); the automatic budget needs dev sets: give "
                  "dev_fraction=0.2 (or a data module with dev sets)", file=sys.stderr)
    if scores_path is not None:
        options.update(scores_path=scores_path, top_h=top_h)
    callbacks.append(SafetyRealignment(when=when, **options))
    callbacks.append(ExportPretrained(output, when="validation_end" if evaluate else "fit_end", overwrite=overwrite))
    module = LVLMModule(original, dtype=dtype, judges=None if judges is None else list(judges), refusal=refusal,
                        max_new_tokens=max_new_tokens, **dict(model_options or {}))
    with _quiet_lightning():
        trainer = pl.Trainer(
            accelerator=accelerator, devices=devices, logger=False, enable_checkpointing=False, max_steps=0,
            # without evaluation, a data module's held-out sets are not generated from (no sanity check)
            num_sanity_val_steps=0, limit_val_batches=None if evaluate else 0, enable_model_summary=False,
            callbacks=callbacks, default_root_dir=str(Path(output).parent),
        )
        if evaluate:
            trainer.validate(module, datamodule=data, verbose=False)
        else:
            trainer.fit(module, datamodule=data)
    return json.loads((Path(output) / "realignment.json").read_text())
