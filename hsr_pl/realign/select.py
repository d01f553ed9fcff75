"""Which pruned weights to restore when there is a budget, and how to keep N:M structure.

Everything here works on *pools*: per linear, the flat (row-major) indices of the entries that
may be restored and a key per entry (larger = restore first). A budget keeps the ``k`` best
entries over all linears together, in one deterministic order: key descending, then the linear's
position in the plan, then the flat index (so ties never depend on the platform).

Keys (``order``):

* ``margin`` — the gap between an entry's safety and utility rank percentiles *within its
  matrix*: ``pct_s − pct_u``, each in [0, 1] (0 = least important). The paper's rule restores its
  whole candidate set; truncating it by this gap keeps the most safety- and least
  utility-relevant candidates first.
* ``gradient`` — the first-order drop of the refusal loss that restoring the entry would give,
  ``−g_ij · w_ij`` (``g`` = ∂L/∂W of the aligned refusals' NLL at the *pruned* model, ``w`` the
  dense value), optionally minus ``λ`` times the first-order rise of the loss on benign answers,
  ``λ · g^u_ij · w_ij``.

``preserve_structure`` (N:M masks): each M-group of a row holds exactly M − N kept weights;
restoring one of its pruned entries swaps out the group's kept entry of lowest utility importance
that is not itself restored. A group can therefore take at most M − N restorations; entries past
that cap (in the global order) leave the pool before the budget is applied, which gives exactly
the set a one-by-one greedy pass would choose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import RealignConfigError

__all__ = [
    "ORDERS",
    "Pool",
    "gradient_gain",
    "group_cap_filter",
    "margin_keys",
    "rank_percentiles",
    "resolve_budget",
    "select_top",
    "structure_swaps",
]

ORDERS = ("margin", "gradient")


@dataclass
class Pool:
    """Candidates of one linear: flat indices (int64, ascending) and their keys (float64)."""

    indices: Tensor
    keys: Tensor

    def __len__(self) -> int:
        return int(self.indices.numel())


def resolve_budget(budget: int | float | str | None, lm_params: int) -> int | None:
    """A budget as a weight count: an int is a count, a float in (0, 1) a fraction of the
    language model's parameters, a string ``"1‱"``, ``"0.1‰"``, ``"0.01%"`` or ``"1e-4"`` likewise.
    ``"auto"`` is not a count (the automatic budget finds one, :mod:`hsr_pl.realign.auto`)."""
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise RealignConfigError(f"budget={budget!r} must be a count (e.g. 100) or a fraction (e.g. 1e-4 or '1‱')")
    if isinstance(budget, str):
        text = budget.strip()
        scale = 1.0
        if text == "auto":
            raise RealignConfigError(
                "budget='auto' is found round by round on dev data, not resolved to a count; it needs "
                "GradientOrder inside SafetyRealignment (or give a count such as 100 or '1‱')"
            )
        if text.endswith("‱"):
            text, scale = text[:-1], 1e-4
        elif text.endswith("‰"):
            text, scale = text[:-1], 1e-3
        elif text.endswith("%"):
            text, scale = text[:-1], 1e-2
        try:
            value = float(text) * scale
        except ValueError:
            raise RealignConfigError(f"budget={budget!r} is not a number; use e.g. 100, 1e-4, '1‱', '0.1‰' or '0.01%'") from None
        if scale == 1.0 and value >= 1 and value == int(value):
            return int(value)
        budget = 0 if value == 0 else value  # "0" is the count 0, as the int is
    if isinstance(budget, int):
        if budget < 0:
            raise RealignConfigError(f"budget={budget} must be ≥ 0 (a number of weights)")
        return budget
    value = float(budget)
    if not 0.0 < value < 1.0:
        raise RealignConfigError(
            f"budget={budget!r}: a float is a fraction of the language model's parameters and must lie in (0, 1); "
            "pass an int for a count"
        )
    return int(value * lm_params)


def rank_percentiles(scores: Tensor, indices: Tensor) -> Tensor:
    """Percentile in [0, 1] of ``scores.flat[indices]`` within the whole matrix (0 = smallest).

    The rank is the number of entries strictly smaller, so equal scores share a percentile.
    """
    flat = scores.reshape(-1).float()
    if flat.numel() <= 1:
        return torch.zeros(indices.shape, dtype=torch.float64)
    ordered = torch.sort(flat).values
    below = torch.searchsorted(ordered, flat[indices].contiguous(), right=False)
    return below.double() / (flat.numel() - 1)


def margin_keys(utility: Tensor, safety: Tensor, indices: Tensor) -> Tensor:
    """``pct_s − pct_u`` of the entries ``indices`` (flat) of one matrix."""
    return rank_percentiles(safety, indices) - rank_percentiles(utility, indices)


def gradient_gain(
    grad: Tensor, dense: Tensor, indices: Tensor, utility_grad: Tensor | None = None, utility_weight: float = 0.0
) -> Tensor:
    """``−g·w`` (minus ``λ·g^u·w``) at the flat ``indices``: the first-order loss drop of restoring them."""
    w = dense.reshape(-1)[indices].double()
    gain = -grad.reshape(-1)[indices].double() * w
    if utility_weight:
        if utility_grad is None:
            raise RealignConfigError("utility_weight > 0 needs the utility-set gradient")
        gain = gain - utility_weight * utility_grad.reshape(-1)[indices].double() * w
    return gain


def select_top(pools: Sequence[Pool], k: int | None) -> list[Tensor]:
    """The ``k`` best entries over all pools (all of them when ``k`` is None), as flat indices per pool."""
    sizes = [len(p) for p in pools]
    total = sum(sizes)
    if k is None or k >= total:
        return [p.indices.clone() for p in pools]
    if k <= 0 or total == 0:
        return [p.indices[:0].clone() for p in pools]
    keys = torch.cat([p.keys.double() for p in pools])
    if bool(torch.isnan(keys).any()):
        raise RealignConfigError("restoration keys hold NaN; check the gradients / importance statistics")
    owner = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    flat = torch.cat([p.indices for p in pools])
    # Pools are concatenated in plan order with ascending indices, so a stable sort by key alone
    # breaks ties by (linear position, flat index).
    chosen = torch.sort(keys, descending=True, stable=True).indices[:k]
    out = []
    for i in range(len(pools)):
        mine = chosen[owner[chosen] == i]
        out.append(torch.sort(flat[mine]).values)
    return out


def ordered(pools: Sequence[Pool]) -> tuple[Tensor, Tensor]:
    """All entries in the global order: ``(pool position, flat index)`` tensors."""
    sizes = [len(p) for p in pools]
    if not sizes or sum(sizes) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    keys = torch.cat([p.keys.double() for p in pools])
    owner = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    flat = torch.cat([p.indices for p in pools])
    order = torch.sort(keys, descending=True, stable=True).indices
    return owner[order], flat[order]


def group_cap_filter(
    pools: Sequence[Pool], shapes: Sequence[tuple[int, int]], m: int, caps: Sequence[Tensor]
) -> list[Pool]:
    """Drop the entries that would exceed their N:M group's remaining capacity, in global order.

    ``caps[i]`` is ``[out, in // m]``: how many more restorations each group of linear i takes.
    """
    owner, flat = ordered(pools)
    if owner.numel() == 0:
        return [Pool(p.indices[:0], p.keys[:0]) for p in pools]
    cols = torch.tensor([s[1] for s in shapes], dtype=torch.long)
    groups_per_linear = torch.tensor([s[0] * (s[1] // m) for s in shapes], dtype=torch.long)
    offsets = torch.cumsum(groups_per_linear, 0) - groups_per_linear
    row, col = flat // cols[owner], flat % cols[owner]
    group = offsets[owner] + row * (cols[owner] // m) + col // m
    # Rank of each entry inside its group, by the global order (stable sort keeps that order).
    by_group = torch.sort(group, stable=True)
    sorted_groups = by_group.values
    position = torch.arange(sorted_groups.numel())
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    first = torch.cummax(torch.where(starts, position, torch.zeros_like(position)), 0).values
    rank_sorted = position - first
    rank = torch.empty_like(rank_sorted)
    rank[by_group.indices] = rank_sorted
    cap = torch.cat([c.reshape(-1).long() for c in caps])[group]
    keep = rank < cap
    out = []
    for i, pool in enumerate(pools):
        kept_flat = flat[keep & (owner == i)]
        member = torch.isin(pool.indices, kept_flat)
        out.append(Pool(pool.indices[member], pool.keys[member]))
    return out


def structure_swaps(
    restore: Tensor, kept: Tensor, utility: Tensor, m: int
) -> Tensor:
    """Kept entries to prune so that every group stays N:M after ``restore`` (bool ``[out, in]``).

    In each group with r new restorations, the r kept entries (``kept``: kept by the pruner and
    not restored) of lowest utility importance are swapped out (ties: lower column).
    """
    rows, cols = restore.shape
    if cols % m:
        raise RealignConfigError(f"in_features={cols} is not divisible by M={m}")
    r = restore.reshape(rows, cols // m, m).sum(-1)
    kept_g = kept.reshape(rows, cols // m, m)
    if bool((kept_g.sum(-1) < r).any()):
        raise RealignConfigError("a group has more restorations than kept weights to swap out; this is a bug")
    score = utility.reshape(rows, cols // m, m).double().masked_fill(~kept_g, float("inf"))
    order = torch.sort(score, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(m).expand_as(order).contiguous())
    swap = kept_g & (rank < r.unsqueeze(-1))
    return swap.reshape(rows, cols)
