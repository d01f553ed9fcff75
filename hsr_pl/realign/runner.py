"""Realign a pruned model in place: the one entry point the Lightning callback needs.

:func:`dense_pass` measures what the rule needs on the *still-dense* model (importance statistics,
and a copy of the dense weights when the pruner also moves kept weights, as SparseGPT does);
:func:`realign_model` then builds the plan (:mod:`hsr_pl.realign.plan`), writes the original
dense values back into the chosen pruned entries, and records everything in
:class:`hsr_pl.state.HSRState`. Model structure comes from the adapter; no model-family ``if``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hsr_pl.distributed import full_tensor, full_weight, write_full
from hsr_pl.models.adapters import ModelAdapter
from hsr_pl.pruning.errors import CalibrationError
from hsr_pl.state import HSRState, head_key

from .config import RealignConfig
from .errors import RealignInputError
from .importance import ImportanceStat, collect_importance, refusal_gradients, refusal_nll
from .plan import LinearPlan, LinearView, plan_restoration
from .select import resolve_budget
from .slices import entry_heads

__all__ = [
    "DenseMeasurement",
    "RealignResult",
    "RealignSession",
    "attention_linears",
    "dense_pass",
    "language_model_parameters",
    "realign_model",
    "restore_masks",
    "round_sizes",
]

Reduce = Callable[[Tensor], Tensor]
Batches = Iterable[Mapping[str, Tensor]]


@dataclass
class DenseMeasurement:
    """Importance statistics of the dense model (and dense weights where the pruner moves them)."""

    importance: str
    utility: dict[str, ImportanceStat] = field(default_factory=dict)
    safety: dict[str, ImportanceStat] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)
    utility_samples: int = 0
    safety_samples: int = 0

    def statistic_bytes(self) -> int:
        return sum(s.nbytes() for s in self.utility.values()) + sum(s.nbytes() for s in self.safety.values())


@dataclass
class RealignResult:
    """What realignment did: per-module plans and the counts the report and manifest show."""

    plans: dict[str, LinearPlan]
    heads: list[tuple[int, int]]
    lm_params: int
    pruned_params: int
    budget: int | None
    rounds: list[int] = field(default_factory=list)

    @property
    def restored(self) -> int:
        return sum(int(p.restore.sum()) for p in self.plans.values())

    @property
    def swapped(self) -> int:
        return sum(int(p.swap.sum()) for p in self.plans.values() if p.swap is not None)

    def summary(self) -> dict:
        """JSON-able counts: per module, per head, and the two ratios (named as such)."""
        modules = {
            name: {
                "restored": int(plan.restore.sum()),
                "swapped_out": int(plan.swap.sum()) if plan.swap is not None else 0,
                "pool": plan.pool,
                "rule_candidates": plan.candidates,
                "p": plan.p,
                **plan.info,
            }
            for name, plan in self.plans.items()
        }
        per_head: dict[str, int] = {}
        per_kv_group: dict[str, int] = {}
        for plan in self.plans.values():
            for key, count in plan.info.get("heads", {}).items():
                per_head[key] = per_head.get(key, 0) + count
            for key, count in plan.info.get("kv_groups", {}).items():
                per_kv_group[key] = per_kv_group.get(key, 0) + count
        for entry in modules.values():
            entry.pop("heads", None)
            entry.pop("kv_groups", None)
        restored = self.restored
        return {
            "restored_params": restored,
            "swapped_out_params": self.swapped,
            "lm_params": self.lm_params,
            "pruned_params": self.pruned_params,
            "restored_ratio_lm": restored / max(self.lm_params, 1),
            "restored_ratio_pruned": restored / max(self.pruned_params, 1),
            "budget": self.budget,
            "rounds": list(self.rounds),
            "heads": [list(h) for h in self.heads],
            "per_head_q_o": dict(sorted(per_head.items())),
            "per_kv_group_k_v": dict(sorted(per_kv_group.items())),
            "modules": modules,
        }


# ------------------------------------------------------------------------------------ helpers
def language_model_parameters(model: nn.Module, adapter: ModelAdapter) -> int:
    """Parameters of the language model: the decoder (embeddings, layers, norms) and an untied lm_head."""
    seen: set[int] = set()
    total = 0
    modules = [adapter.decoder()]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        modules.append(head)
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


def attention_linears(adapter: ModelAdapter, layers: Iterable[int] | None = None) -> dict[str, tuple[int, str, nn.Linear]]:
    """``{qualified name: (layer, role, linear)}`` for the q/k/v/o projections of ``layers`` (default all)."""
    wanted = adapter.layer_indices() if layers is None else sorted(set(layers))
    out = {}
    for layer in wanted:
        for role, linear in adapter.projections(layer).items():
            out[adapter.name_of(linear)] = (layer, role, linear)
    return out


def round_sizes(budget: int, rounds: int) -> list[int]:
    """``budget`` split into ``rounds`` near-equal parts, larger parts first (they sum to budget)."""
    base, extra = divmod(budget, rounds)
    return [base + (1 if i < extra else 0) for i in range(rounds)]


@torch.no_grad()
def _snapshot(linears: Mapping[str, tuple[int, str, nn.Linear]]) -> dict[str, Tensor]:
    return {name: full_tensor(lin.weight).to("cpu", copy=True) for name, (_, _, lin) in linears.items()}


def _counted(batches: Batches | None, counter: list[int]) -> Iterable[Mapping[str, Tensor]] | None:
    if batches is None:
        return None

    def walk():
        for batch in batches:
            counter[0] += int(batch["input_ids"].shape[0])
            yield batch

    return walk()


def dense_pass(
    model: nn.Module,
    adapter: ModelAdapter,
    importance: str,
    utility_batches: Batches | None,
    safety_batches: Batches | None,
    *,
    layers: Iterable[int] | None = None,
    keep_dense: bool = False,
    utility_reduce: Reduce | None = None,
    safety_reduce: Reduce | None = None,
    percdamp: float = 0.01,
) -> DenseMeasurement:
    """Measure the utility and safety importance statistics of the attention projections of ``layers``.

    Must run before any weight is pruned. ``keep_dense`` also copies those weights (to the CPU):
    needed when the pruner changes kept weights, since the scores are those of the dense model.
    Each split's statistics go through its own ``reduce`` (DDP: the shards' weights differ per split).
    """
    linears = attention_linears(adapter, layers)
    plain = {name: lin for name, (_, _, lin) in linears.items()}
    measurement = DenseMeasurement(importance)
    seen_u, seen_s = [0], [0]
    measurement.utility = collect_importance(
        model, _counted(utility_batches, seen_u), plain, importance, reduce=utility_reduce, percdamp=percdamp
    )
    measurement.safety = collect_importance(
        model, _counted(safety_batches, seen_s), plain, importance, reduce=safety_reduce, percdamp=percdamp
    )
    measurement.utility_samples, measurement.safety_samples = seen_u[0], seen_s[0]
    if keep_dense:
        measurement.dense = _snapshot(linears)
    return measurement


def _views(
    adapter: ModelAdapter, state: HSRState, names: Sequence[str], linears, dense: DenseMeasurement | None, pruned0,
    gains: bool = False,
) -> list[LinearView]:
    views = []
    for name in names:
        layer, role, lin = linears[name]
        written = None
        if dense is not None and name in dense.dense:
            weight = dense.dense[name]
            if gains:  # a swapped-out entry is restored to its own (e.g. SparseGPT's) value, not the dense one
                written = state.original_weight(name, full_weight(lin)).float()
        else:
            weight = state.original_weight(name, full_weight(lin))
        views.append(LinearView(
            name=name, layer=layer, role=role, geometry=adapter.geometry(layer),
            pruned=state.pruned[name].clone(),
            restored=state.restored.get(name, torch.zeros_like(state.pruned[name])).clone(),
            dense=weight.float(),
            utility=None if dense is None else dense.utility.get(name),
            safety=None if dense is None else dense.safety.get(name),
            sparsity=float(pruned0[name].float().mean()), pruned_count=int(pruned0[name].sum()),
            restore_values=written,
        ))
    return views


@torch.no_grad()
def _apply(state: HSRState, view: LinearView, plan: LinearPlan, linear: nn.Linear, selection: str) -> None:
    changes = plan.restore.any() or (plan.swap is not None and plan.swap.any())
    weight = full_weight(linear) if changes else None  # sharded: gathered, edited, written back
    if plan.restore.any():
        values = state.original_weight(view.name, weight)
        mask = plan.restore.to(weight.device)
        weight[mask] = values.to(weight.device, weight.dtype)[mask]
        previous = state.restored.get(view.name)
        state.restored[view.name] = plan.restore.clone() if previous is None else previous | plan.restore
    if plan.swap is not None and plan.swap.any():
        state.add_pruned(view.name, plan.swap, weight)
        weight[plan.swap.to(weight.device)] = 0
    if weight is not None:
        write_full(linear, weight)
    positions = plan.restore.nonzero()
    owners = entry_heads(view.role, positions, view.shape, view.geometry, selection)
    counts: dict[str, int] = {}
    for owner in owners.tolist():
        key = head_key(view.layer, owner)
        counts[key] = counts.get(key, 0) + 1
    plan.info = {"layer": view.layer, "role": view.role, ("kv_groups" if view.role in "kv" else "heads"): counts}


@torch.no_grad()
def restore_masks(model: nn.Module, state: HSRState, masks: Mapping[str, Tensor]) -> int:
    """Give the entries of ``masks`` (pruned ones only) their original values; returns the count."""
    modules = dict(model.named_modules())
    count = 0
    for name, mask in masks.items():
        mask = mask & state.pruned[name] & ~state.restored.get(name, torch.zeros_like(mask))
        if not mask.any():
            continue
        full = full_weight(modules[name])
        values = state.original_weight(name, full)
        device_mask = mask.to(full.device)
        full[device_mask] = values.to(full.device, full.dtype)[device_mask]
        write_full(modules[name], full)
        state.restored[name] = mask.clone() if name not in state.restored else state.restored[name] | mask
        count += int(mask.sum())
    return count


def _grads(model, batches, linears, reduce, count) -> dict[str, Tensor]:
    try:
        grads, _ = refusal_gradients(model, batches, linears, reduce=reduce, count=count)
    except CalibrationError as err:
        raise RealignInputError(str(err)) from None
    return grads


def realign_model(
    model: nn.Module,
    adapter: ModelAdapter,
    state: HSRState,
    cfg: RealignConfig,
    heads: Sequence[tuple[int, int]],
    *,
    dense: DenseMeasurement | None = None,
    safety_batches: Batches | None = None,
    utility_batches: Batches | None = None,
    reduce: Reduce | None = None,
    count_batches: Callable[[int], int] | None = None,
) -> RealignResult:
    """Restore the chosen pruned weights of ``model`` in place and record them in ``state``.

    Args:
        heads: the selected ``(layer, head)`` pairs (may be empty for the head-free baselines).
        dense: :func:`dense_pass`'s measurement (required for ``order='margin'`` and for
            ``preserve_structure``).
        safety_batches / utility_batches: calibration batches for the gradient order (the
            refusal loss, and the benign-answer loss when ``utility_weight > 0``).
        reduce: DDP sum of gradients; ``count_batches`` sums a count of this rank over all ranks
            (the gradient order divides by the global response-token count: one token-weighted
            mean, whatever the batching or sharding).

    ``budget: auto`` is not a count: :func:`hsr_pl.realign.auto.auto_realign` drives a
    :class:`RealignSession` round by round instead.
    """
    session = RealignSession(model, adapter, state, cfg, heads, dense=dense, safety_batches=safety_batches,
                             utility_batches=utility_batches, reduce=reduce, count_batches=count_batches)
    budget = session.budget
    sizes = [budget] if cfg.order == "margin" else round_sizes(budget, cfg.rounds)
    for size in sizes:
        session.step(size)
    return session.result()


@dataclass
class _Snapshot:
    """A session's state at one moment: weights of the linears in scope, their masks, the plans."""

    weights: dict[str, Tensor]
    pruned: dict[str, Tensor]
    restored: dict[str, Tensor | None]
    originals: dict[str, Tensor]
    total: dict[str, LinearPlan]
    rounds: list[int]


class RealignSession:
    """One realignment in progress: checks once, then restores round by round (:meth:`step`).

    :func:`realign_model` runs its rounds at once; the automatic budget steps, measures, and may
    :meth:`rollback` to a :meth:`snapshot` (an exact undo of the rounds since: a copy of the weights
    of the linears in scope, on the CPU, and of their masks and originals).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        state: HSRState,
        cfg: RealignConfig,
        heads: Sequence[tuple[int, int]],
        *,
        dense: DenseMeasurement | None = None,
        safety_batches: Batches | None = None,
        utility_batches: Batches | None = None,
        reduce: Reduce | None = None,
        count_batches: Callable[[int], int] | None = None,
    ) -> None:
        if not state.pruned:
            raise RealignInputError("the model has no pruning masks: run Pruning (or PrunedCheckpoint) before realignment")
        heads = [(int(l_), int(h)) for l_, h in heads]
        if cfg.needs_heads and not heads:
            raise RealignInputError(
                "no safety heads selected (top_h 0 or no head scores); give heads, or use selection='none' for the "
                "head-free baseline"
            )
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            by_layer.setdefault(layer, []).append(head)
        all_linears = attention_linears(adapter)
        head_free = cfg.selection == "none" or (cfg.order == "gradient" and cfg.scope == "all")
        names = [n for n, (layer, _, _) in all_linears.items() if head_free or layer in by_layer]
        names = [n for n in names if n in state.pruned]
        if not names:
            raise RealignInputError(
                "none of the selected heads' attention projections was pruned; check Pruning's targets (q/k/v/o)"
            )
        missing = [n for n in names if n not in state.originals]
        if missing:
            raise RealignInputError(
                f"no original values kept for {missing[:3]}; Pruning(keep_originals=...) must cover the attention "
                "projections realignment restores"
            )
        if (cfg.order == "margin" or cfg.preserve_structure) and dense is None:
            raise RealignInputError(
                "no dense importance statistics: SafetyRealignment measures them just before Pruning changes a weight; "
                "put SafetyRealignment after Pruning in trainer.callbacks and let Pruning run in the same trainer"
            )
        if dense is not None:
            lacking = [n for n in names if cfg.order == "margin" and (n not in dense.utility or n not in dense.safety)]
            if lacking:
                raise RealignInputError(f"no dense importance statistics for {lacking[:3]}; the dense pass did not cover them")
        self.model, self.adapter, self.state, self.cfg, self.heads = model, adapter, state, cfg, heads
        self.by_layer, self.names, self.dense = by_layer, names, dense
        self.reduce, self.count_batches = reduce, count_batches
        self.lm_params = language_model_parameters(model, adapter)
        self.budget = None if cfg.budget == "auto" else resolve_budget(cfg.budget, self.lm_params)
        self.pruned_params = sum(int(m.sum()) for m in state.pruned.values())
        self.pruned0 = {n: state.pruned[n].clone() for n in names}
        self.linears = {n: all_linears[n] for n in names}
        self.plain = {n: lin for n, (_, _, lin) in self.linears.items()}
        self.safety_batches = list(safety_batches) if safety_batches is not None else None
        self.utility_batches = list(utility_batches) if utility_batches is not None else None
        self.total: dict[str, LinearPlan] = {}
        self.rounds: list[int] = []

    @property
    def restored(self) -> int:
        """Weights restored by this session so far."""
        return sum(int(p.restore.sum()) for p in self.total.values())

    def step(self, size: int | None) -> int:
        """Restore the top ``size`` entries of the pool at the current model (None: all); the count restored."""
        cfg = self.cfg
        grads = utility_grads = None
        if cfg.order == "gradient":
            if self.safety_batches is None:
                raise RealignInputError("order='gradient' needs the safety calibration batches (the aligned refusals)")
            grads = _grads(self.model, self.safety_batches, self.plain, self.reduce, self.count_batches)
            if cfg.utility_weight:
                if self.utility_batches is None:
                    raise RealignInputError("utility_weight > 0 needs the utility calibration batches")
                utility_grads = _grads(self.model, self.utility_batches, self.plain, self.reduce, self.count_batches)
        views = _views(self.adapter, self.state, self.names, self.linears, self.dense, self.pruned0,
                       gains=cfg.order == "gradient")
        plans = plan_restoration(views, self.by_layer, cfg, size, structure=self.state.structure, grads=grads,
                                 utility_grads=utility_grads)
        done = 0
        for view, plan in zip(views, plans):
            _apply(self.state, view, plan, self.linears[view.name][2], cfg.selection)
            self.total[view.name] = _merge(self.total.get(view.name), plan)
            done += int(plan.restore.sum())
        self.rounds.append(done if size is None else size)
        return done

    def refusal_loss(self) -> float | None:
        """The aligned refusals' token-weighted NLL at the current model (None without safety batches)."""
        if self.safety_batches is None:
            return None
        return refusal_nll(self.model, self.safety_batches, reduce=self.reduce, count=self.count_batches)

    @torch.no_grad()
    def snapshot(self) -> _Snapshot:
        state = self.state
        return _Snapshot(
            weights=_snapshot(self.linears),
            pruned={n: state.pruned[n].clone() for n in self.names},
            restored={n: (state.restored[n].clone() if n in state.restored else None) for n in self.names},
            originals={n: state.originals[n].clone() for n in self.names},
            total=dict(self.total), rounds=list(self.rounds),
        )

    @torch.no_grad()
    def rollback(self, snap: _Snapshot) -> None:
        """Put the weights, masks, originals and plans back as they were at ``snap``."""
        state = self.state
        for name, (_, _, linear) in self.linears.items():
            weight = full_weight(linear)
            weight.copy_(snap.weights[name].to(weight.device, weight.dtype))
            write_full(linear, weight)
            state.pruned[name] = snap.pruned[name].clone()
            state.originals[name] = snap.originals[name].clone()
            if snap.restored[name] is None:
                state.restored.pop(name, None)
            else:
                state.restored[name] = snap.restored[name].clone()
        state.invalidate_masks()
        self.total, self.rounds = dict(snap.total), list(snap.rounds)

    def result(self) -> RealignResult:
        return RealignResult(
            plans=dict(self.total), heads=self.heads, lm_params=self.lm_params, pruned_params=self.pruned_params,
            budget=self.budget if self.cfg.budget != "auto" else self.restored,
            rounds=[] if self.cfg.order == "margin" else list(self.rounds),
        )


def _merge(old: LinearPlan | None, new: LinearPlan) -> LinearPlan:
    if old is None:
        return new
    swap = old.swap if new.swap is None else (new.swap if old.swap is None else old.swap | new.swap)
    info = dict(new.info)
    for key in ("heads", "kv_groups"):
        merged = dict(old.info.get(key, {}))
        for k, v in new.info.get(key, {}).items():
            merged[k] = merged.get(k, 0) + v
        if merged:
            info[key] = merged
    return LinearPlan(new.name, old.restore | new.restore, swap, pool=old.pool, candidates=old.candidates, p=old.p, info=info)
