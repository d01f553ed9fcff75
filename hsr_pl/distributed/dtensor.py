"""Read and write weights the same way whether or not FSDP2 (``fully_shard``) shards them.

Outside a forward every parameter of a ``fully_shard`` unit is a ``DTensor`` holding a block of rows
(``Shard(0)``, ``torch.chunk`` sizes). :func:`full_weight` / :func:`write_full` hand out
``linear.weight.data`` itself on an unsharded model (no copy) and gather one linear's full weight on
a sharded one (a collective: every rank calls them in the same order), so a rank never holds the
full model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from .errors import ShardingError

__all__ = [
    "describe_sharding",
    "full_tensor",
    "full_weight",
    "is_sharded",
    "iter_full_state",
    "local_part_of",
    "local_rows",
    "model_is_sharded",
    "sharded_strategy",
    "write_full",
]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    return DTensor


def is_sharded(tensor) -> bool:
    """True for a ``DTensor`` (a parameter of a ``fully_shard`` unit outside its forward)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def sharded_strategy(trainer) -> bool:
    """True when ``trainer`` runs Lightning's ``ModelParallelStrategy`` (FSDP2)."""
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:  # pragma: no cover - every supported Lightning has it
        return False
    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def model_is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a ``DTensor``."""
    return any(is_sharded(p) for p in model.parameters())


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor as a plain one: gathered (a collective) when sharded, else ``tensor.detach()``."""
    if is_sharded(tensor):
        return tensor.detach().full_tensor()
    return tensor.detach()


def full_weight(linear: nn.Module) -> Tensor:
    """``linear``'s full weight as a plain tensor that may be edited and handed to :func:`write_full`.

    Unsharded: ``linear.weight.data`` itself (edits change the model at once). Sharded: a gathered
    copy (every rank must call this for the same linear in the same order)."""
    weight = linear.weight
    if is_sharded(weight):
        return weight.detach().full_tensor()
    return weight.data


def local_rows(param: Tensor, full: Tensor) -> Tensor:
    """The part of ``full`` that this rank holds of the sharded ``param`` (its local shape)."""
    from torch.distributed.tensor import distribute_tensor

    if tuple(full.shape) != tuple(param.shape):
        raise ShardingError(f"a full tensor of shape {tuple(full.shape)} does not fit parameter {tuple(param.shape)}")
    # src_data_rank=None: every rank slices its own copy (they are identical), no communication.
    part = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None).to_local()
    local = param.to_local()
    if tuple(part.shape) != tuple(local.shape):
        raise ShardingError(
            f"the local shard has shape {tuple(local.shape)} but slicing the full tensor gives {tuple(part.shape)}; "
            "the parameter is not sharded as fully_shard does (Shard(0), torch.chunk sizes)"
        )
    return part


@torch.no_grad()
def write_full(linear_or_param, full: Tensor) -> None:
    """Store ``full`` (the whole weight) into the module's weight: its local rows when sharded.

    A no-op when ``full`` is the unsharded weight's own ``.data`` (what :func:`full_weight` handed out)."""
    param = linear_or_param.weight if isinstance(linear_or_param, nn.Module) else linear_or_param
    if is_sharded(param):
        param.to_local().copy_(local_rows(param, full))
        return
    if full.data_ptr() == param.data.data_ptr() and full.shape == param.shape:
        return
    param.data.copy_(full)


def local_part_of(param: Tensor, full: Tensor) -> Tensor:
    """``full`` itself for a plain parameter, its local rows for a sharded one (masks, deltas)."""
    return local_rows(param, full) if is_sharded(param) else full


# ---------------------------------------------------------------------------------- export
def iter_full_state(model: nn.Module, *, keep: bool = True) -> Iterator[tuple[str, Tensor | None]]:
    """``(name, full CPU tensor)`` for every parameter and persistent buffer, one at a time.

    Sharded tensors are gathered one by one (every rank must iterate in step); ``keep=False``
    (the ranks that do not write) yields None instead of the tensor, so they drop it at once."""
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        value = full_tensor(param)
        yield name, value.to("cpu").contiguous() if keep else None
        del value
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf in getattr(module, "_non_persistent_buffers_set", ()):
            continue
        yield name, full_tensor(buffer).to("cpu").contiguous() if keep else None


def describe_sharding(model: nn.Module) -> Mapping[str, tuple[int, ...]]:
    """``{name: local shape}`` of every sharded parameter (for tests and reports)."""
    return {n: tuple(p.to_local().shape) for n, p in model.named_parameters() if is_sharded(p)}
