"""Reductions over the ranks: where a collective's tensors live, counts summed over every
rank's shard, and the check that every rank runs equally many forwards."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .dtensor import is_sharded
from .errors import ShardingError

__all__ = ["check_lockstep", "collective_device", "count_non_finite", "count_zeros"]


def collective_device(group=None) -> torch.device:
    """Where a collective's tensors must live: the current CUDA device when ``group`` (default:
    the default group) runs NCCL — which takes CUDA tensors only —, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def count_non_finite(param: Tensor) -> int:
    """NaN/inf entries of ``param`` over all ranks (its local rows summed when sharded; every
    rank must call it for the same parameters). 0 for non-float tensors."""
    if not param.is_floating_point():
        return 0
    if is_sharded(param):
        local = param.to_local()
        group = param.device_mesh.get_group()
        bad = torch.tensor([0 if bool(torch.isfinite(local.sum())) else int((~torch.isfinite(local)).sum())],
                           dtype=torch.int64, device=collective_device(group))
        dist.all_reduce(bad, group=group)
        return int(bad.cpu())
    if bool(torch.isfinite(param.sum())):
        return 0
    return int((~torch.isfinite(param)).sum())


@torch.no_grad()
def count_zeros(param: Tensor) -> int:
    """Exact zeros of ``param`` over all ranks (a collective when sharded)."""
    if not is_sharded(param):
        return int((param == 0).sum())
    group = param.device_mesh.get_group()
    zeros = torch.tensor([int((param.to_local() == 0).sum())], dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(zeros, group=group)
    return int(zeros.cpu())


# ---------------------------------------------------------------------------------- lockstep
def check_lockstep(count: int, what: str, fix: str) -> None:
    """Every rank must run ``count`` forwards (a sharded forward is a collective); the same
    :class:`ShardingError` on every rank when they differ."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    counts = torch.tensor([count, -count], dtype=torch.int64, device=collective_device())
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    counts = counts.cpu()
    high, low = int(counts[0]), -int(counts[1])
    if high != low:
        raise ShardingError(f"{what}: the ranks got {low} to {high} batches, but a sharded model needs equal counts; {fix}")
