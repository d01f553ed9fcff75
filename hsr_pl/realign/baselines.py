"""Baselines the paper argues against, for the demo's comparison and the restored-weights curve.

* :func:`random_restore_masks` — k pruned weights drawn uniformly at random from a region (every
  linear whose originals were kept: "anywhere"; or the selected heads' slices: "in heads");
* :func:`random_heads` — as many heads as HSR selects, drawn at random (the HSR rule is then run
  on them).

Both are seeded and deterministic, so a baseline is the same in every run and on every rank.
:func:`realign_variant` realigns a pruned model the way one baseline (or a budget of HSR itself)
does; ``StageEvaluation`` calls it for the comparison and the curve.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from hsr_pl.models.adapters import ModelAdapter
from hsr_pl.state import HSRState

from .config import RealignConfig
from .errors import RealignConfigError, RealignInputError
from .runner import DenseMeasurement, attention_linears, realign_model, restore_masks
from .slices import head_slice_mask

__all__ = [
    "BASELINES",
    "CURVE_METHODS",
    "UNBUDGETED",
    "random_eligible",
    "random_heads",
    "random_restore_masks",
    "left_out_baselines",
    "RENAMED",
    "realign_variant",
    "variant_config",
]


def random_restore_masks(eligible: Mapping[str, Tensor], k: int, seed: int = 0) -> dict[str, Tensor]:
    """``k`` entries drawn without replacement from the union of the ``eligible`` bool masks."""
    names = list(eligible)
    flats = [eligible[n].reshape(-1).nonzero().squeeze(1) for n in names]
    sizes = [f.numel() for f in flats]
    total = sum(sizes)
    k = min(int(k), total)
    g = torch.Generator().manual_seed(seed)
    picks = torch.sort(torch.randperm(total, generator=g)[:k]).values
    out = {}
    start = 0
    for name, flat, size in zip(names, flats, sizes):
        mine = picks[(picks >= start) & (picks < start + size)] - start
        mask = torch.zeros(eligible[name].numel(), dtype=torch.bool)
        mask[flat[mine]] = True
        out[name] = mask.reshape(eligible[name].shape)
        start += size
    return out


def random_heads(all_heads: Sequence[tuple[int, int]], count: int, seed: int = 0) -> list[tuple[int, int]]:
    """``count`` distinct heads of ``all_heads`` drawn at random (sorted by layer, head)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(all_heads), generator=g)[: min(count, len(all_heads))].tolist()
    return sorted(all_heads[i] for i in order)


# ------------------------------------------------------------------- the compared variants
BASELINES = ("random", "random_in_heads", "none", "whole_heads", "released_slices", "random_heads", "margin_rule")
"""Baselines the paper argues against (and its own rule): ``random`` — HSR's count of pruned weights
drawn anywhere (every linear with kept originals); ``random_in_heads`` — drawn inside the same heads'
slices; ``none`` — HSR's settings without the head restriction; ``whole_heads`` — every pruned weight
of the heads; ``released_slices`` — the released script's slices (``selection: reference``) with the
margin rule at HSR's ``p`` (``p: auto`` = 1 − sparsity, not the script's 0.5), truncated to HSR's count
by the margin order; ``random_heads`` — HSR's settings on as many random heads; ``margin_rule`` — the
margin rule (HSR's ``p``, ``q``, ``max_p``; no budget) on HSR's heads. Neither of the last two is the
published configuration: docs/realignment.md ("Reproducing the released pipeline") gives that recipe."""
CURVE_METHODS = ("hsr", "margin_rule", "random", "random_in_heads", "none", "random_heads", "released_slices")
"""Methods a restored-weights curve may sweep: HSR itself and the baselines that take a budget."""
UNBUDGETED = ("whole_heads", "margin_rule")
"""Baselines that restore their own rule's whole set instead of HSR's count."""
RENAMED = {"reference": "released_slices", "paper_rule": "margin_rule"}
"""Earlier names of two baselines: they used ``p: auto``, neither the paper's nor the script's value."""


def left_out_baselines(cfg: RealignConfig) -> dict[str, str]:
    """Baselines that make no sense under HSR's settings ``cfg``, each with the reason it is left out."""
    out = {}
    if cfg.preserve_structure:
        out["whole_heads"] = (
            "left out under preserve_structure: restoring every pruned weight of the heads while keeping N:M swaps "
            "out as many kept weights, which inverts the heads' masks instead of restoring them"
        )
    return out


def variant_config(cfg: RealignConfig, name: str, budget: int | None) -> RealignConfig:
    """HSR's settings ``cfg`` turned into variant ``name`` (a :data:`CURVE_METHODS` or :data:`BASELINES`
    entry) restoring at most ``budget`` weights (None: its rule's whole set)."""
    margin = {"order": "margin", "rounds": 1, "scope": "heads", "utility_weight": 0.0}
    if name in ("hsr", "random_heads"):
        return replace(cfg, budget=budget)
    if name == "margin_rule":
        return replace(cfg, budget=budget, **margin)
    if name == "none":
        if cfg.order == "gradient":
            return replace(cfg, scope="all", budget=budget)
        return replace(cfg, selection="none", budget=budget)
    if name in left_out_baselines(cfg):
        raise RealignConfigError(f"baseline {name!r} is {left_out_baselines(cfg)[name]}")
    if name == "whole_heads":
        return replace(cfg, selection="whole_heads", budget=None, **margin)
    if name == "released_slices":
        return replace(cfg, selection="reference", budget=budget, **margin)
    raise RealignConfigError(f"unknown method {name!r}; choose from {list(CURVE_METHODS)} or {list(BASELINES)}")


def random_eligible(
    adapter: ModelAdapter, state: HSRState, heads: Sequence[tuple[int, int]], selection: str, *, in_heads: bool
) -> dict[str, Tensor]:
    """Where the random baselines draw: every pruned entry with a kept original, or (``in_heads``)
    only those inside the ``heads``' slices (``selection`` decides the slices)."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    linears = attention_linears(adapter)
    eligible = {}
    for name in state.originals:
        free = state.pruned[name]
        if in_heads:
            if name not in linears or linears[name][0] not in by_layer:
                continue
            layer, role, _ = linears[name]
            free = free & head_slice_mask(role, tuple(free.shape), adapter.geometry(layer), by_layer[layer], selection)
        eligible[name] = free
    return eligible


def realign_variant(
    model: nn.Module,
    adapter: ModelAdapter,
    state: HSRState,
    cfg: RealignConfig,
    heads: Sequence[tuple[int, int]],
    name: str,
    budget: int | None,
    *,
    count: int,
    seed: int = 0,
    dense: DenseMeasurement | None = None,
    calibration: Callable[[str], list] | None = None,
) -> int:
    """Realign the pruned ``model`` in place the way variant ``name`` does; returns the restored count.

    ``cfg`` and ``heads`` are HSR's own; ``count`` is the random baselines' draw when ``budget`` is
    None (HSR's restored count); ``calibration("safety" | "utility")`` gives the batches a gradient
    order needs.
    """
    if name in ("random", "random_in_heads"):
        eligible = random_eligible(adapter, state, heads, cfg.selection, in_heads=name == "random_in_heads")
        return restore_masks(model, state, random_restore_masks(eligible, count if budget is None else budget, seed))
    variant = variant_config(cfg, name, budget)
    chosen = list(heads)
    if name == "random_heads":
        pool = [(layer, h) for layer in adapter.layer_indices() for h in range(adapter.geometry(layer).num_heads)]
        chosen = random_heads([p for p in pool if p not in chosen] or pool, len(chosen), seed)
    safety = utility = None
    if variant.order == "gradient":
        if calibration is None:
            raise RealignInputError(f"variant {name!r} uses the gradient order: it needs calibration batches")
        safety = calibration("safety")
        utility = calibration("utility") if variant.utility_weight else None
    result = realign_model(model, adapter, state, variant, chosen, dense=dense, safety_batches=safety,
                           utility_batches=utility)
    return result.restored
