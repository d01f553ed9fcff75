"""Forward-hook statistics of the inputs of target linears, over selected tokens only.

Two accumulators, both in float32 whatever the model dtype, both in the reference's running-mean
form (so masks match locuslab/wanda and IST-DASLab/sparsegpt bit for bit):

* :class:`RowStats` (Wanda): ``scaler_row_j = (1/N) * sum over samples of sum over tokens x_j^2``.
* :class:`HessianStats` (SparseGPT): ``H = (2/N) * sum X X^T``.

N counts calibration *samples* (rows of a batch), as in the reference; the number of tokens that
contributed is kept too. Which tokens count comes from a :class:`TokenSelection` that the runner
points at the current batch before each forward: the response tokens (``labels != -100`` at the
same positions, no shift) or all non-padding tokens (``attention_mask != 0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from hsr_pl.distributed import collective_device

from .errors import CalibrationError, PruningConfigError

__all__ = [
    "HessianStats",
    "RowStats",
    "StatsCollector",
    "TokenSelection",
    "token_mask",
]

TOKEN_MODES = ("response", "all")
Reduce = Callable[[Tensor], Tensor]


def token_mask(batch: Mapping[str, Tensor], tokens: str = "response") -> Tensor:
    """Bool ``[batch, seq]``: which positions of ``batch`` feed the statistics.

    ``response``: ``labels != -100`` (labels are aligned with input_ids; HF shifts them inside the
    loss, we do not). ``all``: every position whose ``attention_mask`` is non-zero.
    """
    if tokens not in TOKEN_MODES:
        raise PruningConfigError(f"tokens={tokens!r} is unknown; use 'response' or 'all'")
    input_ids = batch.get("input_ids")
    if tokens == "response":
        labels = batch.get("labels")
        if labels is None:
            raise CalibrationError(
                "tokens='response' needs `labels` in every calibration batch (-100 outside the response); "
                "load the calibration set with with_response=True, or use tokens='all'"
            )
        return labels != -100
    attn = batch.get("attention_mask")
    if attn is not None:
        return attn != 0
    if input_ids is None:
        raise CalibrationError("a calibration batch has neither attention_mask nor input_ids")
    return torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)


def all_finite(tensor: Tensor) -> bool:
    """Every entry finite, without ``isfinite``'s temporaries (an ``abs`` copy and bool masks:
    12 MiB for a 1376² Hessian, the largest allocation of a SparseGPT layer). A NaN/inf entry
    makes the sum non-finite, so a finite sum settles it in one reduction; only a non-finite sum
    (also reached by overflow) needs the entry-wise check."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


class TokenSelection:
    """The current batch's token mask, shared by every hook; the runner sets it per batch."""

    def __init__(self) -> None:
        self.mask: Tensor | None = None
        self._every = False
        self.index = -1  # position of the current batch in this pass (for order-exact reductions)

    def set(self, mask: Tensor | None) -> None:
        self.index = -1 if mask is None else self.index + 1
        self.mask = mask
        # Decided once per batch, not per hook call: a mask that keeps every token selects by
        # reshaping (a view, as the reference reads its inputs) instead of copying every row.
        self._every = mask is not None and bool(mask.all())

    def select(self, x: Tensor) -> tuple[Tensor, int]:
        """``x [B, T, d]`` -> ``(selected rows [n, d], number of samples B)``."""
        if x.dim() == 2:
            x = x.unsqueeze(0)
        samples = x.shape[0]
        if self.mask is None:
            return x.reshape(-1, x.shape[-1]), samples
        if tuple(self.mask.shape) != tuple(x.shape[:-1]):
            raise CalibrationError(
                f"token mask of shape {tuple(self.mask.shape)} does not match the linear's input "
                f"{tuple(x.shape[:-1])}: the batch's labels/attention_mask must align with the decoder sequence"
            )
        if self._every:
            return x.reshape(-1, x.shape[-1]), samples
        return x[self.mask.to(x.device)], samples


class _RunningStats:
    """The reference's running-average bookkeeping, shared by Wanda's and SparseGPT's statistic.

    ``add`` rescales the old statistic by n/(n+m) before adding the m new samples' term, in the
    reference's order of operations, so the results stay bit-identical to it. The term depends on
    the input rows and on n only, so linears fed the very same input tensor (q/k/v, gate/up) can
    share one computation of it (``shared``, see :class:`StatsCollector`).
    """

    def __init__(self) -> None:
        self.nsamples = 0
        self.ntokens = 0
        # (batch position, samples, raw term) per add, when an order-exact reduction will replay them
        self.record: list[tuple[int, int, Tensor]] | None = None

    def _statistic(self) -> Tensor:
        raise NotImplementedError

    def _raw(self, inp: Tensor) -> Tensor | None:
        """The term before its division by the running count, for statistics that can be replayed."""
        return None

    def _term(self, inp: Tensor) -> Tensor:
        """The new term from the transposed inputs ``[d, n]`` (``self.nsamples`` already updated)."""
        raise NotImplementedError

    def add(self, rows: Tensor, samples: int, shared: dict | None = None, position: int = -1) -> None:
        """Add the selected input rows ``[n, d]`` of ``samples`` calibration samples.

        ``shared``: a dict the caller keeps per input tensor; terms computed for a running count
        are stored in it and reused by statistics of the same kind at the same count.
        """
        if rows.shape[0] == 0:
            return
        if self.record is not None:
            key = ("raw", type(self))
            raw = None if shared is None else shared.get(key)
            if raw is None:
                raw = self._raw(rows.t())
                if shared is not None:
                    shared[key] = raw
            self.record.append((position, samples, raw))
        self._statistic().mul_(self.nsamples / (self.nsamples + samples))
        self.nsamples += samples
        self.ntokens += rows.shape[0]
        key = (type(self), self.nsamples)
        term = None if shared is None else shared.get(key)
        if term is None:
            term = self._term(rows.t())
            if shared is not None:
                shared[key] = term
        self._statistic().add_(term)


class RowStats(_RunningStats):
    """Per-input-channel running mean of the summed squares (Wanda's ``scaler_row``)."""

    def __init__(self, columns: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.scaler_row = torch.zeros(columns, dtype=torch.float32, device=device)

    def _statistic(self) -> Tensor:
        return self.scaler_row

    def _term(self, inp: Tensor) -> Tensor:
        return torch.norm(inp.type(torch.float32), p=2, dim=1) ** 2 / self.nsamples

    def _raw(self, inp: Tensor) -> Tensor:
        return torch.norm(inp.type(torch.float32), p=2, dim=1) ** 2

    def replay(self, entries: list[tuple[int, Tensor]]) -> None:
        """Rebuild the running mean from ``(samples, raw term)`` in the given order: the very
        operations :meth:`add` does, so a global order gives a 1-process run's bits."""
        self.scaler_row.zero_()
        self.nsamples = 0
        for samples, raw in entries:
            self.scaler_row.mul_(self.nsamples / (self.nsamples + samples))
            self.nsamples += samples
            self.scaler_row.add_(raw.to(self.scaler_row.device) / self.nsamples)

    def tensors(self) -> dict[str, Tensor]:
        return {"scaler_row": self.scaler_row}


class HessianStats(_RunningStats):
    """Running ``H = (2/N) sum X X^T`` in float32 (SparseGPT's ``add_batch``)."""

    def __init__(self, columns: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)

    def _statistic(self) -> Tensor:
        return self.H

    def _term(self, inp: Tensor) -> Tensor:
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        return inp.matmul(inp.t())

    def tensors(self) -> dict[str, Tensor]:
        return {"H": self.H}


STAT_KINDS: dict[str, type[RowStats] | type[HessianStats]] = {"row": RowStats, "hessian": HessianStats}


class StatsCollector:
    """Forward hooks on a set of linears that feed one accumulator per linear.

    Use as a context manager: hooks are removed on exit, even after an error.
    """

    def __init__(
        self, linears: Mapping[str, nn.Linear], kind: str, selection: TokenSelection, *, record: bool = False
    ) -> None:
        if kind not in STAT_KINDS:
            raise PruningConfigError(f"statistic kind {kind!r} is unknown; use one of {sorted(STAT_KINDS)}")
        self.linears = dict(linears)
        self.selection = selection
        self.stats = {
            name: STAT_KINDS[kind](lin.in_features, device=lin.weight.device) for name, lin in self.linears.items()
        }
        if record:  # an order-exact reduction will replay every rank's terms (see finalize)
            for stat in self.stats.values():
                stat.record = []
        self._handles: list = []
        self._input: Tensor | None = None  # the last input seen, and the terms computed from it
        self._terms: dict = {}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0]
            if self._input is not x:  # q/k/v (gate/up) get the very same tensor: compute its term once
                self._input, self._terms = x, {}
            rows, samples = self.selection.select(x.detach())
            self.stats[name].add(rows, samples, self._terms, self.selection.index)

        return hook

    def __enter__(self) -> StatsCollector:
        self._handles = [lin.register_forward_hook(self._hook(name)) for name, lin in self.linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._input, self._terms = None, {}

    def finalize(self, reduce: Reduce | None = None) -> dict[str, RowStats | HessianStats]:
        """Apply ``reduce`` (e.g. a DDP all_reduce) to every statistic, then check it is usable.

        A ``reduce`` with an ``ordered`` attribute (``(rank, world)``, batches of one sample dealt
        round robin) makes Wanda's statistic order-exact: every rank's raw terms are gathered and
        the running mean is replayed in the global sample order, bit for bit a 1-process run.
        """
        ordered = getattr(reduce, "ordered", None)
        for name, stat in self.stats.items():
            if ordered is not None and stat.record is not None and hasattr(stat, "replay"):
                _replay_in_global_order(stat, *ordered)
                reduce_this = None
            else:
                reduce_this = reduce
            for tensor in stat.tensors().values() if reduce_this is not None else ():
                if reduce is not None:
                    reduced = reduce(tensor)
                    if reduced is not None and reduced is not tensor:
                        tensor.copy_(reduced)
            if reduce is not None:
                counts = torch.tensor([stat.ntokens], dtype=torch.float64, device=next(iter(stat.tensors().values())).device)
                counted = (reduce.counts if reduce_this is None else reduce)(counts)
                stat.ntokens = int((counted if counted is not None else counts).item())
            if stat.ntokens == 0:
                raise CalibrationError(
                    f"{name}: zero calibration tokens reached this linear; with tokens='response' every batch "
                    "needs response labels (labels != -100), otherwise pass more/longer samples or tokens='all'"
                )
            for key, tensor in stat.tensors().items():
                if not all_finite(tensor):
                    raise CalibrationError(
                        f"{name}: the inputs reaching this linear hold NaN/inf (statistic {key}); the weights are "
                        "finite (checked before pruning), so the calibration inputs are (NaN pixel values?) or the "
                        "activations overflow: check the calibration data, or run in float32/bfloat16 instead of float16"
                    )
        return self.stats


def _replay_in_global_order(stat: RowStats, rank: int, world: int) -> None:
    """Gather every rank's ``(batch position, samples, raw term)`` and replay them in the order of
    one process over the union (batch j of rank r is global batch ``j * world + r``)."""
    import torch.distributed as dist

    device = collective_device()  # NCCL takes CUDA tensors only
    entries = stat.record or []
    width = stat.scaler_row.numel()
    count = torch.tensor([len(entries)], dtype=torch.int64, device=device)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [c.cpu() for c in counts]
    most = max(int(c) for c in counts)
    raws = torch.zeros(most, width, dtype=torch.float32, device=device)
    meta = torch.full((most, 2), -1, dtype=torch.int64)
    for i, (position, samples, raw) in enumerate(entries):
        raws[i] = raw.detach().to(device, torch.float32)
        meta[i, 0], meta[i, 1] = position, samples
    meta = meta.to(device)
    all_raws = [torch.zeros_like(raws) for _ in range(world)]
    all_meta = [torch.zeros_like(meta) for _ in range(world)]
    dist.all_gather(all_raws, raws)
    dist.all_gather(all_meta, meta)
    all_raws = [t.cpu() for t in all_raws]
    all_meta = [t.cpu() for t in all_meta]
    ordered = []
    for r in range(world):
        for i in range(int(counts[r])):
            position, samples = int(all_meta[r][i, 0]), int(all_meta[r][i, 1])
            if position < 0:
                raise CalibrationError("an order-exact reduction needs the batch positions (TokenSelection.set per batch)")
            ordered.append((position * world + r, samples, all_raws[r][i]))
    ordered.sort(key=lambda e: e[0])
    stat.replay([(samples, raw) for _, samples, raw in ordered])
    stat.record = None
