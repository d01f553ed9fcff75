"""``MaskHolder``: the base of the callbacks that fill HSRState's masks (Pruning, PrunedCheckpoint).

The mask holder persists the masks, the kept original values and the restorations in Lightning
checkpoints, puts them back on the module when a checkpoint says it had acted, and re-applies the
masks after every training batch, except on the entries realignment restored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from hsr_pl.state import HSRState, get_state

from ._common import hf_model
from .base import WHEN, HSRCallback

__all__ = ["MaskHolder"]


class MaskHolder(HSRCallback):
    """An HSR step that prunes (fills ``HSRState.pruned`` / ``originals``)."""

    fills_masks = True  # SafetyRealignment finds the pruner by this flag
    changes_kept_weights = True  # SafetyRealignment copies dense weights unless a subclass says no

    def __init__(self, when=WHEN, *, error: type[Exception] = ValueError) -> None:
        super().__init__(when, error=error)
        self._state: HSRState | None = None
        self._loaded: dict | None = None

    def _hold(self, state: HSRState) -> None:
        self._state = state

    def _sync_state(self, pl_module: pl.LightningModule) -> None:
        """Put a checkpoint's HSRState on the module and re-apply its masks."""
        if self._loaded is None:
            return
        state = get_state(pl_module)
        state.load_state_dict(self._loaded)
        self._loaded = None
        self._state = state
        if state.pruned:
            state.apply_masks(hf_model(pl_module))

    @override
    def on_restored(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_state(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Runs after optimizer.step (and after a skipped step under accumulation: harmless).
        if self._done and self._state is not None and self._state.pruned:
            self._state.apply_masks(hf_model(pl_module))

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"hsr_state": self._state.state_dict() if self._state is not None else self._loaded}

    @override
    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._loaded = state.get("hsr_state")
