"""Utility and safety importance of each weight, measured on the *unpruned* model.

HSR scores every weight twice with the pruning method's own score: once on the utility set D^u
and once on the safety set D^s, both over response tokens. What is kept between the dense pass
and the selection is the per-linear *statistic*, never the score matrix (so a 7B model's
statistics are kilobytes, not gigabytes):

==============  ============================================  ==============================
importance      score of W[i, j]                              statistic kept per linear
==============  ============================================  ==============================
``wanda``       ``|W_ij| · sqrt(a_j)``, a = mean Σ_t x_tj²     ``a`` (Wanda's ``scaler_row``, d_in)
``sparsegpt``   ``W_ij² / U_jj²``, U = upper Cholesky of H⁻¹   ``diag(U)`` (d_in)
``magnitude``   ``|W_ij|``                                    none
``snip``        ``Σ_b |W_ij · ∂L_b/∂W_ij|``                   the summed scores (d_out × d_in)
==============  ============================================  ==============================

SNIP's score is a full matrix by nature; it lives in memory between the dense pass and the
selection and is never written to checkpoints. The SparseGPT statistic is the diagonal of the
factor SparseGPT itself divides by (dead inputs get H_jj = 1 and a zero score, as there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hsr_pl.pruning.errors import CalibrationError
from hsr_pl.pruning.gradients import accumulate_gradients
from hsr_pl.pruning.sequential import model_inputs
from hsr_pl.pruning.sparsegpt import inverse_hessian_factor
from hsr_pl.pruning.stats import StatsCollector, TokenSelection, token_mask
from hsr_pl.pruning.wanda import wanda_scores

from .errors import RealignConfigError

__all__ = [
    "IMPORTANCE_KINDS",
    "ImportanceStat",
    "collect_importance",
    "importance_scores",
    "loss_gradients",
    "refusal_gradients",
    "refusal_nll",
    "sparsegpt_diag",
]

IMPORTANCE_KINDS = ("wanda", "sparsegpt", "magnitude", "snip")
Reduce = Callable[[Tensor], Tensor]


@dataclass
class ImportanceStat:
    """The statistic one importance score needs for one linear (see the module table)."""

    kind: str
    tensor: Tensor | None = None
    tokens: int = 0

    def nbytes(self) -> int:
        return 0 if self.tensor is None else self.tensor.numel() * self.tensor.element_size()


def sparsegpt_diag(hessian: Tensor, percdamp: float = 0.01) -> Tensor:
    """``diag(U)`` of the upper Cholesky factor of ``(H + damp·I)⁻¹`` with SparseGPT's dead-input rule."""
    H = hessian.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    upper, _ = inverse_hessian_factor(H, percdamp)
    diag = torch.diag(upper).clone()
    diag[dead] = float("inf")  # SparseGPT zeroes dead columns: their score is 0
    return diag


def importance_scores(weight: Tensor, stat: ImportanceStat) -> Tensor:
    """The float32 importance matrix ``[out, in]`` of ``weight`` (the dense weight) from ``stat``."""
    kind = stat.kind
    if kind == "magnitude":
        return weight.detach().abs().float()
    if stat.tensor is None:
        raise RealignConfigError(f"importance={kind!r} needs its statistic; it was not collected")
    if kind == "wanda":
        return wanda_scores(weight, stat.tensor)
    if kind == "sparsegpt":
        if stat.tensor.shape != (weight.shape[1],):
            raise RealignConfigError(f"sparsegpt statistic {tuple(stat.tensor.shape)} does not fit weight {tuple(weight.shape)}")
        return weight.detach().float() ** 2 / stat.tensor.float().reshape(1, -1) ** 2
    if kind == "snip":
        if stat.tensor.shape != weight.shape:
            raise RealignConfigError(f"snip scores {tuple(stat.tensor.shape)} do not fit weight {tuple(weight.shape)}")
        return stat.tensor.float()
    raise RealignConfigError(f"importance={kind!r} is unknown; choose one of {IMPORTANCE_KINDS}")


def _reduce_in_place(tensor: Tensor, reduce: Reduce | None) -> None:
    if reduce is None:
        return
    reduced = reduce(tensor)
    if reduced is not None and reduced is not tensor:
        tensor.copy_(reduced)


@torch.no_grad()
def _activation_stats(model, batches, linears, kind: str, reduce: Reduce | None, percdamp: float):
    device = model.get_input_embeddings().weight.device
    selection = TokenSelection()
    record = getattr(reduce, "ordered", None) is not None  # order-exact Wanda statistic (see StatsCollector)
    collector = StatsCollector(linears, "row" if kind == "wanda" else "hessian", selection, record=record)
    with collector:
        for batch in batches:
            selection.set(token_mask(batch, "response"))
            model(**model_inputs(batch, device))
    selection.set(None)
    stats = collector.finalize(reduce)
    out = {}
    for name, stat in stats.items():
        if kind == "wanda":
            out[name] = ImportanceStat(kind, stat.scaler_row.detach().cpu().clone(), stat.ntokens)
        else:
            out[name] = ImportanceStat(kind, sparsegpt_diag(stat.H, percdamp).cpu(), stat.ntokens)
    return out


def loss_gradients(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    linears: Mapping[str, nn.Linear],
    transform: Callable[[nn.Linear, Tensor], Tensor] | None = None,
    reduce: Reduce | None = None,
) -> tuple[dict[str, Tensor], int]:
    """``Σ_b transform(W, ∂L_b/∂W)`` per linear (float32, CPU) and the batches used.

    ``L_b`` is the model's response NLL on batch b (labels != -100); see
    :func:`hsr_pl.pruning.gradients.accumulate_gradients`. ``transform`` defaults to the raw
    gradient; SNIP passes ``|W ⊙ g|``. ``reduce`` (a DDP sum) is applied before returning.
    """
    sums, used, _ = accumulate_gradients(model, batches, linears, transform, reduce, what="gradients")
    return {name: tensor.cpu() for name, tensor in sums.items()}, used


def refusal_gradients(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    linears: Mapping[str, nn.Linear],
    *,
    reduce: Reduce | None = None,
    count: Callable[[int], int] | None = None,
) -> tuple[dict[str, Tensor], int]:
    """``∂L/∂W`` per linear (float32, CPU) with ``L`` = Σ token NLLs / total response tokens over
    every batch (and rank), and that token total.

    One global token-weighted mean, so batch 1, batch 3 or two ranks give one process's gradient
    (a mean of per-batch means would weight a short refusal's tokens more in a batch of its own).
    ``reduce`` sums the per-rank sums (DDP); ``count`` sums this rank's token count over ranks.
    """
    sums, _, tokens = accumulate_gradients(model, batches, linears, None, reduce, token_weighted=True,
                                           what="gradients")
    total = count(tokens) if count is not None else tokens
    if total == 0:
        raise CalibrationError("order='gradient': no calibration batch had response tokens (labels != -100)")
    return {name: tensor.cpu() / total for name, tensor in sums.items()}, total


@torch.no_grad()
def refusal_nll(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    reduce: Reduce | None = None,
    count: Callable[[int], int] | None = None,
) -> float | None:
    """The token-weighted mean response NLL over ``batches`` (and ranks): the loss whose gradient
    :func:`refusal_gradients` takes, measured forward-only (the automatic budget's cheap signal).

    ``reduce`` sums this rank's NLL sum over ranks; ``count`` its token count. None: no tokens.
    """
    device = model.get_input_embeddings().weight.device
    total = torch.zeros(1, dtype=torch.float64)
    tokens = 0
    for batch in batches:
        n = int(token_mask(batch, "response")[..., 1:].sum())
        if n == 0:
            continue
        inputs = model_inputs(batch, device)
        inputs["labels"] = batch["labels"].to(device)
        total += float(model(**inputs).loss) * n
        tokens += n
    if reduce is not None:
        total = reduce(total).cpu()
    tokens = count(tokens) if count is not None else tokens
    return float(total.item() / tokens) if tokens else None


def _snip_transform(linear: nn.Linear, grad: Tensor) -> Tensor:
    return (linear.weight.detach().float() * grad).abs()


def collect_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]] | None,
    linears: Mapping[str, nn.Linear],
    kind: str,
    *,
    reduce: Reduce | None = None,
    percdamp: float = 0.01,
) -> dict[str, ImportanceStat]:
    """Measure ``kind``'s statistic for every linear in ``linears`` on ``batches`` (response tokens)."""
    if kind not in IMPORTANCE_KINDS:
        raise RealignConfigError(f"importance={kind!r} is unknown; choose one of {IMPORTANCE_KINDS}")
    if kind == "magnitude":
        return {name: ImportanceStat(kind) for name in linears}
    if batches is None:
        raise CalibrationError(f"importance={kind!r} needs calibration batches")
    if kind == "snip":
        sums, used = loss_gradients(model, batches, linears, _snip_transform, reduce)
        if used == 0:
            raise CalibrationError("snip importance: no batch had response tokens (labels != -100)")
        return {name: ImportanceStat(kind, tensor, used) for name, tensor in sums.items()}
    return _activation_stats(model, batches, linears, kind, reduce, percdamp)
