"""Baselines the paper argues against, for the demo's comparison and the restored-weights curve.

* :func:`random_restore_masks` — k pruned weights drawn uniformly at random from a region (every
  linear whose originals were kept: "anywhere"; or the selected heads' slices: "in heads");
* :func:`random_heads` — as many heads as HSR selects, drawn at random (the HSR rule is then run
  on them).

Both are seeded and deterministic, so a baseline is the same in every run and on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["random_heads", "random_restore_masks"]


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
