"""The naive engine: one full forward of every calibration batch per ablated head.

(L·H + 1) × n forward passes. It is the obviously-correct baseline the exact engine is tested
and benchmarked against; it uses the model's own forward end to end, so it makes no assumption
about the decoder's internals beyond where the hooked modules are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from hsr_pl.models.adapters import ModelAdapter, get_adapter

from .ablation import HeadAblation
from .common import ProgressFn, ScoreAccumulator, forward_outputs, intact_pass, resolve_targets
from .scores import ScoreConfig

__all__ = ["lockstep_head_scores", "naive_head_scores"]


@torch.no_grad()
def naive_head_scores(
    model: nn.Module,
    batches: Sequence[Mapping[str, object]],
    cfg: ScoreConfig | None = None,
    *,
    layers: Iterable[int] | None = None,
    heads: Iterable[tuple[int, int] | str] | None = None,
    progress: ProgressFn | None = None,
    adapter: ModelAdapter | None = None,
) -> dict[str, float]:
    """``{"<layer>-<head>": score}`` by ablating each head in a full forward of every batch.

    Args:
        model: an HF causal LM or LVLM in eval mode.
        batches: calibration batches (dicts ready for ``model(**batch)``; ``labels`` when
            ``positions='response'``), left padded.
        cfg: what to score (default: KL at the last prompt token, ``head`` ablation).
        layers / heads: restrict the scan (resume, DDP splitting); see :func:`resolve_targets`.
        progress: called after each finished layer with that layer's scores.
    """
    cfg = cfg or ScoreConfig()
    adapter = adapter or get_adapter(model)
    targets = resolve_targets(adapter, layers, heads)
    items, means = intact_pass(model, adapter, batches, cfg, list(targets))
    acc = ScoreAccumulator(cfg, items)
    scores: dict[str, float] = {}
    for layer, layer_heads in targets.items():
        for head in layer_heads:
            for b, item in enumerate(items):
                rows = torch.full((item.batch_size,), head, dtype=torch.long)
                with HeadAblation(adapter, layer, rows, cfg.ablation, cfg.epsilon, means.get(layer)):
                    logits, hidden = forward_outputs(model, item, cfg)
                acc.add(layer, head, b, logits, hidden)
        done = acc.finish(layer, layer_heads)
        scores.update(done)
        if progress is not None:
            progress(layer, done)
    return scores


@torch.no_grad()
def lockstep_head_scores(
    model: nn.Module,
    batches: Sequence[Mapping[str, object]],
    cfg: ScoreConfig,
    mine: Sequence[tuple[int, int]],
    shares: Sequence[Sequence[tuple[int, int]]],
    *,
    progress: ProgressFn | None = None,
    adapter: ModelAdapter | None = None,
) -> dict[str, float]:
    """The naive engine's scores of this rank's heads ``mine`` on a *sharded* model.

    A sharded forward is a collective, so every rank runs the same forwards: the intact pass
    (hooks on the union of every share's layers), then ``max(len(share))`` steps of one full
    forward per batch, in which each rank ablates the next head of its own share, or nothing once
    its share is done (that forward's outputs are dropped). The scores are the naive loop's.
    """
    cfg = cfg or ScoreConfig()
    adapter = adapter or get_adapter(model)
    union = sorted({layer for share in shares for layer, _ in share})
    steps = max((len(share) for share in shares), default=0)
    items, means = intact_pass(model, adapter, batches, cfg, union)
    acc = ScoreAccumulator(cfg, items)
    scores: dict[str, float] = {}
    mine = list(mine)
    for step in range(steps):
        if step >= len(mine):
            for item in items:  # keep the peers' collectives company
                forward_outputs(model, item, cfg)
            continue
        layer, head = mine[step]
        for b, item in enumerate(items):
            rows = torch.full((item.batch_size,), head, dtype=torch.long)
            with HeadAblation(adapter, layer, rows, cfg.ablation, cfg.epsilon, means.get(layer)):
                logits, hidden = forward_outputs(model, item, cfg)
            acc.add(layer, head, b, logits, hidden)
        if step + 1 == len(mine) or mine[step + 1][0] != layer:
            heads = [h for l_, h in mine if l_ == layer]
            done = acc.finish(layer, heads)
            scores.update(done)
            if progress is not None:
                progress(layer, done)
    return scores
