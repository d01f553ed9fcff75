"""The HSR neuron rule: R = (T^s(q) ∩ T^u(max_p)) \\ T^u(p), on whole-matrix top fractions.

``T^u(a)`` is the set of entries whose utility importance is among the top ``a``-fraction of the
*whole* matrix (not per row), ``T^s(b)`` the same for safety importance. ``T^u(p)`` stands for
"what the pruner kept", so the band ``T^u(max_p) \\ T^u(p)`` holds weights that matter moderately
for utility and were mostly pruned; intersected with the top safety weights it gives the
candidates to restore.

Selection is exact and deterministic: ``T(a)`` holds exactly ``int(a · numel)`` entries (the
released script's count) and among equal scores the lower flat (row-major) index wins. It is
vectorised and memory-light: one selection pass (numpy's introselect on the CPU, ``kthvalue``
elsewhere) finds the thresholds, and only the entries tied at a threshold are indexed, so an
11008 × 4096 matrix needs a few bytes per entry, not a full sort with int64 indices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import RealignConfigError

__all__ = [
    "candidate_mask", "check_fractions", "top_count", "top_count_masks", "top_fraction_mask", "top_fraction_masks",
]


def top_count(numel: int, fraction: float) -> int:
    """How many entries ``T(fraction)`` holds: ``int(fraction * numel)``, as the released script."""
    return int(fraction * numel)


def _kth_largest(flat: Tensor, ks: list[int]) -> list[Tensor]:
    """The k-th largest value of ``flat`` for every k (1-based); one selection pass on the CPU."""
    n = flat.numel()
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        import numpy as np

        positions = sorted({n - k for k in ks})
        part = np.partition(flat.numpy(), positions)  # numpy's introselect: ~3x torch.kthvalue on CPU
        return [torch.tensor(part[n - k], dtype=flat.dtype) for k in ks]
    return [torch.kthvalue(flat, n - k + 1).values for k in ks]


def top_fraction_masks(scores: Tensor, fractions: list[float]) -> list[Tensor]:
    """:func:`top_fraction_mask` for several fractions of one matrix, sharing the selection pass."""
    for fraction in fractions:
        if not 0.0 <= fraction <= 1.0:
            raise RealignConfigError(f"fraction={fraction} must lie in [0, 1]")
    return top_count_masks(scores, [top_count(scores.numel(), f) for f in fractions])


def top_count_masks(scores: Tensor, counts: list[int]) -> list[Tensor]:
    """Bool masks of the ``k`` largest scores for every ``k`` in ``counts`` (ties to the lower flat
    index), sharing one selection pass; a count is exact where a fraction can round one away."""
    flat = scores.reshape(-1)
    for k in counts:
        if not 0 <= k <= flat.numel():
            raise RealignConfigError(f"count={k} must lie in [0, {flat.numel()}]")
    if bool(torch.isnan(flat).any()):
        raise RealignConfigError("importance scores hold NaN; check the model weights and calibration statistics")
    inner = [k for k in counts if 0 < k < flat.numel()]
    thresholds = dict(zip(inner, _kth_largest(flat.contiguous(), inner))) if inner else {}
    out = []
    for k in counts:
        if k == 0:
            out.append(torch.zeros(scores.shape, dtype=torch.bool, device=scores.device))
            continue
        if k >= flat.numel():
            out.append(torch.ones(scores.shape, dtype=torch.bool, device=scores.device))
            continue
        threshold = thresholds[k].to(flat.device)
        mask = flat > threshold
        need = k - int(torch.count_nonzero(mask))
        if need:
            # Among the entries equal to the threshold keep the first `need` in flat order.
            ties = (flat == threshold).nonzero().squeeze(1)
            mask[ties[:need]] = True
        out.append(mask.reshape(scores.shape))
    return out


def top_fraction_mask(scores: Tensor, fraction: float) -> Tensor:
    """Bool mask of the ``int(fraction · numel)`` largest scores; ties go to the lower flat index."""
    return top_fraction_masks(scores, [fraction])[0]


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


def candidate_mask(
    utility: Tensor, safety: Tensor, p: float, q: float, max_p: float, *, kept: int | None = None
) -> Tensor:
    """``R = (T^s(q) ∩ T^u(max_p)) \\ T^u(p)`` for one matrix (bool, the shape of the scores).

    ``kept``: the exact size of ``T^u(p)`` (``p: auto`` passes the pruner's kept count, since
    ``int(kept / numel · numel)`` can be one less in floating point); default ``int(p · numel)``.
    """
    if utility.shape != safety.shape:
        raise RealignConfigError(
            f"utility importance {tuple(utility.shape)} and safety importance {tuple(safety.shape)} differ in shape"
        )
    check_fractions(p, q, max_p)
    numel = utility.numel()
    counts = [top_count(numel, max_p), top_count(numel, p) if kept is None else int(kept)]
    band_top, kept_mask = top_count_masks(utility, counts)
    return top_fraction_mask(safety, q) & band_top & ~kept_mask
