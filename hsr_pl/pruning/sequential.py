"""Layer-input capture and the per-layer forward used by sequential pruning.

The reference pruners run the decoder layer by layer: the calibration inputs of layer 0 are
captured once (hidden states plus every keyword argument the decoder passes, e.g.
position_embeddings, attention_mask, position_ids, cache_position), and each layer's outputs
become the next layer's inputs. Only one layer's activations are alive at any time, kept on that
layer's device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CalibrationError
from .stats import TokenSelection, token_mask

__all__ = ["LayerInput", "capture_layer_inputs", "move_to", "run_layer"]

# Batch keys that only the loss needs; the decoder layers never see them.
_LOSS_ONLY = ("labels",)


@dataclass
class LayerInput:
    """What one calibration batch feeds a decoder layer, and which of its tokens count."""

    hidden: Tensor
    kwargs: dict[str, Any]
    mask: Tensor | None


class _Captured(Exception):
    """Raised by the capture pre-hook to stop the forward right at the first decoder layer."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.args = args
        self.kwargs = kwargs


def move_to(obj: Any, device: torch.device) -> Any:
    """Recursively move tensors inside tuples/lists/dicts to ``device`` (other objects untouched)."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def model_inputs(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch as ``model(**...)`` kwargs on ``device``, without labels, without a KV cache."""
    out = {k: move_to(v, device) for k, v in batch.items() if k not in _LOSS_ONLY}
    out["use_cache"] = False
    return out


def layer_device(layer: nn.Module) -> torch.device:
    for p in layer.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, first_layer: nn.Module, batches: Iterable[Mapping[str, Tensor]], tokens: str
) -> list[LayerInput]:
    """Run each batch through ``model`` until ``first_layer`` and keep what that layer receives."""
    device = model.get_input_embeddings().weight.device
    captured: list[LayerInput] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _Captured(args, kwargs)

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            mask = token_mask(batch, tokens)
            try:
                model(**model_inputs(batch, device))
            except _Captured as cap:
                kwargs = dict(cap.kwargs)
                hidden = cap.args[0] if cap.args else kwargs.pop("hidden_states")
                if len(cap.args) > 1:
                    raise CalibrationError(
                        "the first decoder layer received extra positional arguments; sequential capture "
                        "supports (hidden_states, **kwargs) layers only; use mode='oneshot'"
                    ) from None
                dev = layer_device(first_layer)
                captured.append(LayerInput(hidden.to(dev), move_to(kwargs, dev), mask.to(dev)))
            else:
                raise CalibrationError(
                    "the forward pass never reached the first decoder layer; check the model and batch"
                )
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[LayerInput], selection: TokenSelection | None = None) -> list[LayerInput]:
    """Feed every captured input through ``layer``; the outputs are the next layer's inputs."""
    dev = layer_device(layer)
    outputs: list[LayerInput] = []
    for inp in inputs:
        hidden = inp.hidden.to(dev)
        kwargs = move_to(inp.kwargs, dev) if hidden.device != inp.hidden.device else inp.kwargs
        if selection is not None:
            selection.set(inp.mask)
        out = layer(hidden, **kwargs)
        if isinstance(out, tuple):
            out = out[0]
        outputs.append(LayerInput(out, kwargs, inp.mask))
    if selection is not None:
        selection.set(None)
    return outputs
