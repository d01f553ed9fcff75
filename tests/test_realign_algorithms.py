"""The realignment algorithms against slow, obviously-correct references (Python loops, float64)
on random inputs, plus hand-worked examples: top fractions, the p/q/max_p rule, head slices (MHA
and GQA, ``head`` and the released script's ``reference``), rank percentiles, the global budget
order, N:M structure swaps and budgets."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from hsr_pl.models.adapters import HeadGeometry
from hsr_pl.realign import (
    ImportanceStat,
    LinearView,
    Pool,
    RealignConfig,
    RealignConfigError,
    candidate_mask,
    entry_heads,
    gradient_gain,
    head_slice_mask,
    importance_scores,
    plan_restoration,
    rank_percentiles,
    resolve_budget,
    round_sizes,
    select_top,
    structure_swaps,
    top_fraction_mask,
)
from hsr_pl.realign.importance import sparsegpt_diag
from hsr_pl.realign.select import group_cap_filter, margin_keys


# ---------------------------------------------------------------------------- references
def ref_top(scores: torch.Tensor, fraction: float) -> set[int]:
    flat = scores.double().flatten().tolist()
    k = int(fraction * len(flat))
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return set(order[:k])


def as_set(mask: torch.Tensor) -> set[int]:
    return set(mask.flatten().nonzero().flatten().tolist())


def ref_slice(role, shape, geo: HeadGeometry, heads, selection) -> set[int]:
    out_f, in_f = shape
    keep = set()
    for r in range(out_f):
        for c in range(in_f):
            ok = False
            for h in heads:
                g = h // (geo.num_heads // geo.num_kv_heads)
                if selection == "none":
                    ok = True
                elif selection in ("head", "whole_heads"):
                    if role == "q":
                        ok |= h * geo.head_dim <= r < (h + 1) * geo.head_dim
                    elif role in "kv":
                        ok |= g * geo.head_dim <= r < (g + 1) * geo.head_dim
                    else:
                        ok |= h * geo.head_dim <= c < (h + 1) * geo.head_dim
                else:  # reference: input columns, o_proj whole
                    if role == "q":
                        w = in_f // geo.num_heads
                        ok |= h * w <= c < (h + 1) * w
                    elif role in "kv":
                        w = in_f // geo.num_kv_heads
                        ok |= g * w <= c < (g + 1) * w
                    else:
                        ok = True
            if selection == "none":
                ok = True
            if ok:
                keep.add(r * in_f + c)
    return keep


# ------------------------------------------------------------------------------ top fractions
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fraction", [0.0, 0.13, 0.5, 0.7, 0.999, 1.0])
def test_top_fraction_equals_a_sorted_loop_with_ties_to_the_lower_index(seed, fraction):
    g = torch.Generator().manual_seed(seed)
    shape = (int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 11, (1,), generator=g)))
    # Few distinct values: many ties straddle the threshold.
    scores = torch.randint(0, 4, shape, generator=g).float() if seed % 2 else torch.rand(shape, generator=g)
    mask = top_fraction_mask(scores, fraction)
    assert as_set(mask) == ref_top(scores, fraction)
    assert int(mask.sum()) == int(fraction * scores.numel())


def test_top_fraction_refuses_nan():
    with pytest.raises(RealignConfigError, match="NaN"):
        top_fraction_mask(torch.tensor([[1.0, float("nan"), 0.0]]), 0.5)


@pytest.mark.parametrize("seed", range(8))
def test_candidate_rule_equals_set_algebra_on_random_scores(seed):
    g = torch.Generator().manual_seed(100 + seed)
    shape = (7, 12)
    u = torch.randint(0, 6, shape, generator=g).double() if seed % 2 else torch.randn(shape, generator=g, dtype=torch.float64)
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    p, q, max_p = [(0.5, 0.5, 0.7), (0.3, 0.5, 0.7), (0.2, 1.0, 0.9), (0.6, 0.25, 1.0)][seed % 4]
    got = as_set(candidate_mask(u, s, p, q, max_p))
    want = (ref_top(s, q) & ref_top(u, max_p)) - ref_top(u, p)
    assert got == want


def test_candidate_rule_hand_worked():
    # 2x4 matrix, utility ranks 7..0 in flat order, safety the reverse.
    u = torch.arange(8, 0, -1).reshape(2, 4).double()   # flat 0 is most useful
    s = torch.arange(1, 9).reshape(2, 4).double()        # flat 7 is most safety-relevant
    # T^u(0.5) = {0,1,2,3}; T^u(0.75) = {0..5}; T^s(0.5) = {4,5,6,7}  ->  R = {4, 5}
    assert as_set(candidate_mask(u, s, 0.5, 0.5, 0.75)) == {4, 5}


@pytest.mark.parametrize(("p", "q", "max_p", "match"), [
    (0.7, 0.5, 0.7, "p=0.7"), (0.0, 0.5, 0.7, "p=0"), (0.5, 0.0, 0.7, "q=0"), (0.5, 0.5, 1.2, "max_p=1.2"),
])
def test_rule_domain_is_checked(p, q, max_p, match):
    with pytest.raises(RealignConfigError, match=match):
        candidate_mask(torch.zeros(2, 2), torch.zeros(2, 2), p, q, max_p)


# ----------------------------------------------------------------------------------- slices
GEOMETRIES = {
    "mha": HeadGeometry(num_heads=4, num_kv_heads=4, head_dim=3, hidden_size=12),
    "gqa": HeadGeometry(num_heads=4, num_kv_heads=2, head_dim=3, hidden_size=12),
}


def role_shape(role, geo):
    if role == "q":
        return (geo.num_heads * geo.head_dim, geo.hidden_size)
    if role in "kv":
        return (geo.num_kv_heads * geo.head_dim, geo.hidden_size)
    return (geo.hidden_size, geo.num_heads * geo.head_dim)


@pytest.mark.parametrize("geo_name", sorted(GEOMETRIES))
@pytest.mark.parametrize("selection", ["head", "reference", "none", "whole_heads"])
@pytest.mark.parametrize("role", ["q", "k", "v", "o"])
@pytest.mark.parametrize("heads", [[0], [3], [1, 2], [0, 1, 2, 3]])
def test_head_slices_equal_the_loop(geo_name, selection, role, heads):
    geo = GEOMETRIES[geo_name]
    shape = role_shape(role, geo)
    assert as_set(head_slice_mask(role, shape, geo, heads, selection)) == ref_slice(role, shape, geo, heads, selection)


def test_gqa_grouping_hand_worked():
    # 4 query heads share 2 KV heads (g = 2): head 3 reads KV group 1 = k/v rows 3..5.
    geo = GEOMETRIES["gqa"]
    k = head_slice_mask("k", role_shape("k", geo), geo, [3], "head")
    assert k[:, 0].nonzero().flatten().tolist() == [3, 4, 5] and bool(k[3].all())
    q = head_slice_mask("q", role_shape("q", geo), geo, [3], "head")
    assert q[:, 0].nonzero().flatten().tolist() == [9, 10, 11]
    o = head_slice_mask("o", role_shape("o", geo), geo, [3], "head")
    assert o[0].nonzero().flatten().tolist() == [9, 10, 11]
    # The released script slices q by input columns d/H = 3 wide, k/v by d/H_kv = 6 wide.
    qr = head_slice_mask("q", role_shape("q", geo), geo, [3], "reference")
    assert qr[0].nonzero().flatten().tolist() == [9, 10, 11] and bool(qr[:, 9].all())
    kr = head_slice_mask("k", role_shape("k", geo), geo, [3], "reference")
    assert kr[0].nonzero().flatten().tolist() == [6, 7, 8, 9, 10, 11]
    assert bool(head_slice_mask("o", role_shape("o", geo), geo, [3], "reference").all())


def test_mlp_roles_are_refused():
    with pytest.raises(RealignConfigError, match="MLP weights are never restored"):
        head_slice_mask("gate", (4, 4), GEOMETRIES["mha"], [0])


def test_entry_heads_owner_of_each_entry():
    geo = GEOMETRIES["gqa"]
    pos = torch.tensor([[0, 11], [4, 2], [11, 0]])
    assert entry_heads("q", pos, role_shape("q", geo), geo, "head").tolist() == [0, 1, 3]
    assert entry_heads("o", pos, role_shape("o", geo), geo, "head").tolist() == [3, 0, 0]
    assert entry_heads("k", pos[:2], role_shape("k", geo), geo, "head").tolist() == [0, 1]
    assert entry_heads("k", pos[:2], role_shape("k", geo), geo, "reference").tolist() == [1, 0]


# ------------------------------------------------------------------------- order and budget
@pytest.mark.parametrize("seed", range(5))
def test_rank_percentiles_equal_counting_smaller_entries(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (6, 7), generator=g).float()
    idx = torch.randperm(42, generator=g)[:15]
    flat = scores.flatten().tolist()
    want = [sum(v < flat[i] for v in flat) / 41 for i in idx.tolist()]
    assert rank_percentiles(scores, idx).tolist() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_select_top_equals_a_global_sorted_loop(seed):
    rng = random.Random(seed)
    pools = []
    for _ in range(rng.randint(1, 4)):
        n = rng.randint(0, 8)
        idx = torch.tensor(sorted(rng.sample(range(50), n)), dtype=torch.long)
        keys = torch.tensor([float(rng.randint(0, 3)) for _ in range(n)], dtype=torch.float64)
        pools.append(Pool(idx, keys))
    entries = [(float(p.keys[j]), i, int(p.indices[j])) for i, p in enumerate(pools) for j in range(len(p))]
    for k in (0, 1, 3, 7, 100, None):
        want = sorted(entries, key=lambda e: (-e[0], e[1], e[2]))[: (len(entries) if k is None else k)]
        got = select_top(pools, k)
        assert sum(len(g) for g in got) == (len(entries) if k is None else min(k, len(entries)))
        assert {(i, int(x)) for i, g in enumerate(got) for x in g} == {(e[1], e[2]) for e in want}


@pytest.mark.parametrize(("budget", "lm", "want"), [
    (None, 10_000, None), (0, 10_000, 0), (25, 10_000, 25), (1e-4, 1_000_000, 100), ("1‱", 1_000_000, 100),
    ("0.01%", 1_000_000, 100), ("1e-4", 1_000_000, 100), ("300", 10, 300), (0.5, 7, 3),
])
def test_budget_forms(budget, lm, want):
    assert resolve_budget(budget, lm) == want


@pytest.mark.parametrize("bad", [True, -3, 1.5, 0.0, "lots", "-1‱"])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(RealignConfigError, match="budget"):
        resolve_budget(bad, 1000)


def test_round_sizes_sum_to_the_budget():
    for budget, rounds in itertools.product([0, 1, 7, 100, 401], [1, 2, 3, 4]):
        sizes = round_sizes(budget, rounds)
        assert sum(sizes) == budget and len(sizes) == rounds and max(sizes) - min(sizes) <= 1


def test_gradient_gain_is_minus_g_times_w_and_subtracts_the_utility_rise():
    g, w, gu = torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([[3.0, 1.0], [-4.0, 2.0]]), torch.ones(2, 2)
    idx = torch.arange(4)
    assert gradient_gain(g, w, idx).tolist() == [-3.0, 2.0, 2.0, -0.0]
    assert gradient_gain(g, w, idx, gu, 0.5).tolist() == [-4.5, 1.5, 4.0, -1.0]


# ---------------------------------------------------------------------------- N:M structure
def greedy_structure(pools, shapes, n, m, restored, budget):
    """One entry at a time in the global order: accept while its group has room and budget is left."""
    entries = [(float(p.keys[j]), i, int(p.indices[j])) for i, p in enumerate(pools) for j in range(len(p))]
    entries.sort(key=lambda e: (-e[0], e[1], e[2]))
    used: dict[tuple, int] = {}
    accepted = []
    for _, i, flat in entries:
        if budget is not None and len(accepted) >= budget:
            break
        rows, cols = shapes[i]
        r, c = divmod(flat, cols)
        group = (i, r, c // m)
        before = int(restored[i].reshape(rows, cols // m, m)[r, c // m].sum())
        if before + used.get(group, 0) < m - n:
            used[group] = used.get(group, 0) + 1
            accepted.append((i, flat))
    return set(accepted)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [None, 3, 10])
def test_group_cap_then_budget_equals_the_greedy_loop(seed, budget):
    g = torch.Generator().manual_seed(seed)
    n, m = 2, 4
    shapes = [(3, 8), (2, 8)]
    pools, restored, caps = [], [], []
    for rows, cols in shapes:
        scores = torch.rand(rows, cols, generator=g)
        pruned = torch.zeros(rows, cols // m, m, dtype=torch.bool)
        pruned.scatter_(2, torch.topk(scores.reshape(rows, cols // m, m), n, largest=False).indices, True)
        pruned = pruned.reshape(rows, cols)
        done = pruned & (torch.rand(rows, cols, generator=g) < 0.15)
        free = (pruned & ~done).flatten().nonzero().flatten()
        keys = torch.randint(0, 3, (free.numel(),), generator=g).double()
        pools.append(Pool(free, keys))
        restored.append(done)
        caps.append((m - n) - done.reshape(rows, cols // m, m).sum(-1))
    filtered = group_cap_filter(pools, shapes, m, caps)
    got = {(i, int(x)) for i, sel in enumerate(select_top(filtered, budget)) for x in sel}
    assert got == greedy_structure(pools, shapes, n, m, restored, budget)


@pytest.mark.parametrize("seed", range(5))
def test_structure_swaps_pick_the_least_useful_kept_weights_and_keep_n_m(seed):
    g = torch.Generator().manual_seed(seed)
    n, m, rows, cols = 2, 4, 4, 8
    utility = torch.randint(0, 4, (rows, cols), generator=g).float()
    pruned = torch.zeros(rows, cols // m, m, dtype=torch.bool)
    pruned.scatter_(2, torch.randperm(m, generator=g)[:n].expand(rows, cols // m, n).contiguous(), True)
    pruned = pruned.reshape(rows, cols)
    restore = pruned & (torch.rand(rows, cols, generator=g) < 0.5)
    # at most M - N = 2 restores per group is guaranteed by the cap filter; keep it so here
    swap = structure_swaps(restore, ~pruned, utility, m)
    for r, grp in itertools.product(range(rows), range(cols // m)):
        cols_g = range(grp * m, (grp + 1) * m)
        want_r = sum(bool(restore[r, c]) for c in cols_g)
        kept = sorted((float(utility[r, c]), c) for c in cols_g if not pruned[r, c])
        assert {c for c in cols_g if swap[r, c]} == {c for _, c in kept[:want_r]}
        nonzero = sum(1 for c in cols_g if (not pruned[r, c] and not swap[r, c]) or restore[r, c])
        assert nonzero == m - n


# --------------------------------------------------------------------------- importance
def test_wanda_and_sparsegpt_importance_equal_their_formulas():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 6, generator=g)
    a = torch.rand(6, generator=g)
    wanda = importance_scores(w, ImportanceStat("wanda", a))
    for i, j in itertools.product(range(5), range(6)):
        assert float(wanda[i, j]) == pytest.approx(abs(float(w[i, j])) * math.sqrt(float(a[j])), rel=1e-6)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    x[:, 2] = 0  # a dead input
    hessian = 2 / 40 * x.t() @ x
    diag = sparsegpt_diag(hessian.float())
    h = hessian.clone()
    h[2, 2] = 1
    h += 0.01 * torch.diag(h).mean() * torch.eye(6, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    scores = importance_scores(w, ImportanceStat("sparsegpt", diag))
    for i, j in itertools.product(range(5), range(6)):
        want = 0.0 if j == 2 else float(w[i, j]) ** 2 / float(upper[j, j]) ** 2
        assert float(scores[i, j]) == pytest.approx(want, rel=1e-4, abs=1e-9)
    assert torch.equal(importance_scores(w, ImportanceStat("magnitude")), w.abs())


# ------------------------------------------------------------------- the plan, end to end
def make_views(seed: int, geo: HeadGeometry, sparsity: float = 0.5, nm: tuple[int, int] | None = None):
    g = torch.Generator().manual_seed(seed)
    views = []
    for layer in (0, 1):
        for role in "qkvo":
            shape = role_shape(role, geo)
            dense = torch.randn(shape, generator=g)
            a_u, a_s = torch.rand(shape[1], generator=g), torch.rand(shape[1], generator=g)
            util = importance_scores(dense, ImportanceStat("wanda", a_u))
            if nm is None:
                k = int(shape[1] * sparsity)
                pruned = torch.zeros(shape, dtype=torch.bool).scatter_(1, torch.sort(util, dim=1, stable=True).indices[:, :k], True)
            else:
                n, m = nm
                grp = util.reshape(shape[0], shape[1] // m, m)
                pruned = torch.zeros(grp.shape, dtype=torch.bool).scatter_(2, torch.topk(grp, n, largest=False).indices, True)
                pruned = pruned.reshape(shape)
            views.append(LinearView(
                name=f"l{layer}.{role}", layer=layer, role=role, geometry=geo, pruned=pruned,
                restored=torch.zeros(shape, dtype=torch.bool), dense=dense,
                utility=ImportanceStat("wanda", a_u), safety=ImportanceStat("wanda", a_s),
                sparsity=float(pruned.float().mean()),
            ))
    return views


def released_reference_restore(view: LinearView, heads_in_layer, p, q, max_p) -> set[int]:
    """A loop transcription of the released script's selection for one linear (torch.topk,
    unique, isin; input-column ranges for q/k/v; all of R for o_proj), on tie-free scores."""
    u = importance_scores(view.dense, view.utility)
    s = importance_scores(view.dense, view.safety)
    numel = u.numel()
    top_p = set(torch.topk(u.flatten(), int(p * numel)).indices.tolist())
    top_max = set(torch.topk(u.flatten(), int(max_p * numel)).indices.tolist())
    top_q = set(torch.topk(s.flatten(), int(q * numel)).indices.tolist())
    filtered = sorted(i for i in top_q if i in top_max and i not in top_p)
    cols = view.shape[1]
    geo = view.geometry
    unmask = set()
    for h in heads_in_layer:
        head_dim = cols // geo.num_heads
        group = h // (geo.num_heads // geo.num_kv_heads)
        group_dim = cols // geo.num_kv_heads
        for idx in filtered:
            c = idx % cols
            if view.role == "q" and h * head_dim <= c < (h + 1) * head_dim:
                unmask.add(idx)
            elif view.role in "kv" and group * group_dim <= c < (group + 1) * group_dim:
                unmask.add(idx)
            elif view.role == "o":
                unmask.add(idx)
    pruned = set(view.pruned.flatten().nonzero().flatten().tolist())
    return unmask & pruned


@pytest.mark.parametrize("geo_name", sorted(GEOMETRIES))
@pytest.mark.parametrize("seed", range(3))
def test_reference_selection_equals_the_released_script(geo_name, seed):
    views = make_views(seed, GEOMETRIES[geo_name])
    heads = {0: [1], 1: [0, 3]}
    cfg = RealignConfig(p=0.5, q=0.5, max_p=0.7, selection="reference")
    plans = plan_restoration(views, heads, cfg, None)
    for view, plan in zip(views, plans):
        assert as_set(plan.restore) == released_reference_restore(view, heads[view.layer], 0.5, 0.5, 0.7), view.name


@pytest.mark.parametrize("geo_name", sorted(GEOMETRIES))
@pytest.mark.parametrize("selection", ["head", "none", "whole_heads"])
def test_plan_without_budget_is_rule_and_pruned_and_slice(geo_name, selection):
    geo = GEOMETRIES[geo_name]
    views = make_views(7, geo, sparsity=0.7)
    heads = {0: [2], 1: [1]}
    plans = plan_restoration(views, heads, RealignConfig(selection=selection), None)
    for view, plan in zip(views, plans):
        u, s = importance_scores(view.dense, view.utility), importance_scores(view.dense, view.safety)
        region = ref_slice(view.role, view.shape, geo, heads[view.layer], selection)
        pruned = as_set(view.pruned)
        if selection == "whole_heads":
            want = pruned & region
        else:
            p = 1 - view.sparsity  # p: auto
            want = ((ref_top(s, 0.5) & ref_top(u, 0.7)) - ref_top(u, p)) & pruned & region
        assert as_set(plan.restore) == want, view.name


@pytest.mark.parametrize("budget", [0, 1, 5, 17, 10_000])
def test_margin_budget_keeps_the_best_margins_and_exactly_min_k_pool(budget):
    views = make_views(3, GEOMETRIES["gqa"], sparsity=0.7)
    heads = {0: [0, 3], 1: [2]}
    full = plan_restoration(views, heads, RealignConfig(), None)
    pool = sum(int(p.restore.sum()) for p in full)
    plans = plan_restoration(views, heads, RealignConfig(budget=budget), budget)
    assert sum(int(p.restore.sum()) for p in plans) == min(budget, pool)
    # Reference: every pool entry with its (margin, linear, index) key, sorted.
    entries = []
    for i, (view, plan) in enumerate(zip(views, full)):
        u = importance_scores(view.dense, view.utility).flatten().tolist()
        s = importance_scores(view.dense, view.safety).flatten().tolist()
        n = len(u)
        for idx in as_set(plan.restore):
            pct_u = sum(v < u[idx] for v in u) / (n - 1)
            pct_s = sum(v < s[idx] for v in s) / (n - 1)
            entries.append((round(pct_s - pct_u, 12), i, idx))
    want = {(e[1], e[2]) for e in sorted(entries, key=lambda e: (-e[0], e[1], e[2]))[:budget]}
    assert {(i, idx) for i, p in enumerate(plans) for idx in as_set(p.restore)} == want
    for plan, whole in zip(plans, full):
        assert not bool((plan.restore & ~whole.restore).any())


@pytest.mark.parametrize("budget", [3, 40, 100_000])
def test_gradient_budget_restores_min_k_of_every_pruned_entry_in_scope(budget):
    views = make_views(5, GEOMETRIES["mha"], sparsity=0.6)
    heads = {0: [1], 1: [0]}
    g = torch.Generator().manual_seed(9)
    grads = {v.name: torch.randn(v.shape, generator=g) for v in views}
    for scope in ("heads", "all"):
        cfg = RealignConfig(order="gradient", budget=budget, scope=scope)
        plans = plan_restoration(views, heads, cfg, budget, grads=grads)
        entries = []
        for i, view in enumerate(views):
            region = ref_slice(view.role, view.shape, view.geometry, heads[view.layer], "head") if scope == "heads" \
                else set(range(view.pruned.numel()))
            for idx in as_set(view.pruned) & region:
                gain = -float(grads[view.name].flatten()[idx]) * float(view.dense.flatten()[idx])
                entries.append((gain, i, idx))
        want = {(e[1], e[2]) for e in sorted(entries, key=lambda e: (-e[0], e[1], e[2]))[:budget]}
        got = {(i, idx) for i, p in enumerate(plans) for idx in as_set(p.restore)}
        assert got == want and len(got) == min(budget, len(entries))


def test_plan_skips_already_restored_entries():
    views = make_views(11, GEOMETRIES["mha"])
    heads = {0: [0], 1: [3]}
    first = plan_restoration(views, heads, RealignConfig(), None)
    for view, plan in zip(views, first):
        view.restored = plan.restore.clone()
    again = plan_restoration(views, heads, RealignConfig(), None)
    assert all(not bool(p.restore.any()) for p in again)


@pytest.mark.parametrize("budget", [None, 6])
def test_preserve_structure_keeps_every_group_exactly_n_m(budget):
    n, m = 2, 4
    views = make_views(13, GEOMETRIES["gqa"], nm=(n, m))
    heads = {0: [0, 1], 1: [3]}
    cfg = RealignConfig(p=0.5, budget=budget, preserve_structure=True)
    plans = plan_restoration(views, heads, cfg, budget, structure=(n, m))
    restored = sum(int(p.restore.sum()) for p in plans)
    assert restored > 0 and (budget is None or restored == budget)
    for view, plan in zip(views, plans):
        assert plan.swap is not None
        assert int(plan.swap.sum()) == int(plan.restore.sum())
        assert not bool((plan.swap & view.pruned).any()) and not bool((plan.restore & ~view.pruned).any())
        nonzero = (~view.pruned & ~plan.swap) | plan.restore
        rows, cols = view.shape
        assert bool((nonzero.reshape(rows, cols // m, m).sum(-1) == m - n).all()), view.name


@pytest.mark.parametrize("nm", [(2, 4), (3, 4), (1, 4)])
def test_preserve_structure_without_budget_keeps_the_best_margin_entries_per_group(nm):
    """With no budget each group keeps its highest-margin candidates; the caps (M − N restorations, as
    many as kept weights to swap out) only bind when more than half of a group is pruned (3:4)."""
    n, m = nm
    views = make_views(17, GEOMETRIES["gqa"], nm=nm)
    heads = {0: [0, 2], 1: [1]}
    plain = plan_restoration(views, heads, RealignConfig(p=0.3, max_p=0.9), None)  # the uncapped pools
    pools = []
    for view, plan in zip(views, plain):
        idx = plan.restore.flatten().nonzero().flatten()
        u = importance_scores(view.dense, view.utility)
        s = importance_scores(view.dense, view.safety)
        pools.append(Pool(idx, margin_keys(u, s, idx)))
    want = greedy_structure(pools, [v.shape for v in views], n, m, [v.restored for v in views], None)
    cfg = RealignConfig(p=0.3, max_p=0.9, preserve_structure=True)
    plans = plan_restoration(views, heads, cfg, None, structure=nm)
    got = {(i, idx) for i, p in enumerate(plans) for idx in as_set(p.restore)}
    pool = sum(len(p) for p in pools)
    assert got == want and (0 < len(got) < pool if n > m - n else len(got) == pool)
    for view, plan in zip(views, plans):
        nonzero = (~view.pruned & ~plan.swap) | plan.restore
        rows, cols = view.shape
        assert bool((nonzero.reshape(rows, cols // m, m).sum(-1) == m - n).all()), view.name


def test_preserve_structure_needs_n_m_masks():
    views = make_views(1, GEOMETRIES["mha"])
    with pytest.raises(RealignConfigError, match="needs N:M masks"):
        plan_restoration(views, {0: [0]}, RealignConfig(preserve_structure=True), None, structure=None)


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(p=0.8), r"p=0.8 must lie in \(0, max_p=0.7\)"),
    (dict(q=0), "q=0.0 must lie in"),
    (dict(max_p=1.5), "max_p=1.5"),
    (dict(p="half"), "p='half' must be a number"),
    (dict(importance="fisher"), "importance='fisher' is unknown"),
    (dict(selection="heads"), "selection='heads' is unknown"),
    (dict(order="random"), "order='random' is unknown"),
    (dict(order="gradient"), "needs a budget"),
    (dict(budget=-1), "budget=-1"),
    (dict(rounds=2), "rounds > 1"),
    (dict(order="gradient", budget=5, rounds=0), "rounds=0"),
    (dict(scope="all"), "scope='all'"),
    (dict(utility_weight=0.5), "utility_weight"),
    (dict(order="gradient", budget=5, selection="none"), "selection='none' has no heads"),
])
def test_bad_settings_fail_with_the_fix(kwargs, match):
    with pytest.raises(RealignConfigError, match=match):
        RealignConfig(**kwargs)


def test_p_auto_with_the_exact_count_keeps_exactly_the_kept_weights_in_t_u_p():
    """A float sparsity can round ``int((1 − s) · numel)`` one below the kept count; the pruner's
    exact count must not."""
    numel = 12 * 12
    off = [k for k in range(1, numel) if int((1 - float(torch.tensor(k / numel))) * numel) != numel - k]
    assert off, "no rounding case at this size: pick another shape"
    view = make_views(4, GEOMETRIES["mha"])[0]  # q of layer 0: 12 x 12
    g = torch.Generator().manual_seed(1)
    k = off[0] if off[0] >= numel * 0.35 else next(x for x in off if x >= numel * 0.35)
    pruned = torch.zeros(numel, dtype=torch.bool)
    pruned[torch.randperm(numel, generator=g)[:k]] = True
    view.pruned = pruned.reshape(view.shape)
    view.sparsity = float(view.pruned.float().mean())
    view.pruned_count = k
    u, s = importance_scores(view.dense, view.utility), importance_scores(view.dense, view.safety)
    order = sorted(range(numel), key=lambda i: (-float(u.flatten()[i]), i))
    top_kept = set(order[: numel - k])
    want = ((ref_top(s, 0.5) & ref_top(u, 0.7)) - top_kept) & as_set(view.pruned) & ref_slice("q", view.shape, view.geometry, [0, 1, 2, 3], "head")
    plan = plan_restoration([view], {0: [0, 1, 2, 3]}, RealignConfig(), None)[0]
    assert as_set(plan.restore) == want and plan.p == (numel - k) / numel


def test_p_auto_beyond_max_p_names_the_module():
    views = make_views(2, GEOMETRIES["mha"], sparsity=0.2)  # p = 0.8 > max_p = 0.7
    with pytest.raises(RealignConfigError, match=r"p=0.833333 for l0.q .*raise max_p above 0.833333"):
        plan_restoration(views, {0: [0], 1: [0]}, RealignConfig(), None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_top_fraction_on_every_dtype_path(dtype):
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 7, (9, 11), generator=g).to(dtype)  # numpy on float64, kthvalue on halves
    for fraction in (0.2, 0.5, 0.7):
        assert as_set(top_fraction_mask(scores, fraction)) == ref_top(scores.double(), fraction)


def test_p_auto_selects_the_kept_count_even_when_max_p_rounds_to_it():
    """22 entries, 15 kept, max_p = 0.7: ``int(0.7 · 22)`` = 15 = the kept count, so the band
    ``T^u(max_p) \\ T^u(p)`` is empty and R must be too; ``int((15 / 22) · 22)`` = 14 in floating
    point, so a fraction-based ``T^u(p)`` misses one kept entry."""
    numel, kept = 22, 15
    assert int(0.7 * numel) == kept and int((kept / numel) * numel) == kept - 1  # the rounding case
    geo = HeadGeometry(num_heads=2, num_kv_heads=2, head_dim=1, hidden_size=11)
    g = torch.Generator().manual_seed(5)
    dense = torch.randn(2, 11, generator=g, dtype=torch.float64).float()
    pruned = torch.zeros(numel, dtype=torch.bool)
    pruned[torch.randperm(numel, generator=g)[: numel - kept]] = True  # the pruner's own (other) choice
    u = dense.abs().double().flatten().tolist()
    # make the kept-th entry by utility one the pruner pruned, so a miss reaches the pool
    order = sorted(range(numel), key=lambda i: (-u[i], i))
    if not bool(pruned[order[kept - 1]]):
        swap_in = order[kept - 1]
        swap_out = next(i for i in range(numel) if bool(pruned[i]))
        pruned[swap_in], pruned[swap_out] = True, False
    view = LinearView(
        name="l0.q", layer=0, role="q", geometry=geo, pruned=pruned.reshape(2, 11),
        restored=torch.zeros(2, 11, dtype=torch.bool), dense=dense,
        utility=ImportanceStat("magnitude"), safety=ImportanceStat("magnitude"),
        sparsity=float(pruned.float().mean()), pruned_count=numel - kept,
    )
    plan = plan_restoration([view], {0: [0, 1]}, RealignConfig(q=1.0, max_p=0.7), None)[0]
    assert plan.p == kept / numel
    assert plan.candidates == 0 and not bool(plan.restore.any())
