"""``SafetyAudit``: how much safety did compression cost? Original vs compressed, same prompts, same judges.

The trainer's model is the original checkpoint. The compressed one is either a folder (any format
repair mode reads: :func:`hsr_pl.models.checkpoints.load_like`) or the model a pruner in the same
run leaves (``compressed: null`` with ``Pruning`` / ``PrunedCheckpoint`` in ``trainer.callbacks``).
Both are evaluated with :func:`hsr_pl.evaluation.per_prompt.evaluate_per_prompt` (sharded over the
DDP ranks) and compared prompt by prompt (:func:`hsr_pl.report.audit.build_audit`); rank 0 prints
the table and writes ``audit.json`` and ``audit.png``. See docs/audit.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from hsr_pl.evaluation.per_prompt import evaluate_per_prompt
from hsr_pl.io import check_output_file
from hsr_pl.models.checkpoints import CheckpointError, compare_architectures, load_like, read_config
from hsr_pl.report.audit import build_audit, closing_line, print_audit, save_audit_png
from hsr_pl.report.heads import write_json_atomic
from hsr_pl.state import get_state
from hsr_pl.validation import positive_int

from ._calibration import layer_progress
from ._common import hf_model
from .base import HSRCallback, providers

__all__ = ["AuditConfigError", "SafetyAudit"]

_GEOMETRY = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size")


class AuditConfigError(ValueError):
    """A bad SafetyAudit setting or two checkpoints that are not the same model (exit 2 in the CLI)."""


def _text(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config.get("text_config") or config


def compare_configs(original: Mapping[str, Any], compressed: Mapping[str, Any], where: str) -> None:
    """Refuse two config.json of different models: type, vocabulary size, text geometry."""
    for key in _GEOMETRY:
        a = original.get(key) if key == "model_type" else _text(original).get(key, original.get(key))
        b = compressed.get(key) if key == "model_type" else _text(compressed).get(key, compressed.get(key))
        if a is not None and b is not None and a != b:
            raise AuditConfigError(
                f"SafetyAudit: the compressed checkpoint {where} has {key}={b!r} but the original has {a!r}; "
                "audit a compressed copy of the same model"
            )


def _finite(obj: Any) -> Any:
    """NaN (a κ of two constant judges, a rate of an empty category) as null: JSON has no NaN."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _vocabulary(tokenizer) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


class SafetyAudit(HSRCallback):
    """Evaluate the original and the compressed model on the same sets with the same judges; one table.

    Example (the trainer's model is the original checkpoint)::

        - class_path: hsr_pl.callbacks.SafetyAudit
          init_args: {compressed: /models/llava-v1.6-vicuna-7b-wanda50}

    Args:
        compressed: folder of the compressed checkpoint; ``None``: the model a pruner in this run
            (``Pruning`` / ``PrunedCheckpoint`` at ``validation_start``) leaves.
        resamples / seed / level: the paired bootstrap of the change (prompts resampled within each set).
        output_dir: where ``audit.json`` and ``audit.png`` go (default ``trainer.default_root_dir``).
        repair_train_path: calibration data named in the printed repair command (VLGuard train.json).
    """

    supports_sharding = False  # swaps whole weights in and out: DDP or one device

    def __init__(
        self,
        compressed: str | None = None,
        resamples: int = 2000,
        seed: int = 0,
        level: float = 0.95,
        output_dir: str | None = None,
        repair_train_path: str | None = None,
    ) -> None:
        super().__init__("validation_start", error=AuditConfigError)
        if compressed is not None:
            folder = Path(str(compressed)).expanduser()
            if not folder.is_dir():
                raise AuditConfigError(f"SafetyAudit(compressed={compressed!r}): no such folder; give the compressed model's folder")
            if not (folder / "config.json").is_file():
                raise AuditConfigError(f"SafetyAudit(compressed={compressed!r}) has no config.json; give the folder save_pretrained wrote")
            compressed = str(folder)
        self.compressed = compressed
        self.resamples = positive_int(resamples, "resamples", "a number of bootstrap draws", AuditConfigError)
        self.seed = int(seed)
        if not isinstance(level, (int, float)) or not 0 < float(level) < 1:
            raise AuditConfigError(f"SafetyAudit(level={level!r}): give the interval's level as a fraction, e.g. 0.95")
        self.level = float(level)
        self.output_dir = output_dir
        self.repair_train_path = repair_train_path
        self.per_prompt: dict[str, dict] = {}
        self.summary: dict[str, Any] = {}
        self._start = time.perf_counter()

    @override
    def settings(self) -> dict[str, Any]:
        return {"compressed": self.compressed, "resamples": self.resamples, "seed": self.seed, "level": self.level}

    @override
    def input_paths(self) -> list[str]:
        return [self.compressed] if self.compressed else []

    # ------------------------------------------------------------------------- checks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        pruners = providers(list(trainer.callbacks), "masks")
        if self.compressed is None and not pruners:
            raise AuditConfigError(
                "SafetyAudit needs compressed=<folder of the compressed checkpoint>, or a pruner (Pruning / "
                "PrunedCheckpoint) in trainer.callbacks whose result it audits"
            )
        if self.compressed is not None and pruners:
            raise AuditConfigError(
                f"SafetyAudit(compressed={self.compressed!r}) compares two checkpoints, but this run also prunes "
                f"({type(pruners[0]).__name__}); drop the pruner or set compressed: null"
            )
        source = getattr(pl_module, "model_source", None)
        folder = Path(self.output_dir or trainer.default_root_dir)
        check_output_file(folder / "audit.json", "SafetyAudit output_dir", protect=[p for p in (source, self.compressed) if p])
        if self.compressed is not None and source and (Path(source).expanduser() / "config.json").is_file():
            # Before any weight is read: the two config.json files must describe the same model.
            compare_configs(read_config(Path(source).expanduser()), read_config(Path(self.compressed)), self.compressed)

    def _load_compressed(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        """The compressed checkpoint as the original's class, after every check (no generation yet)."""
        model = hf_model(pl_module)
        config = read_config(Path(self.compressed))
        compare_configs(model.config.to_dict(), config, self.compressed)
        try:
            compare_architectures(model, config)
            theirs, _ = load_like(model, self.compressed)
        except CheckpointError as exc:
            raise AuditConfigError(f"SafetyAudit: {str(exc).replace('pruned checkpoint', 'compressed checkpoint')}") from None
        tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if any((Path(self.compressed) / f).is_file() for f in tokenizer_files) and getattr(pl_module, "tokenizer", None):
            from transformers import AutoTokenizer

            mine = _vocabulary(pl_module.tokenizer)
            other = _vocabulary(AutoTokenizer.from_pretrained(self.compressed, trust_remote_code=False))
            if mine != other:
                diff = sorted(set(mine.items()) ^ set(other.items()))[:1]
                raise AuditConfigError(
                    f"SafetyAudit: the compressed checkpoint {self.compressed} has another vocabulary ({len(other)} "
                    f"tokens vs {len(mine)}, e.g. {diff[0][0]!r} differs); audit a compressed copy of the same model"
                )
        return theirs

    # ------------------------------------------------------------------------- the flow
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, label: str) -> dict:
        loaders = trainer.datamodule.val_dataloader()
        total = sum(len(loader.dataset) for loader in loaders)
        enabled = trainer.is_global_zero and trainer.progress_bar_callback is not None
        with torch.inference_mode(False), layer_progress(enabled, f"audit: {label}") as step:
            seen = [0]

            def on_batch(_name: str, replies: int) -> None:
                seen[0] += replies * trainer.world_size
                step(min(seen[0], total), total)

            return evaluate_per_prompt(pl_module, loaders, on_batch=on_batch if step is not None else None)

    @override
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compressed is None:
            return  # the pruner's notices drive the audit (before_pruning, on_stage "pruned")
        self._start = time.perf_counter()
        theirs = self._load_compressed(pl_module)
        rank_zero_info("hsr-pl: audit: evaluating the original model")
        self.per_prompt["original"] = self._evaluate(trainer, pl_module, "original")
        model = hf_model(pl_module)
        mine = dict(model.named_parameters())
        other = dict(theirs.named_parameters())
        with torch.no_grad():  # swap: the loaded copy keeps the original's weights meanwhile
            for name, param in mine.items():
                held = param.detach().to(other[name].device, copy=True)
                param.copy_(other[name].to(param.device, param.dtype))
                other[name].copy_(held.to(other[name].dtype))
        try:
            rank_zero_info("hsr-pl: audit: evaluating the compressed model")
            self.per_prompt["compressed"] = self._evaluate(trainer, pl_module, "compressed")
        finally:
            with torch.no_grad():
                for name, param in mine.items():
                    param.copy_(other[name].to(param.device, param.dtype))
            del theirs, other
        self._finish(trainer, pl_module, self.compressed)

    @override
    def before_pruning(self, trainer, pl_module, pruner: Callback) -> None:
        if self.compressed is None:
            self._start = time.perf_counter()
            rank_zero_info("hsr-pl: audit: evaluating the original model")
            self.per_prompt["original"] = self._evaluate(trainer, pl_module, "original")

    @override
    def on_stage(self, trainer, pl_module, stage: str, source: Callback) -> None:
        if self.compressed is None and stage == "pruned" and "original" in self.per_prompt:
            rank_zero_info("hsr-pl: audit: evaluating the compressed model")
            self.per_prompt["compressed"] = self._evaluate(trainer, pl_module, "compressed")
            state = get_state(pl_module)
            self._finish(trainer, pl_module, f"{state.method} @ {100 * (state.sparsity or 0):.0f} % (this run)")

    # --------------------------------------------------------------------------- report
    def _repair_command(self, original: str) -> str:
        if self.compressed is None:
            return ("put hsr_pl.callbacks.SafetyHeadAttribution before the pruner and SafetyRealignment after it in "
                    "this config and rerun; on the organism: hsr-pl validate --config configs/demo.yaml")
        train = self.repair_train_path or "<VLGuard train.json>"
        output = f"{self.compressed.rstrip('/')}-repaired"
        return (f"python -c \"from hsr_pl.repair import repair; repair('{original}', '{self.compressed}', "
                f"'{output}', train_path='{train}')\"")

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, compressed_name: str) -> None:
        original = getattr(pl_module, "model_source", None) or type(hf_model(pl_module)).__name__
        self.summary = build_audit(self.per_prompt["original"], self.per_prompt["compressed"],
                                   names=(original, compressed_name), resamples=self.resamples, seed=self.seed,
                                   level=self.level)
        command = self._repair_command(original)
        self.summary["closing"] = closing_line(self.summary, command)
        self.summary["repair_command"] = command if self.summary["repair_worth_running"] else None
        self.summary["world_size"] = trainer.world_size
        self.summary["prompts_per_rank"] = {s: row["per_rank"] for s, row in self.per_prompt["original"].items()}
        self.summary["wall_s"] = round(time.perf_counter() - self._start, 1)
        if not trainer.is_global_zero:
            return
        folder = Path(self.output_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        print_audit(self.summary)
        try:
            save_audit_png(folder / "audit.png", self.summary)
            self.summary["plot"] = "audit.png"
        except ImportError:
            rank_zero_info("hsr-pl: matplotlib not installed; no audit.png (pip install 'hsr-pl[plot]')")
        write_json_atomic(folder / "audit.json", _finite(json.loads(json.dumps(self.summary, default=float))))
        rank_zero_info(f"hsr-pl: audit: {self.summary['closing']}")
        rank_zero_info(f"hsr-pl: audit written to {folder / 'audit.json'}")
