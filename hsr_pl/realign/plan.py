"""From per-linear inputs to the set of pruned weights to restore (pure tensor code).

The plan is computed one linear at a time (so peak memory is one matrix's two importance scores,
whatever the model size) into :class:`~hsr_pl.realign.select.Pool` objects, then the budget is
applied over all of them at once, then N:M structure is restored by swaps. No model, no Trainer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hsr_pl.models.adapters import HeadGeometry

from .config import RealignConfig
from .errors import RealignConfigError, RealignInputError
from .importance import ImportanceStat, importance_scores
from .rule import candidate_mask, check_fractions
from .select import Pool, gradient_gain, group_cap_filter, margin_keys, select_top, structure_swaps
from .slices import head_slice_mask

__all__ = ["LinearPlan", "LinearView", "build_pools", "plan_restoration"]


@dataclass
class LinearView:
    """What the planner needs to know about one attention projection.

    Attributes:
        pruned: bool ``[out, in]``, True where the weight is pruned now (pruner + N:M swaps).
        restored: bool, True where an earlier step already restored a pruned weight.
        dense: the dense weight (float) the importance scores are computed from.
        utility / safety: the importance statistics of the dense model (None for gradient order
            without structure preservation).
        sparsity: the pruner's sparsity of this linear (``p: auto`` uses ``1 − sparsity``).
        pruned_count: the pruner's exact count of pruned entries; with it ``p: auto`` keeps exactly
            the kept count in ``T^u(p)`` (a float sparsity can round one entry away).
        restore_values: what a restore writes at each pruned entry (the originals; an N:M
            swap's own value before it was swapped out, e.g. SparseGPT's moved value); the
            gradient gain −g·w uses these, so it scores the value that will be written. None: dense.
    """

    name: str
    layer: int
    role: str
    geometry: HeadGeometry
    pruned: Tensor
    restored: Tensor
    dense: Tensor
    utility: ImportanceStat | None = None
    safety: ImportanceStat | None = None
    sparsity: float = 0.0
    pruned_count: int | None = None
    restore_values: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pruned.shape)


@dataclass
class LinearPlan:
    """The outcome for one linear: entries to restore, kept entries to swap out, pool size."""

    name: str
    restore: Tensor
    swap: Tensor | None = None
    pool: int = 0
    candidates: int = 0
    p: float | None = None
    info: dict = field(default_factory=dict)


def _p_for(view: LinearView, cfg: RealignConfig) -> tuple[float, int | None]:
    """``(p, exact size of T^u(p) or None)``: ``p: auto`` with the pruner's exact count selects
    exactly the kept count (a count, since ``int(kept / numel · numel)`` can round one away)."""
    if cfg.p != "auto":
        p = float(cfg.p)
        check_fractions(p, cfg.q, cfg.max_p, where=view.name)
        return p, None
    numel = view.pruned.numel()
    if view.pruned_count is None:
        p, kept = 1.0 - view.sparsity, None
    else:
        kept = numel - view.pruned_count
        p = kept / numel
    check_fractions(p, cfg.q, cfg.max_p, where=view.name)
    return p, kept


def _scores(view: LinearView) -> tuple[Tensor, Tensor]:
    if view.utility is None or view.safety is None:
        raise RealignInputError(f"{view.name}: no dense importance statistics; they are measured before pruning")
    return importance_scores(view.dense, view.utility), importance_scores(view.dense, view.safety)


def build_pools(
    views: Sequence[LinearView],
    heads: Mapping[int, Sequence[int]],
    cfg: RealignConfig,
    *,
    grads: Mapping[str, Tensor] | None = None,
    utility_grads: Mapping[str, Tensor] | None = None,
    with_keys: bool = True,
) -> tuple[list[Pool], list[LinearPlan]]:
    """One pool per view (the restorable entries, flat indices ascending) and its plan stub."""
    pools, plans = [], []
    for view in views:
        free = view.pruned & ~view.restored
        layer_heads = heads.get(view.layer, [])
        if cfg.order == "gradient" and cfg.scope == "all":
            region = torch.ones(view.shape, dtype=torch.bool)
        else:
            region = head_slice_mask(view.role, view.shape, view.geometry, layer_heads, cfg.selection)
        p = None
        candidates = 0
        if cfg.order == "gradient":
            if grads is None or view.name not in grads:
                raise RealignInputError(f"{view.name}: order='gradient' needs the refusal-loss gradient of this linear")
            pool_mask = free & region
            idx = pool_mask.reshape(-1).nonzero().squeeze(1)
            keys = gradient_gain(
                grads[view.name], view.dense if view.restore_values is None else view.restore_values, idx,
                None if utility_grads is None else utility_grads.get(view.name), cfg.utility_weight,
            )
        else:
            if cfg.selection == "whole_heads":
                pool_mask = free & region
                utility = safety = None
            else:
                p, kept = _p_for(view, cfg)
                utility, safety = _scores(view)
                rule = candidate_mask(utility, safety, p, cfg.q, cfg.max_p, kept=kept)
                candidates = int((rule & view.pruned & region).sum())
                pool_mask = rule & free & region
            idx = pool_mask.reshape(-1).nonzero().squeeze(1)
            if with_keys and idx.numel():
                if utility is None:
                    utility, safety = _scores(view)
                keys = margin_keys(utility, safety, idx)
            else:
                keys = torch.zeros(idx.shape, dtype=torch.float64)
        pools.append(Pool(idx, keys))
        plans.append(LinearPlan(view.name, torch.zeros(view.shape, dtype=torch.bool), pool=int(idx.numel()),
                                candidates=candidates, p=p))
    return pools, plans


def _structure_caps(views: Sequence[LinearView], nm: tuple[int, int]) -> list[Tensor]:
    n, m = nm
    caps = []
    for view in views:
        rows, cols = view.shape
        if cols % m:
            raise RealignConfigError(f"{view.name}: in_features={cols} is not divisible by M={m}")
        done = view.restored.reshape(rows, cols // m, m).sum(-1)
        caps.append((m - n) - done)
    return caps


def plan_restoration(
    views: Sequence[LinearView],
    heads: Mapping[int, Sequence[int]],
    cfg: RealignConfig,
    budget: int | None,
    *,
    structure: tuple[int, int] | None = None,
    grads: Mapping[str, Tensor] | None = None,
    utility_grads: Mapping[str, Tensor] | None = None,
) -> list[LinearPlan]:
    """The entries to restore in every view (and, for N:M, the kept entries to swap out).

    ``budget`` is a count (None = the whole pool). With ``cfg.preserve_structure`` the masks must
    be exactly ``structure`` = (N, M).
    """
    pools, plans = build_pools(views, heads, cfg, grads=grads, utility_grads=utility_grads,
                               with_keys=budget is not None or cfg.preserve_structure)
    if cfg.preserve_structure:
        if structure is None:
            raise RealignConfigError("preserve_structure needs N:M masks; the pruner reported unstructured sparsity")
        pools = group_cap_filter(pools, [v.shape for v in views], structure[1], _structure_caps(views, structure))
    chosen = select_top(pools, budget)
    for view, plan, indices in zip(views, plans, chosen):
        restore = torch.zeros(view.pruned.numel(), dtype=torch.bool)
        restore[indices] = True
        plan.restore = restore.reshape(view.shape)
        if cfg.preserve_structure:
            plan.swap = torch.zeros(view.shape, dtype=torch.bool)
            if indices.numel():
                utility = importance_scores(view.dense, view.utility) if view.utility is not None else view.dense.abs()
                plan.swap = structure_swaps(plan.restore, ~view.pruned, utility, structure[1])
    return plans
