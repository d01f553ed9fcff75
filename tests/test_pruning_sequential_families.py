"""Sequential pruning replays every decoder layer exactly as the model itself runs it, on every
tiny family (Gemma3 gives sliding-window and full-attention layers different masks and rotary
embeddings, so layer 0's arguments must not be reused for layer 1), and sequential Wanda equals
a hand-rolled loop of full-model forwards."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hsr_pl.models import get_adapter
from hsr_pl.models.tiny import TINY_BUILDERS, build_tiny
from hsr_pl.pruning import CalibrationError, PruningConfig, capture_layer_inputs, prune_model, run_layer

from attribution_batches import make_batches

# Mllama's decoder skips its cross-attention layers on text-only batches: sequential refuses it.
FAMILIES = sorted(f for f in TINY_BUILDERS if f != "mllama")
_CACHE: dict[tuple[str, bool], tuple[nn.Module, list[dict]]] = {}


def setup(family: str, gqa: bool) -> tuple[nn.Module, list[dict]]:
    """(float64 dense model, left-padded batches with response labels), cached."""
    key = (family, gqa)
    if key not in _CACHE:
        torch.set_num_threads(1)
        model, processor = build_tiny(family, gqa=gqa)
        _CACHE[key] = (model.double().eval(), make_batches(processor, response=True))
    return _CACHE[key]


def mixed_layer_types(family: str) -> tuple[nn.Module, list[dict]]:
    """A 3-layer ``family`` model whose ``layer_types`` mix sliding (window 4) and full attention."""
    dense, processor = build_tiny(family, layers=3)
    config = copy.deepcopy(dense.config)
    text = config.get_text_config()
    text.use_sliding_window, text.sliding_window = True, 4
    text.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(0)
    return type(dense)(config).double().eval(), make_batches(processor, response=True)


def model_layer_io(model: nn.Module, batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(input, output) hidden states of every decoder layer in one full forward, by our own hooks.

    HF's ``hidden_states[-1]`` is after the final norm, so layer outputs are read here instead.
    """
    layers = get_adapter(model).all_layers()
    ins: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(module, args, kwargs):
            ins[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    def post(i):
        def hook(module, args, output):
            outs[i] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return hook

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(post(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [ins[i] for i in range(len(layers))], [outs[i] for i in range(len(layers))]


def assert_replay_matches(model: nn.Module, batches: list[dict], label: str) -> None:
    """Layer l replayed on layer l-1's replayed output = what layer l outputs in the model's forward."""
    layers = get_adapter(model).all_layers()
    inputs = capture_layer_inputs(model, list(layers), batches, "all")
    assert len(inputs) == len(batches)
    reference = [model_layer_io(model, batch) for batch in batches]
    for b, inp in enumerate(inputs):
        assert torch.equal(inp.hidden, reference[b][0][0]), (label, b)
    for index, layer in enumerate(layers):
        inputs = run_layer(layer, index, inputs)
        for b, out in enumerate(inputs):
            torch.testing.assert_close(out.hidden, reference[b][1][index], rtol=0, atol=1e-6,
                                       msg=lambda m, i=index, b=b: f"{label} layer {i} batch {b}: {m}")


def layer0_arguments_gap(model: nn.Module, batches: list[dict]) -> float:
    """Max |Δ| between layer 1's output in the forward and layer 1 run with layer 0's arguments
    (what sequential replay computed before it recorded every layer's own arguments)."""
    layers = get_adapter(model).all_layers()
    inputs = capture_layer_inputs(model, list(layers), batches, "all")
    gap = 0.0
    with torch.no_grad():
        for inp, batch in zip(inputs, batches):
            ins, outs = model_layer_io(model, batch)
            wrong = layers[1](ins[1], **inp.kwargs[0])
            wrong = wrong[0] if isinstance(wrong, tuple) else wrong
            gap = max(gap, float((wrong - outs[1]).abs().max()))
    return gap


def same_structure(a, b, where: str) -> None:
    """``a`` and ``b`` hold equal tensors (exactly) and equal plain values, in the same nesting."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            same_structure(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_structure(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_capture_equals_full_forward(model: nn.Module, batches: list[dict], label: str) -> None:
    """The stub capture (no layer computed) records exactly the arguments the dense forward gives
    every layer, and replaying from it gives bit-identical layer outputs."""
    layers = list(get_adapter(model).all_layers())
    calls: list[str] = []
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    handles = [lin.register_forward_hook(lambda m, a, o: calls.append("linear")) for lin in linears]
    try:
        fast = capture_layer_inputs(model, layers, batches, "all")
    finally:
        for h in handles:
            h.remove()
    assert calls == [], f"{label}: the capture computed decoder layers"
    full = capture_layer_inputs(model, layers, batches, "all", run_layers=True)
    assert len(fast) == len(full) == len(batches)
    for b, (x, y) in enumerate(zip(fast, full)):
        assert torch.equal(x.hidden, y.hidden) and torch.equal(x.mask, y.mask), (label, b)
        assert len(x.kwargs) == len(y.kwargs) == len(layers)
        for index in range(len(layers)):
            same_structure(x.kwargs[index], y.kwargs[index], f"{label} batch {b} layer {index}")
    for index, layer in enumerate(layers):
        fast, full = run_layer(layer, index, fast), run_layer(layer, index, full)
        for b, (x, y) in enumerate(zip(fast, full)):
            assert torch.equal(x.hidden, y.hidden), (label, index, b)
    for layer in layers:
        assert "forward" not in vars(layer), f"{label}: a capture stub was left on a layer"


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_without_computing_layers_equals_the_full_forward_capture(family):
    model, batches = setup(family, True)
    assert_capture_equals_full_forward(model, batches, family)


@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl", "qwen2_5_vl"])
def test_capture_equals_full_forward_with_mixed_sliding_and_full_layer_types(family):
    model, batches = mixed_layer_types(family)
    assert_capture_equals_full_forward(model, batches, f"{family} mixed layer_types")


def test_capture_restores_a_forward_set_on_the_instance_and_survives_errors():
    """Dispatch libraries (accelerate) put their own ``forward`` on the instance: it comes back,
    also when the forward fails half-way."""
    model, batches = setup("llama", False)
    layers = list(get_adapter(model).all_layers())
    wrapped = layers[0].forward
    layers[0].forward = wrapped  # an instance attribute, as accelerate's hooks set one
    try:
        capture_layer_inputs(model, layers, batches, "all")
        assert vars(layers[0])["forward"] is wrapped and "forward" not in vars(layers[1])
        with pytest.raises(CalibrationError, match="labels"):
            capture_layer_inputs(model, layers, [{k: v for k, v in batches[0].items() if k != "labels"}], "response")
        assert vars(layers[0])["forward"] is wrapped and "forward" not in vars(layers[1])
    finally:
        del layers[0].forward


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_replay_equals_the_models_own_layer_outputs(family, gqa):
    model, batches = setup(family, gqa)
    assert_replay_matches(model, batches, f"{family} gqa={gqa}")


@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl", "qwen2_5_vl"])
def test_replay_with_mixed_sliding_and_full_layer_types(family):
    """Qwen2 / Qwen2-VL / Qwen2.5-VL configs whose ``layer_types`` mix sliding and full attention."""
    model, batches = mixed_layer_types(family)
    assert layer0_arguments_gap(model, batches) > 1e-3  # the layers really get different masks
    assert_replay_matches(model, batches, f"{family} mixed layer_types")


def test_gemma3_layers_get_their_own_arguments_shared_by_reference():
    """Tiny Gemma3 alternates sliding and full attention: layer 1 run with layer 0's arguments is
    far off (the old replay's error), and layers of one kind share the very same mask and
    rotary tensors, so recording every layer's arguments costs two sets, not one per layer."""
    model, batches = setup("gemma3", False)
    assert layer0_arguments_gap(model, batches) > 1e-2
    dense, processor = build_tiny("gemma3", layers=4)
    inputs = capture_layer_inputs(dense, list(get_adapter(dense).all_layers()), make_batches(processor, response=True), "all")
    for inp in inputs:
        kw = inp.kwargs
        assert len(kw) == 4
        assert kw[0]["attention_mask"] is kw[2]["attention_mask"] and kw[1]["attention_mask"] is kw[3]["attention_mask"]
        assert kw[0]["position_embeddings"] is kw[2]["position_embeddings"]
        assert not torch.equal(kw[0]["attention_mask"], kw[1]["attention_mask"])


# --------------------------------------------------------------- sequential Wanda vs hand loop


def hand_rolled_sequential_wanda(model: nn.Module, batches: list[dict], sparsity: float) -> dict[str, torch.Tensor]:
    """The reference semantics written out: for each layer in order, full-model forwards through
    the already-pruned earlier layers; float64 Σx² over response tokens / number of rows, from
    our own hooks; per output row prune the floor(d_in·s) lowest |W|·sqrt(stat) of a stable sort."""
    adapter = get_adapter(model)
    masks: dict[str, torch.Tensor] = {}
    for layer in adapter.layer_indices():
        linears = {adapter.name_of(m): m for m in adapter.linears(layer).values()}
        sums = {n: torch.zeros(lin.in_features, dtype=torch.float64) for n, lin in linears.items()}
        rows = 0
        seen: dict[str, torch.Tensor] = {}
        handles = [lin.register_forward_hook(lambda m, a, o, n=n, seen=seen: seen.__setitem__(n, a[0].detach()))
                   for n, lin in linears.items()]
        try:
            with torch.no_grad():
                for batch in batches:
                    model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
                    response = batch["labels"] != -100
                    for n in linears:
                        sums[n] += (seen[n][response].double() ** 2).sum(0)
                    rows += batch["input_ids"].shape[0]
        finally:
            for h in handles:
                h.remove()
        for n, lin in linears.items():
            stat = (sums[n] / rows).float()
            score = lin.weight.detach().abs() * stat.sqrt()
            k = int(lin.in_features * sparsity)
            mask = torch.zeros_like(score, dtype=torch.bool)
            for r in range(score.shape[0]):
                order = torch.sort(score[r], stable=True).indices
                mask[r, order[:k]] = True
            with torch.no_grad():
                lin.weight[mask] = 0
            masks[n] = mask
    return masks


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen2_vl", "qwen2_5_vl"])
def test_sequential_wanda_equals_hand_rolled_loop(family):
    dense, processor = build_tiny(family, layers=3)
    batches = make_batches(processor, response=True, dtype=torch.float32)
    seq_model, hand_model = copy.deepcopy(dense), copy.deepcopy(dense)
    seq = prune_model(seq_model, batches, PruningConfig("wanda", sparsity=0.5, mode="sequential")).masks
    hand = hand_rolled_sequential_wanda(hand_model, batches, 0.5)
    assert set(seq) == set(hand) == set(get_adapter(dense).target_linears())
    for name in seq:
        assert torch.equal(seq[name], hand[name]), name
    for key, value in seq_model.state_dict().items():
        assert torch.equal(value, hand_model.state_dict()[key]), key


def test_capture_stops_at_the_last_requested_layer_and_needs_every_layer():
    model, batches = setup("llava", False)
    layers = list(get_adapter(model).all_layers())
    calls: list[int] = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    try:
        inputs = capture_layer_inputs(model, layers[:1], batches, "all")
    finally:
        for h in handles:
            h.remove()
    assert calls == [] and all(len(inp.kwargs) == 1 for inp in inputs)
    with pytest.raises(CalibrationError, match="never reached decoder layers \\[1\\]"):
        capture_layer_inputs(model, [layers[0], nn.Linear(2, 2), layers[1]], batches, "all")


def test_mllama_sequential_still_refused():
    model, processor = build_tiny("mllama")
    with pytest.raises(NotImplementedError, match="mode='oneshot'"):
        prune_model(model, make_batches(processor, response=True, dtype=torch.float32), PruningConfig("wanda"))


def test_run_layer_outputs_new_replace_or_none_agree():
    """``replace`` (the runner's re-forward) writes the same outputs into the input list that
    ``new`` returns; ``none`` (the statistics pass) still runs every batch, for the hooks."""
    model, batches = setup("gemma3", False)
    layers = list(get_adapter(model).all_layers())
    inputs = capture_layer_inputs(model, layers, batches, "all")
    new = run_layer(layers[0], 0, inputs)
    calls: list[int] = []
    handle = layers[0].register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        assert run_layer(layers[0], 0, inputs, outputs="none") == []
    finally:
        handle.remove()
    assert len(calls) == len(batches)
    replaced = run_layer(layers[0], 0, inputs, outputs="replace")
    assert replaced is inputs and len(replaced) == len(new)
    for a, b in zip(replaced, new):
        assert torch.equal(a.hidden, b.hidden) and a.kwargs is b.kwargs
    with pytest.raises(ValueError, match="outputs="):
        run_layer(layers[0], 0, inputs, outputs="keep")
