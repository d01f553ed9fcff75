"""Wanda (Sun et al., 2023): prune by |W| times the input activation norm.

``scaler_row`` is the per-input-channel statistic of :class:`hsr_pl.pruning.stats.RowStats`:
the reference's running mean over calibration samples of the per-sample sum of x_j^2 (float32).
Any positive multiple ranks the same; we keep the reference's arithmetic so masks match it.

``granularity="row"`` (default) is the reference's per-output-row selection; ``"matrix"`` ranks
the scores of the whole matrix at once, as torchao's ``WandaSparsifier`` does (one threshold,
exactly ``floor(numel * s)`` pruned, ties to the lower row-major index), so rows end up with
different sparsities.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import PruningConfigError
from .masks import UNSTRUCTURED, matrix_rank_mask, select_mask

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
    weight: Tensor,
    scaler_row: Tensor,
    sparsity: float | None,
    nm: tuple[int, int] = UNSTRUCTURED,
    granularity: str = "row",
) -> Tensor:
    """Bool mask (True = prune): per-row (or whole-matrix) stable selection, or N:M groups, on
    the Wanda score."""
    scores = wanda_scores(weight, scaler_row)
    if granularity == "matrix":
        if nm != UNSTRUCTURED:
            raise PruningConfigError("granularity='matrix' is unstructured; an N:M structure selects within groups")
        if sparsity is None:
            raise PruningConfigError("unstructured selection needs a sparsity in (0, 1)")
        return matrix_rank_mask(scores, sparsity)
    return select_mask(scores, sparsity, nm, granularity)
