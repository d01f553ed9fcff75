"""The HSR neuron rule: R = (T^s(q) ∩ T^u(max_p)) \\ T^u(p), on whole-matrix top fractions.

``T^u(a)`` is the set of entries whose utility importance is among the top ``a``-fraction of the
*whole* matrix (not per row), ``T^s(b)`` the same for safety importance. ``T^u(p)`` stands for
"what the pruner kept", so the band ``T^u(max_p) \\ T^u(p)`` holds weights that matter moderately
for utility and were mostly pruned; intersected with the top safety weights it gives the
candidates to restore.

Selection is exact and deterministic: ``T(a)`` holds exactly ``int(a · numel)`` entries (the
released script's count) and among equal scores the lower flat (row-major) index wins. It is
vectorised and memory-light: one ``kthvalue`` finds the threshold, one cumulative sum breaks the
ties, so a 11008 × 4096 matrix needs a few bytes per entry, not a full sort with int64 indices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import RealignConfigError

__all__ = ["candidate_mask", "check_fractions", "top_count", "top_fraction_mask"]


def top_count(numel: int, fraction: float) -> int:
    """How many entries ``T(fraction)`` holds: ``int(fraction * numel)``, as the released script."""
    return int(fraction * numel)


def top_fraction_mask(scores: Tensor, fraction: float) -> Tensor:
    """Bool mask of the ``int(fraction · numel)`` largest scores; ties go to the lower flat index."""
    if not 0.0 <= fraction <= 1.0:
        raise RealignConfigError(f"fraction={fraction} must lie in [0, 1]")
    flat = scores.reshape(-1)
    k = top_count(flat.numel(), fraction)
    if k == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k >= flat.numel():
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if bool(torch.isnan(flat).any()):
        raise RealignConfigError("importance scores hold NaN; check the model weights and calibration statistics")
    # The k-th largest value is the (n - k + 1)-th smallest.
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    above = flat > threshold
    ties = flat == threshold
    need = k - int(above.sum())
    # Among the tied entries keep the first `need` in flat order.
    keep_ties = ties & (torch.cumsum(ties, 0) <= need)
    return (above | keep_ties).reshape(scores.shape)


def check_fractions(p: float, q: float, max_p: float, where: str = "") -> None:
    """The rule's domain: 0 < p < max_p ≤ 1 and 0 < q ≤ 1 (``where`` names the module for p=auto)."""
    at = f" for {where}" if where else ""
    if not 0.0 < q <= 1.0:
        raise RealignConfigError(f"q={q}{at} must lie in (0, 1] (the top safety fraction; paper: 0.5)")
    if not 0.0 < max_p <= 1.0:
        raise RealignConfigError(f"max_p={max_p}{at} must lie in (0, 1] (paper: 0.7)")
    if not 0.0 < p < max_p:
        raise RealignConfigError(
            f"p={p:g}{at} must lie in (0, max_p={max_p:g}); p is the kept fraction (p: auto = 1 - sparsity), so "
            f"raise max_p above {p:g} or lower p"
        )


def candidate_mask(utility: Tensor, safety: Tensor, p: float, q: float, max_p: float) -> Tensor:
    """``R = (T^s(q) ∩ T^u(max_p)) \\ T^u(p)`` for one matrix (bool, the shape of the scores)."""
    if utility.shape != safety.shape:
        raise RealignConfigError(
            f"utility importance {tuple(utility.shape)} and safety importance {tuple(safety.shape)} differ in shape"
        )
    check_fractions(p, q, max_p)
    return top_fraction_mask(safety, q) & top_fraction_mask(utility, max_p) & ~top_fraction_mask(utility, p)
