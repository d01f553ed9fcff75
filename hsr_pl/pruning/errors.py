"""Errors raised by the pruning code. Each message names the problem and the fix."""

from __future__ import annotations

__all__ = ["CalibrationError", "DamagedModelError", "PartialPruningError", "PruningConfigError", "PruningError"]


class PruningError(Exception):
    """Base class of every pruning failure."""


class PruningConfigError(PruningError, ValueError):
    """A bad option (method, sparsity, N:M structure, mode, token selection, targets)."""


class CalibrationError(PruningError, ValueError):
    """Calibration data cannot give usable statistics (no tokens, NaN/inf, missing labels)."""


class DamagedModelError(PruningError, ValueError):
    """The model's weights hold NaN/inf before pruning (found before any weight changes)."""


class PartialPruningError(PruningError, RuntimeError):
    """A failure after some decoder layers were already pruned in place.

    ``pruned_layers`` lists the decoder-layer indices whose target weights were already changed,
    so the caller knows the model is no longer dense and must be reloaded before a retry.
    """

    def __init__(self, message: str, pruned_layers: list[int]) -> None:
        super().__init__(
            f"{message} (decoder layers already pruned in place: {pruned_layers or 'none'}; "
            "reload the dense weights before retrying)"
        )
        self.pruned_layers = list(pruned_layers)
