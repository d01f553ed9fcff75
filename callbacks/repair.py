"""``PrunedCheckpoint``: repair mode — the pruner is a checkpoint that another tool pruned.

The trainer's model is the original (dense) checkpoint; at its moment this callback loads the
pruned one (:func:`hsr_pl.models.checkpoints.load_like`), infers the pruned set
``(pruned == 0) & (original != 0)`` of every target linear, keeps the originals there and copies
every parameter of the pruned checkpoint into the model. See docs/realignment.md (repair mode).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from hsr_pl.models.checkpoints import (
    PrunedCheckpointCheck,
    check_pruned_checkpoint,
    check_pruned_folder,
    pruned_set,
)
from hsr_pl.models.mask_files import MASK_FILE, check_mask_file, read_mask_file
from hsr_pl.pruning import PruningConfigError
from hsr_pl.pruning.masks import detect_structure
from hsr_pl.state import get_state

from ._common import hf_model
from ._masks import MaskHolder
from .base import WHEN, notify_before_pruning, notify_stage

__all__ = ["PrunedCheckpoint", "outside_line"]

# Exact-zero fraction above which a module outside the targets is reported as pruned by the tool.
OUTSIDE_ZERO_FRACTION = 0.05


def outside_line(outside: dict[str, float]) -> str:
    """One readable line naming every module the tool pruned outside the targets (none left out)."""
    listed = ", ".join(f"{n} ({100 * f:.2f} %)" for n, f in outside.items())
    return (f"hsr-pl: warning: the tool also pruned {len(outside)} module(s) outside the targets, kept as the tool "
            f"left them (realignment does not touch them; realignment.json lists them): {listed}")


class PrunedCheckpoint(MaskHolder):
    """Take the masks from a checkpoint pruned by any tool, then hand on like ``Pruning``.

    Example (in place of Pruning; the trainer's model is the original checkpoint)::

        - class_path: hsr_pl.callbacks.PrunedCheckpoint
          init_args: {path: /models/llava-v1.6-vicuna-7b-wanda50, when: validation_start}

    Args:
        path: folder of the pruned checkpoint (``save_pretrained`` layout, dense with exact zeros
            or compressed-tensors ``sparse-bitmask`` / ``sparse-24-bitmask``).
        targets / ignore / keep_originals: regexes as for :class:`hsr_pl.callbacks.Pruning`
            (default: every decoder-layer linear; originals kept for q/k/v/o).
        masks: a mask file (docs/realignment.md, "Mask files"): the pruned set when zeros cannot tell it
            (e.g. llm-compressor runs GPTQ after pruning, which overwrites the pruned zeros). Default:
            ``<path>/pruning_masks.safetensors`` when it exists, else inferred from the zeros.
        when: ``fit_start`` and/or ``validation_start``.
        state_dir: where checkpoints' side files go (as for :class:`hsr_pl.callbacks.Pruning`).
    """

    supports_sharding = False  # copies / compares whole weights: no FSDP2 path yet
    # MaskHolder's defaults hold: another tool may have moved kept weights (SparseGPT does), its score
    # is unknown (realignment's ``importance: auto`` takes Wanda's, the paper's), and the N:M structure
    # is known only once the checkpoint is loaded.

    def __init__(
        self,
        path: str,
        targets: str | list[str] | None = None,
        ignore: str | list[str] | None = None,
        keep_originals: str | list[str] | None = None,
        when: str | list[str] = WHEN,
        state_dir: str | None = None,
        masks: str | None = None,
    ) -> None:
        super().__init__(
            when, error=PruningConfigError, state_dir=state_dir, targets=targets, ignore=ignore,
            keep_originals=keep_originals,
        )
        if not isinstance(path, str) or not path:
            raise PruningConfigError("PrunedCheckpoint needs path=<folder of the pruned checkpoint>")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise PruningConfigError(f"PrunedCheckpoint(path={path!r}): no such folder; give the pruned model's folder")
        if not (folder / "config.json").is_file():
            raise PruningConfigError(f"PrunedCheckpoint(path={path!r}) has no config.json; give the folder save_pretrained wrote")
        self.path = str(folder)
        if masks is None and (folder / MASK_FILE).is_file():
            masks = str(folder / MASK_FILE)
        self.masks = None if masks is None else str(Path(masks).expanduser())
        if self.masks is not None:
            check_mask_file(Path(self.masks))
        self.report: dict[str, Any] = {}
        self._checked: PrunedCheckpointCheck | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # What config.json and the safetensors headers can tell, before the head scan and any file written.
        source = getattr(pl_module, "model_source", None)
        original = Path(source).expanduser() if isinstance(source, str) and Path(source).expanduser().is_dir() else None
        check_pruned_folder(original, Path(self.path))

    @override
    def settings(self) -> dict[str, Any]:
        return {"path": self.path, "targets": self.targets, "ignore": self.ignore, "keep_originals": self.keep_originals,
                "masks": self.masks}

    @override
    def input_paths(self) -> list[str]:
        return [self.path] + ([self.masks] if self.masks else [])

    @override
    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every refusal of the pruned checkpoint (check_pruned_checkpoint) before any HSR work,
        e.g. the head scan; the loaded copy is kept for run()."""
        model = hf_model(pl_module)
        targets, _ = self.resolve_targets(model)
        self._checked = check_pruned_checkpoint(model, self.path, targets, self._given_masks(model, targets))

    def _given_masks(self, model: torch.nn.Module, targets: list[str]) -> dict[str, torch.Tensor] | None:
        """The pruned sets of an explicit mask file (None: infer them from the zeros)."""
        if self.masks is None:
            return None
        modules = dict(model.named_modules())
        return read_mask_file(Path(self.masks), {f"{n}.weight": tuple(modules[n].weight.shape) for n in targets})

    @override
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        model = hf_model(pl_module)
        targets, keep = self.resolve_targets(model)
        checked = self._checked or check_pruned_checkpoint(model, self.path, targets, self._given_masks(model, targets))
        self._checked = None
        pruned_model, info, masks = checked.model, checked.info, checked.masks
        theirs = dict(pruned_model.named_parameters())
        modules = dict(model.named_modules())
        if self.masks is None and detect_structure(masks) is None:
            zeros = {n: theirs[f"{n}.weight"].detach().cpu() == 0 for n in targets}
            if detect_structure(zeros) is not None:
                # An N:M checkpoint whose original held exact zeros inside pruned groups: those count as
                # pruned too (restoring a zero changes nothing), so the pattern is seen and kept.
                masks = zeros
        pruned_count = sum(int(m.sum()) for m in masks.values())
        outside = self._pruned_outside(model, theirs, set(targets))
        # Entries the mask file calls pruned that the tool later overwrote (GPTQ after pruning).
        overwritten = None if self.masks is None else sum(
            int((theirs[f"{n}.weight"].detach().cpu()[m] != 0).sum()) for n, m in masks.items())
        # Everything is checked: callbacks that need the dense model (realignment) measure it now.
        notify_before_pruning(trainer, pl_module, self)
        state = get_state(pl_module)
        keep_set = set(keep)
        with torch.no_grad():
            for name in targets:
                state.record_pruning(name, masks[name], modules[name].weight.detach() if name in keep_set else None)
            for name, param in model.named_parameters():
                param.data.copy_(theirs[name].detach().to(param.device, param.dtype))
            if overwritten:
                state.apply_masks(model)  # the mask file decides, as on resume and after every fit step
        del pruned_model, theirs, checked
        total = sum(m.numel() for m in masks.values())
        state.sparsity = pruned_count / total
        state.method = f"checkpoint:{self.path}"
        state.structure = detect_structure(masks)
        self._hold(state)
        self.report = {
            "path": self.path, "format": info["format"], "recipe_yaml": info["recipe"], "targets": len(targets),
            "pruned_params": pruned_count, "sparsity": state.sparsity,
            "structure": None if state.structure is None else list(state.structure),
            "pruned_outside_targets": outside, "masks": self.masks or "inferred from zeros",
            "seconds": round(time.perf_counter() - start, 3),
        }
        if overwritten is not None:
            self.report["nonzero_where_masked"] = overwritten
        state.source = dict(self.report)
        if outside:
            rank_zero_info(outside_line(outside))
        structure = "" if state.structure is None else f", {state.structure[0]}:{state.structure[1]}"
        rank_zero_info(
            f"hsr-pl: repair mode: {self.path} ({info['format']}) pruned {pruned_count:,} of {total:,} target weights "
            f"({100 * state.sparsity:.2f} %{structure}); the model now holds the pruned weights"
        )
        notify_stage(trainer, pl_module, "pruned", self)

    @staticmethod
    def _pruned_outside(model, theirs, targets: set[str]) -> dict[str, float]:
        """Linears outside the targets whose pruned copy has many more exact zeros than the original."""
        out = {}
        for name, module in model.named_modules():
            if name in targets or not isinstance(module, torch.nn.Linear):
                continue
            mine = module.weight.detach()
            zeros = float(pruned_set(mine.cpu(), theirs[f"{name}.weight"].detach().cpu()).float().mean())
            if zeros >= OUTSIDE_ZERO_FRACTION:
                out[name] = zeros
        return out

    @override
    def on_restored(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_restored(trainer, pl_module)
        if self.report:
            get_state(pl_module).source = dict(self.report)

    @override
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "report": dict(self.report)}

    @override
    def load_extra_state(self, state) -> None:
        super().load_extra_state(state)
        self.report = dict(state.get("report", {}))
