"""prune_model on the tiny LLaVA: exact sparsity patterns, targeting, sequential semantics,
response-token statistics, validation before weight changes, partial-failure reporting."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from hsr_pl.models import get_adapter
from hsr_pl.models.tiny import build_tiny
from hsr_pl.pruning import (
    CalibrationError,
    DamagedModelError,
    PartialPruningError,
    PruningConfig,
    PruningConfigError,
    prune_model,
    wanda_mask,
)

QUESTIONS = ["what colour is this ?", "describe this image .", "what shape is in the picture ?", "tell me what this is ."]
RESPONSES = ["red circle", "it is a blue square", "a green triangle on the left", "sorry i cannot help", "yes"]


def make_batches(processor, n_batches: int = 3, batch_size: int = 2, seed: int = 0) -> list[dict]:
    """VLGuard-contract batches: left padded, labels = -100 on prompt and padding."""
    rng = np.random.default_rng(seed)
    processor.tokenizer.padding_side = "left"
    size = processor.image_processor.crop_size["height"]
    out = []
    for _ in range(n_batches):
        imgs, texts, prompt_lens = [], [], []
        for _ in range(batch_size):
            img = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[rng.integers(4)]}]}]
            prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
            prompt_lens.append(processor(images=[img], text=[prompt], return_tensors="pt")["input_ids"].shape[1])
            texts.append(prompt + RESPONSES[rng.integers(len(RESPONSES))] + " </s>")
            imgs.append(img)
        enc = dict(processor(images=imgs, text=texts, return_tensors="pt", padding=True))
        labels = enc["input_ids"].clone()
        for r in range(batch_size):
            pad = labels.shape[1] - int(enc["attention_mask"][r].sum())
            labels[r, : pad + prompt_lens[r]] = -100
        enc["labels"] = labels
        out.append(enc)
    return out


@pytest.fixture(scope="module")
def batches():
    _, processor = build_tiny("llava")
    return make_batches(processor)


def fresh(gqa: bool = False):
    return build_tiny("llava", gqa=gqa)[0]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- exact patterns


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("structure", ["0:0", "2:4"])
def test_exact_sparsity_pattern_on_tiny_llava(batches, gqa, method, structure):
    model = fresh(gqa)
    targets = get_adapter(model).target_linears()
    config = PruningConfig(method, sparsity=0.5 if structure == "0:0" else None, mask_structure=structure)
    result = prune_model(model, batches, config)
    assert set(result.masks) == set(targets)
    for name, lin in targets.items():
        mask, w = result.masks[name], lin.weight.detach()
        assert mask.shape == w.shape and mask.dtype == torch.bool
        assert (w[mask] == 0).all(), name  # pruned entries are exact zeros
        assert (w[~mask] != 0).all(), name
        rows, cols = mask.shape
        if structure == "2:4":
            assert (mask.view(rows, cols // 4, 4).sum(-1) == 2).all(), name
        elif method == "wanda":
            assert (mask.sum(1) == cols // 2).all(), name  # per row: floor(d_in * s)
        else:
            # SparseGPT: one threshold per 128-column block over all rows: index floor(numel*s), '<='
            for b in range(0, cols, 128):
                block = mask[:, b : b + 128]
                assert int(block.sum()) == int(block.numel() * 0.5) + 1, name


def test_only_targets_change_and_originals_are_dense(batches):
    model = fresh()
    adapter = get_adapter(model)
    names = [n for n in adapter.target_linears() if ".layers.1." in n and ("q_proj" in n or "down_proj" in n)]
    before = snapshot(model)
    result = prune_model(model, batches, PruningConfig("sparsegpt"), targets=names, keep_originals=names[:1])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.weight" for n in names}
    assert set(result.masks) == set(names) and result.layers == [1]
    assert torch.equal(result.originals[names[0]], before[f"{names[0]}.weight"])
    assert set(result.originals) == {names[0]}


def test_unknown_target_and_keep_originals_rejected(batches):
    model = fresh()
    with pytest.raises(PruningConfigError, match="not decoder-layer linears"):
        prune_model(model, batches, PruningConfig(), targets=["model.vision_tower.x"])
    with pytest.raises(PruningConfigError, match="keep_originals"):
        prune_model(model, batches, PruningConfig(), targets=[next(iter(get_adapter(model).target_linears()))],
                    keep_originals=["nope"])


# ------------------------------------------------------------------------ sequential semantics


def hand_rolled_sequential_wanda(model, batches, sparsity: float, granularity: str = "row") -> dict[str, torch.Tensor]:
    """Reference semantics with full-model forwards: layer l's stats see the pruned layers < l.

    Statistics are computed here by hand (float64, response tokens), not with hsr_pl's hooks.
    """
    adapter = get_adapter(model)
    masks = {}
    for layer in adapter.layer_indices():
        linears = {adapter.name_of(m): m for m in adapter.linears(layer).values()}
        sums = {n: torch.zeros(lin.in_features, dtype=torch.float64) for n, lin in linears.items()}
        samples = 0
        seen: dict[str, torch.Tensor] = {}
        handles = [lin.register_forward_hook(lambda m, a, o, n=n, seen=seen: seen.__setitem__(n, a[0].detach()))
                   for n, lin in linears.items()]
        with torch.no_grad():
            for batch in batches:
                model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
                keep = batch["labels"] != -100
                for n in linears:
                    sums[n] += (seen[n][keep].double() ** 2).sum(0)
                samples += batch["input_ids"].shape[0]
        for h in handles:
            h.remove()
        for n, lin in linears.items():
            mask = wanda_mask(lin.weight, (sums[n] / samples).float(), sparsity, granularity=granularity)
            with torch.no_grad():
                lin.weight[mask] = 0
            masks[n] = mask
    return masks


def test_sequential_equals_hand_rolled_loop_and_differs_from_oneshot(batches):
    seq_model, hand_model, one_model = fresh(), fresh(), fresh()
    seq = prune_model(seq_model, batches, PruningConfig("wanda", sparsity=0.5, mode="sequential")).masks
    hand = hand_rolled_sequential_wanda(hand_model, batches, 0.5)
    one = prune_model(one_model, batches, PruningConfig("wanda", sparsity=0.5, mode="oneshot")).masks
    assert set(seq) == set(hand) == set(one)
    for name in seq:
        assert torch.equal(seq[name], hand[name]), name
        if ".layers.0." in name:
            assert torch.equal(seq[name], one[name]), name  # layer 0 sees the same dense inputs
    layer1 = [n for n in seq if ".layers.1." in n]
    assert any(not torch.equal(seq[n], one[n]) for n in layer1)  # layer 1 stats come from pruned layer 0
    for k, v in seq_model.state_dict().items():
        assert torch.equal(v, hand_model.state_dict()[k]), k


def test_whole_matrix_wanda_sequential_and_oneshot_reach_the_selection(batches):
    """granularity='matrix' in both modes: sequential equals the hand-rolled loop, one-shot equals the
    whole-matrix rule on dense statistics; each matrix prunes exactly floor(numel*s), rows unevenly."""
    seq_model, hand_model, one_model = fresh(), fresh(), fresh()
    config = PruningConfig("wanda", sparsity=0.6, mode="sequential", granularity="matrix")
    seq = prune_model(seq_model, batches, config).masks
    hand = hand_rolled_sequential_wanda(hand_model, batches, 0.6, granularity="matrix")
    one = prune_model(one_model, batches, PruningConfig("wanda", 0.6, mode="oneshot", granularity="matrix")).masks
    rows = prune_model(fresh(), batches, PruningConfig("wanda", 0.6, mode="sequential")).masks
    assert set(seq) == set(hand) == set(one)
    for name in seq:
        assert torch.equal(seq[name], hand[name]), name
        assert int(seq[name].sum()) == int(seq[name].numel() * 0.6), name
        if ".layers.0." in name:
            assert torch.equal(seq[name], one[name]), name
    assert any(len(set(seq[n].sum(1).tolist())) > 1 for n in seq)  # uneven rows: not the per-row rule
    assert any(not torch.equal(seq[n], rows[n]) for n in seq)


def test_progress_and_reduce_hooks(batches):
    calls, reduced = [], []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        reduced.append(t.shape)
        return t * 3  # a sum over 3 equal ranks: masks must not move

    base = prune_model(fresh(), batches, PruningConfig("wanda")).masks
    model = fresh()
    result = prune_model(model, batches, PruningConfig("wanda"), on_layer=lambda i, n: calls.append((i, n)),
                         reduce=reduce)
    assert calls == [(1, 2), (2, 2)]
    assert len(reduced) == 2 * len(result.masks)  # one statistic + one token count per linear
    assert all(torch.equal(base[n], result.masks[n]) for n in base)


def test_sequential_refuses_models_with_other_layer_types(batches, monkeypatch):
    model = fresh()
    adapter = get_adapter(model)
    monkeypatch.setattr(adapter, "other_layer_indices", lambda: [1])
    with pytest.raises(NotImplementedError, match="mode='oneshot'"):
        prune_model(model, batches, PruningConfig("wanda"), adapter=adapter)


# --------------------------------------------------------------------------- token selection


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_statistics_cover_exactly_the_selected_tokens(batches, tokens):
    """Layer-0 q_proj statistic (one-shot) equals a float64 sum over the selected positions."""
    from hsr_pl.pruning import StatsCollector, TokenSelection, token_mask

    model = fresh()
    adapter = get_adapter(model)
    q = adapter.projections(0)["q"]
    seen = []
    handle = q.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    selection = TokenSelection()
    collector = StatsCollector({"q": q}, "row", selection)
    with collector, torch.no_grad():
        for batch in batches:
            selection.set(token_mask(batch, tokens))
            model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    handle.remove()
    stat = collector.finalize()["q"]
    expected = torch.zeros(q.in_features, dtype=torch.float64)
    count = 0
    for x, batch in zip(seen, batches):
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                take = batch["labels"][b, t] != -100 if tokens == "response" else batch["attention_mask"][b, t] != 0
                if take:
                    expected += x[b, t].double() ** 2
                    count += 1
    assert stat.ntokens == count
    assert count < sum(int(b["attention_mask"].sum()) for b in batches) or tokens == "all"
    torch.testing.assert_close(stat.scaler_row.double(), expected / 6, rtol=1e-5, atol=1e-6)


def test_response_and_all_tokens_give_different_masks(batches):
    a = prune_model(fresh(), batches, PruningConfig("wanda", tokens="response")).masks
    b = prune_model(fresh(), batches, PruningConfig("wanda", tokens="all")).masks
    assert any(not torch.equal(a[n], b[n]) for n in a)


# -------------------------------------------------------------------------------- validation


def test_zero_response_tokens_fail_before_any_change(batches):
    empty = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in batches]
    for mode in ("sequential", "oneshot"):
        model = fresh()
        before = snapshot(model)
        with pytest.raises(CalibrationError, match="zero calibration tokens"):
            prune_model(model, empty, PruningConfig("wanda", mode=mode))
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_labels_explained(batches):
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(CalibrationError, match="with_response=True"):
        prune_model(fresh(), no_labels, PruningConfig("wanda"))
    prune_model(fresh(), no_labels, PruningConfig("wanda", tokens="all"))  # fine with all tokens


def test_overflow_midway_names_pruned_layers(batches):
    model = fresh()
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.projections(1)["v"].weight[0, 0] = 3e38  # finite, but layer 1's o_proj statistic overflows
    with pytest.raises(PartialPruningError, match=r"already pruned in place: \[0\]") as info:
        prune_model(model, batches, PruningConfig("wanda"))
    assert info.value.pruned_layers == [0]
    assert isinstance(info.value.__cause__, CalibrationError)


def test_nan_oneshot_fails_before_any_change(batches):
    model = fresh()
    with torch.no_grad():
        get_adapter(model).projections(1)["v"].weight[0, 0] = float("nan")
    before = snapshot(model)
    name = get_adapter(model).name_of(get_adapter(model).projections(1)["v"])
    with pytest.raises(DamagedModelError, match=rf"weight {re.escape(name)}.weight holds 1 NaN/inf value"):
        prune_model(model, batches, PruningConfig("sparsegpt", mode="oneshot"))
    for k, v in model.state_dict().items():
        assert torch.equal(v.nan_to_num(7.0), before[k].nan_to_num(7.0)), k


def test_nm_on_indivisible_width_fails_before_any_change(batches):
    model = fresh()
    before = snapshot(model)
    with pytest.raises(PruningConfigError, match="divisible by 3"):
        prune_model(model, batches, PruningConfig("wanda", mask_structure="2:3", sparsity=None))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------- magnitude and snip


def test_magnitude_needs_no_data_and_prunes_per_row():
    model = fresh()
    result = prune_model(model, None, PruningConfig("magnitude", sparsity=0.25))
    for name, mask in result.masks.items():
        assert (mask.sum(1) == mask.shape[1] // 4).all(), name


def test_snip_equals_hand_computed_gradient_scores(batches):
    model, ref = fresh(), fresh()
    adapter = get_adapter(ref)
    names = [n for n in adapter.target_linears() if ".layers.1." in n]
    linears = {n: dict(ref.named_modules())[n] for n in names}
    scores = {n: torch.zeros_like(lin.weight, dtype=torch.float64) for n, lin in linears.items()}
    for batch in batches:
        loss = ref(**batch, use_cache=False).loss
        grads = torch.autograd.grad(loss, [lin.weight for lin in linears.values()])
        for (n, lin), g in zip(linears.items(), grads):
            scores[n] += (lin.weight.detach().double() * g.double()).abs()
    before_flags = [p.requires_grad for p in model.parameters()]
    result = prune_model(model, batches, PruningConfig("snip", sparsity=0.5), targets=names)
    assert [p.requires_grad for p in model.parameters()] == before_flags
    for n in names:
        k = scores[n].shape[1] // 2
        expected = torch.zeros_like(result.masks[n])
        for r in range(scores[n].shape[0]):
            order = sorted(range(scores[n].shape[1]), key=lambda j: (scores[n][r, j].item(), j))
            expected[r, order[:k]] = True
        assert torch.equal(result.masks[n], expected), n
