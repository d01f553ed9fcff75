"""Magnitude pruning: the score is |W|; no calibration data needed.

``granularity="row"`` (hsr-pl default) compares weights within each output row like Wanda;
``"matrix"`` is the reference pruner's rule (one threshold over the whole matrix, ``<=``).
"""

from __future__ import annotations

from torch import Tensor

from .masks import UNSTRUCTURED, select_mask

__all__ = ["magnitude_mask"]


def magnitude_mask(
    weight: Tensor, sparsity: float | None, nm: tuple[int, int] = UNSTRUCTURED, granularity: str = "row"
) -> Tensor:
    """Bool mask (True = prune) of the smallest-magnitude weights."""
    return select_mask(weight.detach().abs().float(), sparsity, nm, granularity)
