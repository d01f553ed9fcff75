"""Resumable head-attribution scans: where the partial files live, what identifies a scan, and
merging what a killed scan left (pure file and tensor code; the callback only orchestrates).

A scan writes the layers it finished to ``<stem>.partial.json`` (``<stem>.partial.rank<r>.json``
per rank under DDP, :func:`partial_path`) together with its *settings*: the score settings plus a
:func:`fingerprint` of the calibration data and the weights. A resume merges every partial file
next to the output whose settings are identical (:func:`merge_partials`) and refuses the others,
so a resumed scan can never mix scores of other prompts, models or settings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hsr_pl.distributed import full_tensor
from hsr_pl.report.heads import read_partial

__all__ = ["fingerprint", "merge_partials", "partial_files", "partial_path"]


def partial_path(output: Path, rank: int = 0, world: int = 1) -> Path:
    """``<stem>.partial.json`` (one process) or ``<stem>.partial.rank<r>.json`` (under DDP)."""
    return output.with_name(output.stem + (".partial.json" if world == 1 else f".partial.rank{rank}.json"))


def partial_files(output: Path) -> list[Path]:
    """Every partial file of ``output``, whichever world size wrote it."""
    return sorted(output.parent.glob(output.stem + ".partial*.json"))


def merge_partials(paths: Sequence[Path], settings: Mapping[str, Any]) -> dict[str, float]:
    """The scores in ``paths``, all of which must have been written with ``settings``.

    Raises ValueError naming the first differing settings of a file that does not match.
    """
    merged: dict[str, float] = {}
    for path in paths:
        theirs, scores = read_partial(path)
        if theirs != dict(settings):
            diff = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
            detail = ", ".join(f"{k}: {theirs.get(k)!r} there vs {settings.get(k)!r} now" for k in diff[:4])
            raise ValueError(
                f"resume refused: {path} was written with different settings ({detail}). Delete it to start "
                "afresh, set resume: false, or rerun with the settings it was written with"
            )
        merged.update(scores)
    return merged


@torch.no_grad()
def fingerprint(model: nn.Module, adapter, batches: Sequence[Mapping[str, Tensor]]) -> dict[str, Any]:
    """Cheap identity of the calibration data (every tensor) and weights (last o_proj), so a
    resume cannot mix scores of different prompts or models."""
    data = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key].detach().cpu().contiguous()
            data.update(key.encode())
            data.update(str(tuple(value.shape)).encode())
            data.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    last = adapter.layer_indices()[-1]
    weight = full_tensor(adapter.projections(last)["o"].weight).cpu().contiguous()
    weights = hashlib.sha256(weight.view(torch.uint8).numpy().tobytes()).hexdigest()
    config = getattr(model, "config", None)
    return {
        "num_samples": sum(int(b["input_ids"].shape[0]) for b in batches),
        "data_sha256": data.hexdigest(),
        "weights_sha256": weights,
        "model_type": getattr(config, "model_type", type(model).__name__),
        "heads": {str(layer): adapter.geometry(layer).num_heads for layer in adapter.layer_indices()},
    }
