"""The reference pruners' sequential loops, re-stated for LLaMA-shaped HF models (benchmarks only).

Written from the published algorithms' loop structure, not copied: locuslab/wanda ``prune_wanda``
and the SparseGPT sequential driver (IST-DASLab/sparsegpt, also vendored by locuslab/wanda as
``prune_sparsegpt``). Both

1. catch layer 0's inputs with a *Catcher* that replaces ``layers[0]``, stores each sample's hidden
   states into one preallocated ``[nsamples, seq, hidden]`` tensor and raises, so nothing after
   the embeddings runs; the keyword arguments of the last call are kept and reused for every
   layer (the references assume every layer gets the same ones: true for LLaMA);
2. per decoder layer: forward hooks on all its linears feed per-linear statistics while every
   sample runs through the layer, one sample at a time; the hooks go; each linear is pruned
   (SparseGPT frees its Hessian right after); every sample runs through the pruned layer again
   and the outputs become the next layer's inputs (the two buffers swap).

Statistics use the references' running-mean updates; Wanda's mask is a stable row sort (or the
reference's per-group ``topk`` loop over columns for N:M), SparseGPT's ``fasterprune`` works in
place on one float32 copy of the weight and consumes its Hessian. Deviation, to keep the
comparison honest: the buffers hold ``nsamples`` rows, where ``prepare_calibration_input`` always
allocates 128.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn


class _Stop(Exception):
    """Raised by the catcher once it has layer 0's input."""


class _Catcher(nn.Module):
    """Stands in for ``layers[0]``: stores the sample's hidden states and the layer's arguments."""

    def __init__(self, layer: nn.Module, inps: Tensor, cache: dict) -> None:
        super().__init__()
        self.layer = layer
        self.inps = inps
        self.cache = cache

    def forward(self, hidden: Tensor, **kwargs) -> Tensor:
        self.inps[self.cache["i"]] = hidden[0]
        self.cache["i"] += 1
        self.cache["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        raise _Stop


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def catch_inputs(model: nn.Module, batches: Sequence[Mapping[str, Tensor]]) -> tuple[Tensor, dict]:
    """``(inps [nsamples, seq, hidden], layer-0 kwargs)``; every batch holds one sample."""
    layers = model.model.layers
    seq = batches[0]["input_ids"].shape[1]
    dtype = next(model.parameters()).dtype
    inps = torch.zeros(len(batches), seq, model.config.hidden_size, dtype=dtype)
    cache: dict = {"i": 0, "kwargs": None}
    layers[0] = _Catcher(layers[0], inps, cache)
    try:
        for batch in batches:
            try:
                model(**batch, use_cache=False)
            except _Stop:
                pass
    finally:
        layers[0] = layers[0].layer
    return inps, cache["kwargs"]


class _RowStat:
    """Wanda's ``scaler_row``: running mean over samples of the per-sample sum of squares."""

    def __init__(self, cols: int) -> None:
        self.scaler_row = torch.zeros(cols)
        self.nsamples = 0

    def add_batch(self, inp: Tensor) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        count = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.scaler_row *= self.nsamples / (self.nsamples + count)
        self.nsamples += count
        self.scaler_row += torch.norm(inp.type(torch.float32), p=2, dim=1) ** 2 / self.nsamples


class _Hessian:
    """SparseGPT's running ``H = 2/N sum X X^T`` and its in-place ``fasterprune``."""

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        self.H: Tensor | None = torch.zeros(linear.in_features, linear.in_features)
        self.nsamples = 0

    def add_batch(self, inp: Tensor) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        count = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.H *= self.nsamples / (self.nsamples + count)
        self.nsamples += count
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity: float, prunen: int, prunem: int, blocksize: int = 128, percdamp: float = 0.01) -> Tensor:
        weight = self.linear.weight
        W = weight.data.clone().float()
        H = self.H
        self.H = None
        cols = W.shape[1]
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        diag = torch.arange(cols)
        H[diag, diag] += percdamp * torch.mean(torch.diag(H))
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)
        del H
        mask = torch.zeros_like(W, dtype=torch.bool)
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prunen == 0:
                saliency = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(saliency.flatten())[0][int(saliency.numel() * sparsity)]
                mask1 = saliency <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(i2 - i1):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:
                    saliency = W1[:, i : i + prunem] ** 2 / (torch.diag(Hinv1)[i : i + prunem].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(saliency, prunen, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err = (w - q) / d
                W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err
            W[:, i1:i2] = Q1
            mask[:, i1:i2] = mask1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        weight.data = W.to(weight.dtype)
        return mask


def _wanda_mask(weight: Tensor, scaler_row: Tensor, sparsity: float, prunen: int, prunem: int) -> Tensor:
    metric = torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))
    mask = torch.zeros_like(metric) == 1
    if prunen != 0:
        for col in range(metric.shape[1]):
            if col % prunem == 0:
                group = metric[:, col : col + prunem].float()
                mask.scatter_(1, col + torch.topk(group, prunen, dim=1, largest=False)[1], True)
    else:
        order = torch.sort(metric, dim=-1, stable=True)[1]
        mask.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
    return mask


def _run(layer: nn.Module, inps: Tensor, outs: Tensor, kwargs: dict) -> None:
    for j in range(inps.shape[0]):
        out = layer(inps[j].unsqueeze(0), **kwargs)
        outs[j] = (out[0] if isinstance(out, tuple) else out)[0]


@torch.no_grad()
def reference_sequential(
    model: nn.Module, batches: Sequence[Mapping[str, Tensor]], method: str, sparsity: float,
    nm: tuple[int, int] = (0, 0),
) -> dict[str, Tensor]:
    """Prune ``model`` in place the references' way; ``{qualified linear name: mask}``."""
    prunen, prunem = nm
    inps, kwargs = catch_inputs(model, batches)
    outs = torch.zeros_like(inps)
    masks: dict[str, Tensor] = {}
    for index, layer in enumerate(model.model.layers):
        subset = _linears(layer)
        stats = {n: _RowStat(m.in_features) if method == "wanda" else _Hessian(m) for n, m in subset.items()}
        handles = [
            subset[n].register_forward_hook(lambda mod, inp, out, s=stats[n]: s.add_batch(inp[0].data)) for n in subset
        ]
        _run(layer, inps, outs, kwargs)
        for handle in handles:
            handle.remove()
        for name, linear in subset.items():
            if method == "wanda":
                mask = _wanda_mask(linear.weight.data, stats[name].scaler_row, sparsity, prunen, prunem)
                linear.weight.data[mask] = 0
            else:
                mask = stats[name].fasterprune(sparsity, prunen, prunem)
            stats[name] = None
            masks[f"model.layers.{index}.{name}"] = mask
        del stats
        _run(layer, inps, outs, kwargs)
        inps, outs = outs, inps
    return masks
