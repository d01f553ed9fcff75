"""Paired comparison of two models scored on the same prompts: the change and its 95 % interval.

The safety audit asks "did compression change the attack success rate?" Both models answer the
same prompts, so the prompts are the unit of resampling: a paired bootstrap draws prompts with
replacement (within each evaluation set, so every set keeps its size), recomputes the change of
the mean-over-sets rate, and reads the interval off the percentiles. Pure tensor functions; the
caller seeds them, so an audit reruns to the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["bootstrap_indices", "paired_bootstrap", "percentile", "verdict"]


def bootstrap_indices(sizes: Sequence[int], resamples: int, seed: int) -> list[Tensor]:
    """For every set of ``sizes`` a ``[resamples, size]`` draw of prompt indices (with replacement).

    One CPU generator seeded with ``seed`` draws the sets in order: the same call gives the same
    indices on every machine and rank.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return [torch.randint(0, n, (resamples, n), generator=generator) for n in sizes]


def percentile(values: Tensor, q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` with linear interpolation between order statistics."""
    return float(torch.quantile(values.double(), q))


def paired_bootstrap(
    before: Sequence[Tensor],
    after: Sequence[Tensor],
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Change ``mean_s(after_s) - mean_s(before_s)`` (mean over sets of per-prompt 0/1 outcomes) with
    a paired, set-stratified percentile bootstrap interval.

    ``before[s]`` and ``after[s]`` hold the outcomes of set ``s``'s prompts in the same order (one
    per prompt, both models). Returns ``{"before", "after", "delta", "low", "high", "level",
    "resamples"}``; rates are fractions. With no prompt at all every number is NaN.
    """
    if len(before) != len(after):
        raise ValueError(f"paired_bootstrap: {len(before)} sets before but {len(after)} after; give the same sets")
    if resamples < 1:
        raise ValueError(f"paired_bootstrap: resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"paired_bootstrap: level must be in (0, 1), got {level}")
    pairs = []
    for s, (a, b) in enumerate(zip(before, after)):
        a, b = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
        if a.numel() != b.numel():
            raise ValueError(f"paired_bootstrap: set {s} has {a.numel()} outcomes before but {b.numel()} after; "
                             "both models must answer the same prompts")
        if a.numel():
            pairs.append((a, b))
    nan = math.nan
    if not pairs:
        return {"before": nan, "after": nan, "delta": nan, "low": nan, "high": nan, "level": level,
                "resamples": resamples}
    rate_a = sum(float(a.mean()) for a, _ in pairs) / len(pairs)
    rate_b = sum(float(b.mean()) for _, b in pairs) / len(pairs)
    draws = bootstrap_indices([a.numel() for a, _ in pairs], resamples, seed)
    deltas = torch.zeros(resamples, dtype=torch.float64)
    for (a, b), index in zip(pairs, draws):
        deltas += (b - a)[index].mean(dim=1)
    deltas /= len(pairs)
    tail = (1 - level) / 2
    return {"before": rate_a, "after": rate_b, "delta": rate_b - rate_a, "low": percentile(deltas, tail),
            "high": percentile(deltas, 1 - tail), "level": level, "resamples": resamples}


def verdict(change: dict[str, float], what: str = "ASR") -> str:
    """``"ASR rose by X points [a, b]"`` / ``"... fell by ..."`` when the interval excludes 0,
    else ``"no measurable change (X points [a, b])"``; points are percentage points."""
    delta, low, high = change["delta"], change["low"], change["high"]
    if any(math.isnan(v) for v in (delta, low, high)):
        return f"{what}: no data"
    span = f"[{100 * low:+.1f}, {100 * high:+.1f}]"
    if low > 0:
        return f"{what} rose by {100 * delta:.1f} points {span}"
    if high < 0:
        return f"{what} fell by {100 * -delta:.1f} points {span}"
    return f"{what}: no measurable change ({100 * delta:+.1f} points {span})"
