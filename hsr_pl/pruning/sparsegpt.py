"""SparseGPT (Frantar & Alistarh, 2023): prune by OBS saliency and update the kept weights.

A faithful re-statement of the reference ``SparseGPT.fasterprune`` (IST-DASLab/sparsegpt, also
vendored by locuslab/wanda) in float32, so masks and updated weights match it bit for bit on the
same device: dead inputs, 1 % relative damping, upper Cholesky factor of H^-1, blocks of 128,
one threshold per block over all rows (unstructured) or N:M groups chosen on the already
updated weights, OBS error propagation inside the block and ``Err @ U`` after it.

One deliberate addition: where the reference crashes on a Hessian that is still not positive
definite after damping, we retry with ten times the damping (up to ``max_damp_retries`` times)
and report the damping used. The first attempt is exactly the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import CalibrationError
from .masks import UNSTRUCTURED
from .stats import all_finite

__all__ = ["SparseGPTResult", "inverse_hessian_factor", "sparsegpt_prune"]


@dataclass
class SparseGPTResult:
    """Updated weight (input dtype, pruned entries exactly 0), the mask (True = pruned), damping used."""

    weight: Tensor
    mask: Tensor
    percdamp: float


def inverse_hessian_factor(
    hessian: Tensor, percdamp: float = 0.01, max_damp_retries: int = 6, *, overwrite: bool = False
) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of (H + damp I)^-1, with damp = percdamp * mean(diag H).

    ``hessian`` must already have its dead diagonal entries set to 1. If a Cholesky fails the
    damping grows tenfold and we retry; after ``max_damp_retries`` retries a CalibrationError says
    what to do.

    Memory is the reference's: two ``[in, in]`` matrices. The damped H is factored into L, then
    H's storage receives (H + damp I)^-1 and, in place, U, so U is a view of that storage (in the
    reference's column-major layout). ``overwrite=False`` works on a copy and leaves ``hessian``
    alone; ``overwrite=True`` consumes it, as the reference consumes its Hessian. A retry after the
    first Cholesky failed starts from the exact undamped H (damping only touched the diagonal,
    which is kept); after the second one failed, H's storage is gone: it comes back from
    ``hessian`` (copy) or, when consumed, as L L^T with the exact diagonal (rounding-level error,
    on a path where the reference crashes).
    """
    cols = hessian.shape[0]
    work = hessian if overwrite else hessian.clone()
    column_major = work.mT  # H is symmetric: the same values in the layout LAPACK writes
    diagonal = work.diagonal()
    undamped = diagonal.clone()
    mean_diag = torch.mean(undamped)
    info = torch.zeros((), dtype=torch.int32, device=work.device)
    pd = percdamp
    for attempt in range(max_damp_retries + 1):
        if attempt:
            diagonal.copy_(undamped)
        diagonal += pd * mean_diag
        low, failed = torch.linalg.cholesky_ex(work)
        if int(failed) == 0:
            torch.cholesky_inverse(low, out=column_major)
            _, failed = torch.linalg.cholesky_ex(column_major, upper=True, out=(column_major, info))
            if int(failed) == 0 and all_finite(column_major):
                return column_major, pd
            work.copy_(low @ low.mT if overwrite else hessian)
        del low
        pd *= 10.0
    raise CalibrationError(
        f"the Hessian ({cols}x{cols}) is not positive definite even with damping {pd / 10:g} x mean(diag H); "
        "check the calibration activations (NaN/inf, a degenerate layer) or use more calibration tokens"
    )


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float | None,
    nm: tuple[int, int] = UNSTRUCTURED,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_damp_retries: int = 6,
    compute_dtype: torch.dtype = torch.float32,
    overwrite_hessian: bool = False,
) -> SparseGPTResult:
    """Prune ``weight`` ``[out, in]`` given the calibration Hessian ``[in, in]``.

    The reference computes in float32 (``compute_dtype``); float64 exists so tests can compare
    against a float64 loop re-implementation exactly. Returns new tensors; ``weight`` is
    untouched, and so is ``hessian`` unless ``overwrite_hessian=True``: then (in
    ``compute_dtype``) it is the workspace, as the reference consumes its own Hessian, which
    saves two ``[in, in]`` copies per linear. Masks and weights are the same either way, except
    after a failed *second* Cholesky (see :func:`inverse_hessian_factor`).
    """
    prunen, prunem = nm
    if prunen == 0 and sparsity is None:
        raise ValueError("unstructured SparseGPT needs a sparsity in (0, 1)")
    if prunen and weight.shape[1] % prunem:
        raise ValueError(f"in_features={weight.shape[1]} is not divisible by M={prunem}")
    W = weight.detach().clone().to(compute_dtype)
    rows, cols = W.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match in_features={cols}")
    in_place = overwrite_hessian and hessian.dtype == compute_dtype
    H = hessian.detach() if in_place else hessian.detach().to(compute_dtype, copy=True)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, used = inverse_hessian_factor(H, percdamp, max_damp_retries, overwrite=in_place)
    del H

    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = torch.where(mask1[:, i], 0.0, w)  # = clone, then zero the pruned rows (one kernel)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return SparseGPTResult(W.to(weight.dtype), mask, used)
