"""Which entries of an attention projection belong to a selected head (``selection``).

Weights are ``nn.Linear`` layouts ``[out, in]``. With H query heads, H_kv key/value heads,
g = H / H_kv and head dim d_h:

* ``head`` (default, and ``whole_heads``): q_proj rows ``[h·d_h, (h+1)·d_h)``; k_proj / v_proj
  rows of the KV group ``h // g``; o_proj columns ``[h·d_h, (h+1)·d_h)`` — exactly the weights
  that compute head h's query, its group's keys and values, and what its output writes.
* ``reference`` (the released script, reproduced bit for bit): q_proj *input columns*
  ``[h·d/H, (h+1)·d/H)``; k_proj / v_proj input columns ``[k·d/H_kv, (k+1)·d/H_kv)`` with
  k = h // g; o_proj: the whole matrix of a layer that holds a selected head.
* ``none``: every entry of every attention projection (no head restriction; a baseline).

MLP weights are never in any slice.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from hsr_pl.models.adapters import HeadGeometry

from .errors import RealignConfigError

__all__ = ["ROLES", "SELECTIONS", "entry_heads", "head_slice_mask"]

ROLES = ("q", "k", "v", "o")
SELECTIONS = ("head", "reference", "none", "whole_heads")


def _ranges(length: int, width: int, groups: Iterable[int]) -> Tensor:
    flags = torch.zeros(length, dtype=torch.bool)
    for g in groups:
        flags[g * width : (g + 1) * width] = True
    return flags


def head_slice_mask(
    role: str, shape: tuple[int, int], geometry: HeadGeometry, heads: Iterable[int], selection: str = "head"
) -> Tensor:
    """Bool ``[out, in]`` mask of the entries of projection ``role`` owned by ``heads`` of one layer."""
    if role not in ROLES:
        raise RealignConfigError(f"role={role!r} is not an attention projection {ROLES}; MLP weights are never restored")
    if selection not in SELECTIONS:
        raise RealignConfigError(f"selection={selection!r} is not one of {SELECTIONS}")
    out_features, in_features = shape
    heads = sorted(set(int(h) for h in heads))
    bad = [h for h in heads if not 0 <= h < geometry.num_heads]
    if bad:
        raise RealignConfigError(f"heads {bad} do not exist in a layer of {geometry.num_heads} heads")
    rows = torch.zeros(out_features, dtype=torch.bool)
    cols = torch.zeros(in_features, dtype=torch.bool)
    if selection == "none":
        return torch.ones(shape, dtype=torch.bool)
    groups = sorted({geometry.kv_group(h) for h in heads})
    if selection in ("head", "whole_heads"):
        if role == "q":
            rows = _ranges(out_features, geometry.head_dim, heads)
            cols[:] = True
        elif role in ("k", "v"):
            rows = _ranges(out_features, geometry.head_dim, groups)
            cols[:] = True
        else:
            rows[:] = True
            cols = _ranges(in_features, geometry.head_dim, heads)
    else:  # reference
        if not heads:
            return torch.zeros(shape, dtype=torch.bool)
        rows[:] = True
        if role == "q":
            cols = _ranges(in_features, in_features // geometry.num_heads, heads)
        elif role in ("k", "v"):
            cols = _ranges(in_features, in_features // geometry.num_kv_heads, groups)
        else:
            cols[:] = True
    return rows[:, None] & cols[None, :]


def entry_heads(role: str, positions: Tensor, shape: tuple[int, int], geometry: HeadGeometry, selection: str) -> Tensor:
    """For each ``[row, col]`` in ``positions``, the head (q, o) or KV group (k, v) it belongs to.

    Used for the per-head report: q/o entries are counted for their query head, k/v entries for
    their KV group (shared by the g query heads of the group).
    """
    rows, cols = positions[:, 0], positions[:, 1]
    out_features, in_features = shape
    if role == "o":
        return cols // geometry.head_dim
    if selection == "reference":
        width = in_features // (geometry.num_heads if role == "q" else geometry.num_kv_heads)
        return cols // width
    return rows // geometry.head_dim
