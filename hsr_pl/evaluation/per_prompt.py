"""Evaluate a model and keep every judge's verdict on every prompt, not only the rates.

A paired comparison of two models (the safety audit) needs per-prompt outcomes: which prompt each
model complied with. :func:`evaluate_per_prompt` generates exactly as
:func:`hsr_pl.evaluation.runner.evaluate` does (``module.generate`` and the set's metric group from
``module.metrics_for``, so the same judges), records each verdict at the prompt's index in its set,
and :func:`rates` turns them back into the runner's ``{set: {"kind", "n", "asr[judge]" ...}}`` so
:func:`~hsr_pl.evaluation.runner.headline` reads both alike. Utility sets are scored by their
metric group (choice, circular, ANLS) as in the runner.

Under DDP every rank answers the prompts ``rank, rank + world, ...`` of each set (no prompt twice,
none left out), the verdicts are gathered by index onto every rank, and the utility metrics sum
their counts over the ranks like the runner's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from .scoring import cohen_kappa

__all__ = ["category_flags", "evaluate_per_prompt", "judge_agreement", "rates", "shard_loader"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_loader(loader: DataLoader, rank: int, world: int) -> tuple[DataLoader, list[int]]:
    """This rank's slice ``rank::world`` of an unshuffled loader, and the slice's indices in the set."""
    size = len(loader.dataset)
    index = list(range(rank, size, world))
    if world == 1:
        return loader, index
    part = DataLoader(Subset(loader.dataset, index), batch_size=loader.batch_size, shuffle=False,
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers)
    return part, index


def _header(loader: DataLoader) -> dict[str, Any] | None:
    """What ``metrics_for`` needs to build a set's metric group before (or without) a batch."""
    collate = loader.collate_fn
    eval_set, meta = getattr(collate, "eval_set", None), getattr(collate, "meta", None)
    if eval_set is None or meta is None:
        return None
    return {"eval_set": eval_set.name, "kind": eval_set.kind, "eval_meta": meta}


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate_per_prompt(module, loaders: Iterable[DataLoader], *, on_batch=None) -> dict[str, dict[str, Any]]:
    """Generate on every set and return, per set, the verdicts of every judge on every prompt.

    Returns ``{set: {"kind", "n", "categories": [names], "category": [index per prompt],
    "flags": {judge: [bool per prompt]}, "utility": {log key: value}, "per_rank": [prompts per rank]}}`` (``flags`` for harmful
    sets are "complied", for benign sets "refused"; ``utility`` for utility sets).
    """
    rank, world = _world()
    device = next(module.model.parameters()).device
    store: dict[str, Any] = {}
    out: dict[str, dict[str, Any]] = {}
    flags_before = [(m, m.training) for m in module.model.modules()]
    module.model.eval()
    try:
        for loader in loaders:
            header = _header(loader)
            if header is not None:  # built on every rank, so the utility counts sync even from an empty slice
                module.metrics_for(header, store)
            part, index = shard_loader(loader, rank, world)
            position = 0
            for batch in part:
                batch = _to(batch, device)
                name, kind = batch["eval_set"], batch["kind"]
                replies = module.generate(batch, (batch.get("eval_meta") or {}).get("max_new_tokens"))
                group = module.metrics_for(batch, store)
                row = out.setdefault(name, {"kind": kind, "size": len(loader.dataset), "index": [], "category": [],
                                            "categories": list((batch.get("eval_meta") or {}).get("categories", ())),
                                            "flags": {j.name: [] for j in group.judges}})
                here = index[position: position + len(replies)]
                position += len(replies)
                row["index"].extend(here)
                if kind == "utility":
                    group.update_batch(replies, batch)
                else:
                    prompts, images = batch.get("instructions"), batch.get("image_refs")
                    for judge in group.judges:
                        said = judge.refused(replies, prompts, images) if kind == "benign" else judge(replies, prompts, images)
                        row["flags"][judge.name].extend(bool(f) for f in said)
                    row["category"].extend(int(c) for c in batch.get("categories") or [-1] * len(replies))
                if on_batch is not None:
                    on_batch(name, len(replies))
            if header is not None and header["eval_set"] not in out:
                group = store[header["eval_set"]]
                out[header["eval_set"]] = {"kind": header["kind"], "size": len(loader.dataset), "index": [],
                                           "category": [], "categories": list(header["eval_meta"].get("categories", ())),
                                           "flags": {j.name: [] for j in group.judges}}
    finally:
        for mod, flag in flags_before:
            mod.train(flag)
    utility = {name: {k: float(v) for k, v in group.compute().items()}
               for name, group in store.items() if group.kind == "utility"}
    return _assemble(out, utility, world)


def _assemble(local: dict[str, dict[str, Any]], utility: Mapping[str, Mapping[str, float]], world: int) -> dict:
    """Every rank's verdicts put in prompt order (gathered from all ranks under DDP)."""
    parts = [local]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, local)
    result = {}
    for name, first in local.items():
        size = first["size"]
        flags = {j: [None] * size for j in first["flags"]}
        category = [-1] * size
        for part in parts:
            row = part[name]
            for j, values in row["flags"].items():
                for i, v in zip(row["index"], values):
                    flags[j][i] = v
            for i, c in zip(row["index"], row["category"]):
                category[i] = c
        if first["kind"] != "utility":
            missing = [j for j, values in flags.items() if any(v is None for v in values)]
            if missing:
                raise RuntimeError(f"evaluate_per_prompt: set {name!r} lacks verdicts of {missing} for some prompts")
        result[name] = {
            "kind": first["kind"], "n": size, "categories": first["categories"], "category": category,
            "flags": flags if first["kind"] != "utility" else {}, "utility": dict(utility.get(name, {})),
            "per_rank": [len(part[name]["index"]) for part in parts],
        }
    return result


def rates(per_prompt: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The runner's result shape from per-prompt verdicts: ``{set: {"kind", "n", "asr[j]" | "over_refusal[j]" | utility}}``."""
    out = {}
    for name, row in per_prompt.items():
        values: dict[str, Any] = {"kind": row["kind"], "n": row["n"]}
        if row["kind"] == "utility":
            values.update(row["utility"])
        else:
            label = "asr" if row["kind"] == "harmful" else "over_refusal"
            for judge, flags in row["flags"].items():
                values[f"{label}[{judge}]"] = sum(flags) / len(flags) if flags else float("nan")
        out[name] = values
    return out


def judge_agreement(per_prompt: Mapping[str, Mapping[str, Any]], kind: str = "harmful") -> dict[str, Any]:
    """Cohen's κ of every judge pair over all prompts of the sets of ``kind`` pooled, and raw agreement."""
    judges: list[str] = []
    for row in per_prompt.values():
        if row["kind"] == kind:
            judges = judges or list(row["flags"])
    pooled: dict[str, list[bool]] = {j: [] for j in judges}
    for row in per_prompt.values():
        if row["kind"] == kind:
            for j in judges:
                pooled[j].extend(row["flags"][j])
    size = len(judges)
    kappa = [[float("nan")] * size for _ in range(size)]
    agree = [[float("nan")] * size for _ in range(size)]
    for a in range(size):
        for b in range(size):
            x, y = pooled[judges[a]], pooled[judges[b]]
            both = sum(p and q for p, q in zip(x, y))
            only_a = sum(p and not q for p, q in zip(x, y))
            only_b = sum(q and not p for p, q in zip(x, y))
            neither = len(x) - both - only_a - only_b
            kappa[a][b] = cohen_kappa(both, only_a, only_b, neither)
            agree[a][b] = (both + neither) / len(x) if x else float("nan")
    n = len(pooled[judges[0]]) if judges else 0
    return {"judges": judges, "kappa": kappa, "agreement": agree, "n": n}


def category_flags(row: Mapping[str, Any], judge: str) -> dict[str, list[bool]]:
    """A set's verdicts of ``judge`` split by category name (prompts without a category left out)."""
    out: dict[str, list[bool]] = {c: [] for c in row["categories"]}
    for flag, c in zip(row["flags"][judge], row["category"]):
        if c >= 0:
            out[row["categories"][c]].append(flag)
    return out
