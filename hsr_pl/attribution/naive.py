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

__all__ = ["naive_head_scores"]


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
