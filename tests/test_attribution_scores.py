"""Score functions against slow, explicit float64 references on random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from hsr_pl.attribution.scores import (
    ScoreConfig,
    kl_per_position,
    last_prompt_index,
    per_prompt_mean,
    reference_score,
    score_positions,
    subspace_score,
)


def test_kl_matches_explicit_sum():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    got = kl_per_position(p, q)
    for i in range(4):
        zp = sum(math.exp(x) for x in p[i].tolist())
        zq = sum(math.exp(x) for x in q[i].tolist())
        want = 0.0
        for a, b in zip(p[i].tolist(), q[i].tolist()):
            pa, qb = math.exp(a) / zp, math.exp(b) / zq
            want += pa * math.log(pa / qb)
        assert got[i].item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(kl_per_position(p, p), torch.zeros(4, dtype=torch.float64), atol=1e-15)


def test_per_prompt_mean_loop():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 4.0], dtype=torch.float64)
    rows = torch.tensor([0, 0, 0, 1, 2])
    assert per_prompt_mean(values, rows, 3).tolist() == [2.0, 10.0, 4.0]


def test_score_positions_last_and_response():
    ids = torch.arange(12).view(2, 6)
    labels = torch.full((2, 6), -100)
    labels[0, 3:] = 7  # prompt 0..2, response 3..5
    labels[1, 4:] = 7  # prompt 0..3, response 4..5
    batch = {"input_ids": ids, "labels": labels}
    assert last_prompt_index(batch).tolist() == [2, 3]
    last = score_positions(batch, "last")
    assert last.nonzero().tolist() == [[0, 2], [1, 3]]
    resp = score_positions(batch, "response")
    # last prompt token + every response token whose next token is a response token
    assert resp.nonzero().tolist() == [[0, 2], [0, 3], [0, 4], [1, 3], [1, 4]]
    no_labels = {"input_ids": ids}
    assert score_positions(no_labels, "last").nonzero().tolist() == [[0, 5], [1, 5]]
    with pytest.raises(ValueError, match="with_response=True"):
        score_positions(no_labels, "response")
    bad = {"input_ids": ids, "labels": torch.full((2, 6), -100)}
    with pytest.raises(ValueError, match="no response token"):
        score_positions(bad, "response")


def _top_left_singular(m: torch.Tensor, r: int) -> torch.Tensor:
    # Eigenvectors of M Mᵀ (a different route than the SVD used by the code).
    vals, vecs = torch.linalg.eigh(m @ m.T)
    order = torch.argsort(vals, descending=True)[:r]
    return vecs[:, order]


@pytest.mark.parametrize("r_max", [1, 2, 3])
def test_subspace_score_is_spec_sum_over_r(r_max):
    """Σ_{r≤r_max} arccos σ_r(U_rᵀ U'_r): the r-th singular value of the r×r product, per r."""
    g = torch.Generator().manual_seed(r_max)
    a = torch.randn(6, 9, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(6, 9, generator=g, dtype=torch.float64)
    want = 0.0
    for r in range(1, r_max + 1):
        u, v = _top_left_singular(a, r), _top_left_singular(b, r)
        c = u.T @ v
        # singular values of C = square roots of the eigenvalues of C Cᵀ; σ_r is the smallest.
        sigma_r = torch.linalg.eigvalsh(c @ c.T).clamp(0, 1).sqrt().min().item()
        want += math.degrees(math.acos(min(1.0, sigma_r)))
    assert subspace_score(a, b, r_max) == pytest.approx(want, rel=1e-8, abs=1e-8)
    assert subspace_score(a, a, r_max) == pytest.approx(0.0, abs=1e-5)
    # scaling a matrix keeps its singular subspaces
    assert subspace_score(a, 3.0 * a, r_max) == pytest.approx(0.0, abs=1e-5)


def test_subspace_score_r2_hand_case():
    # Leading directions agree (e1); the second ones are 60 degrees apart in the (e2, e3) plane.
    a = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    c, s = math.cos(math.radians(60)), math.sin(math.radians(60))
    b = torch.tensor([[3.0, 0.0], [0.0, c], [0.0, s]], dtype=torch.float64)
    assert subspace_score(a, b, 1) == pytest.approx(0.0, abs=1e-6)
    assert subspace_score(a, b, 2) == pytest.approx(60.0, rel=1e-6)


def test_reference_score_loop():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, 4, generator=g, dtype=torch.float64)
    na = math.sqrt(sum(x * x for x in a[:, 0].tolist()))
    nb = math.sqrt(sum(x * x for x in b[:, 0].tolist()))
    dot = sum(x / na * y / nb for x, y in zip(a[:, 0].tolist(), b[:, 0].tolist()))
    assert reference_score(a, b) == pytest.approx(math.degrees(math.acos(abs(dot))), rel=1e-10)
    # only column 0 matters
    b2 = b.clone()
    b2[:, 1:] = 0
    assert reference_score(a, b2) == reference_score(a, b)
    # sign of the column does not matter (|a·b|)
    assert reference_score(a, -b) == pytest.approx(reference_score(a, b), rel=1e-12)


def test_shape_errors():
    with pytest.raises(ValueError, match="equal shape"):
        subspace_score(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="equal shape"):
        reference_score(torch.zeros(3), torch.zeros(3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"score": "cosine"}, "score='cosine'"),
        ({"positions": "all"}, "positions='all'"),
        ({"ablation": "drop"}, "ablation='drop'"),
        ({"epsilon": 1.5}, "epsilon=1.5"),
        ({"r_max": 0}, "r_max=0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScoreConfig(**kwargs)
