"""``realignment.json``: the manifest an export carries beside the realigned weights."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from hsr_pl import __version__
from hsr_pl.pruning.masks import detect_structure
from hsr_pl.state import HSRState

__all__ = ["after_restoring", "realignment_manifest"]


def after_restoring(state: HSRState) -> dict[str, Any]:
    """The exported weights' sparsity over the pruner's targets once restorations (and N:M swaps) are
    in, and whether N:M masks are still exactly N:M (what sparse kernels need)."""
    masks = {n: m & ~state.restored[n] if n in state.restored else m for n, m in state.pruned.items()}
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int(m.sum()) for m in masks.values())
    structure = detect_structure(masks) if state.structure is not None else None
    return {
        "pruned_params": pruned, "target_params": total, "sparsity": pruned / total if total else None,
        "structure": None if structure is None else f"{structure[0]}:{structure[1]}",
        "still_n_m": None if state.structure is None else structure == tuple(state.structure),
    }


def realignment_manifest(pl_module: pl.LightningModule, state: HSRState) -> dict[str, Any] | None:
    """``realignment.json``: model, pruning, heads with scores, settings, restored counts, ratios."""
    if not state.realignment:
        return None
    report = state.realignment
    model = getattr(pl_module, "model", pl_module)
    config = getattr(model, "config", None)
    settings = report.get("settings", {})
    heads = report.get("heads", [])
    scores = report.get("head_scores", {})
    return {
        "hsr_pl_version": __version__,
        "model": {
            "source": getattr(pl_module, "model_source", None),
            "model_type": getattr(config, "model_type", None),
            "class": type(model).__name__,
        },
        "pruning": {
            "method": state.method, "sparsity": state.sparsity,
            "structure": None if state.structure is None else f"{state.structure[0]}:{state.structure[1]}",
            "after_restoring": after_restoring(state),
            "checkpoint": dict(state.source) or None,
        },
        "heads": [{"layer": l_, "head": h, "score": scores.get(f"{l_}-{h}")} for l_, h in heads],
        "rule": {**{k: settings.get(k) for k in ("p", "q", "max_p", "selection", "importance")}, "top_h": len(heads)},
        "budget": {"setting": settings.get("budget"), "count": report.get("budget"), "order": settings.get("order"),
                   "rounds": report.get("rounds"), "scope": settings.get("scope"),
                   "preserve_structure": settings.get("preserve_structure")},
        "restored": {
            "params": report["restored_params"],
            "swapped_out_params": report.get("swapped_out_params", 0),
            "lm_params": report["lm_params"],
            "pruned_params": report["pruned_params"],
            "ratio_of_language_model_params": report["restored_ratio_lm"],
            "ratio_of_pruned_params": report["restored_ratio_pruned"],
            "per_module": {n: m["restored"] for n, m in report["modules"].items() if m["restored"]},
            "per_head_q_o": report.get("per_head_q_o", {}),
            "per_kv_group_k_v": report.get("per_kv_group_k_v", {}),
        },
        "calibration": report.get("calibration", {}),
        # budget: auto's dev trajectory and stop reason, or a fixed budget's one dev check (None: no dev sets)
        "auto": report.get("auto"),
        "dev_check": report.get("dev_check"),
    }
