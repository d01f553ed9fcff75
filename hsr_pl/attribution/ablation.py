"""Hooks that ablate attention heads, one head per batch row.

Every engine ablates heads through :class:`HeadAblation`: a context manager that hooks one
decoder layer and, for each row ``r`` of the batch, ablates query head ``heads[r]`` of that
layer (``-1`` leaves the row intact). Because the head is chosen per row, several ablated
copies of the same prompts can share one batched forward (the exact engine's trick) while the
naive loop uses the very same hooks with one head for every row.

Modes (docs/attribution.md):

``head``  (default) query activations of the head × ε (output of
          ``adapter.query_states_module``, pre-RoPE) and its slice of the o_proj input × ε.
          Exactly one query head, for MHA and GQA alike.
``qkv``   the released scripts: query, key and value activations × ε. Under GQA the key/value
          head is shared, so the whole KV group is ablated (all g query heads of the group get
          the same score). For MHA this equals ``head`` up to O(ε).
``zero``  the head's o_proj input slice set to 0.
``mean``  the head's o_proj input slice replaced by its mean over the calibration prompts
          (see :func:`o_proj_input_means`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from hsr_pl.models.adapters import ModelAdapter, split_heads

__all__ = [
    "ABLATION_MODES",
    "HeadAblation",
    "HeadScaling",
    "o_proj_input_means",
    "validate_ablation",
]

ABLATION_MODES = ("head", "qkv", "zero", "mean")


def validate_ablation(mode: str, epsilon: float) -> None:
    """Raise a clear error for an unknown mode or an ε outside [0, 1)."""
    if mode not in ABLATION_MODES:
        raise ValueError(f"ablation={mode!r} is not one of {ABLATION_MODES}; 'head' is the default")
    if not (0.0 <= float(epsilon) < 1.0):
        raise ValueError(f"epsilon={epsilon!r} must lie in [0, 1) (default 1e-5: a near-zero scale)")


def _row_scale(heads: Tensor, num_heads: int, value: float, dtype: torch.dtype) -> Tensor:
    """``[N, H]`` multipliers: ``value`` at (row, heads[row]) and 1 elsewhere (row intact if -1)."""
    scale = torch.ones(heads.numel(), num_heads, dtype=dtype, device=heads.device)
    rows = torch.nonzero(heads >= 0).flatten()
    scale[rows, heads[rows]] = value
    return scale


HeadView = Callable[[Tensor], Tensor]


def _edit_heads(states: Tensor, view: HeadView, edit: Callable[[Tensor], Tensor]) -> Tensor:
    """A copy of ``states`` whose per-head view (``view(...)``: ``[N, ..., T, H, d_h]``) holds
    ``edit(view(states))``.

    The result is written back *through the view* of the copy, so the hooked tensor's own
    layout (flat, token-major or Gemma3's head-major ``[N, H, T, d_h]``) never matters:
    reshaping an edited view back to ``states.shape`` would refill a transposed layout in the
    wrong order. ``edit`` reads ``states``, not the copy being written, so tensors autograd
    saves for the gradient engine's α are never modified in place.
    """
    out = states.clone()
    view(out).copy_(edit(view(states)))
    return out


def _per_row(scale: Tensor, heads: Tensor) -> Tensor:
    """``[N, H]`` per-row, per-head values shaped to broadcast over a ``[N, ..., H, d_h]`` view."""
    return scale.to(heads.dtype).view(heads.shape[0], *(1,) * (heads.dim() - 3), scale.shape[1], 1)


def _scale_heads(states: Tensor, view: HeadView, scale: Tensor) -> Tensor:
    """``states`` with head h of row r × ``scale[r, h]``, whatever its layout."""
    return _edit_heads(states, view, lambda heads: heads * _per_row(scale, heads))


class HeadAblation:
    """Context manager: ablate ``heads[r]`` of decoder layer ``layer`` in batch row ``r``.

    Args:
        adapter: the model's adapter (module paths and geometry).
        layer: decoder layer index.
        heads: LongTensor ``[N]`` of query-head indices, ``-1`` for an intact row. ``N`` must be
            the batch size of every forward run inside the context.
        mode: one of :data:`ABLATION_MODES`.
        epsilon: the scale of the ``head`` and ``qkv`` modes.
        mean: ``[H, d_h]`` per-head mean o_proj input (mode ``mean`` only).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        layer: int,
        heads: Tensor,
        mode: str = "head",
        epsilon: float = 1e-5,
        mean: Tensor | None = None,
    ) -> None:
        validate_ablation(mode, epsilon)
        if mode == "mean" and mean is None:
            raise ValueError("ablation='mean' needs the per-head means (o_proj_input_means)")
        self.adapter = adapter
        self.layer = layer
        self.geometry = adapter.geometry(layer)
        self.heads = heads.long().flatten()
        self.mode = mode
        self.epsilon = float(epsilon)
        self.mean = mean
        self._handles: list[Any] = []

    # ----------------------------------------------------------------------------- hooks
    def _check_rows(self, tensor: Tensor) -> None:
        if tensor.shape[0] != self.heads.numel():
            raise RuntimeError(
                f"HeadAblation got a batch of {tensor.shape[0]} rows but heads has {self.heads.numel()}"
            )

    def _query_hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        self._check_rows(output)
        scale = _row_scale(self.heads.to(output.device), self.geometry.num_heads, self.epsilon, output.dtype)
        # the adapter knows its family's layout (Gemma3's q_norm output is head-major)
        return _scale_heads(output, lambda t: self.adapter.query_heads(self.layer, t), scale)

    def _kv_scale(self, output: Tensor) -> Tensor:
        # The KV head read by query head h is h // g: the whole group is scaled.
        self._check_rows(output)
        geo = self.geometry
        heads = self.heads.to(output.device)
        groups = torch.where(heads >= 0, torch.div(heads, geo.group_size, rounding_mode="floor"), heads)
        return _row_scale(groups, geo.num_kv_heads, self.epsilon, output.dtype)

    def _key_hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        scale = self._kv_scale(output)
        return _scale_heads(output, lambda t: self.adapter.key_heads(self.layer, t), scale)

    def _value_hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        # v_proj's output is flat [..., T, H_kv * d_h]; split_heads refuses a layout it cannot tell
        geo = self.geometry
        scale = self._kv_scale(output)
        return _scale_heads(output, lambda t: split_heads(t, geo.num_kv_heads, geo.head_dim), scale)

    def _o_proj_pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        self._check_rows(x)
        geo = self.geometry
        heads = self.heads.to(x.device)

        def view(t: Tensor) -> Tensor:  # o_proj input: the flat concatenation of head outputs
            return split_heads(t, geo.num_heads, geo.head_dim)

        if self.mode == "head":
            return (_scale_heads(x, view, _row_scale(heads, geo.num_heads, self.epsilon, x.dtype)), *args[1:])
        keep = _row_scale(heads, geo.num_heads, 0.0, x.dtype)  # 0 on the ablated head
        if self.mode == "zero":
            return (_scale_heads(x, view, keep), *args[1:])
        mean = self.mean.to(x.device, x.dtype)  # [H, d_h], broadcasts over the view's last two dims

        def to_mean(split: Tensor) -> Tensor:
            k = _per_row(keep, split)
            return split * k + (1 - k) * mean

        return (_edit_heads(x, view, to_mean), *args[1:])

    # --------------------------------------------------------------------------- context
    def __enter__(self) -> HeadAblation:
        a, i = self.adapter, self.layer
        if self.mode in ("head", "qkv"):
            self._handles.append(a.query_states_module(i).register_forward_hook(self._query_hook))
        if self.mode == "qkv":
            self._handles.append(a.key_states_module(i).register_forward_hook(self._key_hook))
            self._handles.append(a.value_states_module(i).register_forward_hook(self._value_hook))
        else:
            self._handles.append(a.o_proj(i).register_forward_pre_hook(self._o_proj_pre_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class HeadScaling:
    """Context manager for the gradient engine: o_proj input slice of head h → c + α (x − c).

    ``alpha`` is ``[N, n_layers, H]`` (one scale per batch row, scored layer and head, all 1 at
    the intact point); ``centers`` maps a layer to its ``[H, d_h]`` centre c (the calibration
    mean for mode ``mean``, zero otherwise). ∂score/∂α at α = 1 is the first-order effect of
    moving a head's output towards its ablated value; one row per prompt keeps the gradients of
    different prompts apart at no extra cost.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        layers: list[int],
        alpha: Tensor,
        centers: Mapping[int, Tensor] | None = None,
    ) -> None:
        self.adapter = adapter
        self.layers = list(layers)
        self.alpha = alpha
        self.centers = dict(centers or {})
        self._handles: list[Any] = []

    def _hook(self, index: int):
        layer = self.layers[index]
        geo = self.adapter.geometry(layer)

        def pre_hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            a = self.alpha[:, index, : geo.num_heads]  # alpha is padded to the widest layer
            center = self.centers.get(layer)

            def move(split: Tensor) -> Tensor:
                if center is None:
                    return split * _per_row(a, split)
                c = center.to(x.device, x.dtype)
                return c + _per_row(a, split) * (split - c)

            return (_edit_heads(x, lambda t: split_heads(t, geo.num_heads, geo.head_dim), move), *args[1:])

        return pre_hook

    def __enter__(self) -> HeadScaling:
        for k, layer in enumerate(self.layers):
            self._handles.append(self.adapter.o_proj(layer).register_forward_pre_hook(self._hook(k)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextmanager
def o_proj_input_means(
    adapter: ModelAdapter, layers: list[int], token_mask: list[Tensor | None]
) -> Iterator[dict[int, Tensor]]:
    """Accumulate each head's mean o_proj input over the non-padding tokens of the forwards run
    inside the context (call order must match ``token_mask``: one ``[B, T]`` bool mask per
    forward, or ``None`` for all positions). Yields a dict that is filled with ``[H, d_h]`` means
    (float64 accumulation, model dtype result) when the context exits.

    This is the ``mean`` mode's replacement value: the mean over every non-padding position of
    every calibration prompt, i.e. the head's average contribution, so the ablation removes only
    the prompt-specific part of what the head writes.
    """
    sums: dict[int, Tensor] = {}
    counts: dict[int, float] = {}
    dtypes: dict[int, torch.dtype] = {}
    calls: dict[int, int] = {layer: 0 for layer in layers}
    handles = []
    result: dict[int, Tensor] = {}

    def make(layer: int):
        geo = adapter.geometry(layer)

        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            mask = token_mask[calls[layer]] if calls[layer] < len(token_mask) else None
            calls[layer] += 1
            flat = x.reshape(*x.shape[:2], geo.num_heads * geo.head_dim).double()
            if mask is not None:
                m = mask.to(x.device, torch.bool)
                flat = flat[m]
            else:
                flat = flat.reshape(-1, flat.shape[-1])
            sums[layer] = sums.get(layer, 0) + flat.sum(0)
            counts[layer] = counts.get(layer, 0.0) + flat.shape[0]
            dtypes[layer] = x.dtype

        return pre_hook

    for layer in layers:
        handles.append(adapter.o_proj(layer).register_forward_pre_hook(make(layer)))
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        if layer not in sums or counts[layer] == 0:
            raise RuntimeError(f"no tokens reached o_proj of layer {layer}: cannot form the mean")
        geo = adapter.geometry(layer)
        mean = (sums[layer] / counts[layer]).view(geo.num_heads, geo.head_dim)
        result[layer] = mean.to(dtypes[layer])
