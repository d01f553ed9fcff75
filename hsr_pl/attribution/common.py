"""Pieces shared by the attribution engines: target resolution, the intact pass, accumulation.

Every engine runs the same intact pass (:func:`intact_pass`) over the calibration batches and
keeps, per batch, the intact logits at the scored positions, the final hidden state (after the
final norm) at each row's last prompt token, and — for ``ablation='mean'`` — the per-head mean
o_proj inputs. Engines differ only in how they produce the ablated counterparts; the
:class:`ScoreAccumulator` turns those into ``{"<layer>-<head>": score}`` identically for all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hsr_pl.models.adapters import ModelAdapter
from hsr_pl.state import head_key, parse_head_key

from .ablation import o_proj_input_means
from .scores import (
    ScoreConfig,
    kl_per_position,
    last_prompt_index,
    per_prompt_mean,
    reference_score,
    score_positions,
    subspace_score,
)

__all__ = [
    "IntactBatch",
    "ProgressFn",
    "ScoreAccumulator",
    "intact_pass",
    "model_inputs",
    "prepare_batches",
    "resolve_targets",
]

# Called after each finished layer with (layer, {"<layer>-<head>": score} of that layer).
ProgressFn = Callable[[int, dict[str, float]], None]

# Keys a calibration batch may hold that the model's forward must not receive.
_NON_INPUT_KEYS = ("labels",)


def model_inputs(batch: Mapping[str, object], device: torch.device) -> dict[str, object]:
    """The batch without ``labels``, tensors moved to ``device``."""
    out = {}
    for key, value in batch.items():
        if key in _NON_INPUT_KEYS:
            continue
        out[key] = value.to(device) if isinstance(value, Tensor) else value
    return out


def resolve_targets(
    adapter: ModelAdapter,
    layers: Iterable[int] | None = None,
    heads: Iterable[tuple[int, int] | str] | None = None,
) -> dict[int, list[int]]:
    """``{layer: [head, ...]}`` to score, ascending.

    ``layers`` restricts to whole layers, ``heads`` to explicit ``(layer, head)`` pairs or
    ``"<layer>-<head>"`` keys (what resume and DDP splitting pass); both ``None`` = every head of
    every self-attention layer. Unknown layers or heads raise before any forward runs.
    """
    valid = adapter.layer_indices()
    out: dict[int, set[int]] = {}
    if heads is not None:
        for item in heads:
            if isinstance(item, str):
                item = parse_head_key(item)
            layer, head = int(item[0]), int(item[1])
            if layer not in valid:
                raise ValueError(f"head {layer}-{head}: layer {layer} is not a self-attention layer {valid}")
            n = adapter.geometry(layer).num_heads
            if not 0 <= head < n:
                raise ValueError(f"head {layer}-{head}: layer {layer} has heads 0..{n - 1}")
            out.setdefault(layer, set()).add(head)
    layer_list = valid if layers is None else [int(x) for x in layers]
    for layer in layer_list:
        if layer not in valid:
            raise ValueError(f"layer {layer} is not a self-attention layer of this model; valid: {valid}")
    if layers is not None and heads is not None:
        out = {layer: hs for layer, hs in out.items() if layer in set(layer_list)}
    elif heads is None:
        out = {layer: set(range(adapter.geometry(layer).num_heads)) for layer in layer_list}
    return {layer: sorted(out[layer]) for layer in sorted(out)}


@dataclass
class IntactBatch:
    """What the intact pass keeps about one calibration batch."""

    inputs: dict[str, object]
    rows: Tensor  # [K] row of each scored position
    cols: Tensor  # [K] its time index
    batch_size: int
    last_index: Tensor  # [B] last prompt token per row
    logits: Tensor | None = None  # [K, V] intact logits at the scored positions
    final_hidden: Tensor | None = None  # [B, d] hidden_states[-1] at the last prompt token
    token_mask: Tensor | None = None  # [B, T] non-padding positions
    extra: dict[str, object] = field(default_factory=dict)


def _prepare(batch: Mapping[str, object], cfg: ScoreConfig, device: torch.device) -> IntactBatch:
    positions = "last" if cfg.score != "kl" else cfg.positions
    mask = score_positions(batch, positions)  # raises early on missing labels
    rows, cols = mask.nonzero(as_tuple=True)
    inputs = model_inputs(batch, device)
    attn = batch.get("attention_mask")
    ids = batch["input_ids"]
    token_mask = attn.bool() if isinstance(attn, Tensor) else torch.ones_like(ids, dtype=torch.bool)
    return IntactBatch(
        inputs=inputs,
        rows=rows.to(device),
        cols=cols.to(device),
        batch_size=ids.shape[0],
        last_index=last_prompt_index(batch).to(device),
        token_mask=token_mask,
    )


def forward_outputs(model: nn.Module, item: IntactBatch, cfg: ScoreConfig) -> tuple[Tensor | None, Tensor | None]:
    """One full forward: (logits at the scored positions, final hidden at the last prompt token)."""
    want_hidden = cfg.score != "kl"
    out = model(**item.inputs, use_cache=False, output_hidden_states=want_hidden)
    logits = out.logits[item.rows, item.cols] if cfg.score == "kl" else None
    hidden = None
    if want_hidden:
        final = out.hidden_states[-1]
        hidden = final[torch.arange(item.batch_size, device=final.device), item.last_index]
    return logits, hidden


def prepare_batches(model: nn.Module, batches: Sequence[Mapping[str, object]], cfg: ScoreConfig) -> list[IntactBatch]:
    """Validate and index every batch (scored positions, last prompt token) without running it."""
    if not batches:
        raise ValueError("no calibration batches: need at least one prompt to score heads")
    device = next(model.parameters()).device
    return [_prepare(batch, cfg, device) for batch in batches]


@torch.no_grad()
def intact_pass(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: Sequence[Mapping[str, object]],
    cfg: ScoreConfig,
    layers: Sequence[int],
    extra_hooks: Callable[[int], object] | None = None,
) -> tuple[list[IntactBatch], dict[int, Tensor]]:
    """Run every batch once, intact. Returns the kept outputs and (mode ``mean``) the per-head
    mean o_proj inputs of ``layers`` over the non-padding tokens of all batches.

    ``extra_hooks(i)`` may return a context manager entered around batch ``i``'s forward (the
    exact engine uses it to capture layer inputs).
    """
    items = prepare_batches(model, batches, cfg)
    means: dict[int, Tensor] = {}
    masks = [item.token_mask for item in items] if cfg.ablation == "mean" else []
    from contextlib import ExitStack, nullcontext

    with ExitStack() as stack:
        if cfg.ablation == "mean":
            means = stack.enter_context(o_proj_input_means(adapter, list(layers), masks))
        for i, item in enumerate(items):
            ctx = extra_hooks(i) if extra_hooks is not None else nullcontext()
            with ctx:
                item.logits, item.final_hidden = forward_outputs(model, item, cfg)
    return items, means


class ScoreAccumulator:
    """Collects per-prompt ablated outputs per head and reduces them to scores."""

    def __init__(self, cfg: ScoreConfig, items: Sequence[IntactBatch]) -> None:
        self.cfg = cfg
        self.items = items
        self._kl: dict[str, list[Tensor]] = {}
        self._hidden: dict[str, list[Tensor | None]] = {}

    def add(self, layer: int, head: int, batch_index: int, logits: Tensor | None, hidden: Tensor | None) -> None:
        """Record head (layer, head)'s ablated outputs for batch ``batch_index`` (same layout as
        :class:`IntactBatch`: logits ``[K, V]`` at the scored positions, hidden ``[B, d]``)."""
        key = head_key(layer, head)
        item = self.items[batch_index]
        if self.cfg.score == "kl":
            kl = kl_per_position(item.logits, logits)
            self._kl.setdefault(key, []).append(per_prompt_mean(kl, item.rows, item.batch_size))
        else:
            slots = self._hidden.setdefault(key, [None] * len(self.items))
            slots[batch_index] = hidden.detach()

    def finish(self, layer: int, heads: Iterable[int]) -> dict[str, float]:
        """Scores of ``heads`` of ``layer`` once every batch has been added."""
        out: dict[str, float] = {}
        for head in heads:
            key = head_key(layer, head)
            if self.cfg.score == "kl":
                values = self._kl.pop(key)
                if len(values) != len(self.items):
                    raise RuntimeError(f"head {key}: {len(values)} of {len(self.items)} batches scored")
                out[key] = float(torch.cat(values).mean())
                continue
            slots = self._hidden.pop(key)
            if any(s is None for s in slots):
                raise RuntimeError(f"head {key}: some batches were not scored")
            intact = torch.cat([item.final_hidden for item in self.items])
            ablated = torch.cat(slots)  # type: ignore[arg-type]
            if self.cfg.score == "subspace":
                out[key] = subspace_score(intact, ablated, self.cfg.r_max)
            else:
                out[key] = reference_score(intact, ablated)
        return out
