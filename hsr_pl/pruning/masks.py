"""Mask selection from importance scores: per row, per matrix and N:M.

Every function takes a score matrix ``[out, in]`` (larger = more important) and returns a bool
mask of the same shape, True = pruned. The selection rules are the reference implementations'
(locuslab/wanda, IST-DASLab/sparsegpt), so that equal scores give equal masks:

* per row (Wanda, SNIP, magnitude ``per_row``): stable ascending sort of each row, prune the
  first ``floor(in * s)``; among equal scores the lower column index is pruned first.
* per matrix (the reference magnitude pruner, and SparseGPT's per-block threshold): sort all
  scores, take the value at index ``floor(numel * s)`` and prune every score ``<=`` it. Note that
  this prunes at least ``floor(numel * s) + 1`` entries (more with ties); we keep that quirk.
* ranked over the whole matrix (Wanda ``granularity="matrix"``, as torchao's ``WandaSparsifier``
  ranks): stable ascending sort of all scores in row-major order, prune exactly the first
  ``floor(numel * s)``; among equal scores the lower row-major index is pruned first.
* N:M: in each group of M consecutive input columns of a row, prune the N smallest with
  ``torch.topk(largest=False)``, as the reference does. Among tied scores inside a group the
  choice is torch.topk's (implementation defined; on CPU it is *not* always the lower index);
  because we call topk on the same values as the reference, the choice is the reference's.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from .errors import PruningConfigError

__all__ = [
    "UNSTRUCTURED",
    "check_sparsity",
    "detect_structure",
    "matrix_mask",
    "matrix_rank_mask",
    "nm_mask",
    "parse_nm",
    "row_mask",
    "select_mask",
]

UNSTRUCTURED = (0, 0)
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(structure: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; ``"0:0"``, ``"unstructured"`` or None -> ``(0, 0)``.

    N:M means N of every M consecutive input weights are pruned, so 0 < N < M.
    """
    if structure is None:
        return UNSTRUCTURED
    if isinstance(structure, str):
        if structure.strip().lower() == "unstructured":
            return UNSTRUCTURED
        match = _NM.match(structure)
        if match is None:
            raise PruningConfigError(
                f"mask_structure={structure!r} is not 'N:M'; use e.g. '2:4' or '0:0' (unstructured)"
            )
        n, m = int(match.group(1)), int(match.group(2))
    else:
        try:
            n, m = (int(v) for v in structure)
        except (TypeError, ValueError):
            raise PruningConfigError(
                f"mask_structure={structure!r} is not an (N, M) pair; use e.g. (2, 4) or '2:4'"
            ) from None
    if (n, m) == UNSTRUCTURED:
        return UNSTRUCTURED
    if not 0 < n < m:
        raise PruningConfigError(
            f"mask_structure={n}:{m} is invalid: N:M needs 0 < N < M (e.g. '2:4'), or '0:0' for unstructured"
        )
    return n, m


def check_sparsity(sparsity: float) -> float:
    """Return ``sparsity`` as a float if it lies in the open interval (0, 1)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise PruningConfigError(f"sparsity={sparsity!r} is not a number; pass a fraction such as 0.5") from None
    if not (0.0 < value < 1.0) or math.isnan(value):
        raise PruningConfigError(
            f"sparsity={sparsity!r} must lie strictly between 0 and 1 (the fraction of weights to prune, e.g. 0.5)"
        )
    return value


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Per output row, prune the ``floor(in * s)`` lowest scores (stable: ties -> lower column)."""
    k = int(scores.shape[1] * sparsity)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k == 0:
        return mask
    order = torch.sort(scores, dim=-1, stable=True)[1][:, :k]
    return mask.scatter_(1, order, True)


def matrix_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Prune every score ``<=`` the sorted score at index ``floor(numel * s)`` (reference rule)."""
    flat = torch.sort(scores.flatten())[0]
    thresh = flat[int(scores.numel() * sparsity)]
    return scores <= thresh


def matrix_rank_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Over the whole matrix, prune exactly the ``floor(numel * s)`` lowest scores (stable: ties ->
    lower row-major index). Unlike :func:`matrix_mask` no tie can make it prune more."""
    flat = scores.reshape(1, -1)
    return row_mask(flat, sparsity).reshape(scores.shape)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """In each group of ``m`` consecutive input columns of each row, prune the ``n`` lowest."""
    rows, cols = scores.shape
    if cols % m:
        raise PruningConfigError(
            f"N:M structure {n}:{m} needs in_features divisible by M, got {cols}; pick an M that divides "
            f"{cols} or exclude this linear from the targets"
        )
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, largest=False)[1]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(2, idx, True).reshape(rows, cols)


def select_mask(
    scores: Tensor, sparsity: float | None, nm: tuple[int, int] = UNSTRUCTURED, granularity: str = "row"
) -> Tensor:
    """Dispatch to :func:`nm_mask` (when ``nm`` is not ``(0, 0)``), :func:`row_mask` or :func:`matrix_mask`."""
    if nm != UNSTRUCTURED:
        return nm_mask(scores, *nm)
    if sparsity is None:
        raise PruningConfigError("unstructured selection needs a sparsity in (0, 1)")
    if granularity == "row":
        return row_mask(scores, sparsity)
    if granularity == "matrix":
        return matrix_mask(scores, sparsity)
    raise PruningConfigError(f"granularity={granularity!r} is unknown; use 'row' or 'matrix'")


def detect_structure(masks: dict[str, Tensor]) -> tuple[int, int] | None:
    """``(N, M)`` when every mask prunes exactly N of every M consecutive inputs (M in 4, 8, 16)."""
    if not masks:
        return None
    for m in (4, 8, 16):
        counts = set()
        for mask in masks.values():
            rows, cols = mask.shape
            if cols % m:
                counts = None
                break
            counts |= set(mask.reshape(rows, cols // m, m).sum(-1).unique().tolist())
            if len(counts) > 1:
                break
        if counts is not None and len(counts) == 1:
            n = counts.pop()
            if 0 < n < m:
                return int(n), m
    return None
