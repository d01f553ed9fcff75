"""Wanda (Sun et al., 2023): prune by |W| times the input activation norm.

``scaler_row`` is the per-input-channel statistic of :class:`hsr_pl.pruning.stats.RowStats`:
the reference's running mean over calibration samples of the per-sample sum of x_j^2 (float32).
Any positive multiple ranks the same; we keep the reference's arithmetic so masks match it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masks import UNSTRUCTURED, select_mask

__all__ = ["wanda_mask", "wanda_scores"]


def wanda_scores(weight: Tensor, scaler_row: Tensor) -> Tensor:
    """S_ij = |W_ij| * sqrt(a_j), in float32 as the reference computes it."""
    if scaler_row.shape != (weight.shape[1],):
        raise ValueError(
            f"activation statistic has shape {tuple(scaler_row.shape)}, expected ({weight.shape[1]},) "
            "(one value per input channel of the weight)"
        )
    return weight.detach().abs().float() * torch.sqrt(scaler_row.float().reshape(1, -1))


def wanda_mask(
    weight: Tensor, scaler_row: Tensor, sparsity: float | None, nm: tuple[int, int] = UNSTRUCTURED
) -> Tensor:
    """Bool mask (True = prune): per-row stable selection, or N:M groups on the Wanda score."""
    return select_mask(wanda_scores(weight, scaler_row), sparsity, nm, "row")
