"""Evaluate a model on the evaluation sets *outside* Lightning's validation loop.

The demo and the benchmarks measure the same model several times in one process — dense, pruned,
realigned, and every baseline — on the same held-out sets; running Lightning's loop for each would
re-enter the callbacks. This is the same generation and the same metrics as
``LVLMModule.validation_step``, as a plain function that returns ``{set: {metric: value}}``.
Under DDP the torchmetrics counts are synced, so every rank gets the union's numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["evaluate", "headline"]


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(module, loaders: Iterable[Iterable[Mapping[str, Any]]], *, on_batch=None) -> dict[str, dict[str, Any]]:
    """Greedy replies on every batch of ``loaders`` (VLGuard eval collation) scored per set.

    ``module`` is an :class:`hsr_pl.module.LVLMModule`; its generation, judges and metrics are
    exactly those of ``validate`` (:meth:`~hsr_pl.module.LVLMModule.eval_step`). Returns
    ``{set name: {"kind", "n", <log key>: value, ...}}`` with values as fractions.
    """
    device = next(module.model.parameters()).device
    store: dict[str, Any] = {}
    flags = [(m, m.training) for m in module.model.modules()]
    module.model.eval()
    try:
        for loader in loaders:
            for batch in loader:
                replies = module.eval_step(_to(batch, device), store)
                if on_batch is not None:
                    on_batch(batch["eval_set"], len(replies))
    finally:
        for mod, flag in flags:
            mod.train(flag)
    out = {}
    for name, group in store.items():
        values = {key: float(value) for key, value in group.compute().items()}
        out[name] = {"kind": group.kind, "n": int(group.count()), **values}
    return out


def headline(results: Mapping[str, Mapping[str, Any]], judge: str) -> dict[str, float | int | None]:
    """``asr`` (mean over harmful sets), ``asr_<set>``, ``utility`` (mean over utility sets) and
    ``over_refusal`` (mean over benign sets) under one judge, plus the sizes."""
    harmful = {n: r for n, r in results.items() if r["kind"] == "harmful"}
    utility = {n: r for n, r in results.items() if r["kind"] == "utility"}
    benign = {n: r for n, r in results.items() if r["kind"] == "benign"}
    key = f"asr[{judge}]"
    out: dict[str, float | int | None] = {}
    for name, row in harmful.items():
        out[f"asr_{name.removeprefix('harmful_')}"] = row.get(key)
    asr = [r[key] for r in harmful.values() if key in r]
    out["asr"] = sum(asr) / len(asr) if asr else None
    util = [v for r in utility.values() for k, v in r.items() if k.startswith("utility[")]
    out["utility"] = sum(util) / len(util) if util else None
    refusal = [r.get(f"over_refusal[{judge}]", next((v for k, v in r.items() if k.startswith("over_refusal[")), None))
               for r in benign.values()]
    refusal = [v for v in refusal if v is not None]
    out["over_refusal"] = sum(refusal) / len(refusal) if refusal else None
    out["n_harmful"] = sum(r["n"] for r in harmful.values())
    out["n_utility"] = sum(r["n"] for r in utility.values())
    out["n_benign"] = sum(r["n"] for r in benign.values())
    return out
