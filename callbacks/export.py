"""``ExportPretrained``: write the model and its processor with ``save_pretrained``, atomically.

The folder is what a user downloads or shares, so it holds safetensors and JSON only (no pickle),
pruned weights stay exact zeros, and it appears all at once: everything is written into a
temporary sibling folder that replaces the target in one rename, so an interrupted run never
leaves a half-written checkpoint where a good one used to be. A small ``hsr_summary.json``
records what the hsr-pl callbacks did (pruning method and sparsity, selected heads).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from hsr_pl.state import get_state

__all__ = ["ExportPretrained", "save_pretrained_atomic"]

_WHEN = ("fit_end", "validation_end")


def save_pretrained_atomic(model, processor, dirpath: str | os.PathLike, summary: dict | None = None) -> Path:
    """``model.save_pretrained`` + ``processor.save_pretrained`` into ``dirpath`` in one rename."""
    target = Path(dirpath)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        if summary is not None:
            (tmp / "hsr_summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        # mkdtemp makes a private (0700) folder; give the result the usual umask-based modes.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for path in tmp.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


class ExportPretrained(Callback):
    """Save the wrapped HF model and processor to ``dirpath`` at the end of fit or validate.

    Args:
        dirpath: the output folder (replaced as a whole).
        when: ``fit_end`` (default) or ``validation_end``.
    """

    def __init__(self, dirpath: str, when: str = "fit_end") -> None:
        if not dirpath:
            raise ValueError("dirpath is empty; give the folder to write the checkpoint to")
        if when not in _WHEN:
            raise ValueError(f"when={when!r}: choose one of {_WHEN}")
        self.dirpath = str(dirpath)
        self.when = when
        if Path(self.dirpath).exists() and not Path(self.dirpath).is_dir():
            raise ValueError(f"dirpath={self.dirpath} is a file; give a folder")

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model = getattr(pl_module, "model", pl_module)
        state = get_state(pl_module)
        summary = {
            "pruning_method": state.method,
            "sparsity": state.sparsity,
            "top_heads": [list(h) for h in state.top_heads],
            "restored_weights": int(sum(int(m.sum()) for m in state.restored.values())),
            "global_step": int(trainer.global_step),
        }
        path = save_pretrained_atomic(model, getattr(pl_module, "processor", None), self.dirpath, summary)
        rank_zero_info(f"hsr-pl: saved the model and processor to {path}")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_end":
            self._export(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "validation_end" and not trainer.sanity_checking:
            self._export(trainer, pl_module)
