"""Calibration data and the process group, the way every hsr-pl callback uses them.

* :func:`calibration_batches` — one split of ``trainer.datamodule.calibration_dataloader`` as
  tensor dicts on a device; under DDP each rank takes every ``world``-th sample (:func:`shard`),
  so the union over ranks is the whole selection;
* :func:`check_counts` — the global sample / token counts, and this rank's share, with the same
  error on every rank when a split has no usable tokens;
* :class:`WeightedAllReduce` — the ``reduce=`` that turns per-rank running means into the mean
  over the union of all shards (weights ``n_rank / n_total``), or sums (weight 1);
* :func:`layer_progress` — the rich progress bar the long per-layer loops share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from hsr_pl.pruning import CalibrationError, token_mask

from ._common import world as dist_world

__all__ = ["WeightedAllReduce", "calibration_batches", "check_counts", "comm_device", "layer_progress", "shard"]

Batch = dict[str, Tensor]


def comm_device(fallback: torch.device) -> torch.device:
    """Where collective tensors must live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback if fallback.type != "cuda" else torch.device("cpu")


class WeightedAllReduce:
    """``reduce=`` for the statistics code under DDP: ``all_reduce(sum)`` of ``weight * t``.

    Wanda's ``scaler_row`` and SparseGPT's ``H`` are running means over a rank's own samples;
    with ``weight = n_rank / n_total`` (samples that contributed tokens) their weighted sum is the
    mean over the union of all shards — exact, not only for equal shards. Sums (SNIP scores,
    gradients) use ``weight = 1``. Token counts pass through ``reduce`` as well; they only serve
    the "zero tokens" check, which a weighted sum keeps correct (positive iff any rank saw a token).
    """

    def __init__(self, weight: float, *, ordered: tuple[int, int] | None = None) -> None:
        self.weight = float(weight)
        # (rank, world) when every batch holds one sample dealt round robin (shard()): Wanda's
        # statistic is then replayed in the global order instead (StatsCollector.finalize), bit
        # for bit one process over the union. Counts still go through a plain sum.
        self.ordered = ordered

    def counts(self, tensor: Tensor) -> Tensor:
        """The sum over ranks (token counts of an order-exact statistic)."""
        moved = tensor.to(comm_device(tensor.device))
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(tensor.device)

    def __call__(self, tensor: Tensor) -> Tensor:
        out = tensor * self.weight
        device = out.device
        moved = out.to(comm_device(device))
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(device)


def shard(loader: Iterable[Batch], rank: int, world: int) -> Iterable[Batch]:
    """This rank's part of the calibration set: samples ``rank, rank + world, …`` (the union is all)."""
    if world == 1:
        return loader
    dataset = getattr(loader, "dataset", None)
    if isinstance(loader, DataLoader) and hasattr(dataset, "__len__") and not isinstance(dataset, IterableDataset):
        size = len(dataset)
        if size < world:
            raise CalibrationError(
                f"{size} calibration samples cannot be split over {world} ranks; raise num_samples to at least {world}"
            )
        return DataLoader(
            dataset,
            batch_size=loader.batch_size,
            sampler=list(range(rank, size, world)),
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )
    return (batch for i, batch in enumerate(loader) if i % world == rank)


def calibration_batches(
    trainer: pl.Trainer,
    split: str,
    num_samples: int | None,
    *,
    owner: str,
    device: torch.device | None,
    batch_size: int = 1,
    with_response: bool = True,
    sharded: bool = True,
    dtype: torch.dtype | None = None,
    hint: str = "",
) -> list[Batch]:
    """Tensor batches of ``split`` on ``device`` (this rank's shard unless ``sharded=False``).

    ``owner`` names the callback in errors; floating tensors are cast to ``dtype`` when given;
    ``device=None`` leaves them where the loader put them. An empty split is an error.
    """
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not hasattr(datamodule, "calibration_dataloader"):
        raise CalibrationError(
            f"{owner} needs calibration data: run the trainer with a data module that has "
            "calibration_dataloader(split, num_samples, ...) (hsr_pl.data.VLGuardDataModule)" + (f", {hint}" if hint else "")
        )
    try:
        loader = datamodule.calibration_dataloader(split, num_samples, with_response=with_response, batch_size=batch_size)
    except (ValueError, KeyError) as exc:
        raise CalibrationError(f"{owner.split('(')[0]}.calibration={split!r}: {exc}") from exc
    rank, world = dist_world() if sharded else (0, 1)
    batches = []
    for batch in shard(loader, rank, world):
        tensors = {}
        for key, value in batch.items():
            if isinstance(value, Tensor):
                value = value if device is None else value.to(device)
                tensors[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        batches.append(tensors)
    if not batches and not sharded:
        raise CalibrationError(f"calibration split {split!r} is empty; add {split} examples")
    return batches


def check_counts(batches: Sequence[Batch], tokens_mode: str, device: torch.device, split: str) -> tuple[int, int, float]:
    """Global ``(samples, tokens)`` and this rank's weight ``n_rank / n_total``.

    Every rank raises the same error when a split (or one rank's shard) has no usable token.
    """
    samples = tokens = 0
    for batch in batches:
        mask = token_mask(batch, tokens_mode)
        count = int(mask.sum())
        if count:
            samples += mask.shape[0]
            tokens += count
    rank, world = dist_world()
    counts = torch.zeros(world, 2, dtype=torch.float64)
    counts[rank] = torch.tensor([samples, tokens], dtype=torch.float64)
    if world > 1:
        counts = counts.to(comm_device(device))
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        counts = counts.cpu()
    total_samples, total_tokens = (int(v) for v in counts.sum(0).tolist())
    if total_tokens == 0:
        raise CalibrationError(
            f"zero calibration tokens in {split!r} with tokens={tokens_mode!r}: the batches' labels mark no response "
            "(labels != -100); calibrate with responses, or use tokens='all'"
        )
    empty = [r for r in range(world) if counts[r, 1] == 0]
    if empty:
        raise CalibrationError(
            f"ranks {empty} got no calibration tokens in their shard of {total_samples} samples; "
            f"raise num_samples (every rank needs samples with {tokens_mode} tokens)"
        )
    return total_samples, total_tokens, samples / total_samples


@contextmanager
def layer_progress(enabled: bool, description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich bar over ``(done, total)`` steps; yields None when disabled."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task(description, total=None)

        def on_step(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield on_step
