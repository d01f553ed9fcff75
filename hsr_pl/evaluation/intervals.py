"""Percentile bootstrap 95 % intervals for rates (ASR, over-refusal, accuracy) and their differences.

Why: a rate on 300 prompts moves by several points between data seeds; a reported number needs
its interval. The outcomes are 0/1 per prompt, so resampling n prompts with replacement and
counting successes is a Binomial(n, p̂) draw: :func:`bootstrap_ci` draws those counts directly
(exactly the bootstrap distribution, in O(resamples) memory whatever n). A paired difference
(two rates on the same prompts, e.g. dense vs pruned) resamples prompts, i.e. a multinomial draw
over the four (x, y) outcome cells. Seeded: the same inputs and seed give the same interval.

The percentile interval of 0/n (or n/n) successes is [0, 0] ([1, 1]): the bootstrap cannot say
more than the data; report n with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Interval", "bootstrap_ci"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval (and how it was drawn)."""

    estimate: float
    low: float
    high: float
    confidence: float
    resamples: int
    seed: int
    paired: bool
    n: tuple[int, ...]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["n"] = list(self.n)
        return out


def _outcomes(values: Sequence[bool | int | float], label: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1) if len(values) else np.zeros(0)
    if array.size == 0:
        raise ValueError(f"{label} is empty; pass one 0/1 (or bool) outcome per prompt")
    if not np.all((array == 0) | (array == 1)):
        raise ValueError(f"{label} holds values other than 0/1; pass one 0/1 (or bool) outcome per prompt")
    return array


def bootstrap_ci(
    x: Sequence[bool | int | float],
    y: Sequence[bool | int | float] | None = None,
    *,
    paired: bool = False,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> Interval:
    """The percentile bootstrap interval of ``mean(x)``, or of ``mean(x) - mean(y)``.

    Args:
        x, y: 0/1 outcomes per prompt (True = e.g. an attack success). Without ``y``: the interval
            of x's rate. With ``y``: of the difference; independent samples by default (each side
            resampled on its own), or ``paired=True`` when ``x[i]`` and ``y[i]`` are the same
            prompt (equal lengths; the prompts are resampled together).
        confidence: the interval's coverage (0.95: the 2.5th and 97.5th percentiles).
        resamples: bootstrap draws (10 000 by default).
        seed: of ``numpy.random.default_rng``.
    """
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must lie in (0, 1), e.g. 0.95")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples={resamples!r} must be an integer ≥ 100 (10 000 is usual)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    a = _outcomes(x, "x")
    rng = np.random.default_rng(seed)
    if y is None:
        if paired:
            raise ValueError("paired=True needs y (the second rate on the same prompts)")
        estimate = float(a.mean())
        draws = rng.binomial(a.size, estimate, size=resamples) / a.size
        sizes: tuple[int, ...] = (a.size,)
    else:
        b = _outcomes(y, "y")
        estimate = float(a.mean() - b.mean())
        if paired:
            if a.size != b.size:
                raise ValueError(f"paired=True needs x and y of equal length (one pair per prompt), got {a.size} and {b.size}")
            only_x = float(np.mean((a == 1) & (b == 0)))
            only_y = float(np.mean((a == 0) & (b == 1)))
            cells = rng.multinomial(a.size, [only_x, only_y, max(0.0, 1.0 - only_x - only_y)], size=resamples)
            draws = (cells[:, 0] - cells[:, 1]) / a.size
        else:
            draws = (rng.binomial(a.size, a.mean(), size=resamples) / a.size
                     - rng.binomial(b.size, b.mean(), size=resamples) / b.size)
        sizes = (a.size, b.size)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return Interval(estimate, float(low), float(high), float(confidence), resamples, seed, bool(paired), sizes)
