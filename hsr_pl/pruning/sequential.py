"""Layer-input capture and the per-layer forward used by sequential pruning.

The reference pruners run the decoder layer by layer: the calibration inputs of layer 0 are
captured once, and each layer's outputs become the next layer's inputs. The keyword arguments
(attention_mask, position_embeddings, position_ids, cache_position, ...) are *not* the same for
every layer in all families: Gemma3, and Qwen2/2.5-VL with mixed ``layer_types``, give sliding-
window layers another mask and other rotary embeddings than full-attention layers. So the capture
records what *each* decoder layer receives, and layer l is replayed with layer l's own arguments.

The decoders build those arguments before their layer loop, from the batch alone; a layer's
output only changes the next layer's hidden states. So the capture swaps every listed layer's
``forward`` for a stub that records its arguments and hands its input straight on: one pass
through the embeddings (and the vision tower), no decoder layer computed, the same cost as the
references' Catcher at layer 0. An adapter whose decoder derives a layer's arguments from an
earlier layer's output sets ``layer_arguments_from_batch = False``; its capture then runs the
dense layers (``run_layers=True``, also the tests' reference). The decoder hands the same tensor
objects to every layer of a kind, so keeping references costs a few masks per batch, not one per
layer. Only one layer's hidden states are alive at any time, kept on that layer's device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from hsr_pl.distributed import model_is_sharded, reshard_all

from .errors import CalibrationError
from .stats import TokenSelection, token_mask

__all__ = ["LayerInput", "capture_layer_inputs", "move_to", "run_layer"]

# Batch keys that only the loss needs; the decoder layers never see them.
_LOSS_ONLY = ("labels",)
# Cache arguments: the capture forward runs with use_cache=False, a replay must not get one either.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")


@dataclass
class LayerInput:
    """What one calibration batch feeds the current decoder layer, and which of its tokens count.

    ``kwargs[l]`` holds the keyword arguments decoder layer ``l`` received in the dense forward
    (everything but the hidden states); ``hidden`` is the current layer's input.
    """

    hidden: Tensor
    kwargs: list[dict[str, Any]]
    mask: Tensor | None


class _Captured(Exception):
    """Raised by the last capture pre-hook: nothing after it (last layer, norm, lm_head) is needed."""


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


def _split_call(index: int, args: tuple, kwargs: dict) -> tuple[Tensor, dict[str, Any]]:
    """(hidden states, the other keyword arguments) of one decoder-layer call."""
    kw = dict(kwargs)
    if len(args) > 1:
        raise CalibrationError(
            f"decoder layer {index} received {len(args)} positional arguments; sequential capture supports "
            "layer(hidden_states, **kwargs) only; use mode='oneshot'"
        )
    if args:
        hidden = args[0]
    elif "hidden_states" in kw:
        hidden = kw.pop("hidden_states")
    else:
        raise CalibrationError(f"decoder layer {index} received no hidden states; use mode='oneshot'")
    for key in _CACHE_KWARGS:
        if kw.get(key) is not None:
            raise CalibrationError(f"decoder layer {index} received a KV cache ({key}) despite use_cache=False")
        kw.pop(key, None)
    return hidden, kw


_ABSENT = object()


@contextmanager
def _stubbed(layers: Sequence[nn.Module], record: Callable[[int, tuple, dict], Tensor]) -> Iterator[None]:
    """Replace each layer's ``forward`` by ``record(index, args, kwargs)`` (its return value is the
    layer's output); the previous instance attribute (e.g. an accelerate hook's) comes back after."""
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for index, layer in enumerate(layers):
            saved.append((layer, layer.__dict__.get("forward", _ABSENT)))
            layer.forward = partial(_forward_stub, record, index)
        yield
    finally:
        for layer, previous in saved:
            if previous is _ABSENT:
                del layer.forward
            else:
                layer.forward = previous


def _forward_stub(record: Callable[[int, tuple, dict], Tensor], index: int, *args: Any, **kwargs: Any) -> Tensor:
    return record(index, args, kwargs)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    layers: Sequence[nn.Module],
    batches: Iterable[Mapping[str, Tensor]],
    tokens: str,
    *,
    run_layers: bool = False,
) -> list[LayerInput]:
    """Run each batch into the dense ``model`` and record what every layer in ``layers`` gets.

    ``layers`` are decoder layers 0..n-1 in call order. Per batch this keeps layer 0's hidden
    states (moved to layer 0's device) and each layer's keyword arguments by reference (on the
    device the decoder made them; :func:`run_layer` moves them). The forward stops at the entry of
    the last listed layer, so the rest of the model never runs. With ``run_layers=False`` (the
    default) no listed layer is computed either: each passes its input on unchanged, which is
    exact for decoders that build every layer's arguments from the batch (see the module doc);
    ``run_layers=True`` computes layers 0..n-2 densely instead.
    """
    if not layers:
        raise CalibrationError("no decoder layers to capture inputs for")
    device = model.get_input_embeddings().weight.device
    sharded = model_is_sharded(model)
    captured: list[LayerInput] = []
    current: dict[int, tuple[Tensor | None, dict[str, Any]]] = {}
    last = len(layers) - 1

    def record(index: int, args: tuple, kwargs: dict) -> Tensor:
        hidden, kw = _split_call(index, args, kwargs)
        current[index] = (hidden if index == 0 else None, kw)
        if index == last:
            raise _Captured
        return hidden

    def make(index: int):
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            record(index, args, kwargs)

        return pre_hook

    handles = []
    try:
        with ExitStack() as stack:
            if run_layers:
                handles = [layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]
            else:
                stack.enter_context(_stubbed(layers, record))
            for batch in batches:
                mask = token_mask(batch, tokens)
                current.clear()
                try:
                    model(**model_inputs(batch, device))
                except _Captured:
                    pass
                finally:
                    if sharded:
                        reshard_all(model)  # the stopped forward skipped FSDP's post-forward reshard
                missing = [i for i in range(len(layers)) if i not in current]
                if missing:
                    raise CalibrationError(
                        f"the forward pass never reached decoder layers {missing[:5]}; sequential pruning needs "
                        "every layer called once in order (use mode='oneshot' for decoders that skip layers)"
                    )
                dev = layer_device(layers[0])
                hidden = current[0][0].to(dev)
                kwargs = [current[i][1] for i in range(len(layers))]
                captured.append(LayerInput(hidden, kwargs, mask.to(dev)))
    finally:
        for handle in handles:
            handle.remove()
        current.clear()
    return captured


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    index: int,
    inputs: list[LayerInput],
    selection: TokenSelection | None = None,
    *,
    outputs: str = "new",
) -> list[LayerInput]:
    """Feed every input through decoder layer ``index`` with that layer's own recorded kwargs.

    The outputs are layer ``index + 1``'s inputs. ``outputs`` says what becomes of them:
    ``"new"`` returns them in a new list; ``"replace"`` writes each into ``inputs`` in place of
    the input it came from (returned too), so only one batch's hidden states are alive twice;
    ``"none"`` drops them (a statistics pass, whose hooks are all it needs). The references keep
    two full ``[samples, seq, hidden]`` buffers instead.
    """
    if outputs not in ("new", "replace", "none"):
        raise ValueError(f"outputs={outputs!r}: use 'new', 'replace' or 'none'")
    dev = layer_device(layer)
    results: list[LayerInput] = inputs if outputs == "replace" else []
    for position, inp in enumerate(inputs):
        if index >= len(inp.kwargs):
            raise CalibrationError(
                f"no recorded arguments for decoder layer {index} (captured {len(inp.kwargs)} layers)"
            )
        kwargs = move_to(inp.kwargs[index], dev)
        if selection is not None:
            selection.set(inp.mask)
        out = layer(inp.hidden.to(dev), **kwargs)
        if isinstance(out, tuple):
            out = out[0]
        if outputs == "replace":
            results[position] = LayerInput(out, inp.kwargs, inp.mask)
        elif outputs == "new":
            results.append(LayerInput(out, inp.kwargs, inp.mask))
        del out
    if selection is not None:
        selection.set(None)
    return results
