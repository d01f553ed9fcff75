"""``ExportPretrained``: save the realigned model at the end of the run (fit or validate).

The writing itself (atomic folder, sharded stream, what is refused) is :mod:`hsr_pl.export`; the
manifest is :mod:`hsr_pl.report.manifest`. See docs/errors.md for the refused targets.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from hsr_pl.distributed import fail_fast, model_is_sharded
from hsr_pl.export import (
    ExportError,
    check_export_target,
    parse_size,
    remove_stale_temps,
    save_pretrained_atomic,
    save_sharded_atomic,
)
from hsr_pl.models.organism import ORGANISM_PACKAGE_PATH
from hsr_pl.report.manifest import realignment_manifest
from hsr_pl.state import get_state
from hsr_pl.validation import choice

from .base import HSRCallback

__all__ = ["ExportError", "ExportPretrained"]

_WHEN = ("run_end", "fit_end", "validation_end")


def _inside(path: str, folder: Path) -> bool:
    return folder == Path(path).expanduser().resolve() or folder in Path(path).expanduser().resolve().parents


class ExportPretrained(Callback):
    """Save the wrapped HF model and processor to ``dirpath`` at the end of the run.

    Example (last in ``trainer.callbacks``; ``realignment.json`` goes beside the weights)::

        - class_path: hsr_pl.callbacks.ExportPretrained
          init_args: {dirpath: runs/realigned}

    Args:
        dirpath: the output folder: new, empty, or an earlier hsr-pl export that holds nothing
            but what it wrote (its ``.hsr-pl-export.json`` lists the files).
        when: ``run_end`` (default: the end of whatever runs, ``hsr-pl fit`` or ``hsr-pl validate``),
            ``fit_end`` or ``validation_end`` (only then).
        overwrite: also replace a non-empty folder hsr-pl did not write (never the model's source).
        max_shard_size: a sharded (FSDP2) model is gathered tensor by tensor and written as
            safetensors shards of at most this size with an index file (``5GB``, ``500MiB``, bytes).
    """

    def __init__(
        self, dirpath: str, when: str = "run_end", overwrite: bool = False, max_shard_size: int | str = "5GB"
    ) -> None:
        super().__init__()
        if not dirpath:
            raise ExportError("dirpath is empty; give the folder to write the checkpoint to")
        choice(when, "ExportPretrained.when", _WHEN, error=ExportError)
        self.dirpath = str(dirpath)
        self.export_when = when
        self.overwrite = bool(overwrite)
        if Path(self.dirpath).exists() and not Path(self.dirpath).is_dir():
            raise ExportError(f"dirpath={self.dirpath} is a file; give a folder")
        self.max_shard_bytes = parse_size(max_shard_size)
        self.path: Path | None = None

    def _protected(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        paths = [getattr(pl_module, "model_source", None), str(ORGANISM_PACKAGE_PATH)]
        paths += [path for cb in trainer.callbacks if isinstance(cb, HSRCallback) for path in cb.input_paths()]
        return [p for p in paths if p]

    def _check_own_outputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a dirpath that this run's other outputs go into: they would be replaced by the
        export, or make its folder hold files it did not write, refused only at the very end."""
        folder = Path(self.dirpath).expanduser().resolve()
        outputs = [(type(cb).__name__, path) for cb in trainer.callbacks if isinstance(cb, HSRCallback)
                   for path in cb.output_paths()]
        eval_output = dict(getattr(pl_module, "hparams", {})).get("eval_output")
        if eval_output:
            outputs.append(("model eval_output", str(eval_output)))
        for owner, path in outputs:
            if _inside(path, folder):
                raise ExportError(
                    f"ExportPretrained dirpath={self.dirpath!r} would hold {owner}'s output {path}, which the export "
                    "replaces; write that output elsewhere or choose another dirpath"
                )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before any work: a target that would lose data fails now, not after the run.
        check_export_target(self.dirpath, overwrite=self.overwrite, protected=self._protected(trainer, pl_module))
        self._check_own_outputs(trainer, pl_module)
        if trainer.is_global_zero:
            remove_stale_temps(self.dirpath)

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", pl_module)
        sharded = model_is_sharded(model)
        if not (trainer.is_global_zero or sharded):
            return
        state = get_state(pl_module)
        summary = {
            "pruning_method": state.method,
            "sparsity": state.sparsity,
            "top_heads": [list(h) for h in state.top_heads],
            "restored_weights": int(sum(int(m.sum()) for m in state.restored.values())),
            "global_step": int(trainer.global_step),
        }
        if sharded:  # every rank gathers; rank 0 writes; nobody returns before the folder exists
            with fail_fast("ExportPretrained"):
                self.path = save_sharded_atomic(
                    model, getattr(pl_module, "processor", None), self.dirpath, summary,
                    manifest=realignment_manifest(pl_module, state), overwrite=self.overwrite,
                    protected=self._protected(trainer, pl_module), writer=trainer.is_global_zero,
                    max_shard_bytes=self.max_shard_bytes,
                )
                trainer.strategy.barrier()
            rank_zero_info(f"hsr-pl: saved the sharded model (gathered tensor by tensor) and processor to {self.path}")
            return
        self.path = save_pretrained_atomic(
            model, getattr(pl_module, "processor", None), self.dirpath, summary,
            manifest=realignment_manifest(pl_module, state), overwrite=self.overwrite,
            protected=self._protected(trainer, pl_module),
        )
        rank_zero_info(f"hsr-pl: saved the model and processor to {self.path}")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_when in ("fit_end", "run_end"):
            self._export(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # run_end: a validation inside fit is not the end of the run (on_fit_end exports then).
        if self.export_when == "validation_end" or (
            self.export_when == "run_end" and trainer.state.fn == TrainerFn.VALIDATING
        ):
            self._export(trainer, pl_module)
