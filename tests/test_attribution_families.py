"""The exact engine equals the naive loop on every family with a tiny builder, MHA and GQA, for
every score × positions × ablation mode."""

from __future__ import annotations

import pytest
from test_attribution_engines import assert_same, setup_model

from hsr_pl.attribution import ScoreConfig, exact_head_scores, naive_head_scores
from hsr_pl.models.tiny import TINY_BUILDERS

FAMILIES = [(family, gqa) for family in sorted(TINY_BUILDERS) for gqa in (False, True)]
CONFIGS = [
    ScoreConfig(score=score, positions=positions, ablation=ablation)
    for score, positions in (("kl", "last"), ("kl", "response"), ("subspace", "last"), ("reference", "last"))
    for ablation in ("head", "qkv", "zero", "mean")
]


@pytest.mark.slow
@pytest.mark.parametrize("family, gqa", FAMILIES)
def test_exact_equals_naive_all_families(family, gqa):
    model, with_resp, prompts = setup_model(family, gqa)
    for cfg in CONFIGS:
        batches = with_resp if cfg.positions == "response" else prompts
        naive = naive_head_scores(model, batches, cfg)
        assert naive and all(v > 0 for v in naive.values()), (family, cfg)
        assert_same(exact_head_scores(model, batches, cfg, max_batch_heads=3), naive)
