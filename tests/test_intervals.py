"""bootstrap_ci against slow references: explicit resampling loops (python random, sorted
percentiles) and the exact ideal bootstrap of a proportion (binomial pmf summed in a loop)."""

from __future__ import annotations

import math
import random

import pytest

from hsr_pl.evaluation.intervals import Interval, bootstrap_ci


def slow_percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default rule), by hand."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def slow_bootstrap(x, y=None, paired=False, resamples=4000, seed=0, confidence=0.95):
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        if y is None:
            stats.append(sum(x[rng.randrange(len(x))] for _ in range(len(x))) / len(x))
        elif paired:
            picks = [rng.randrange(len(x)) for _ in range(len(x))]
            stats.append(sum(x[i] - y[i] for i in picks) / len(x))
        else:
            mx = sum(x[rng.randrange(len(x))] for _ in range(len(x))) / len(x)
            my = sum(y[rng.randrange(len(y))] for _ in range(len(y))) / len(y)
            stats.append(mx - my)
    tail = (1 - confidence) / 2
    return slow_percentile(stats, tail), slow_percentile(stats, 1 - tail)


def exact_bootstrap_quantiles(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The ideal (infinitely many draws) percentile interval: quantiles of Binomial(n, k/n) / n."""
    p = successes / n
    tail = (1 - confidence) / 2
    cdf, low, high = 0.0, None, None
    for k in range(n + 1):
        cdf += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if low is None and cdf >= tail:
            low = k / n
        if high is None and cdf >= 1 - tail:
            high = k / n
    return low, high


def outcomes(n: int, ones: int, seed: int) -> list[int]:
    values = [1] * ones + [0] * (n - ones)
    random.Random(seed).shuffle(values)
    return values


@pytest.mark.parametrize(("n", "ones"), [(400, 120), (300, 291), (250, 40)])
def test_proportion_matches_the_exact_ideal_bootstrap(n, ones):
    got = bootstrap_ci(outcomes(n, ones, 0), resamples=200_000, seed=1)
    low, high = exact_bootstrap_quantiles(ones, n)
    assert got.estimate == ones / n
    assert abs(got.low - low) <= 1 / n + 1e-12 and abs(got.high - high) <= 1 / n + 1e-12, (got, low, high)
    narrower = bootstrap_ci(outcomes(n, ones, 0), resamples=200_000, seed=1, confidence=0.8)
    assert got.low < narrower.low <= narrower.high < got.high


def test_proportion_matches_a_slow_resampling_loop():
    x = outcomes(200, 70, 3)
    got = bootstrap_ci(x, resamples=4000, seed=2)
    low, high = slow_bootstrap(x, seed=5)
    assert abs(got.low - low) <= 2 / 200 and abs(got.high - high) <= 2 / 200, (got, low, high)


def test_independent_difference_matches_a_slow_resampling_loop():
    x, y = outcomes(150, 90, 1), outcomes(120, 30, 2)
    got = bootstrap_ci(x, y, resamples=4000, seed=3)
    low, high = slow_bootstrap(x, y, resamples=4000, seed=7)
    assert got.estimate == pytest.approx(90 / 150 - 30 / 120)
    assert abs(got.low - low) <= 0.012 and abs(got.high - high) <= 0.012, (got, low, high)
    assert got.n == (150, 120) and not got.paired


def test_paired_difference_matches_a_slow_resampling_loop_and_is_narrower_when_correlated():
    rng = random.Random(4)
    y = outcomes(200, 60, 4)
    x = [v if rng.random() < 0.9 else 1 - v for v in y]  # mostly the same verdicts on the same prompts
    got = bootstrap_ci(x, y, paired=True, resamples=4000, seed=3)
    low, high = slow_bootstrap(x, y, paired=True, resamples=4000, seed=8)
    assert abs(got.low - low) <= 0.01 and abs(got.high - high) <= 0.01, (got, low, high)
    unpaired = bootstrap_ci(x, y, resamples=4000, seed=3)
    assert got.high - got.low < 0.7 * (unpaired.high - unpaired.low)


def test_seeded_and_serialisable():
    x = outcomes(100, 37, 0)
    assert bootstrap_ci(x, seed=4) == bootstrap_ci(x, seed=4)
    assert bootstrap_ci(x, seed=4) != bootstrap_ci(x, seed=5)
    record = bootstrap_ci([True, False, True, True], resamples=100).to_dict()
    assert record["n"] == [4] and record["confidence"] == 0.95 and record["estimate"] == 0.75
    assert isinstance(bootstrap_ci([1, 1, 1]), Interval) and bootstrap_ci([1, 1, 1]).low == 1.0


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (([],), {}, "x is empty"),
        (([0, 2],), {}, "other than 0/1"),
        (([0, 1], [0.5]), {}, "y holds values other than 0/1"),
        (([0, 1],), {"paired": True}, "needs y"),
        (([0, 1], [1, 1, 0]), {"paired": True}, "equal length"),
        (([0, 1],), {"confidence": 95}, "confidence=95"),
        (([0, 1],), {"resamples": 10}, "resamples=10"),
        (([0, 1],), {"seed": -1}, "seed=-1"),
    ],
)
def test_bad_inputs(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(*args, **kwargs)
