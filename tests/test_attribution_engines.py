"""Engines: the exact engine equals the naive loop; the naive loop equals explicit weight edits;
the gradient engine equals finite differences; subsets, progress and errors."""

from __future__ import annotations

import copy

import pytest
import torch

from hsr_pl.attribution import (
    ScoreConfig,
    exact_head_scores,
    gradient_head_scores,
    head_scores,
    naive_head_scores,
    top_heads,
)
from hsr_pl.models import get_adapter
from hsr_pl.models.tiny import build_tiny

from attribution_batches import make_batches

# Every score × mode on LLaVA (MHA, GQA) and text-only LLaMA; the other families get a
# representative subset in test_attribution_families.py.
MODELS = [("llava", False), ("llava", True), ("llama", False), ("llama", True)]
SCORES = [("kl", "last"), ("kl", "response"), ("subspace", "last"), ("reference", "last")]
MODES = ["head", "qkv", "zero", "mean"]

_CACHE: dict = {}


def setup_model(family: str, gqa: bool):
    """(float64 model, batches with response, prompt-only batches), cached per module."""
    key = (family, gqa)
    if key not in _CACHE:
        model, processor = build_tiny(family, gqa=gqa)
        model = model.double().eval()
        _CACHE[key] = (
            model,
            make_batches(processor, response=True),
            make_batches(processor, response=False),
        )
    return _CACHE[key]


def assert_same(a: dict, b: dict, rtol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=rtol, abs=1e-12), k


@pytest.mark.slow
@pytest.mark.parametrize("family, gqa", MODELS)
def test_exact_equals_naive(family, gqa):
    model, with_resp, prompts = setup_model(family, gqa)
    for score, positions in SCORES:
        # 'last' runs on prompt-only batches (the default calibration), 'response' needs labels
        batches = with_resp if positions == "response" else prompts
        for mode in MODES:
            cfg = ScoreConfig(score=score, positions=positions, ablation=mode)
            naive = naive_head_scores(model, batches, cfg)
            exact = exact_head_scores(model, batches, cfg, max_batch_heads=3)
            assert len(naive) == 2 * 4
            assert all(v > 0 for v in naive.values()), (score, mode)
            assert_same(exact, naive)


def test_qkv_gqa_scores_are_groupwise():
    model, _, prompts = setup_model("llava", True)
    s = exact_head_scores(model, prompts, ScoreConfig(ablation="qkv"))
    for layer in (0, 1):  # 4 heads, 2 KV heads: groups {0,1}, {2,3}
        assert s[f"{layer}-0"] == s[f"{layer}-1"] and s[f"{layer}-2"] == s[f"{layer}-3"]
        assert s[f"{layer}-0"] != s[f"{layer}-2"]
    h = exact_head_scores(model, prompts, ScoreConfig(ablation="head"))
    assert h["0-0"] != h["0-1"]  # the default ablates exactly one query head


def test_grouping_does_not_change_scores():
    model, with_resp, _ = setup_model("llama", True)
    cfg = ScoreConfig(positions="response")
    ref = exact_head_scores(model, with_resp, cfg, max_batch_heads=1)
    for kwargs in ({}, {"max_batch_heads": 2}, {"max_batch_heads": 3}, {"max_batch_bytes": 1}):
        assert_same(exact_head_scores(model, with_resp, cfg, **kwargs), ref, rtol=1e-12)


def _hand_kl_last(model, batches, edit) -> float:
    """KL at the last prompt token of each prompt, explicit loops: intact vs a weight-edited copy."""
    edited = copy.deepcopy(model)
    edit(edited)
    per_prompt = []
    with torch.no_grad():
        for batch in batches:
            p = model(**batch).logits[:, -1]
            q = edited(**batch).logits[:, -1]
            for r in range(p.shape[0]):
                lp, lq = torch.log_softmax(p[r], -1), torch.log_softmax(q[r], -1)
                per_prompt.append(sum(float(lp[v].exp() * (lp[v] - lq[v])) for v in range(lp.numel())))
    return sum(per_prompt) / len(per_prompt)


def _edit(mode: str, layer: int, head: int, eps: float, mean: torch.Tensor | None):
    def apply(model):
        a = get_adapter(model)
        geo = a.geometry(layer)
        proj = a.projections(layer)
        qs, kvs = geo.query_slice(head), geo.kv_slice(head)
        with torch.no_grad():
            if mode in ("head", "qkv"):
                proj["q"].weight[qs] *= eps  # q_proj is linear: scaling its rows scales the query
            if mode == "head":
                proj["o"].weight[:, qs] *= eps
            if mode == "qkv":
                proj["k"].weight[kvs] *= eps
                proj["v"].weight[kvs] *= eps  # v × ε: every head of the group outputs × ε
            if mode in ("zero", "mean"):
                o = proj["o"]
                if mode == "mean":
                    extra = o.weight[:, qs] @ mean  # constant contribution of the mean slice
                    o.bias = torch.nn.Parameter(extra if o.bias is None else o.bias + extra)
                o.weight[:, qs] = 0.0

    return apply


def _hand_mean(model, batches, layer: int, head: int) -> torch.Tensor:
    """Mean of the head's o_proj input over non-padding tokens, accumulated token by token."""
    a = get_adapter(model)
    geo = a.geometry(layer)
    seen = []
    handle = a.o_proj(layer).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    total, count = torch.zeros(geo.head_dim, dtype=torch.float64), 0
    for x, batch in zip(seen, batches):
        for r in range(x.shape[0]):
            for t in range(x.shape[1]):
                if batch["attention_mask"][r, t]:
                    total += x[r, t, geo.query_slice(head)]
                    count += 1
    return total / count


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family, gqa", [("llava", True), ("llama", False)])
def test_naive_equals_weight_edits(family, gqa, mode):
    model, _, prompts = setup_model(family, gqa)
    eps = 1e-5
    naive = naive_head_scores(model, prompts, ScoreConfig(ablation=mode, epsilon=eps), heads=[(1, 2), (0, 1)])
    for layer, head in ((1, 2), (0, 1)):
        mean = _hand_mean(model, prompts, layer, head) if mode == "mean" else None
        want = _hand_kl_last(model, prompts, _edit(mode, layer, head, eps, mean))
        assert naive[f"{layer}-{head}"] == pytest.approx(want, rel=1e-6)


def test_subsets_and_progress():
    model, with_resp, _ = setup_model("llama", False)
    cfg = ScoreConfig(positions="response")
    full = exact_head_scores(model, with_resp, cfg)
    seen = []
    part = exact_head_scores(model, with_resp, cfg, layers=[1], progress=lambda layer, s: seen.append((layer, s)))
    assert list(part) == ["1-0", "1-1", "1-2", "1-3"]
    assert seen == [(1, part)]
    assert_same(part, {k: full[k] for k in part}, rtol=1e-12)
    picked = naive_head_scores(model, with_resp, cfg, heads=["1-3", (0, 2)])
    assert sorted(picked) == ["0-2", "1-3"]
    assert_same(picked, {k: full[k] for k in picked})
    calls = []
    gradient_head_scores(model, with_resp, cfg, heads=["1-3", "0-2"], progress=lambda layer, s: calls.append(layer))
    assert calls == [0, 1]
    # prompt-only batches: the target is the intact model's top next token
    _, _, prompts = setup_model("llama", False)
    est = gradient_head_scores(model, prompts)
    assert len(est) == 8 and all(v > 0 and v == v for v in est.values())


def test_dispatch_and_top_heads():
    model, _, prompts = setup_model("llama", False)
    s = head_scores(model, prompts, engine="exact")
    assert_same(s, head_scores(model, prompts, engine="naive"))
    best = top_heads(s, 3)
    ranked = sorted(s, key=s.get, reverse=True)[:3]
    assert [f"{layer}-{head}" for layer, head in best] == ranked
    assert top_heads({"0-1": 1.0, "0-0": 1.0, "1-0": 2.0}, 3) == [(1, 0), (0, 0), (0, 1)]


def _float64_norms(model):
    """A copy whose RMSNorms compute in the input dtype: HF's upcast to float32 rounds the hidden
    states at float32 precision, which makes finite differences of a float64 model noisy."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            def forward(x, m=module):
                return m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))

            module.forward = forward
    return model


@pytest.mark.parametrize("mode", MODES)
def test_gradient_loglik_equals_finite_differences(mode):
    model, with_resp, _ = setup_model("llama", True)
    model = _float64_norms(model)
    cfg = ScoreConfig(positions="response", ablation=mode)
    got = gradient_head_scores(model, with_resp, cfg)
    a = get_adapter(model)
    delta = 1.0 - cfg.epsilon if mode in ("head", "qkv") else 1.0
    means = {}
    if mode == "mean":
        means = {(l_, h): _hand_mean(model, with_resp, l_, h) for l_ in (0, 1) for h in range(4)}

    def mean_loglik(layer: int, heads: list[int], alpha: float) -> list[float]:
        # o_proj input slice of each head in `heads` -> c + alpha (x - c), by weight edits
        m = copy.deepcopy(model)
        o = get_adapter(m).o_proj(layer)
        geo = a.geometry(layer)
        with torch.no_grad():
            for h in heads:
                qs = geo.query_slice(h)
                if mode == "mean":
                    extra = (1 - alpha) * (o.weight[:, qs] @ means[(layer, h)])
                    o.bias = torch.nn.Parameter(extra if o.bias is None else o.bias + extra)
                o.weight[:, qs] *= alpha
        out = []
        with torch.no_grad():
            for batch in with_resp:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                logp = torch.log_softmax(m(**inputs).logits, -1)
                for r in range(logp.shape[0]):
                    vals = [float(logp[r, t, batch["labels"][r, t + 1]])
                            for t in range(logp.shape[1] - 1) if batch["labels"][r, t + 1] != -100]
                    out.append(sum(vals) / len(vals))
        return out

    h_step = 1e-4
    geo = a.geometry(0)
    for layer in (0, 1):
        for head in range(4):
            group = [head]
            if mode == "qkv":
                k = geo.kv_group(head)
                group = list(range(k * geo.group_size, (k + 1) * geo.group_size))
            up, down = mean_loglik(layer, group, 1 + h_step), mean_loglik(layer, group, 1 - h_step)
            per_prompt = [abs((u - d) / (2 * h_step) * delta) for u, d in zip(up, down)]
            assert got[f"{layer}-{head}"] == pytest.approx(sum(per_prompt) / len(per_prompt), rel=1e-5)


@pytest.mark.slow
def test_gradient_fisher_estimates_second_order_kl():
    """The Fisher estimator's expectation is ½ Δα² F; with many probes it tracks the exact
    second-order term, computed here from the full Jacobian by finite differences."""
    model, _, prompts = setup_model("llama", False)
    model = _float64_norms(model)
    cfg = ScoreConfig(ablation="zero")
    est = gradient_head_scores(model, prompts, cfg, estimator="fisher", probes=300, seed=1)
    a = get_adapter(model)
    h_step = 1e-5
    for layer, head in ((0, 0), (1, 3)):
        qs = a.geometry(layer).query_slice(head)
        logps = []
        for alpha in (1 + h_step, 1 - h_step):
            m = copy.deepcopy(model)
            with torch.no_grad():
                get_adapter(m).o_proj(layer).weight[:, qs] *= alpha
                logps.append(torch.cat([torch.log_softmax(m(**b).logits[:, -1], -1) for b in prompts]))
        with torch.no_grad():
            p = torch.cat([torch.softmax(model(**b).logits[:, -1], -1) for b in prompts])
        dlogp = (logps[0] - logps[1]) / (2 * h_step)
        fisher = (p * dlogp**2).sum(-1)  # per prompt
        want = float((0.5 * fisher).mean())
        assert est[f"{layer}-{head}"] == pytest.approx(want, rel=0.25)


def test_errors_before_work():
    model, with_resp, prompts = setup_model("llama", False)
    with pytest.raises(ValueError, match="with_response=True"):
        exact_head_scores(model, prompts, ScoreConfig(positions="response"))
    with pytest.raises(ValueError, match="layer 7"):
        naive_head_scores(model, prompts, layers=[7])
    with pytest.raises(ValueError, match="heads 0..3"):
        exact_head_scores(model, prompts, heads=["0-9"])
    with pytest.raises(ValueError, match="KL scores only"):
        gradient_head_scores(model, prompts, ScoreConfig(score="subspace"))
    with pytest.raises(ValueError, match="max_batch_heads"):
        exact_head_scores(model, prompts, max_batch_heads=0)
    with pytest.raises(ValueError, match="engine='fast'"):
        head_scores(model, prompts, engine="fast")
    with pytest.raises(ValueError, match="no calibration batches"):
        exact_head_scores(model, [])
    with pytest.raises(ValueError, match="estimator"):
        gradient_head_scores(model, prompts, estimator="hessian")
