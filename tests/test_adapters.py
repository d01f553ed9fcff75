"""Model-family adapters: one table of cases (family x MHA/GQA) drives every check.

Adding a family = one adapter class in hsr_pl/models/families.py + one row in FAMILIES below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from hsr_pl.models import UnsupportedModelError, get_adapter, split_heads, supported_families
from hsr_pl.models.tiny import build_tiny, example_batch


@dataclass(frozen=True)
class Family:
    model_type: str
    decoder: str  # qualified name of the language decoder (holds .layers)
    self_layers: tuple[int, ...] = (0, 1)
    other_layers: tuple[int, ...] = ()
    query_hook: str = "q_proj"


FAMILIES = [
    Family("llava", "model.language_model"),
    Family("llava_next", "model.language_model"),
    Family("qwen2_vl", "model.language_model"),
    Family("qwen2_5_vl", "model.language_model"),
    Family("gemma3", "model.language_model", query_hook="q_norm"),
    Family("idefics3", "model.text_model"),
    Family("smolvlm", "model.text_model"),
    Family("mllama", "model.language_model", self_layers=(0, 2), other_layers=(1,)),
    Family("internvl", "model.language_model"),
    Family("llama", "model"),
    Family("mistral", "model"),
    Family("qwen2", "model"),
]
CASES = [
    pytest.param(fam, gqa, id=f"{fam.model_type}-{'gqa' if gqa else 'mha'}")
    for fam in FAMILIES
    for gqa in (False, True)
]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _build(fam: Family, gqa: bool):
    model, processor = build_tiny(fam.model_type, gqa=gqa)
    return model, processor, get_adapter(model)


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_every_registered_model_type_has_a_case():
    registered = {t for types in supported_families().values() for t in types}
    assert registered == {fam.model_type for fam in FAMILIES}


@pytest.mark.parametrize("fam,gqa", CASES)
def test_structure_and_geometry(fam: Family, gqa: bool):
    model, _, adapter = _build(fam, gqa)
    text = model.config.get_text_config()
    assert adapter.name_of(adapter.decoder()) == fam.decoder
    assert adapter.layer_indices() == list(fam.self_layers)
    assert adapter.other_layer_indices() == list(fam.other_layers)
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    assert kv == (heads // 2 if gqa else heads)
    for i in adapter.layer_indices():
        geo = adapter.geometry(i)
        assert (geo.num_heads, geo.num_kv_heads) == (heads, kv)
        assert geo.head_dim == (getattr(text, "head_dim", None) or text.hidden_size // heads) == 16
        assert geo.group_size == heads // kv and geo.is_gqa == gqa
        assert geo.hidden_size == text.hidden_size
        # slices tile q rows / o columns; kv_slice follows the group
        assert [geo.query_slice(h) for h in range(heads)] == [
            slice(h * 16, h * 16 + 16) for h in range(heads)
        ]
        assert {geo.kv_slice(h).start // 16 for h in range(heads)} == set(range(kv))


@pytest.mark.parametrize("fam,gqa", CASES)
def test_target_linears_are_exactly_the_decoder_self_attention_layers(fam: Family, gqa: bool):
    model, _, adapter = _build(fam, gqa)
    targets = adapter.target_linears()
    expected = {f"{fam.decoder}.layers.{i}.self_attn.{p}" for i in fam.self_layers for p in PROJ}
    expected |= {f"{fam.decoder}.layers.{i}.mlp.{p}" for i in fam.self_layers for p in MLP}
    assert set(targets) == expected
    assert len(targets) == 7 * len(fam.self_layers)
    assert all(isinstance(m, nn.Linear) for m in targets.values())
    # nothing from the vision tower, projector, lm_head, embeddings or cross-attention layers
    all_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    outside = all_linears - expected
    assert any("lm_head" in n for n in outside)
    if fam.model_type not in ("llama", "mistral", "qwen2"):
        assert any(("vision" in n or "visual" in n) for n in outside)
    for i in fam.other_layers:
        assert any(n.startswith(f"{fam.decoder}.layers.{i}.") for n in outside)
    for name, module in targets.items():
        layer, short = adapter.locate(name)
        assert adapter.linears(layer)[short] is module
    with pytest.raises(KeyError):
        adapter.locate("lm_head")


# (vision tower, projector) as the transformers classes name them; Qwen2-VL's merger sits inside
# its tower, text-only models have neither.
VISION_PARTS = {
    "llava": ("model.vision_tower", "model.multi_modal_projector"),
    "llava_next": ("model.vision_tower", "model.multi_modal_projector"),
    "qwen2_vl": ("model.visual", None),
    "qwen2_5_vl": ("model.visual", None),
    "gemma3": ("model.vision_tower", "model.multi_modal_projector"),
    "idefics3": ("model.vision_model", "model.connector"),
    "smolvlm": ("model.vision_model", "model.connector"),
    "mllama": ("model.vision_model", "model.multi_modal_projector"),
    "internvl": ("model.vision_tower", "model.multi_modal_projector"),
    "llama": (None, None),
    "mistral": (None, None),
    "qwen2": (None, None),
}


@pytest.mark.parametrize("fam", FAMILIES, ids=[f.model_type for f in FAMILIES])
def test_vision_tower_and_projector(fam: Family):
    model, _, adapter = _build(fam, False)
    names = {id(m): n for n, m in model.named_modules()}
    found = tuple(None if m is None else names[id(m)] for m in (adapter.vision_tower(), adapter.projector()))
    assert found == VISION_PARTS[fam.model_type]


def test_mllama_cross_attention_listed_apart():
    model, _, adapter = _build(FAMILIES[7], False)
    cross = adapter.cross_attention_linears()
    assert set(cross) == {f"model.language_model.layers.1.cross_attn.{p}" for p in PROJ} | {
        f"model.language_model.layers.1.mlp.{p}" for p in MLP
    }
    assert not set(cross) & set(adapter.target_linears())


@pytest.mark.parametrize("fam,gqa", CASES)
def test_o_proj_prehook_matches_zeroing_weight_columns(fam: Family, gqa: bool):
    model, processor, adapter = _build(fam, gqa)
    batch = example_batch(fam.model_type, processor)
    layer = adapter.layer_indices()[-1]
    geo = adapter.geometry(layer)
    head = geo.num_heads - 1  # in the last KV group under GQA
    cols = geo.query_slice(head)
    base = _logits(model, batch)

    def zero_head(module, args):
        x = args[0].clone()
        x[..., cols] = 0
        return (x,)

    handle = adapter.o_proj(layer).register_forward_pre_hook(zero_head)
    hooked = _logits(model, batch)
    handle.remove()
    with torch.no_grad():
        adapter.o_proj(layer).weight[:, cols] = 0
    zeroed = _logits(model, batch)
    assert not torch.allclose(hooked, base, atol=1e-6)  # the ablation does something
    torch.testing.assert_close(hooked, zeroed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fam,gqa", CASES)
def test_query_states_hook_point(fam: Family, gqa: bool):
    model, processor, adapter = _build(fam, gqa)
    batch = example_batch(fam.model_type, processor)
    layer = adapter.layer_indices()[0]
    geo = adapter.geometry(layer)
    module = adapter.query_states_module(layer)
    assert module is getattr(adapter.attention(layer), fam.query_hook)
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
    base = _logits(model, batch)
    handle.remove()
    states = adapter.query_heads(layer, seen[0])
    assert states.shape == (*batch["input_ids"].shape, geo.num_heads, geo.head_dim)
    if fam.query_hook == "q_proj":
        assert split_heads(seen[0], geo.num_heads, geo.head_dim).shape == states.shape
    key_out = []
    handle = adapter.key_states_module(layer).register_forward_hook(lambda m, a, out: key_out.append(out))
    _logits(model, batch)
    handle.remove()
    keys = adapter.key_heads(layer, key_out[0])
    assert keys.shape == (*batch["input_ids"].shape, geo.num_kv_heads, geo.head_dim)

    # Scaling one head's states at the hook point must reach the attention (not be normalised away).
    def scale_head(m, a, out):
        out = out.clone()
        adapter.query_heads(layer, out)[..., 0, :] *= 1e-5
        return out

    handle = module.register_forward_hook(scale_head)
    scaled = _logits(model, batch)
    handle.remove()
    assert not torch.allclose(scaled, base, atol=1e-6)


def test_split_heads_layouts_are_views():
    flat = torch.randn(2, 5, 3 * 4)
    split = split_heads(flat, 3, 4)
    assert split.shape == (2, 5, 3, 4) and torch.equal(split[0, 1, 2], flat[0, 1, 8:12])
    head_major = torch.randn(2, 3, 5, 4)  # [batch, H, seq, d]
    view = split_heads(head_major, 3, 4)
    assert view.shape == (2, 5, 3, 4) and torch.equal(view[1, 4, 2], head_major[1, 2, 4])
    view[0, 1, 2] = 0  # in-place edits reach the hooked tensor
    assert head_major[0, 2, 1].abs().sum() == 0
    token_major = torch.randn(2, 5, 3, 4)
    assert split_heads(token_major, 3, 4) is token_major
    ambiguous = torch.randn(1, 3, 3, 4)  # seq == H
    with pytest.raises(ValueError, match="head_major"):
        split_heads(ambiguous, 3, 4)
    assert torch.equal(split_heads(ambiguous, 3, 4, head_major=True), ambiguous.transpose(1, 2))
    assert split_heads(ambiguous, 3, 4, head_major=False) is ambiguous
    with pytest.raises(ValueError, match="cannot split"):
        split_heads(torch.randn(2, 5, 7), 3, 4)


def test_gemma3_scaling_q_proj_is_undone_by_q_norm():
    """Why the Gemma3 hook point is q_norm: scaling a head in q_proj's output changes nothing."""
    model, processor, adapter = _build(FAMILIES[4], False)
    batch = example_batch("gemma3", processor)
    geo = adapter.geometry(0)
    base = _logits(model, batch)

    def scale_head(m, a, out):
        out = out.clone()
        # RMSNorm(c * x) = RMSNorm(x) up to its eps; a factor > 1 keeps eps negligible
        split_heads(out, geo.num_heads, geo.head_dim)[..., 0, :] *= 4.0
        return out

    handle = adapter.projections(0)["q"].register_forward_hook(scale_head)
    scaled = _logits(model, batch)
    handle.remove()
    torch.testing.assert_close(scaled, base, rtol=1e-4, atol=1e-4)


def _reference_attention(x, wq, wk, wv, heads, kv_heads, theta):
    """Causal self-attention per head, float64 python loops: LLaMA RoPE (rotate-half), GQA."""
    seq, _ = x.shape
    d = wq.shape[0] // heads
    q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
    inv_freq = [1.0 / theta ** (2 * j / d) for j in range(d // 2)]

    def rope(vec, pos):
        out = vec.clone()
        for j in range(d // 2):
            c, s = math.cos(pos * inv_freq[j]), math.sin(pos * inv_freq[j])
            a, b = vec[j].item(), vec[j + d // 2].item()
            out[j], out[j + d // 2] = a * c - b * s, b * c + a * s
        return out

    outs = torch.zeros(seq, heads * d, dtype=torch.float64)
    group = heads // kv_heads
    for h in range(heads):
        g = h // group
        for t in range(seq):
            qt = rope(q[t, h * d : (h + 1) * d], t)
            scores = [float(qt @ rope(k[s, g * d : (g + 1) * d], s)) / math.sqrt(d) for s in range(t + 1)]
            top = max(scores)
            weights = [math.exp(sc - top) for sc in scores]
            total = sum(weights)
            for s in range(t + 1):
                outs[t, h * d : (h + 1) * d] += weights[s] / total * v[s, g * d : (g + 1) * d]
    return outs


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_o_proj_input_is_the_hand_computed_per_head_attention_output(gqa: bool):
    model, tokenizer = build_tiny("llama", gqa=gqa)
    model = model.double()
    adapter = get_adapter(model)
    layer = 1
    geo = adapter.geometry(layer)
    proj = adapter.projections(layer)
    captured = {}
    h1 = proj["q"].register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    h2 = proj["o"].register_forward_pre_hook(lambda m, a: captured.__setitem__("o_in", a[0]))
    ids = tokenizer(["what colour is the shape ? red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        model(input_ids=ids)
    h1.remove()
    h2.remove()
    theta = model.config.rope_parameters["rope_theta"]
    expected = _reference_attention(
        captured["x"][0],
        proj["q"].weight.detach(),
        proj["k"].weight.detach(),
        proj["v"].weight.detach(),
        geo.num_heads,
        geo.num_kv_heads,
        theta,
    )
    got = captured["o_in"][0]
    for h in range(geo.num_heads):
        sl = geo.query_slice(h)
        # HF builds the RoPE angles in float32 even for a float64 model: ~1e-8 relative noise
        torch.testing.assert_close(got[:, sl], expected[:, sl], rtol=1e-6, atol=1e-9)
    assert got.abs().max() > 1e-3  # not trivially zero


def test_unknown_model_type_names_supported_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(model)
    message = str(err.value)
    assert "'gpt2'" in message and "GPT2LMHeadModel" in message
    for family, types in supported_families().items():
        assert family in message and all(t in message for t in types)
    assert "register_adapter" in message and "docs/adapters.md" in message
    with pytest.raises(UnsupportedModelError, match="None"):
        get_adapter(nn.Linear(2, 2))
