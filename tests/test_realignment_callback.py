"""SafetyRealignment in a Trainer: the restore set equals an independent float64 computation of the
rule on the dense model, the properties (only head slices, never MLP, dense values back,
idempotent), wrong orders and missing inputs, SparseGPT's dense copy, gradient order against
finite differences, budgets and rounds, N:M preservation, fit with restored weights staying free
and a checkpoint resume."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from hsr_pl.callbacks import Pruning, SafetyHeadAttribution, SafetyRealignment
from hsr_pl.data import VLGuardDataModule
from hsr_pl.models import get_adapter
from hsr_pl.models.tiny import build_tiny_llava
from hsr_pl.module import LVLMModule
from hsr_pl.realign import RealignConfigError, RealignInputError, attention_linears, loss_gradients
from hsr_pl.state import get_state

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "tiny_vlguard" / "train.json"
HEADS = ["0-1", "1-2"]


def make_module(gqa: bool = False, lr: float = 1e-3, dtype=None) -> LVLMModule:
    model, processor = build_tiny_llava(gqa, layers=2, heads=4)
    if dtype is not None:
        model = model.to(dtype)
    return LVLMModule(model, processor=processor, max_new_tokens=1, learning_rate=lr)


def make_data(module: LVLMModule) -> VLGuardDataModule:
    eval_sets = [{"name": "harmful", "path": str(TRAIN), "split": "safety", "kind": "harmful", "num_samples": 1}]
    return VLGuardDataModule(
        train_path=str(TRAIN), eval_sets=eval_sets, eval_batch_size=1, batch_size=2, processor=module.processor,
        num_samples=8,
    )


def make_trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path,
        max_steps=2, limit_train_batches=2,
    )
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def batches(module, split, n=8):
    loader = make_data(module).calibration_dataloader(split, n, with_response=True, batch_size=1)
    return [{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in loader]


def run_validate(tmp_path, module, realign: SafetyRealignment, pruning: Pruning | None = None):
    pruning = pruning or Pruning(method="wanda", sparsity=0.5, num_samples=8, when="validation_start")
    trainer = make_trainer(tmp_path, [pruning, realign])
    trainer.validate(module, datamodule=make_data(module), verbose=False)
    return trainer


# ------------------------------------------------------------------------ independent reference
def reference_scaler_rows(model: nn.Module, names, data) -> dict[str, torch.Tensor]:
    """Wanda's statistic by hand, in float64: mean over samples of Σ_t x_t² over response tokens."""
    linears = dict(model.named_modules())
    sums = {n: torch.zeros(linears[n].in_features, dtype=torch.float64) for n in names}
    current: dict[str, torch.Tensor] = {}
    handles = [linears[n].register_forward_hook(lambda m, a, o, n=n: current.__setitem__(n, a[0].detach())) for n in names]
    with torch.no_grad():
        for batch in data:
            current.clear()
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            model(**inputs, use_cache=False)
            keep = batch["labels"] != -100
            for n in names:
                sums[n] += (current[n][keep].double() ** 2).sum(0)
    for h in handles:
        h.remove()
    return {n: s / len(data) for n, s in sums.items()}


def top_set(scores: torch.Tensor, fraction: float | None = None, count: int | None = None) -> set[int]:
    """The ``int(fraction · numel)`` (or ``count``) largest entries; ties to the lower flat index."""
    flat = scores.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return set(order[: int(fraction * len(flat)) if count is None else count])


def slice_set(role, shape, head_dim, group, heads) -> set[int]:
    rows, cols = shape
    out = set()
    for r in range(rows):
        for c in range(cols):
            for h in heads:
                if (role == "q" and r // head_dim == h) or (role in "kv" and r // head_dim == h // group) or (
                    role == "o" and c // head_dim == h
                ):
                    out.add(r * cols + c)
    return out


@pytest.mark.parametrize("gqa", [False, True])
def test_restore_set_equals_the_rule_computed_independently(tmp_path, gqa):
    module = make_module(gqa)
    dense = copy.deepcopy(module.model).eval()
    realign = SafetyRealignment(heads=HEADS, num_samples=8, when="validation_start", table=False)
    run_validate(tmp_path, module, realign)
    state = get_state(module)
    adapter = get_adapter(dense)
    names = list(attention_linears(adapter, [0, 1]))
    u_rows = reference_scaler_rows(dense, names, batches(module, "utility"))
    s_rows = reference_scaler_rows(dense, names, batches(module, "safety"))
    modules = dict(dense.named_modules())
    pruned_model = dict(module.model.named_modules())
    total = 0
    for name in names:
        layer, role, _ = attention_linears(adapter)[name]
        w = modules[name].weight.detach().double()
        u = w.abs() * u_rows[name].sqrt()
        s = w.abs() * s_rows[name].sqrt()
        pruned = state.pruned[name]
        kept = pruned.numel() - int(pruned.sum())  # p: auto puts exactly the kept count in T^u(p)
        heads = [int(k.split("-")[1]) for k in HEADS if int(k.split("-")[0]) == layer]
        geo = adapter.geometry(layer)
        region = slice_set(role, tuple(w.shape), geo.head_dim, geo.group_size, heads)
        want = ((top_set(s, 0.5) & top_set(u, 0.7)) - top_set(u, count=kept)) & set(pruned.flatten().nonzero().flatten().tolist()) & region
        got = set(state.restored[name].flatten().nonzero().flatten().tolist())
        assert got == want, name
        total += len(got)
        # restored entries carry their dense values; every other entry is exactly as the pruner left it
        now = pruned_model[name].weight.detach()
        restored = state.restored[name]
        assert torch.equal(now[restored], modules[name].weight.detach()[restored])
        assert bool((now[pruned & ~restored] == 0).all())
    assert total > 0 and realign.report["restored_params"] == total
    # MLP weights are never restored: they stay exactly pruned.
    for name, mask in state.pruned.items():
        if ".mlp." in name:
            assert name not in state.restored
            assert bool((pruned_model[name].weight.detach()[mask] == 0).all())


def test_restoring_again_changes_nothing(tmp_path):
    from hsr_pl.realign import realign_model

    seen = {}

    class Keep(SafetyRealignment):
        def run(self, trainer, pl_module):
            seen["dense"] = self.dense
            super().run(trainer, pl_module)

    module = make_module()
    realign = Keep(heads=HEADS, num_samples=8, when="validation_start", table=False)
    run_validate(tmp_path, module, realign)
    assert realign.report["restored_params"] > 0
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    restored = {k: v.clone() for k, v in get_state(module).restored.items()}
    # The same rule, heads and dense statistics a second time: nothing left to restore.
    again = realign_model(module.model, get_adapter(module.model), get_state(module), realign.config,
                          realign.result.heads, dense=seen["dense"])
    assert again.restored == 0
    assert all(torch.equal(v, before[k]) for k, v in module.model.state_dict().items())
    assert all(torch.equal(get_state(module).restored[k], v) for k, v in restored.items())


def test_heads_come_from_head_attribution_before_pruning(tmp_path):
    """One head (so one of the two layers): every restored entry sits in that head's slices, and
    the other layer's attention projections stay exactly as the pruner left them."""
    module = make_module()
    attribution = SafetyHeadAttribution(num_samples=2, top_h=1, when="validation_start", heatmap=False)
    pruning = Pruning(num_samples=8, when="validation_start")
    realign = SafetyRealignment(num_samples=8, when="validation_start", table=False)
    seen = {}

    class Snapshot(pl.Callback):
        def on_validation_start(self, trainer, pl_module):  # runs after the pruner, before realignment
            seen.update({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

    trainer = make_trainer(tmp_path, [attribution, pruning, Snapshot(), realign])
    trainer.validate(module, datamodule=make_data(module), verbose=False)
    assert [tuple(h) for h in realign.report["heads"]] == attribution.top and len(attribution.top) == 1
    state = get_state(module)
    assert state.realignment["restored_params"] == realign.report["restored_params"] > 0
    adapter = get_adapter(module.model)
    (layer, head), = attribution.top
    geo = adapter.geometry(layer)
    for name, (lin_layer, role, linear) in attention_linears(adapter).items():
        restored = state.restored.get(name)
        if lin_layer != layer:
            assert restored is None or not bool(restored.any()), name
            assert torch.equal(linear.weight.detach(), seen[f"{name}.weight"]), f"{name}: the other layer changed"
            continue
        got = set(restored.flatten().nonzero().flatten().tolist()) if restored is not None else set()
        assert got <= slice_set(role, tuple(linear.weight.shape), geo.head_dim, geo.group_size, [head]), name


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(p=0.9), "p=0.9"),
    (dict(top_h=-1), "top_h=-1"),
    (dict(heads=["0-1"], heads_path="x.json"), "not both"),
    (dict(heads_path="/nonexistent/heads.json", top_h=2), "does not exist"),
    (dict(output="report.txt"), "must be a .json"),
    (dict(safety_calibration="harmful"), "safety_calibration='harmful'"),
    (dict(num_samples=0), "num_samples=0"),
    (dict(when="test_start"), r"SafetyRealignment\(when='test_start'\)"),
    (dict(heads=["zero-one"]), "not of the form"),
])
def test_bad_arguments_fail_in_init(kwargs, match):
    with pytest.raises((RealignConfigError, ValueError), match=match):
        SafetyRealignment(**kwargs)


def test_wrong_order_and_missing_inputs_are_named(tmp_path):
    module = make_module()
    realign = SafetyRealignment(heads=HEADS, num_samples=8, when="validation_start", table=False)
    trainer = make_trainer(tmp_path, [realign, Pruning(num_samples=8, when="validation_start")])
    with pytest.raises(RealignInputError, match="comes before the pruner"):
        trainer.validate(module, datamodule=make_data(module), verbose=False)
    module = make_module()
    trainer = make_trainer(tmp_path, [SafetyRealignment(heads=HEADS, when="validation_start")])
    with pytest.raises(RealignInputError, match="has no pruner before it"):
        trainer.validate(module, datamodule=make_data(module), verbose=False)
    module = make_module()
    with pytest.raises(RealignInputError, match="has no heads"):
        run_validate(tmp_path, module, SafetyRealignment(num_samples=8, when="validation_start"))
    module = make_module()
    with pytest.raises(RealignInputError, match=r"head 5-0 does not exist"):
        run_validate(tmp_path, module, SafetyRealignment(heads=["5-0"], num_samples=8, when="validation_start"))


def untouched(module: LVLMModule, before: dict) -> bool:
    return not get_state(module).pruned and all(torch.equal(v, before[k]) for k, v in module.model.state_dict().items())


@pytest.mark.parametrize("case", ["head-range", "structure", "originals", "output"])
def test_refusals_come_before_any_weight_changes(tmp_path, case):
    module = make_module()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    pruning, kwargs, error, match = Pruning(num_samples=8, when="validation_start"), {}, RealignInputError, None
    if case == "head-range":
        kwargs, match = dict(heads=["0-9"]), "head 0-9 does not exist"
    elif case == "structure":
        kwargs, error, match = dict(preserve_structure=True), RealignConfigError, "Pruning is unstructured"
    elif case == "originals":
        pruning = Pruning(num_samples=8, keep_originals=[r"\.mlp\."], when="validation_start")
        match = r"Pruning keeps no original values of 8 attention projection\(s\)"
    else:
        (tmp_path / "file").write_text("x")
        kwargs, error, match = dict(output=str(tmp_path / "file" / "report.json")), ValueError, "file"
    realign = SafetyRealignment(heads=kwargs.pop("heads", HEADS), num_samples=8, when="validation_start", table=False,
                                **kwargs)
    with pytest.raises(error, match=match):
        run_validate(tmp_path, module, realign, pruning)
    assert untouched(module, before) and realign.dense is None


@pytest.mark.parametrize(("method", "want"), [("magnitude", "wanda"), ("wanda", "wanda"), ("snip", "snip")])
def test_importance_auto_is_the_pruning_method(tmp_path, method, want):
    realign = SafetyRealignment(heads=HEADS, num_samples=8, when="validation_start", table=False)
    assert realign.settings()["importance_setting"] == "auto"
    run_validate(tmp_path, make_module(), realign, Pruning(method=method, num_samples=8, when="validation_start"))
    assert realign.config.importance == want == realign.report["importance"]
    explicit = SafetyRealignment(heads=HEADS, importance="magnitude", num_samples=8, when="validation_start", table=False)
    run_validate(tmp_path, make_module(), explicit, Pruning(method=method, num_samples=8, when="validation_start"))
    assert explicit.config.importance == "magnitude"


def test_sparsegpt_scores_use_the_dense_copy(tmp_path, monkeypatch):
    module = make_module()
    dense = copy.deepcopy(module.model)
    seen = {}

    class Spy(SafetyRealignment):
        def run(self, trainer, pl_module):
            seen["dense"] = {k: v.clone() for k, v in self.dense.dense.items()}
            super().run(trainer, pl_module)

    import hsr_pl.realign.runner as runner

    planned = {}
    plan = runner.plan_restoration

    def spy_plan(views, *args, **kwargs):
        planned.update({v.name: v.dense.clone() for v in views})
        return plan(views, *args, **kwargs)

    monkeypatch.setattr(runner, "plan_restoration", spy_plan)
    realign = Spy(heads=HEADS, num_samples=8, when="validation_start", table=False)
    run_validate(tmp_path, module, realign, Pruning(method="sparsegpt", num_samples=8, when="validation_start"))
    modules = dict(dense.named_modules())
    pruned = dict(module.model.named_modules())
    assert seen["dense"] and all(torch.equal(v, modules[k].weight.detach()) for k, v in seen["dense"].items())
    # The planner scored the dense weights, not SparseGPT's updated kept weights.
    assert set(planned) == set(seen["dense"])
    for name, weight in planned.items():
        assert torch.equal(weight, modules[name].weight.detach().float()), name
        kept = ~get_state(module).pruned[name]
        assert not torch.equal(weight[kept], pruned[name].weight.detach().float()[kept]), name
    assert realign.report["restored_params"] > 0


def test_wanda_needs_no_dense_copy(tmp_path):
    seen = {}

    class Spy(SafetyRealignment):
        def run(self, trainer, pl_module):
            seen["copies"] = dict(self.dense.dense)
            seen["stats"] = sorted(self.dense.utility)
            super().run(trainer, pl_module)

    realign = Spy(heads=HEADS, num_samples=8, when="validation_start", table=False)
    run_validate(tmp_path, make_module(), realign)
    # Wanda keeps kept weights as they were: the dense values come from HSRState's originals.
    assert seen["copies"] == {} and len(seen["stats"]) == 8  # q/k/v/o of the two layers holding heads
    assert realign.report["restored_params"] > 0 and realign.dense is None


# ------------------------------------------------------------------------------- gradient
def test_refusal_gradient_matches_central_finite_differences():
    module = make_module(dtype=torch.float64)
    model = module.model.eval()
    data = [{k: (v.double() if v.is_floating_point() else v) for k, v in b.items()} for b in batches(module, "safety", 3)]
    adapter = get_adapter(model)
    name = next(iter(attention_linears(adapter, [0])))
    linear = dict(model.named_modules())[name]
    grads, used = loss_gradients(model, data, {name: linear})
    assert used == 3

    def loss() -> float:
        # The response NLL in float64 (HF's own loss upcasts logits to float32 only).
        with torch.no_grad():
            total = 0.0
            for b in data:
                logits = model(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False).logits.double()
                labels = b["labels"][:, 1:]
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                keep = labels != -100
                total += float(-logp[keep].gather(1, labels[keep].unsqueeze(1)).mean())
            return total

    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        i, j = (int(torch.randint(0, s, (1,), generator=g)) for s in linear.weight.shape)
        eps = 3e-3  # the eager attention's softmax runs in float32: smaller steps drown in its rounding
        with torch.no_grad():
            linear.weight[i, j] += eps
            up = loss()
            linear.weight[i, j] -= 2 * eps
            down = loss()
            linear.weight[i, j] += eps
        assert grads[name][i, j].item() == pytest.approx((up - down) / (2 * eps), rel=2e-2, abs=2e-6)


@pytest.mark.parametrize("rounds", [1, 3])
def test_gradient_order_restores_exactly_the_budget(tmp_path, rounds):
    module = make_module()
    realign = SafetyRealignment(heads=HEADS, order="gradient", budget=25, rounds=rounds, num_samples=8,
                                when="validation_start", table=False)
    run_validate(tmp_path, module, realign)
    state = get_state(module)
    assert sum(int(m.sum()) for m in state.restored.values()) == 25 == realign.report["restored_params"]
    assert realign.report["rounds"] == ([25] if rounds == 1 else [9, 8, 8])


def test_gradient_first_round_takes_the_largest_first_order_gains(tmp_path):
    module = make_module()
    realign = SafetyRealignment(heads=HEADS, order="gradient", budget=10, num_samples=8, when="validation_start",
                                table=False)
    pruner = Pruning(num_samples=8, when="validation_start")
    trainer = make_trainer(tmp_path, [pruner])
    trainer.validate(module, datamodule=make_data(module), verbose=False)
    state = get_state(module)
    adapter = get_adapter(module.model)
    names = list(attention_linears(adapter, [0, 1]))
    modules = dict(module.model.named_modules())
    with torch.inference_mode(False):
        grads, used = loss_gradients(module.model, batches(module, "safety"), {n: modules[n] for n in names})
    entries = []
    for name in names:
        layer, role, _ = attention_linears(adapter)[name]
        geo = adapter.geometry(layer)
        heads = [int(k.split("-")[1]) for k in HEADS if int(k.split("-")[0]) == layer]
        region = slice_set(role, tuple(state.pruned[name].shape), geo.head_dim, geo.group_size, heads)
        dense = state.original_weight(name, modules[name].weight.detach()).flatten()
        for idx in set(state.pruned[name].flatten().nonzero().flatten().tolist()) & region:
            entries.append((-float(grads[name].flatten()[idx]) / used * float(dense[idx]), names.index(name), idx))
    want = {(names[i], idx) for _, i, idx in sorted(entries, key=lambda e: (-e[0], e[1], e[2]))[:10]}
    trainer = make_trainer(tmp_path, [pruner, realign])  # pruner is done: realign on the pruned model
    realign.dense = None
    trainer.validate(module, datamodule=make_data(module), verbose=False)
    got = {(n, i) for n, m in state.restored.items() for i in m.flatten().nonzero().flatten().tolist()}
    assert got == want


def test_preserve_structure_after_2_4_pruning(tmp_path):
    module = make_module()
    realign = SafetyRealignment(heads=HEADS, preserve_structure=True, num_samples=8, when="validation_start", table=False)
    run_validate(tmp_path, module, realign, Pruning(mask_structure="2:4", num_samples=8, when="validation_start"))
    assert realign.report["restored_params"] > 0
    assert realign.report["swapped_out_params"] == realign.report["restored_params"]
    for name, lin in dict(module.model.named_modules()).items():
        if name in get_state(module).pruned:
            w = lin.weight.detach()
            groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
            assert bool((groups <= 2).all()), name
            keep = get_state(module).keep_mask(name)
            assert bool((keep.reshape(w.shape[0], -1, 4).sum(-1) == 2).all()), name


@pytest.mark.parametrize("rounds", [1, 3])
def test_gradient_order_with_preserve_structure_stays_exactly_2_4(tmp_path, rounds):
    """The gradient order (one round, or three with the gradient recomputed) under
    preserve_structure: the budget is restored, as many kept weights are swapped out, restored
    entries carry their dense values and stay non-zero, swapped-out ones are zero, nothing else
    changes, and every group of 4 holds exactly 2."""
    module = make_module()
    dense = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    realign = SafetyRealignment(heads=HEADS, order="gradient", budget=12, rounds=rounds, preserve_structure=True,
                                num_samples=8, when="validation_start", table=False)
    seen = {}

    class Snapshot(pl.Callback):
        def on_validation_start(self, trainer, pl_module):  # after the pruner, before realignment
            seen.update({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})
            seen["pruned"] = {k: v.clone() for k, v in get_state(pl_module).pruned.items()}

    pruning = Pruning(mask_structure="2:4", num_samples=8, when="validation_start")
    trainer = make_trainer(tmp_path, [pruning, Snapshot(), realign])
    trainer.validate(module, datamodule=make_data(module), verbose=False)
    state = get_state(module)
    assert realign.report["restored_params"] == 12 == sum(int(m.sum()) for m in state.restored.values())
    assert realign.report["swapped_out_params"] == 12 and realign.report["rounds"] == ([12] if rounds == 1 else [4, 4, 4])
    for name, lin in dict(module.model.named_modules()).items():
        if name not in state.pruned:
            continue
        w = lin.weight.detach()
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()), name
        assert bool((state.keep_mask(name).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()), name
        restored = state.restored.get(name, torch.zeros_like(state.pruned[name]))
        assert torch.equal(w[restored], dense[f"{name}.weight"][restored]), name
        assert bool((w[restored] != 0).all()), f"{name}: a restored entry was swapped out again"
        # swapped out (a later round may restore one again: its gain counts like any pruned entry's)
        swapped = state.pruned[name] & ~seen["pruned"][name]
        assert bool((w[swapped & ~restored] == 0).all()), name
        untouched = ~restored & ~swapped
        assert torch.equal(w[untouched], seen[f"{name}.weight"][untouched]), name


def test_preserve_structure_refuses_unstructured_masks(tmp_path):
    with pytest.raises(RealignConfigError, match="needs N:M masks"):
        run_validate(tmp_path, make_module(), SafetyRealignment(heads=HEADS, preserve_structure=True, num_samples=8,
                                                                 when="validation_start"))


# ------------------------------------------------------------------------ fit and resume
class CountRuns:
    def __init__(self, monkeypatch) -> None:
        import hsr_pl.callbacks.realignment as realignment_module

        self.calls = 0
        real = realignment_module.realign_model

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(realignment_module, "realign_model", counting)


def test_fit_keeps_restored_weights_free_and_resumes_without_realigning(tmp_path, monkeypatch):
    counter = CountRuns(monkeypatch)
    module = make_module(lr=0.05)
    pruning = Pruning(num_samples=8, when="fit_start")
    realign = SafetyRealignment(heads=HEADS, num_samples=8, when="fit_start", table=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = make_trainer(tmp_path, [pruning, realign, ckpt], enable_checkpointing=True, max_steps=3,
                           limit_train_batches=3)
    trainer.fit(module, datamodule=make_data(module))
    state = get_state(module)
    restored = {k: v.clone() for k, v in state.restored.items()}
    assert counter.calls == 1 and sum(int(m.sum()) for m in restored.values()) > 0
    modules = dict(module.model.named_modules())
    for name in state.pruned:
        w = modules[name].weight.detach()
        assert bool((w[~state.keep_mask(name)] == 0).all()), name
        if name in restored:
            assert bool((w[restored[name]] != 0).all()), f"{name}: a restored weight was masked"
    report = dict(realign.report)
    resumed = make_module(lr=0.05)
    again = SafetyRealignment(heads=HEADS, num_samples=8, when="fit_start", table=False)
    trainer = make_trainer(tmp_path, [Pruning(num_samples=8, when="fit_start"), again], max_steps=5, limit_train_batches=5)
    trainer.fit(resumed, datamodule=make_data(resumed), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert counter.calls == 1 and again.done
    assert get_state(resumed).realignment["restored_params"] == report["restored_params"]
    assert all(torch.equal(get_state(resumed).restored[k], v) for k, v in restored.items())
    changed = SafetyRealignment(heads=HEADS, budget=5, num_samples=8, when="fit_start")
    trainer = make_trainer(tmp_path, [Pruning(num_samples=8, when="fit_start"), changed], max_steps=5)
    with pytest.raises(ValueError, match=r"budget: None there -> 5 now"):
        trainer.fit(make_module(), datamodule=make_data(resumed), ckpt_path=tmp_path / "ckpt" / "last.ckpt")


def test_report_file_and_ratios(tmp_path):
    module = make_module()
    out = tmp_path / "out" / "realignment.json"
    realign = SafetyRealignment(heads=HEADS, num_samples=8, when="validation_start", table=False, output=str(out))
    run_validate(tmp_path, module, realign)
    import json

    report = json.loads(out.read_text())
    lm = sum(p.numel() for p in module.model.model.language_model.parameters()) + module.model.lm_head.weight.numel()
    assert report["lm_params"] == lm
    assert report["pruned_params"] == sum(int(m.sum()) for m in get_state(module).pruned.values())
    assert math.isclose(report["restored_ratio_lm"], report["restored_params"] / lm)
    assert sum(m["restored"] for m in report["modules"].values()) == report["restored_params"]
    assert sum(report["per_head_q_o"].values()) + sum(report["per_kv_group_k_v"].values()) == report["restored_params"]
    assert set(report["per_head_q_o"]) <= {"0-1", "1-2"}
    assert report["calibration"]["utility_samples"] == 8


def test_export_writes_the_manifest_and_reloads_with_plain_transformers(tmp_path):
    import json

    from transformers import AutoModelForImageTextToText

    from hsr_pl.callbacks import ExportPretrained

    module = make_module()
    attribution = SafetyHeadAttribution(num_samples=2, top_h=2, when="validation_start", heatmap=False)
    callbacks = [attribution, Pruning(num_samples=8, when="validation_start"),
                 SafetyRealignment(num_samples=8, budget=30, when="validation_start", table=False),
                 ExportPretrained(str(tmp_path / "realigned"), when="validation_end")]
    make_trainer(tmp_path, callbacks).validate(module, datamodule=make_data(module), verbose=False)
    folder = tmp_path / "realigned"
    manifest = json.loads((folder / "realignment.json").read_text())
    assert manifest["restored"]["params"] == 30 == sum(manifest["restored"]["per_module"].values())
    after = manifest["pruning"].pop("after_restoring")
    assert manifest["pruning"] == {"method": "wanda", "sparsity": 0.5, "structure": None, "checkpoint": None}
    assert after["sparsity"] == (after["target_params"] * 0.5 - manifest["restored"]["params"]) / after["target_params"]
    assert [[h["layer"], h["head"]] for h in manifest["heads"]] == [list(p) for p in attribution.top]
    assert all(h["score"] == attribution.scores[f"{h['layer']}-{h['head']}"] for h in manifest["heads"])
    assert manifest["rule"] == {"p": "auto", "q": 0.5, "max_p": 0.7, "top_h": len(attribution.top), "selection": "head",
                                "importance": "wanda"}
    assert manifest["budget"]["count"] == 30 and manifest["calibration"]["num_samples"] == 8
    assert manifest["restored"]["ratio_of_language_model_params"] == pytest.approx(30 / manifest["restored"]["lm_params"])
    assert manifest["hsr_pl_version"] and manifest["model"]["model_type"] == "llava"
    reloaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    batch = batches(module, "safety", 1)[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, module.model.eval()(**inputs).logits, rtol=0, atol=0)
    exported = dict(reloaded.named_modules())
    for name in get_state(module).pruned:
        keep = get_state(module).keep_mask(name)
        assert bool((exported[name].weight[~keep] == 0).all())
