"""``MaskHolder``: the base of the callbacks that fill HSRState's masks (Pruning, PrunedCheckpoint).

It declares what realignment may ask of a pruner, persists masks, originals and restorations
(a content-addressed safetensors side file next to the checkpoints, :mod:`hsr_pl.state_file`),
puts them back on resume, and re-applies the masks after every training batch except on the
entries realignment restored.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from hsr_pl.pruning.targets import regex_list, resolve_targets
from hsr_pl.state import HSRState, get_state, tensor_version
from hsr_pl.state_file import FORMAT as STATE_FORMAT
from hsr_pl.state_file import read_state_file, write_state_file

from ._common import hf_model
from .base import WHEN, HSRCallback

__all__ = ["MaskHolder", "mask_holders"]


def mask_holders(callbacks: Iterable[Any]) -> list[MaskHolder]:
    """The pruners among ``callbacks``, in order."""
    return [cb for cb in callbacks if isinstance(cb, MaskHolder)]


class MaskHolder(HSRCallback):
    """An HSR step that prunes (fills ``HSRState.pruned`` / ``originals``).

    What realignment may ask of its pruner is declared here: :attr:`changes_kept_weights`,
    :attr:`importance`, :attr:`planned_structure` and :meth:`resolve_targets`.
    """

    provides = frozenset({"masks"})
    #: Whether :attr:`planned_structure` is known before pruning (a pruned checkpoint tells only when loaded).
    structure_known_before_pruning: ClassVar[bool] = False

    def __init__(
        self,
        when=WHEN,
        *,
        error: type[Exception] = ValueError,
        state_dir: str | None = None,
        targets: str | list[str] | None = None,
        ignore: str | list[str] | None = None,
        keep_originals: str | list[str] | None = None,
    ) -> None:
        super().__init__(when, error=error)
        self.targets = regex_list(targets, "targets")
        self.ignore = regex_list(ignore, "ignore") or []
        self.keep_originals = regex_list(keep_originals, "keep_originals")
        self.state_dir = None if state_dir is None else str(state_dir)
        self._state: HSRState | None = None
        self._loaded: dict | None = None
        self._trainer: pl.Trainer | None = None
        self._written: tuple[dict, dict] | None = None  # (tensor signature, side-file reference)

    # ---------------------------------------------------------------- what realignment asks
    @property
    def changes_kept_weights(self) -> bool:
        """Whether pruning also moves kept weights (SparseGPT, other tools): realignment then copies
        the dense weights it may need before the first change."""
        return True

    @property
    def importance(self) -> str:
        """The score realignment's ``importance: auto`` uses (Wanda's: the paper's default)."""
        return "wanda"

    @property
    def planned_structure(self) -> tuple[int, int] | None:
        """The ``(N, M)`` structure the masks will have, None for unstructured (meaningful when
        :attr:`structure_known_before_pruning`)."""
        return None

    def resolve_targets(self, model: torch.nn.Module) -> tuple[list[str], list[str]]:
        """``(names pruned or compared, names whose dense values are kept)`` for ``model`` (an HF model)."""
        return resolve_targets(model, self.targets, self.ignore, self.keep_originals)

    def _hold(self, state: HSRState) -> None:
        self._state = state

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer  # where checkpoints' side files go, and who writes them

    def _sync_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put a checkpoint's HSRState on the module and re-apply its masks."""
        if self._loaded is None:
            return
        loaded = self._loaded
        if "side_file" in loaded:  # tensors by reference (else a checkpoint with them inline)
            ckpt = getattr(trainer, "ckpt_path", None)
            search = [Path(ckpt).parent if ckpt else None, *self._state_dirs(trainer)]
            with torch.inference_mode(False):  # normal tensors (with version counters) even under validate
                tensors, metadata = read_state_file(loaded["side_file"], search)
                loaded = {**loaded, **HSRState.tensors_state(tensors, metadata)}
            self._written = None
        state = get_state(pl_module)
        state.load_state_dict(loaded)
        self._loaded = None
        self._state = state
        if state.pruned:
            state.apply_masks(hf_model(pl_module))

    @override
    def on_restored(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_state(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Runs after optimizer.step (and after a skipped step under accumulation: harmless).
        # Frozen weights are skipped: the optimizer cannot have moved them since the last time.
        if self._done and self._state is not None and self._state.pruned:
            self._state.apply_masks(hf_model(pl_module), only_trainable=True)

    # -------------------------------------------------------------------------------- state
    def _state_dirs(self, trainer: pl.Trainer) -> list[Path]:
        """Where side files go (the first) and are looked for: state_dir, checkpoints, run root."""
        checkpoint = getattr(trainer, "checkpoint_callback", None)
        folder = checkpoint.dirpath if isinstance(checkpoint, ModelCheckpoint) else None
        dirs = [self.state_dir, folder, getattr(trainer, "default_root_dir", None)]
        return [Path(d) for d in dirs if d]

    def _side_file(self, state: HSRState) -> dict[str, Any]:
        """The side-file reference of ``state``'s tensors, writing the file when they changed."""
        signature = _signature(state)
        if self._written is None or not _same_signature(self._written[0], signature):
            tensors, metadata = state.to_tensors()
            ref = write_state_file(
                self._state_dirs(self._trainer)[0], tensors, metadata, write=self._trainer.is_global_zero
            )
            self._written = (signature, ref)
        return self._written[1]

    @override
    def extra_state(self) -> dict[str, Any]:
        if self._state is None:
            return {"hsr_state": self._loaded}
        if self._trainer is None:  # outside a Trainer: nowhere to write, keep it all in the dict
            return {"hsr_state": self._state.state_dict()}
        return {"hsr_state": {"format": STATE_FORMAT, **self._state.metadata(), "side_file": self._side_file(self._state)}}

    @override
    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._loaded = state.get("hsr_state")


def _signature(state: HSRState) -> dict[tuple[str, str], tuple[weakref.ref, int]]:
    """What the state's tensors are now: weak references and version counters (cheap, and a
    replaced or in-place edited tensor differs, without keeping the old one alive)."""
    return {
        (kind, name): (weakref.ref(tensor), tensor_version(tensor))
        for kind in ("pruned", "restored", "originals")
        for name, tensor in getattr(state, kind).items()
    }


def _same_signature(old: Mapping, new: Mapping) -> bool:
    if old.keys() != new.keys():
        return False
    return all(old[k][0]() is new[k][0]() and old[k][1] == new[k][1] for k in new)
