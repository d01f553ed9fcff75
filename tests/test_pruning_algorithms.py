"""Pure-tensor pruning maths against slow, obviously-correct references (python loops, float64).

Model-level behaviour (sequential runner, token selection on a tiny LLaVA) is in
test_pruning_model.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import require_torchao
from torch import nn

from hsr_pl.pruning import (
    CalibrationError,
    HessianStats,
    PruningConfig,
    PruningConfigError,
    RowStats,
    StatsCollector,
    TokenSelection,
    magnitude_mask,
    matrix_mask,
    nm_mask,
    parse_nm,
    row_mask,
    snip_mask,
    snip_scores,
    sparsegpt_prune,
    wanda_mask,
)

# ------------------------------------------------------------------------------ slow references


def slow_row_mask(scores: list[list[float]], sparsity: float) -> list[list[bool]]:
    """Per row: prune the floor(d*s) lowest, ties broken towards the lower column index."""
    out = []
    for row in scores:
        k = int(len(row) * sparsity)
        order = sorted(range(len(row)), key=lambda j: (row[j], j))
        pruned = set(order[:k])
        out.append([j in pruned for j in range(len(row))])
    return out


def slow_matrix_mask(scores: list[list[float]], sparsity: float) -> list[list[bool]]:
    flat = sorted(v for row in scores for v in row)
    thresh = flat[int(len(flat) * sparsity)]
    return [[v <= thresh for v in row] for row in scores]


def slow_nm_mask_distinct(scores: list[list[float]], n: int, m: int) -> list[list[bool]]:
    out = []
    for row in scores:
        mask = [False] * len(row)
        for g in range(0, len(row), m):
            for j in sorted(range(g, g + m), key=lambda j: row[j])[:n]:
                mask[j] = True
        out.append(mask)
    return out


def as_lists(t: torch.Tensor) -> list:
    return t.double().tolist()


def upper_cholesky_loops(a: list[list[float]]) -> list[list[float]]:
    """U upper triangular with A = U^T U (textbook Cholesky–Banachiewicz on A, transposed)."""
    n = len(a)
    low = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            s = sum(low[i][k] * low[j][k] for k in range(j))
            low[i][j] = math.sqrt(a[i][i] - s) if i == j else (a[i][j] - s) / low[j][j]
    return [[low[j][i] for j in range(n)] for i in range(n)]


def slow_sparsegpt(weight, hessian, sparsity, n=0, m=0, blocksize=128, percdamp=0.01):
    """Loop re-implementation of the reference fasterprune in float64 (python floats)."""
    W = as_lists(weight)
    H = as_lists(hessian)
    rows, cols = len(W), len(W[0])
    for j in range(cols):
        if H[j][j] == 0:
            H[j][j] = 1.0
            for r in range(rows):
                W[r][j] = 0.0
    damp = percdamp * sum(H[j][j] for j in range(cols)) / cols
    for j in range(cols):
        H[j][j] += damp
    hinv = torch.linalg.inv(torch.tensor(H, dtype=torch.float64)).tolist()
    U = upper_cholesky_loops(hinv)
    mask = [[False] * cols for _ in range(rows)]
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        if n == 0:
            scores = [(W[r][c] ** 2 / U[c][c] ** 2, r, c) for r in range(rows) for c in range(b0, b1)]
            values = sorted(s for s, _, _ in scores)
            thresh = values[int(len(values) * sparsity)]
            for s, r, c in scores:
                mask[r][c] = s <= thresh
        err = [[0.0] * (b1 - b0) for _ in range(rows)]
        for c in range(b0, b1):
            i = c - b0
            if n and i % m == 0:
                for r in range(rows):
                    group = sorted(range(c, c + m), key=lambda k: W[r][k] ** 2 / U[k][k] ** 2)
                    for k in group[:n]:
                        mask[r][k] = True
            for r in range(rows):
                q = 0.0 if mask[r][c] else W[r][c]
                e = (W[r][c] - q) / U[c][c]
                err[r][i] = e
                W[r][c] = q
                for k in range(c + 1, b1):
                    W[r][k] -= e * U[c][k]
        for r in range(rows):
            for k in range(b1, cols):
                W[r][k] -= sum(err[r][i] * U[b0 + i][k] for i in range(b1 - b0))
    return torch.tensor(W, dtype=torch.float64), torch.tensor(mask)


# ----------------------------------------------------------------------------- option parsing


@pytest.mark.parametrize(
    ("structure", "expected"),
    [("0:0", (0, 0)), ("2:4", (2, 4)), (" 1 : 4 ", (1, 4)), ((4, 8), (4, 8)), ("unstructured", (0, 0)), (None, (0, 0))],
)
def test_parse_nm_accepts(structure, expected):
    assert parse_nm(structure) == expected


@pytest.mark.parametrize("structure", ["4:2", "0:4", "2:2", "2-4", "a:b", (3,)])
def test_parse_nm_rejects(structure):
    with pytest.raises(PruningConfigError, match="mask_structure"):
        parse_nm(structure)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 0.0}, "strictly between 0 and 1"),
        ({"sparsity": 1.0}, "strictly between 0 and 1"),
        ({"sparsity": -0.2}, "strictly between 0 and 1"),
        ({"sparsity": float("nan")}, "strictly between 0 and 1"),
        ({"sparsity": "half"}, "not a number"),
        ({"sparsity": None}, "needs sparsity"),
        ({"method": "obs"}, "method='obs' is unknown"),
        ({"mask_structure": "3:2"}, "0 < N < M"),
        ({"mask_structure": "2:4", "sparsity": 0.7}, "conflicts with mask_structure=2:4"),
        ({"mode": "layerwise"}, "mode='layerwise' is unknown"),
        ({"method": "snip", "mode": "sequential"}, "no sequential mode"),
        ({"tokens": "prompt"}, "tokens='prompt' is unknown"),
        ({"method": "sparsegpt", "granularity": "matrix"}, "magnitude and wanda only"),
        ({"method": "snip", "granularity": "matrix"}, "magnitude and wanda only"),
        ({"method": "wanda", "granularity": "matrix", "mask_structure": "2:4", "sparsity": None}, "ranks within groups"),
        ({"method": "wanda", "granularity": "column"}, "granularity='column' is unknown"),
        ({"percdamp": 0.0}, "percdamp"),
    ],
)
def test_config_rejects_bad_options(kwargs, match):
    with pytest.raises(PruningConfigError, match=match):
        PruningConfig(**kwargs)


def test_config_defaults_follow_reference():
    assert PruningConfig("wanda").mode == "sequential"
    assert PruningConfig("sparsegpt").mode == "sequential"
    assert PruningConfig("snip").mode == "oneshot"
    assert PruningConfig("magnitude").mode == "oneshot"
    assert PruningConfig("wanda", mask_structure="2:4", sparsity=None).nm == (2, 4)


# ----------------------------------------------------------------------------- mask selection


@pytest.mark.parametrize("sparsity", [0.01, 0.25, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("seed", [0, 1])
def test_row_mask_matches_slow_with_ties(sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (7, 33), generator=g).float()  # many ties
    expected = torch.tensor(slow_row_mask(as_lists(scores), sparsity))
    got = row_mask(scores, sparsity)
    assert torch.equal(got, expected)
    assert (got.sum(1) == int(33 * sparsity)).all()


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_matrix_mask_matches_slow_with_ties(sparsity):
    scores = torch.randint(0, 5, (6, 10), generator=torch.Generator().manual_seed(3)).float()
    assert torch.equal(matrix_mask(scores, sparsity), torch.tensor(slow_matrix_mask(as_lists(scores), sparsity)))


def test_matrix_mask_prunes_index_k_inclusive_like_reference():
    # distinct scores 0..9, s=0.5: the reference prunes everything <= sorted[5], i.e. six entries.
    scores = torch.arange(10.0).reshape(2, 5)
    assert int(matrix_mask(scores, 0.5).sum()) == 6


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (3, 4)])
def test_nm_mask_distinct_matches_slow(n, m):
    scores = torch.randn(5, 4 * m, generator=torch.Generator().manual_seed(n * 10 + m), dtype=torch.float64)
    got = nm_mask(scores, n, m)
    assert torch.equal(got, torch.tensor(slow_nm_mask_distinct(as_lists(scores), n, m)))


def test_nm_mask_ties_match_reference_topk_loop_and_are_valid():
    scores = torch.randint(0, 3, (64, 32), generator=torch.Generator().manual_seed(5)).float()
    got = nm_mask(scores, 2, 4)
    # the reference's loop: one topk call per group of 4 columns
    ref = torch.zeros_like(scores, dtype=torch.bool)
    for ii in range(0, 32, 4):
        ref.scatter_(1, ii + torch.topk(scores[:, ii : ii + 4], 2, dim=1, largest=False)[1], True)
    assert torch.equal(got, ref)
    groups, gmask = scores.view(64, 8, 4), got.view(64, 8, 4)
    assert (gmask.sum(-1) == 2).all()
    pruned_max = torch.where(gmask, groups, torch.full_like(groups, -1)).amax(-1)
    kept_min = torch.where(~gmask, groups, torch.full_like(groups, 99)).amin(-1)
    assert (pruned_max <= kept_min).all()


def test_nm_mask_rejects_indivisible_width():
    with pytest.raises(PruningConfigError, match="divisible by M"):
        nm_mask(torch.randn(2, 6), 2, 4)


# ------------------------------------------------------------------------------------- wanda


def test_wanda_hand_worked_tiny_linear():
    """torchao-style: a 2x4 linear, one chosen input, the expected mask written out."""
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    selection = TokenSelection()
    collector = StatsCollector({"lin": lin}, "row", selection)
    with collector:
        lin(torch.tensor([[[4.0, 1.0, 2.0, 1.0]]]))  # sqrt(a) = [4, 1, 2, 1]
    stats = collector.finalize()
    # scores row0 = [4, 2, 6, 4] (tie 4 vs 4 -> column 0 first), row1 = [16, 3, 4, 1]
    mask = wanda_mask(lin.weight, stats["lin"].scaler_row, 0.5)
    assert mask.tolist() == [[True, True, False, False], [False, True, False, True]]
    nm = wanda_mask(lin.weight, stats["lin"].scaler_row, None, (1, 2))
    assert nm.tolist() == [[False, True, False, True], [False, True, False, True]]


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.8])
def test_wanda_matches_slow_float64_with_ties(sparsity):
    g = torch.Generator().manual_seed(11)
    weight = torch.randint(-3, 4, (9, 24), generator=g).float()
    root = torch.randint(0, 4, (24,), generator=g).double()  # a = root^2: scores exact in fp32 and fp64
    scores = [[abs(w) * r for w, r in zip(row, root.tolist())] for row in as_lists(weight)]
    expected = torch.tensor(slow_row_mask(scores, sparsity))
    assert torch.equal(wanda_mask(weight, (root**2).float(), sparsity), expected)


def test_wanda_nm_matches_slow():
    g = torch.Generator().manual_seed(12)
    weight, a = torch.randn(8, 16, generator=g), torch.rand(16, generator=g)
    scores = (weight.double().abs() * a.double().sqrt()).tolist()
    assert torch.equal(wanda_mask(weight, a, None, (2, 4)), torch.tensor(slow_nm_mask_distinct(scores, 2, 4)))


def slow_whole_matrix_mask(scores: list[list[float]], sparsity: float) -> list[list[bool]]:
    """Whole matrix: prune the floor(numel*s) lowest, ties broken towards the lower row-major index."""
    cells = [(v, i * len(row) + j, i, j) for i, row in enumerate(scores) for j, v in enumerate(row)]
    k = int(len(cells) * sparsity)
    pruned = {(i, j) for _, _, i, j in sorted(cells)[:k]}
    return [[(i, j) in pruned for j in range(len(row))] for i, row in enumerate(scores)]


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.6, 0.7, 0.93])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wanda_whole_matrix_matches_slow_float64_with_ties(sparsity, seed):
    g = torch.Generator().manual_seed(100 + seed)
    weight = torch.randint(-3, 4, (7, 12), generator=g).float()  # many ties, zeros included
    root = torch.randint(0, 4, (12,), generator=g).double()  # a = root^2: scores exact in fp32 and fp64
    scores = [[abs(w) * r for w, r in zip(row, root.tolist())] for row in as_lists(weight)]
    expected = torch.tensor(slow_whole_matrix_mask(scores, sparsity))
    got = wanda_mask(weight, (root**2).float(), sparsity, granularity="matrix")
    assert torch.equal(got, expected)
    assert int(got.sum()) == int(weight.numel() * sparsity)  # exactly, whatever the ties


def test_wanda_whole_matrix_on_random_floats_matches_slow():
    g = torch.Generator().manual_seed(7)
    weight, a = torch.randn(16, 24, generator=g), torch.rand(24, generator=g) * 5
    scores = (weight.double().abs() * a.double().sqrt()).tolist()
    for sparsity in (0.5, 0.6, 0.7):
        expected = torch.tensor(slow_whole_matrix_mask(scores, sparsity))
        assert torch.equal(wanda_mask(weight, a, sparsity, granularity="matrix"), expected)


def test_wanda_whole_matrix_hand_worked():
    # scores row0 = [4, 2, 6, 4], row1 = [16, 3, 4, 1]; 50 %: the 4 lowest of the matrix are 1, 2, 3
    # and one of the three 4s: the first in row-major order (row 0, column 0)
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    a = torch.tensor([16.0, 1.0, 4.0, 1.0])
    got = wanda_mask(weight, a, 0.5, granularity="matrix")
    assert got.tolist() == [[True, True, False, False], [False, True, False, True]]
    # one threshold for the whole matrix: a weak row is pruned whole, unlike per row
    weight, a = torch.tensor([[4.0, 4.0, 4.0, 4.0], [1.0, 1.0, 1.0, 1.0]]), torch.ones(4)
    assert wanda_mask(weight, a, 0.5, granularity="matrix").tolist() == [[False] * 4, [True] * 4]
    assert wanda_mask(weight, a, 0.5).tolist() == [[True, True, False, False]] * 2
    # 6 of 8: row 1, then the tied 4s of row 0 in column order
    assert wanda_mask(weight, a, 0.75, granularity="matrix").tolist() == [[True, True, False, False], [True] * 4]


def test_wanda_rejects_wrong_statistic_shape():
    with pytest.raises(ValueError, match="one value per input channel"):
        wanda_mask(torch.randn(3, 4), torch.rand(5), 0.5)


# ---------------------------------------------------------------------- torchao WandaSparsifier


def _torchao_wanda(weight: torch.Tensor, inputs: list[torch.Tensor], block: int | None):
    require_torchao()
    from torchao.sparsity import WandaSparsifier

    model = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    sparsifier = WandaSparsifier(sparsity_level=0.5, semi_structured_block_size=block)
    sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight"}])
    with torch.no_grad():
        for x in inputs:
            model(x)
    sparsifier.step()
    sparsifier.squash_mask()
    return model[0].weight == 0


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("block", [None, 4])
def test_statistics_reproduce_torchao_wanda_sparsifier(block):
    """Same layer, same inputs: our hook statistic with torchao's selection rule gives its mask.

    torchao's WandaSparsifier differs from the reference Wanda in two documented ways, so the
    comparison applies torchao's rule to our statistic: score |W| * sum(x^2) (no square root) and,
    unstructured, the floor(numel*s) lowest of the *whole matrix* (argsort) instead of per row.
    """
    g = torch.Generator().manual_seed(21)
    weight = torch.randn(8, 16, generator=g)
    inputs = [torch.randn(2, 5, 16, generator=g) * torch.rand(16, generator=g) * 3 for _ in range(3)]
    expected = _torchao_wanda(weight, inputs, block)

    lin = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    collector = StatsCollector({"lin": lin}, "row", TokenSelection())
    with collector, torch.no_grad():
        for x in inputs:
            lin(x)
    scaler_row = collector.finalize()["lin"].scaler_row  # = sum(x^2) / samples
    torchao_scores = weight.abs() * scaler_row  # a positive multiple of torchao's |W| * sum(x^2)
    if block is None:
        got = row_mask(torchao_scores.reshape(1, -1), 0.5).reshape(weight.shape)
    else:
        got = nm_mask(torchao_scores, 2, 4)
        # with 2:4 the only difference left is sqrt: same groups, so compare per-group choice too
    assert torch.equal(got, expected)
    # and the reference rule (per row, sqrt) is a different mask on the same data
    ours = wanda_mask(weight, scaler_row, 0.5)
    assert (ours.sum(1) == 8).all()
    assert block is not None or not torch.equal(ours, expected)
    if block is None:
        # granularity="matrix" is torchao's whole-matrix rule; with scaler_row**2 as the statistic
        # its score |W| * sqrt(a) is torchao's |W| * sum(x^2) up to a positive factor
        assert torch.equal(wanda_mask(weight, scaler_row**2, 0.5, granularity="matrix"), expected)


# ------------------------------------------------------------------------------- statistics


def test_row_and_hessian_stats_match_slow_over_masked_tokens():
    g = torch.Generator().manual_seed(31)
    batches = [torch.randn(2, 6, 5, generator=g) for _ in range(3)]
    masks = [torch.rand(2, 6, generator=g) > 0.4 for _ in range(3)]
    selection = TokenSelection()
    rows, hess = RowStats(5), HessianStats(5)
    for x, mk in zip(batches, masks):
        selection.set(mk)
        sel, samples = selection.select(x)
        rows.add(sel, samples)
        hess.add(sel, samples)
    samples = sum(x.shape[0] for x in batches)
    sq = [0.0] * 5
    H = [[0.0] * 5 for _ in range(5)]
    tokens = 0
    for x, mk in zip(batches, masks):
        for b in range(2):
            for t in range(6):
                if mk[b, t]:
                    tokens += 1
                    v = x[b, t].double().tolist()
                    for i in range(5):
                        sq[i] += v[i] ** 2
                        for j in range(5):
                            H[i][j] += v[i] * v[j]
    assert rows.ntokens == hess.ntokens == tokens
    torch.testing.assert_close(rows.scaler_row.double(), torch.tensor(sq, dtype=torch.float64) / samples, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hess.H.double(), 2 * torch.tensor(H, dtype=torch.float64) / samples, rtol=1e-5, atol=1e-6)
    assert rows.scaler_row.dtype == hess.H.dtype == torch.float32


def test_hessian_is_float32_for_half_inputs():
    lin = nn.Linear(4, 3).to(torch.bfloat16)
    collector = StatsCollector({"l": lin}, "hessian", TokenSelection())
    with collector, torch.no_grad():
        lin(torch.randn(1, 3, 4, dtype=torch.bfloat16))
    assert collector.finalize()["l"].H.dtype == torch.float32


def test_stats_reject_nan_and_zero_tokens():
    lin = nn.Linear(3, 2)
    selection = TokenSelection()
    collector = StatsCollector({"l": lin}, "row", selection)
    with collector, torch.no_grad():
        selection.set(torch.zeros(1, 4, dtype=torch.bool))
        lin(torch.randn(1, 4, 3))
    with pytest.raises(CalibrationError, match="zero calibration tokens"):
        collector.finalize()
    collector = StatsCollector({"l": lin}, "row", TokenSelection())
    with collector, torch.no_grad():
        lin(torch.tensor([[[1.0, float("nan"), 0.0]]]))
    with pytest.raises(CalibrationError, match="NaN/inf"):
        collector.finalize()


def test_token_mask_shape_mismatch_is_explained():
    selection = TokenSelection()
    selection.set(torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(CalibrationError, match="does not match"):
        selection.select(torch.randn(1, 4, 2))


# -------------------------------------------------------------------------------- sparsegpt


def _hessian(g, cols, tokens=64, dead=()):
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    for j in dead:
        x[:, j] = 0
    return 2 * x.T @ x / tokens


@pytest.mark.parametrize(
    ("cols", "blocksize", "sparsity"), [(40, 16, 0.5), (48, 16, 0.3), (20, 128, 0.7), (33, 8, 0.9)]
)
def test_sparsegpt_unstructured_matches_loop_reference(cols, blocksize, sparsity):
    g = torch.Generator().manual_seed(cols + blocksize)
    W = torch.randn(6, cols, generator=g, dtype=torch.float64)
    H = _hessian(g, cols, dead=(3,))
    exp_w, exp_mask = slow_sparsegpt(W, H, sparsity, blocksize=blocksize)
    res = sparsegpt_prune(W, H, sparsity, blocksize=blocksize, compute_dtype=torch.float64)
    assert torch.equal(res.mask, exp_mask)
    torch.testing.assert_close(res.weight, exp_w, rtol=1e-9, atol=1e-9)
    assert (res.weight[res.mask] == 0).all()  # exact zeros
    assert (res.weight[:, 3] == 0).all()  # dead input column
    assert res.percdamp == 0.01


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_sparsegpt_nm_matches_loop_reference(n, m):
    g = torch.Generator().manual_seed(100 + n)
    W = torch.randn(5, 32, generator=g, dtype=torch.float64)
    H = _hessian(g, 32)
    exp_w, exp_mask = slow_sparsegpt(W, H, None, n, m, blocksize=16)
    res = sparsegpt_prune(W, H, None, (n, m), blocksize=16, compute_dtype=torch.float64)
    assert torch.equal(res.mask, exp_mask)
    torch.testing.assert_close(res.weight, exp_w, rtol=1e-9, atol=1e-9)
    assert (res.mask.view(5, -1, m).sum(-1) == n).all()
    assert (res.weight[res.mask] == 0).all()


def test_sparsegpt_float32_default_and_input_untouched():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(4, 16, generator=g).to(torch.bfloat16)
    H = _hessian(g, 16).float()
    before_w, before_h = W.clone(), H.clone()
    res = sparsegpt_prune(W, H, 0.5)
    assert res.weight.dtype == torch.bfloat16
    assert torch.equal(W, before_w) and torch.equal(H, before_h)
    assert (res.weight[res.mask] == 0).all() and int(res.mask.sum()) == 33  # floor(64*0.5)+1, no ties


def test_sparsegpt_non_positive_definite_hessian_gets_more_damping():
    g = torch.Generator().manual_seed(8)
    v = torch.randn(16, 1, generator=g, dtype=torch.float64)
    H = v @ v.T - 0.05 * torch.eye(16, dtype=torch.float64)  # indefinite; 1 % damping is not enough
    W = torch.randn(4, 16, generator=g, dtype=torch.float64)
    res = sparsegpt_prune(W, H, 0.5, compute_dtype=torch.float64)
    assert res.percdamp > 0.01
    assert torch.isfinite(res.weight).all()
    exp_w, exp_mask = slow_sparsegpt(W, H, 0.5, percdamp=res.percdamp)
    assert torch.equal(res.mask, exp_mask)


def test_sparsegpt_hopeless_hessian_raises_clear_error():
    H = torch.full((8, 8), float("nan"))
    with pytest.raises(CalibrationError, match="not positive definite"):
        sparsegpt_prune(torch.randn(2, 8), H, 0.5)


# ------------------------------------------------------------------------- magnitude and snip


@pytest.mark.parametrize("granularity", ["row", "matrix"])
def test_magnitude_matches_slow_with_ties(granularity):
    W = torch.randint(-4, 5, (6, 12), generator=torch.Generator().manual_seed(41)).float()
    absw = [[abs(v) for v in row] for row in as_lists(W)]
    slow = slow_row_mask if granularity == "row" else slow_matrix_mask
    assert torch.equal(magnitude_mask(W, 0.5, granularity=granularity), torch.tensor(slow(absw, 0.5)))


def test_magnitude_nm():
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    absw = [[abs(v) for v in row] for row in as_lists(W)]
    assert torch.equal(magnitude_mask(W, None, (2, 4)), torch.tensor(slow_nm_mask_distinct(absw, 2, 4)))


def test_snip_matches_slow():
    g = torch.Generator().manual_seed(43)
    W = torch.randn(5, 8, generator=g)
    grads = [torch.randn(5, 8, generator=g) for _ in range(3)]
    total = sum(snip_scores(W, gr) for gr in grads)
    slow = [[sum(abs(W[r, c].item() * gr[r, c].item()) for gr in grads) for c in range(8)] for r in range(5)]
    torch.testing.assert_close(total.double(), torch.tensor(slow, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert torch.equal(snip_mask(total, 0.5), torch.tensor(slow_row_mask(slow, 0.5)))


@pytest.mark.parametrize("indefinite", [False, True], ids=["pd", "needs-more-damping"])
def test_sparsegpt_overwriting_the_hessian_changes_nothing_but_the_hessian(indefinite):
    """``overwrite_hessian=True`` (the runner's setting: the statistic is not needed afterwards)
    uses the Hessian as workspace; masks, weights and damping are those of the copying default."""
    g = torch.Generator().manual_seed(9)
    if indefinite:
        v = torch.randn(16, 1, generator=g)
        H = v @ v.T - 0.05 * torch.eye(16)
    else:
        H = _hessian(g, 16, dead=(2,)).float()
    W = torch.randn(4, 16, generator=g)
    copied = sparsegpt_prune(W, H, 0.5)
    workspace = H.clone()
    overwritten = sparsegpt_prune(W, workspace, 0.5, overwrite_hessian=True)
    assert torch.equal(copied.mask, overwritten.mask) and torch.equal(copied.weight, overwritten.weight)
    assert copied.percdamp == overwritten.percdamp and (copied.percdamp > 0.01) == indefinite
    assert not torch.equal(workspace, H)  # it really was the workspace


def test_token_selection_of_every_token_is_a_view_with_the_same_rows():
    x = torch.randn(2, 3, 4)
    selection = TokenSelection()
    selection.set(torch.ones(2, 3, dtype=torch.bool))
    rows, samples = selection.select(x)
    assert samples == 2 and torch.equal(rows, x[torch.ones(2, 3, dtype=torch.bool)])
    assert rows.data_ptr() == x.data_ptr()
    partial = torch.tensor([[True, False, True], [False, False, True]])
    selection.set(partial)
    assert torch.equal(selection.select(x)[0], x[partial])


@pytest.mark.parametrize("overwrite", [False, True], ids=["copy", "consume"])
def test_sparsegpt_retry_after_the_second_cholesky_fails(monkeypatch, overwrite):
    """The inverse's Cholesky failing (its storage is then lost) retries with 10x damping: from
    the caller's Hessian when copying (exactly the reference at that damping), from L L^T with the
    exact diagonal when the Hessian is consumed (here: the same mask)."""
    g = torch.Generator().manual_seed(10)
    H = _hessian(g, 24, dead=(5,)).float()
    W = torch.randn(6, 24, generator=g)
    real = torch.linalg.cholesky_ex
    failures = []

    def flaky(matrix, *, upper=False, out=None, **kwargs):
        result = real(matrix, upper=upper, out=out, **kwargs) if out is not None else real(matrix, upper=upper, **kwargs)
        if upper and not failures:
            failures.append(1)
            return result[0], torch.ones((), dtype=torch.int32)
        return result

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    res = sparsegpt_prune(W, H.clone(), 0.5, overwrite_hessian=overwrite)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", real)
    assert failures == [1] and res.percdamp == pytest.approx(0.1)
    expected = sparsegpt_prune(W, H, 0.5, percdamp=res.percdamp)
    assert torch.equal(res.mask, expected.mask)
    if overwrite:
        torch.testing.assert_close(res.weight, expected.weight, rtol=1e-4, atol=1e-5)
    else:
        assert torch.equal(res.weight, expected.weight)


def test_all_finite_agrees_with_isfinite_also_when_the_sum_overflows():
    from hsr_pl.pruning.stats import all_finite

    big = torch.full((4, 4), 3e38)  # finite entries, infinite sum
    cases = [torch.randn(5, 5), big, torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), -float("inf")]),
             torch.tensor([2.0, -float("inf")]), torch.zeros(0)]
    for tensor in cases:
        assert all_finite(tensor) == bool(torch.isfinite(tensor).all()), tensor


@pytest.mark.parametrize("kind", ["row", "hessian"])
def test_linears_fed_the_same_tensor_share_one_term_with_identical_statistics(kind, monkeypatch):
    """q/k/v (and gate/up) receive the very same input tensor: its term is computed once per
    batch, and every statistic equals the one accumulated on its own."""
    import hsr_pl.pruning.stats as stats_module

    g = torch.Generator().manual_seed(41)
    q, k, o = nn.Linear(6, 4), nn.Linear(6, 2), nn.Linear(4, 3)
    batches = [torch.randn(2, 5, 6, generator=g) for _ in range(3)]
    masks = [torch.rand(2, 5, generator=g) > 0.3 for _ in range(3)]
    cls = stats_module.STAT_KINDS[kind]
    calls: list[int] = []
    real = cls._term
    monkeypatch.setattr(cls, "_term", lambda self, inp: calls.append(1) or real(self, inp))
    selection = TokenSelection()
    collector = StatsCollector({"q": q, "k": k, "o": o}, kind, selection)
    with collector, torch.no_grad():
        for x, mask in zip(batches, masks):
            selection.set(mask)
            q(x), k(x), o(torch.randn(2, 5, 4, generator=g))  # o gets another input
    assert len(calls) == 3 * 2  # per batch: one for q and k together, one for o
    alone = cls(6)
    for x, mask in zip(batches, masks):
        alone.add(x[mask], 2)
    for name in ("q", "k"):
        for key, tensor in collector.stats[name].tensors().items():
            assert torch.equal(tensor, alone.tensors()[key]), (name, key)
