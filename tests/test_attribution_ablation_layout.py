"""HeadAblation edits exactly the ablated head whatever the layout of the hooked tensor.

Gemma3's query/key hook points (``q_norm``/``k_norm``) output head-major ``[B, H, T, d_h]``
states while every other family's hook points are flat ``[B, T, H * d_h]``; a layout slip there
silently scales the wrong numbers and is invisible to the exact-vs-naive comparison (both use
the same hooks). These tests watch the hooked tensors with independent hooks and anchor the
scores to hand-made edits that know each family's layout explicitly.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hsr_pl.attribution import HeadAblation, HeadScaling, ScoreConfig, naive_head_scores
from hsr_pl.models import get_adapter
from hsr_pl.models.tiny import TINY_BUILDERS, build_tiny

from attribution_batches import make_batches

EPS = 1e-5
FAMILIES = [(family, gqa) for family in sorted(TINY_BUILDERS) for gqa in (False, True)]


def _setup(family: str, gqa: bool):
    model, processor = build_tiny(family, gqa=gqa)
    model = model.double().eval()
    (batch,) = make_batches(processor, response=False, sizes=(3,))
    return model, get_adapter(model), batch


class _Watch:
    """Clones of a module's output (forward hook) or first input (pre-hook), one per forward.

    Hooks run in registration order and a hook's return value is what the next one sees, so a
    watch registered before HeadAblation's hook sees the unedited tensor and one registered after
    it sees exactly what the model goes on to use.
    """

    def __init__(self, module: torch.nn.Module, pre: bool = False) -> None:
        self.seen: list[torch.Tensor] = []
        if pre:
            self.handle = module.register_forward_pre_hook(
                lambda m, args: self.seen.append(args[0].detach().clone())
            )
        else:
            self.handle = module.register_forward_hook(
                lambda m, args, out: self.seen.append(out.detach().clone())
            )

    def remove(self) -> torch.Tensor:
        self.handle.remove()
        assert len(self.seen) == 1
        return self.seen[0]


def _run(model, adapter, batch, module_fn, *, pre=False, heads, mode, mean=None):
    """(tensor before HeadAblation's hook, tensor after it) at ``module_fn(adapter)`` in one forward."""
    module = module_fn(adapter)
    before = _Watch(module, pre)
    with HeadAblation(adapter, 0, heads, mode, EPS, mean):
        after = _Watch(module, pre)
        with torch.no_grad():
            model(**batch)
        after_t = after.remove()
    return before.remove(), after_t


def _per_head(before: torch.Tensor, after: torch.Tensor, view, expected: torch.Tensor, fill=None) -> None:
    """Check, head by head and row by row, ``after = before × expected[r, h]`` (or ``fill[h]``
    where ``expected`` is 0 and ``fill`` is given); views are ``[B, T, H, d_h]``."""
    vb, va = view(before), view(after)
    assert vb.shape[0] == expected.shape[0] and vb.shape[-2] == expected.shape[1]
    for r in range(expected.shape[0]):
        for h in range(expected.shape[1]):
            b, a, s = vb[r, ..., h, :], va[r, ..., h, :], float(expected[r, h])
            if s == 1.0:
                assert torch.equal(a, b), (r, h)  # untouched heads are bit-identical
            elif fill is not None and s == 0.0:
                assert torch.equal(a, fill[h].expand_as(a)), (r, h)
            else:
                assert b.abs().max() > 0
                torch.testing.assert_close(a, b * s, rtol=1e-12, atol=0.0)
                assert float(a.norm() / b.norm()) == pytest.approx(s, rel=1e-9), (r, h)


@pytest.mark.parametrize("family, gqa", FAMILIES)
def test_ablation_edits_only_the_chosen_head(family, gqa):
    model, adapter, batch = _setup(family, gqa)
    geo = adapter.geometry(0)
    H, g = geo.num_heads, geo.group_size
    # Rows ablate different heads (one row intact): the per-row selection must survive the layout.
    h = 1
    heads = torch.tensor([h, -1, H - 1])
    q_scale = torch.ones(3, H, dtype=torch.float64)
    kv_scale = torch.ones(3, geo.num_kv_heads, dtype=torch.float64)
    for r, head in enumerate(heads.tolist()):
        if head >= 0:
            q_scale[r, head] = EPS
            kv_scale[r, head // g] = EPS

    def q_view(t):
        return adapter.query_heads(0, t)

    def k_view(t):
        return adapter.key_heads(0, t)

    def o_view(t):
        return t.view(*t.shape[:-1], H, geo.head_dim)  # o_proj input: flat concat of head outputs

    def v_view(t):
        return t.view(*t.shape[:-1], geo.num_kv_heads, geo.head_dim)  # v_proj output: flat

    # head: query states × ε, and the o_proj input slice × ε (seen before/after in one forward)
    before, after = _run(model, adapter, batch, lambda a: a.query_states_module(0), heads=heads, mode="head")
    _per_head(before, after, q_view, q_scale)
    before, after = _run(model, adapter, batch, lambda a: a.o_proj(0), pre=True, heads=heads, mode="head")
    _per_head(before, after, o_view, q_scale)

    # qkv: query head × ε, the KV group of the head × ε in keys and values, o_proj untouched
    before, after = _run(model, adapter, batch, lambda a: a.query_states_module(0), heads=heads, mode="qkv")
    _per_head(before, after, q_view, q_scale)
    before, after = _run(model, adapter, batch, lambda a: a.key_states_module(0), heads=heads, mode="qkv")
    _per_head(before, after, k_view, kv_scale)
    before, after = _run(model, adapter, batch, lambda a: a.value_states_module(0), heads=heads, mode="qkv")
    _per_head(before, after, v_view, kv_scale)
    before, after = _run(model, adapter, batch, lambda a: a.o_proj(0), pre=True, heads=heads, mode="qkv")
    assert torch.equal(before, after)

    # zero / mean: the o_proj input slice replaced by 0 / the given per-head mean
    zero_scale = torch.where(q_scale == 1.0, q_scale, torch.zeros_like(q_scale))
    before, after = _run(model, adapter, batch, lambda a: a.o_proj(0), pre=True, heads=heads, mode="zero")
    _per_head(before, after, o_view, zero_scale, fill=torch.zeros(H, geo.head_dim, dtype=torch.float64))
    mean = torch.randn(H, geo.head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before, after = _run(
        model, adapter, batch, lambda a: a.o_proj(0), pre=True, heads=heads, mode="mean", mean=mean
    )
    _per_head(before, after, o_view, zero_scale, fill=mean)


@pytest.mark.parametrize("family, gqa", [("gemma3", True), ("llava", False)])
def test_head_scaling_moves_each_slice_by_its_own_alpha(family, gqa):
    """The gradient engine's hook: o_proj input slice (r, l, h) → c + α[r, l, h] (x − c), and
    gradients reach α."""
    model, adapter, batch = _setup(family, gqa)
    layers = adapter.layer_indices()[:2]
    H, d = adapter.geometry(layers[0]).num_heads, adapter.geometry(layers[0]).head_dim
    g = torch.Generator().manual_seed(5)
    alpha = (0.5 + torch.rand(3, len(layers), H, dtype=torch.float64, generator=g)).requires_grad_(True)
    centers = {layers[0]: torch.randn(H, d, dtype=torch.float64, generator=g)}  # layers[1]: centre 0
    before = [_Watch(adapter.o_proj(layer), pre=True) for layer in layers]
    with HeadScaling(adapter, layers, alpha, centers):
        after = [_Watch(adapter.o_proj(layer), pre=True) for layer in layers]
        out = model(**batch).logits
        seen_after = [w.remove() for w in after]
    seen_before = [w.remove() for w in before]
    for k, layer in enumerate(layers):
        c = centers.get(layer, torch.zeros(H, d, dtype=torch.float64))
        x, y = seen_before[k], seen_after[k]
        for r in range(3):
            for h in range(H):
                xs, ys = x[r, :, h * d : (h + 1) * d], y[r, :, h * d : (h + 1) * d]
                want = c[h] + float(alpha.detach()[r, k, h]) * (xs - c[h])
                torch.testing.assert_close(ys, want, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(out[:, -1].logsumexp(-1).sum(), alpha)
    assert torch.isfinite(grad).all() and (grad != 0).all()


# ----------------------------------------------------------------------------- score anchors
def _hand_kl(model, edited, batch) -> float:
    """Mean over prompts of KL(intact ‖ edited) at the last prompt token, python loops, float64."""
    with torch.no_grad():
        p = model(**batch).logits[:, -1]
        q = edited(**batch).logits[:, -1]
    total = 0.0
    for r in range(p.shape[0]):
        lp, lq = torch.log_softmax(p[r], -1), torch.log_softmax(q[r], -1)
        total += sum(float(lp[v].exp() * (lp[v] - lq[v])) for v in range(lp.numel()))
    return total / p.shape[0]


def _scale_rows(linear: torch.nn.Linear, rows: slice, s: float) -> None:
    """Scale output features ``rows`` of a linear layer (weight rows and bias entries)."""
    linear.weight[rows] *= s
    if linear.bias is not None:
        linear.bias[rows] *= s


def _hand_edit(family: str, model, layer: int, head: int, mode: str):
    """A copy of ``model`` with the head ablated by hand: weights where the hook point is a
    linear output, an explicit head-major hook on Gemma3's norms (``[B, H, T, d_h]``)."""
    edited = copy.deepcopy(model)
    attn = edited.model.language_model.layers[layer].self_attn
    cfg = edited.config.get_text_config()
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    kv = head // (H // H_kv)
    q_rows, kv_rows = slice(head * d, (head + 1) * d), slice(kv * d, (kv + 1) * d)

    def head_major_scale(index: int, heads: int):
        def hook(module, args, out):
            assert out.shape[1] == heads and out.shape[-1] == d  # [B, heads, T, d]
            out = out.clone()
            out[:, index] *= EPS
            return out

        return hook

    with torch.no_grad():
        if mode == "zero":
            attn.o_proj.weight[:, q_rows] = 0.0
            return edited
        if family == "gemma3":
            attn.q_norm.register_forward_hook(head_major_scale(head, H))
            if mode == "qkv":
                attn.k_norm.register_forward_hook(head_major_scale(kv, H_kv))
        else:
            _scale_rows(attn.q_proj, q_rows, EPS)
            if mode == "qkv":
                _scale_rows(attn.k_proj, kv_rows, EPS)
        if mode == "head":
            attn.o_proj.weight[:, q_rows] *= EPS
        else:
            _scale_rows(attn.v_proj, kv_rows, EPS)
    return edited


@pytest.mark.parametrize("mode", ["head", "qkv", "zero"])
@pytest.mark.parametrize("family, gqa", [("gemma3", False), ("gemma3", True), ("qwen2_vl", True)])
def test_naive_scores_equal_hand_edits(family, gqa, mode):
    model, adapter, batch = _setup(family, gqa)
    targets = [(0, 1), (1, 2)]
    scores = naive_head_scores(model, [batch], ScoreConfig(ablation=mode, epsilon=EPS), heads=targets)
    for layer, head in targets:
        want = _hand_kl(model, _hand_edit(family, model, layer, head, mode), batch)
        assert want > 0
        assert scores[f"{layer}-{head}"] == pytest.approx(want, rel=1e-6), (layer, head)
