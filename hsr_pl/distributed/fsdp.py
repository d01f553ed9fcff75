"""Wrap a model in FSDP2 units and load its checkpoint sharded.

:func:`shard_model` makes every decoder layer, the vision tower, the projector and the untied
embeddings ``fully_shard`` units; :func:`load_sharded` builds the model on the meta device
(:func:`meta_parameters`) and then each rank reads only its own rows of every tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models import get_adapter
from .dtensor import is_sharded
from .errors import ShardingError

__all__ = ["checkpoint_name_mapper", "load_sharded", "meta_parameters", "reshard_all", "shard_model"]


def reshard_all(model: nn.Module) -> None:
    """Put every ``fully_shard`` unit of ``model`` back to its sharded state. A forward that
    stopped with an exception (the sequential capture stops at the last layer's entry) skips the
    post-forward reshard, leaving gathered parameters behind; edits to those would be lost."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _units(model: nn.Module, adapter) -> list[nn.Module]:
    """The ``fully_shard`` units below the root, innermost first: every decoder layer, the vision
    tower, the projector, and the input/output embeddings when untied. The tower and the
    projector are units of their own because ``generate`` calls them outside the root's forward
    (image features are computed up front)."""
    units: list[nn.Module] = list(adapter.all_layers())
    vision = adapter.vision_tower()
    if vision is not None:
        # One unit for the whole tower: transformers records the tower's hidden states with
        # hooks keyed on its layer classes, which fully_shard would rename.
        units.append(vision)
    projector = adapter.projector()
    if projector is not None and any(True for _ in projector.parameters()):
        units.append(projector)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is embed.weight
    if not tied:
        units.append(embed)
        if head is not None:
            units.append(head)
    return units


def shard_model(model: nn.Module, mesh, *, adapter=None, reshard_after_forward: bool = True) -> list[str]:
    """``fully_shard`` every unit of :func:`_units` and then the root over ``mesh`` (1-D, data
    parallel); returns the units' names. Works on a meta-device model as well."""
    from torch.distributed.fsdp import fully_shard

    if adapter is None:
        adapter = get_adapter(model)
    if mesh.ndim != 1:
        raise ShardingError(f"shard_model needs the 1-D data-parallel mesh, got {mesh.ndim} dimensions")
    names = {id(m): n for n, m in model.named_modules()}
    recorded = _output_capture_entries(model)
    wrapped = []
    for unit in _units(model, adapter):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
        wrapped.append(names.get(id(unit), "?"))
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    _restore_output_capture(recorded)
    return wrapped


def _output_capture_entries(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    """transformers keys what a (sub)model may record (hidden states, attentions) on its class's
    name; ``fully_shard`` swaps the class for an ``FSDP<Name>`` subclass, so the entries are
    noted before and registered for the new classes after (else e.g. LLaVA's vision tower
    returns no hidden states)."""
    try:
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers without the registry: nothing to keep
        return []
    return [(m, _CAN_RECORD_REGISTRY.get(m)) for m in model.modules() if isinstance(m, PreTrainedModel)]


def _restore_output_capture(entries: list[tuple[nn.Module, dict]]) -> None:
    if not entries:
        return
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    for module, entry in entries:
        if entry and not _CAN_RECORD_REGISTRY.get(module):
            _CAN_RECORD_REGISTRY[module] = entry


# ---------------------------------------------------------------------------------- loading
@contextmanager
def meta_parameters() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers real (rotary
    frequencies and other computed buffers keep their constructed values; :func:`load_sharded`
    overwrites those a checkpoint carries). Each parameter is created on the CPU and moved to
    meta at registration, before any initialisation runs on it: one parameter at a time."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """``{checkpoint tensor name: file}`` from ``model.safetensors`` or the index of shards."""
    from safetensors import safe_open

    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        with safe_open(str(single), "pt") as handle:
            return {key: single for key in handle.keys()}
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {str(k): folder / str(v) for k, v in weight_map.items()}
    raise ShardingError(f"{folder} has no model.safetensors (or index); save the weights with save_pretrained")


def checkpoint_name_mapper(model: nn.Module):
    """``checkpoint key -> model parameter name`` as ``from_pretrained`` renames them (legacy
    layouts such as LLaVA's ``language_model.model.*``); weight conversions beyond renaming
    (fused or split tensors) are refused: the sharded loader copies rows, it does not convert.
    Build it before ``fully_shard`` (which renames the module classes transformers looks up)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # older transformers: the names are the model's own
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    names = dict.fromkeys(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None)

    def mapped(key: str) -> str:
        renamed, converter = rename_source_key(key, renamings, converters, base_model_prefix=prefix, meta_state_dict=names)
        if converter is not None:
            raise ShardingError(
                f"{getattr(model.config, 'model_type', '?')}: checkpoint tensor {key!r} needs a weight conversion "
                f"({converter}) that the sharded loader does not do; load it with strategy ddp, or re-save it in the "
                "model's own layout"
            )
        return renamed

    return mapped


def _shard_bounds(param: Tensor) -> tuple[int, int]:
    """``[start, end)`` of the rows this rank holds of the ``Shard(0)`` DTensor ``param``."""
    from torch.distributed.tensor import Shard

    if len(param.placements) != 1 or not isinstance(param.placements[0], Shard) or param.placements[0].dim != 0:
        raise ShardingError(f"parameter placements {param.placements} are not Shard(0); shard with fully_shard")
    rows = param.shape[0]
    world = param.device_mesh.size()
    rank = param.device_mesh.get_local_rank()
    size = math.ceil(rows / world) if rows else 0
    start = min(rows, rank * size)
    return start, min(rows, start + size)


@torch.no_grad()
def load_sharded(
    model: nn.Module, folder: str | Path, device: torch.device | str = "cpu", *, names=None
) -> dict[str, int]:
    """Materialise the meta parameters of the sharded ``model`` on ``device`` and fill them from
    the checkpoint ``folder``: each rank reads only its own rows of each tensor (``get_slice``).

    Returns ``{"read_bytes": …, "tensors": …}`` for this rank. Every parameter must be in the
    checkpoint, else a :class:`ShardingError` names the first missing one. ``names``: the
    :func:`checkpoint_name_mapper` built before sharding.
    """
    from safetensors import safe_open

    folder = Path(folder)
    files = _checkpoint_files(folder)
    mapped = names or checkpoint_name_mapper(model)
    by_model_name = {mapped(k): (k, f) for k, f in files.items()}
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in by_model_name]
    if missing:
        raise ShardingError(
            f"{folder}: the checkpoint lacks {len(missing)} parameter(s) of the model (e.g. {missing[0]!r}); re-save the "
            "checkpoint with save_pretrained"
        )
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            buffers = {n: b.detach().clone() for n, b in module.named_buffers(recurse=False) if not b.is_meta}
            module.to_empty(device=device, recurse=False)
            for name, value in buffers.items():
                getattr(module, name).copy_(value)
    handles: dict[Path, object] = {}
    read = 0
    try:
        for name, param in params.items():
            key, file = by_model_name[name]
            if file not in handles:
                handles[file] = safe_open(str(file), "pt")
            piece = handles[file].get_slice(key)
            shape = tuple(piece.get_shape())
            if shape != tuple(param.shape):
                raise ShardingError(f"{file.name}: {key} has shape {shape}, the model's {name} {tuple(param.shape)}")
            if is_sharded(param):
                start, end = _shard_bounds(param)
                local = param.to_local()
                rows = piece[start:end] if end > start else torch.empty(0, *shape[1:])
                local.copy_(rows.to(local.dtype))
                read += rows.numel() * rows.element_size()
            else:
                value = piece[:]
                param.data.copy_(value.to(param.dtype))
                read += value.numel() * value.element_size()
        for name, buffer in model.named_buffers():  # persistent buffers a checkpoint carries (small, whole)
            if name in by_model_name and not is_sharded(buffer):
                key, file = by_model_name[name]
                if file not in handles:
                    handles[file] = safe_open(str(file), "pt")
                value = handles[file].get_tensor(key)
                if tuple(value.shape) != tuple(buffer.shape):
                    raise ShardingError(f"{file.name}: {key} has shape {tuple(value.shape)}, the model's {name} "
                                        f"{tuple(buffer.shape)}")
                buffer.copy_(value.to(buffer.dtype))
    finally:
        handles.clear()
    return {"read_bytes": int(read), "tensors": len(params)}
