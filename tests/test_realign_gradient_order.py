"""The gradient order against a float64 reference written here: the refusal loss is one
token-weighted mean over every response token (batch 1, 2 and 3 give the same gradient when the
refusals differ in length), rounds recompute the gradient after each round's restore, and
``utility_weight > 0`` moves the order the way the utility-weighted gain says."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from unequal_calibration import write_unequal_set

import hsr_pl.realign.runner as runner
from hsr_pl.callbacks import Pruning, SafetyRealignment
from hsr_pl.data import VLGuardDataModule
from hsr_pl.models import get_adapter
from hsr_pl.models.tiny import build_tiny_llava
from hsr_pl.module import LVLMModule
from hsr_pl.realign import RealignConfig, attention_linears, realign_model, refusal_gradients
from hsr_pl.state import get_state

HEADS = [(0, 1), (1, 2)]


def make_module() -> LVLMModule:
    torch.manual_seed(0)
    model, processor = build_tiny_llava(False, layers=2, heads=4)
    return LVLMModule(model.to(torch.float64), processor=processor, max_new_tokens=1)


def make_data(module: LVLMModule, path: Path) -> VLGuardDataModule:
    eval_sets = [{"name": "utility", "path": str(path), "split": "utility", "kind": "utility", "num_samples": 1}]
    return VLGuardDataModule(train_path=str(path), eval_sets=eval_sets, eval_batch_size=1,
                             processor=module.processor, num_samples=7)


def batches(module, path, split="safety", batch_size=1, n=7) -> list[dict[str, torch.Tensor]]:
    loader = make_data(module, path).calibration_dataloader(split, n, with_response=True, batch_size=batch_size)
    out = []
    for b in loader:
        out.append({k: (v.double() if v.is_floating_point() else v) for k, v in b.items() if isinstance(v, torch.Tensor)})
    return out


def pruned_module(tmp_path, path: Path, **pruning) -> LVLMModule:
    module = make_module()
    kwargs = {**dict(method="wanda", sparsity=0.5, num_samples=7, when="validation_start"), **pruning}
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         default_root_dir=tmp_path, callbacks=[Pruning(**kwargs)])
    trainer.validate(module, datamodule=make_data(module, path), verbose=False)
    assert get_state(module).pruned
    return module


# ------------------------------------------------------------------------------- reference
def reference_gradient(model: nn.Module, samples, names) -> dict[str, torch.Tensor]:
    """∂/∂W of (Σ over every response token of −log p(token)) / (number of those tokens), float64,
    from the logits of one sample at a time (no HF loss, no batching)."""
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in names]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    total, tokens = 0.0, 0
    with torch.enable_grad():
        for b in samples:
            assert b["input_ids"].shape[0] == 1
            logits = model(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False).logits.double()
            labels = b["labels"][:, 1:]
            keep = labels != -100
            logp = torch.log_softmax(logits[:, :-1], dim=-1)[keep]
            total = total - logp.gather(1, labels[keep].unsqueeze(1)).sum()
            tokens += int(keep.sum())
        grads = torch.autograd.grad(total / tokens, weights)
    for w, flag in zip(weights, flags):
        w.requires_grad_(flag)
    return {n: g.detach().double() for n, g in zip(names, grads)}


def region(adapter, name: str, heads) -> set[int]:
    """Flat indices of the selected heads' slices in ``name`` (rows of q/k/v, columns of o)."""
    layer, role, linear = attention_linears(adapter)[name]
    geo = adapter.geometry(layer)
    rows, cols = linear.weight.shape
    mine = [h for l_, h in heads if l_ == layer]
    out = set()
    for r in range(rows):
        for c in range(cols):
            for h in mine:
                kv = h // geo.group_size
                if (role == "q" and r // geo.head_dim == h) or (role in "kv" and r // geo.head_dim == kv) or (
                    role == "o" and c // geo.head_dim == h
                ):
                    out.add(r * cols + c)
    return out


def reference_gains(module, grads, names, heads, skip=frozenset(), utility=None, weight=0.0, state=None):
    """[(gain, name, flat index)] of every restorable entry: −g·w_orig (− λ·g^u·w_orig), float64."""
    state = state if state is not None else get_state(module)
    adapter = get_adapter(module.model)
    modules = dict(module.model.named_modules())
    out = []
    for name in names:
        dense = state.original_weight(name, modules[name].weight.detach()).double().flatten()
        g = grads[name].flatten()
        gu = utility[name].flatten() if utility is not None else None
        for idx in sorted(set(state.pruned[name].flatten().nonzero().flatten().tolist()) & region(adapter, name, heads)):
            if (name, idx) in skip:
                continue
            gain = -float(g[idx]) * float(dense[idx])
            if gu is not None:
                gain -= weight * float(gu[idx]) * float(dense[idx])
            out.append((gain, name, idx))
    return sorted(out, key=lambda e: (-e[0], names.index(e[1]), e[2]))


def top(entries, k) -> set[tuple[str, int]]:
    # a gap at the cut keeps the float32 method and the float64 reference from disagreeing on a tie
    assert entries[k - 1][0] - entries[k][0] > 1e-3 * abs(entries[0][0]), "near-tie at the cut: change k"
    return {(n, i) for _, n, i in entries[:k]}


def spy_plans(monkeypatch) -> list[dict]:
    """Records the gradients each planning call gets and the entries it picks."""
    calls: list[dict] = []
    plan = runner.plan_restoration

    def spy(views, *args, **kwargs):
        plans = plan(views, *args, **kwargs)
        calls.append({
            "grads": {k: v.clone() for k, v in (kwargs.get("grads") or {}).items()},
            "utility_grads": {k: v.clone() for k, v in (kwargs.get("utility_grads") or {}).items()},
            "picks": {(p.name, i) for p in plans for i in p.restore.flatten().nonzero().flatten().tolist()},
        })
        return plans

    monkeypatch.setattr(runner, "plan_restoration", spy)
    return calls


def names_of(module, heads=HEADS) -> list[str]:
    adapter = get_adapter(module.model)
    state = get_state(module)
    return [n for n in attention_linears(adapter, sorted({l_ for l_, _ in heads})) if n in state.pruned]


# ------------------------------------------------------------------------------- item 11
def test_refusal_gradient_is_one_token_weighted_mean_for_any_batch_size(tmp_path, monkeypatch):
    """Batch 1, 2 and 3 over refusals of unequal length: the gradient realign_model plans with is
    the float64 gradient of Σ token NLL / total tokens (a mean of per-batch means is off by %)."""
    path = write_unequal_set(tmp_path)
    module = pruned_module(tmp_path, path)
    names = names_of(module)
    singles = batches(module, path)
    lengths = {int((b["labels"] != -100).sum()) for b in singles}
    assert len(lengths) >= 4, "the refusals must differ in length"
    want = reference_gradient(module.model, singles, names)
    cfg = RealignConfig(order="gradient", budget=3)
    for size in (1, 2, 3):
        calls = spy_plans(monkeypatch)
        work = copy.deepcopy(module)
        data = batches(work, path, batch_size=size)
        assert len(data) == {1: 7, 2: 4, 3: 3}[size]
        realign_model(work.model, get_adapter(work.model), get_state(work), cfg, HEADS, safety_batches=data)
        got = calls[0]["grads"]
        for name in names:
            scale = want[name].abs().max()
            assert float((got[name].double() - want[name]).abs().max()) <= 1e-4 * float(scale), (size, name)
    # the public function: the same gradient and the global token count
    grads, tokens = refusal_gradients(module.model, batches(module, path, batch_size=2),
                                      {n: dict(module.model.named_modules())[n] for n in names})
    assert tokens == sum(int((b["labels"][:, 1:] != -100).sum()) for b in singles)
    assert all(torch.allclose(grads[n].double(), want[n], rtol=0, atol=1e-4 * float(want[n].abs().max())) for n in names)


# ------------------------------------------------------------------------------- item 10
def test_second_round_takes_the_top_gains_recomputed_after_the_first(tmp_path, monkeypatch):
    """Round 2 picks the top gains of the gradient at the model *after* round 1's restore (float64
    reference); the continuation of round 1's order would pick differently here."""
    path = write_unequal_set(tmp_path)
    module = pruned_module(tmp_path, path)
    names = names_of(module)
    singles = batches(module, path)
    k = 12  # here 3 of round 2's 12 picks differ from ranks 13-24 of round 1's order
    # reference round 1 at the pruned model
    first_entries = reference_gains(module, reference_gradient(module.model, singles, names), names, HEADS)
    first = top(first_entries, k)
    # restore round 1 in a copy, recompute the gradient there, take the top k of the rest
    after = copy.deepcopy(module)
    modules = dict(after.model.named_modules())
    state = get_state(after)
    with torch.no_grad():
        for name in names:
            dense = state.original_weight(name, modules[name].weight.detach())
            for n_, idx in first:
                if n_ == name:
                    modules[name].weight.view(-1)[idx] = dense.view(-1)[idx]
    second_entries = reference_gains(after, reference_gradient(after.model, singles, names), names, HEADS, skip=first)
    second = top(second_entries, k)
    stale = {(n, i) for _, n, i in first_entries[k: 2 * k]}
    assert second != stale, "round 1's order already gives round 2's picks here: the test could not fail"

    calls = spy_plans(monkeypatch)
    cfg = RealignConfig(order="gradient", budget=2 * k, rounds=2)
    result = realign_model(module.model, get_adapter(module.model), get_state(module), cfg, HEADS, safety_batches=singles)
    assert result.rounds == [k, k] and len(calls) == 2
    assert calls[0]["picks"] == first
    assert calls[1]["picks"] == second


# ------------------------------------------------------------------------ utility_weight > 0
def test_utility_weight_moves_the_order_as_the_weighted_gain_says(tmp_path, monkeypatch):
    """λ > 0 restores the top entries of −g·w − λ·g^u·w (float64 reference, g^u the gradient of the
    benign answers' loss), which differ from λ = 0's picks: entries that would raise the utility
    loss drop out."""
    path = write_unequal_set(tmp_path)
    module = pruned_module(tmp_path, path)
    names = names_of(module)
    safety = batches(module, path)
    utility = batches(module, path, split="utility")
    g = reference_gradient(module.model, safety, names)
    gu = reference_gradient(module.model, utility, names)
    k, weight = 8, 2.0
    plain = top(reference_gains(module, g, names, HEADS), k)
    weighted_entries = reference_gains(module, g, names, HEADS, utility=gu, weight=weight)
    weighted = top(weighted_entries, k)
    assert plain != weighted, "λ does not change the order here: the test could not fail"
    # the expected direction: the utility-loss rise g^u·w of the picks falls
    rise = {(n, i): float(gu[n].flatten()[i]) * float(get_state(module).original_weight(
        n, dict(module.model.named_modules())[n].weight.detach()).double().flatten()[i]) for _, n, i in weighted_entries}
    assert sum(rise[e] for e in weighted) < sum(rise[e] for e in plain)

    for lam, want in ((0.0, plain), (weight, weighted)):
        work = copy.deepcopy(module)
        calls = spy_plans(monkeypatch)
        cfg = RealignConfig(order="gradient", budget=k, utility_weight=lam)
        realign_model(work.model, get_adapter(work.model), get_state(work), cfg, HEADS,
                      safety_batches=batches(work, path), utility_batches=batches(work, path, split="utility"))
        assert calls[0]["picks"] == want, lam
        # and the restored weights carry their original values
        state = get_state(work)
        modules = dict(work.model.named_modules())
        for name, mask in state.restored.items():
            dense = state.original_weight(name, modules[name].weight.detach())
            assert torch.equal(modules[name].weight.detach()[mask], dense[mask])


def test_utility_weight_through_the_callback(tmp_path):
    """The same through Pruning → SafetyRealignment(utility_weight=2) in one Trainer: the restored
    set is the top of the utility-weighted float64 gain at the pruned model, not λ = 0's."""
    path = write_unequal_set(tmp_path)
    module = make_module()
    saved = {}

    class Snapshot(pl.Callback):
        def on_validation_start(self, trainer, pl_module):  # after the pruner, before realignment
            saved["weights"] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
            saved["state"] = copy.deepcopy(get_state(pl_module))

    realign = SafetyRealignment(heads=["0-1", "1-2"], order="gradient", budget=8, utility_weight=2.0, num_samples=7,
                                when="validation_start", table=False)
    pruning = Pruning(method="wanda", sparsity=0.5, num_samples=7, when="validation_start")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         default_root_dir=tmp_path, callbacks=[pruning, Snapshot(), realign])
    trainer.validate(module, datamodule=make_data(module, path), verbose=False)
    reference = make_module()
    reference.model.load_state_dict(saved["weights"])
    state = saved["state"]
    names = [n for n in attention_linears(get_adapter(reference.model), [0, 1]) if n in state.pruned]
    g = reference_gradient(reference.model, batches(reference, path), names)
    gu = reference_gradient(reference.model, batches(reference, path, split="utility"), names)
    weighted = top(reference_gains(reference, g, names, HEADS, utility=gu, weight=2.0, state=state), 8)
    plain = top(reference_gains(reference, g, names, HEADS, state=state), 8)
    got = {(n, i) for n, m in get_state(module).restored.items() for i in m.flatten().nonzero().flatten().tolist()}
    assert got == weighted != plain


@pytest.mark.parametrize("size", [2, 3])
def test_utility_gradient_is_batch_invariant_too(tmp_path, monkeypatch, size):
    path = write_unequal_set(tmp_path)
    module = pruned_module(tmp_path, path)
    names = names_of(module)
    want = reference_gradient(module.model, batches(module, path, split="utility"), names)
    calls = spy_plans(monkeypatch)
    cfg = RealignConfig(order="gradient", budget=2, utility_weight=1.0)
    realign_model(module.model, get_adapter(module.model), get_state(module), cfg, HEADS,
                  safety_batches=batches(module, path, batch_size=size),
                  utility_batches=batches(module, path, split="utility", batch_size=size))
    got = calls[0]["utility_grads"]
    for name in names:
        assert float((got[name].double() - want[name]).abs().max()) <= 1e-4 * float(want[name].abs().max()), name
