"""Small helpers every hsr-pl callback needs: the wrapped HF model, the DDP world, eval mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import torch.distributed as dist
from torch import nn

__all__ = ["eval_mode", "hf_model", "world"]


def hf_model(pl_module: nn.Module) -> nn.Module:
    """The Hugging Face model a LightningModule wraps (``LVLMModule.model``), else the module itself."""
    inner = getattr(pl_module, "model", None) if isinstance(pl_module, pl.LightningModule) else None
    return inner if isinstance(inner, nn.Module) else pl_module


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run on the deterministic model (no dropout), then give every module its own mode back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.train(flag)
