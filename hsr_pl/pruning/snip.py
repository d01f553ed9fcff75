"""SNIP (Lee et al., 2019) as used by Wei et al.: score = |W ⊙ ∂L/∂W|, L = NLL of the response.

The score of each calibration batch is accumulated (sum over batches of |W ⊙ g_b|), so a batch
whose gradient cancels another's still counts. Selection is per output row, like Wanda.
"""

from __future__ import annotations

from torch import Tensor

from .masks import UNSTRUCTURED, select_mask

__all__ = ["snip_mask", "snip_scores"]


def snip_scores(weight: Tensor, grad: Tensor) -> Tensor:
    """|W ⊙ g| in float32 for one batch's gradient ``grad``."""
    if grad.shape != weight.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} != weight shape {tuple(weight.shape)}")
    return (weight.detach().float() * grad.detach().float()).abs()


def snip_mask(score_sum: Tensor, sparsity: float | None, nm: tuple[int, int] = UNSTRUCTURED) -> Tensor:
    """Bool mask (True = prune) from the accumulated SNIP scores, per-row (or N:M)."""
    return select_mask(score_sum.float(), sparsity, nm, "row")
