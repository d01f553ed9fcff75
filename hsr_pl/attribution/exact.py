"""The exact engine: the naive loop's scores at a fraction of its cost.

Two facts make it cheap without changing any score:

1. Ablating a head of layer l cannot change layers < l. The engine keeps the hidden states
   entering layer l (and the keyword arguments every decoder layer was called with in the intact
   pass: position embeddings, masks, ...) and re-runs only layers l..L-1, the final norm and the
   output head — the last two only at the scored positions, which also skips most of the
   vocabulary projection.
2. Several heads can share one forward: the batch of b prompts is repeated k times and copy j
   ablates head j of the group (:class:`~hsr_pl.attribution.ablation.HeadAblation` selects the
   head per row). Rows never interact, so a head's score does not depend on how heads are
   grouped.

Layers are visited in order and the cached states are advanced through each layer intact after
its heads are scored, so only one layer's inputs (n × T × d) are held at a time. Before scoring,
the engine replays the intact model from the cached states and checks it reproduces the full
forward's outputs, so a family whose head is not ``lm_head(norm(h))`` fails loudly instead of
scoring wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from hsr_pl.models.adapters import ModelAdapter, get_adapter
from hsr_pl.state import head_key

from .ablation import HeadAblation
from .common import IntactBatch, ProgressFn, ScoreAccumulator, intact_pass, resolve_targets
from .scores import ScoreConfig, per_prompt_mean

__all__ = ["exact_head_scores", "heads_per_forward"]

_DROP_KWARGS = ("cache", "past_key_values", "past_key_value")


def _final_norm(adapter: ModelAdapter) -> nn.Module:
    getter = getattr(adapter, "final_norm", None)
    if callable(getter):
        return getter()
    norm = getattr(adapter.decoder(), "norm", None)
    if not isinstance(norm, nn.Module):
        raise TypeError(
            f"{type(adapter).__name__} exposes no final norm (decoder().norm); add a final_norm() "
            "method to the adapter or use engine='naive'"
        )
    return norm


def _expand(value: Any, batch: int, copies: int) -> Any:
    """Repeat every per-row tensor (dim ≥ 2 with leading size ``batch``) ``copies`` times along
    dim 0, copy-major (row j·batch + r is copy j of row r); recurse into tuples/lists."""
    if copies == 1:
        return value
    if isinstance(value, Tensor):
        if value.dim() >= 2 and value.shape[0] == batch:
            return value.repeat(copies, *(1,) * (value.dim() - 1))
        return value
    if isinstance(value, tuple):
        return tuple(_expand(v, batch, copies) for v in value)
    if isinstance(value, list):
        return [_expand(v, batch, copies) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, batch, copies) for k, v in value.items()}
    return value


def heads_per_forward(
    num_heads: int,
    batch_size: int,
    seq_len: int,
    hidden_size: int,
    element_size: int,
    max_batch_heads: int | None,
    max_batch_bytes: int | None,
) -> int:
    """How many ablated copies of a batch share one forward.

    ``max_batch_bytes`` bounds a rough activation estimate per row: 24 · T · d elements (the
    residual stream, the attention and MLP intermediates of one layer with margin) plus T² per
    head-row for eager attention scores (one layer at a time, so this does not grow with L).
    """
    k = num_heads if max_batch_heads is None else max(1, min(num_heads, int(max_batch_heads)))
    if max_batch_bytes is not None:
        per_row = element_size * seq_len * (24 * hidden_size + seq_len)
        k = max(1, min(k, int(max_batch_bytes) // max(1, per_row * batch_size)))
    return k


class _LayerInputs:
    """Captures the hidden state entering ``first`` and every layer's kwargs during a forward."""

    def __init__(self, layers: nn.ModuleList, first: int) -> None:
        self.layers = layers
        self.first = first
        self.hidden: Tensor | None = None
        self.kwargs: dict[int, dict[str, Any]] = {}

    @contextmanager
    def capture(self):
        handles = []

        def make(index: int):
            def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                kw = dict(kwargs)
                if args:
                    hidden, rest = args[0], args[1:]
                    if rest:
                        raise TypeError(
                            f"decoder layer {index} got {len(args)} positional arguments; the exact "
                            "engine replays layers as layer(hidden, **kwargs) — use engine='naive'"
                        )
                else:
                    hidden = kw.pop("hidden_states")
                for key in _DROP_KWARGS:
                    if kw.get(key) is not None:
                        raise RuntimeError(f"decoder layer {index} received a KV cache ({key}); run with use_cache=False")
                    kw.pop(key, None)
                kw["use_cache"] = False
                self.kwargs[index] = kw
                if index == self.first:
                    self.hidden = hidden.detach()

            return pre_hook

        for index in range(self.first, len(self.layers)):
            handles.append(self.layers[index].register_forward_pre_hook(make(index), with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def _run_layers(layers: nn.ModuleList, start: int, stop: int, hidden: Tensor, kwargs: dict[int, dict], batch: int, copies: int) -> Tensor:
    for index in range(start, stop):
        out = layers[index](hidden, **_expand(kwargs[index], batch, copies))
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _tail_outputs(
    hidden: Tensor, item: IntactBatch, copies: int, cfg: ScoreConfig, norm: nn.Module, head: nn.Module
) -> tuple[Tensor | None, Tensor | None]:
    """Final norm (+ output head) at the scored positions of every copy: logits ``[copies, K, V]``
    and final hidden states ``[copies, B, d]``."""
    B = item.batch_size
    offsets = torch.arange(copies, device=hidden.device)[:, None] * B
    logits = final = None
    if cfg.score == "kl":
        rows = (offsets + item.rows[None]).flatten()
        cols = item.cols.repeat(copies)
        logits = head(norm(hidden[rows, cols])).view(copies, item.rows.numel(), -1)
    else:
        rows = (offsets + torch.arange(B, device=hidden.device)[None]).flatten()
        cols = item.last_index.repeat(copies)
        final = norm(hidden[rows, cols]).view(copies, B, -1)
    return logits, final


class _SharedIntactAccumulator(ScoreAccumulator):
    """The accumulator with the intact side of the KL computed once per (layer, batch) instead of
    once per head: log p and p = exp(log p) of a batch are reused by all heads of the layer (the
    engine visits a layer's heads batch by batch). Same operations on the same tensors as
    :func:`~hsr_pl.attribution.scores.kl_per_position`, so the scores are bit-identical; only the
    current batch's log-probabilities are held."""

    def __init__(self, cfg: ScoreConfig, items: Sequence[IntactBatch]) -> None:
        super().__init__(cfg, items)
        self._cached: tuple[int, Tensor, Tensor] | None = None

    def add(self, layer: int, head: int, batch_index: int, logits: Tensor | None, hidden: Tensor | None) -> None:
        if self.cfg.score != "kl":
            super().add(layer, head, batch_index, logits, hidden)
            return
        item = self.items[batch_index]
        if self._cached is None or self._cached[0] != batch_index:
            dtype = torch.promote_types(item.logits.dtype, torch.float32)
            logp = torch.log_softmax(item.logits.to(dtype), dim=-1)
            self._cached = (batch_index, logp, logp.exp())
        _, logp, p = self._cached
        logq = torch.log_softmax(logits.to(logp.dtype), dim=-1)
        kl = (p * (logp - logq)).sum(-1)
        self._kl.setdefault(head_key(layer, head), []).append(per_prompt_mean(kl, item.rows, item.batch_size))


def _check_replay(
    layers: nn.ModuleList, start: int, state: Tensor, kwargs: dict, item: IntactBatch, cfg: ScoreConfig,
    norm: nn.Module, head: nn.Module,
) -> None:
    hidden = _run_layers(layers, start, len(layers), state, kwargs, item.batch_size, 1)
    logits, final = _tail_outputs(hidden, item, 1, cfg, norm, head)
    got, want = (logits[0], item.logits) if cfg.score == "kl" else (final[0], item.final_hidden)
    tol = 1e-3 if want.dtype in (torch.float32, torch.float64) else 5e-2
    scale = float(want.abs().max()) + 1e-6
    err = float((got.to(want.dtype) - want).abs().max())
    if err > tol * scale:
        raise RuntimeError(
            f"the exact engine's replay of layers {start}..{len(layers) - 1} + final norm + output head "
            f"differs from the model's own forward (max abs diff {err:.3g}, scale {scale:.3g}): this family "
            "computes its outputs differently (e.g. logit soft-capping); use engine='naive'"
        )


@torch.no_grad()
def exact_head_scores(
    model: nn.Module,
    batches: Sequence[Mapping[str, object]],
    cfg: ScoreConfig | None = None,
    *,
    layers: Iterable[int] | None = None,
    heads: Iterable[tuple[int, int] | str] | None = None,
    progress: ProgressFn | None = None,
    max_batch_heads: int | None = None,
    max_batch_bytes: int | None = None,
    adapter: ModelAdapter | None = None,
    check_replay: bool = True,
) -> dict[str, float]:
    """Scores identical to :func:`~hsr_pl.attribution.naive.naive_head_scores`, computed by
    re-running only layers l..L-1 for heads of layer l, several heads per batched forward.

    Args:
        max_batch_heads: at most this many ablated copies of a batch per forward (``None``: all
            heads of a layer at once).
        max_batch_bytes: rough activation budget per forward (see :func:`heads_per_forward`).
        check_replay: verify once that replaying the cached layer inputs reproduces the intact
            forward (cheap: one tail pass of the first batch).
        Other arguments as in :func:`naive_head_scores`.
    """
    cfg = cfg or ScoreConfig()
    adapter = adapter or get_adapter(model)
    targets = resolve_targets(adapter, layers, heads)
    if max_batch_heads is not None and int(max_batch_heads) < 1:
        raise ValueError(f"max_batch_heads={max_batch_heads!r} must be ≥ 1 (or None for a whole layer)")
    if not targets:
        return {}
    all_layers = adapter.all_layers()
    first = next(iter(targets))
    captures = [_LayerInputs(all_layers, first) for _ in batches]
    items, means = intact_pass(
        model, adapter, batches, cfg, list(targets), extra_hooks=lambda i: captures[i].capture()
    )
    norm, head_module = _final_norm(adapter), model.get_output_embeddings()
    states = [cap.hidden for cap in captures]
    if check_replay:
        _check_replay(all_layers, first, states[0], captures[0].kwargs, items[0], cfg, norm, head_module)

    acc = _SharedIntactAccumulator(cfg, items)
    scores: dict[str, float] = {}
    current = first
    for layer, layer_heads in targets.items():
        # Advance the intact states from `current` to the input of `layer`.
        for b, cap in enumerate(captures):
            states[b] = _run_layers(all_layers, current, layer, states[b], cap.kwargs, items[b].batch_size, 1)
        current = layer
        for b, (item, cap) in enumerate(zip(items, captures)):
            state = states[b]
            k = heads_per_forward(
                len(layer_heads), item.batch_size, state.shape[1], state.shape[-1], state.element_size(),
                max_batch_heads, max_batch_bytes,
            )
            for start in range(0, len(layer_heads), k):
                group = layer_heads[start : start + k]
                copies = len(group)
                rows = torch.tensor(group, dtype=torch.long).repeat_interleave(item.batch_size)
                hidden = state.repeat(copies, *(1,) * (state.dim() - 1))
                with HeadAblation(adapter, layer, rows, cfg.ablation, cfg.epsilon, means.get(layer)):
                    hidden = _run_layers(
                        all_layers, layer, len(all_layers), hidden, cap.kwargs, item.batch_size, copies
                    )
                logits, final = _tail_outputs(hidden, item, copies, cfg, norm, head_module)
                for j, head in enumerate(group):
                    acc.add(
                        layer, head, b,
                        None if logits is None else logits[j],
                        None if final is None else final[j],
                    )
        done = acc.finish(layer, layer_heads)
        scores.update(done)
        if progress is not None:
            progress(layer, done)
    return scores
