"""Summed per-batch gradients of the response NLL for a set of linears — SNIP's score and
realignment's gradient order both start here.

Two sums: SNIP adds ``|W ⊙ g_b|`` of each batch's mean-NLL gradient (a per-batch score, per sample
at batch size 1); the gradient order adds ``n_b · g_b`` (``token_weighted``), the gradient of the
*summed* token NLLs, so that dividing by the global token count gives the gradient of one mean
over every response token whatever the batching or sharding.

Only the listed weights get gradients; every ``requires_grad`` flag is put back and the ``.grad``
buffers are cleared afterwards, also after an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .errors import CalibrationError
from .sequential import model_inputs
from .stats import token_mask

__all__ = ["accumulate_gradients"]

Transform = Callable[[nn.Linear, Tensor], Tensor]


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    linears: Mapping[str, nn.Linear],
    transform: Transform | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    *,
    token_weighted: bool = False,
    what: str = "gradients",
) -> tuple[dict[str, Tensor], int, int]:
    """``(Σ_b transform(W, ∂L_b/∂W) per linear, batches used, loss tokens)``.

    ``L_b`` is the model's response NLL on batch b: the mean over the ``n_b`` positions whose
    next-token label is not -100 (HF's shifted loss); batches without such a token are skipped.
    ``token_weighted`` adds ``n_b · ∂L_b/∂W`` instead (the gradient of the summed token NLLs; no
    ``transform`` then). The third value is ``Σ_b n_b`` on this rank. ``transform`` defaults to the
    raw gradient (float32); ``reduce`` (a DDP all-reduce) is applied to every sum before the
    finiteness check. ``what`` names the caller in errors.
    """
    if token_weighted and transform is not None:
        raise ValueError("token_weighted sums raw gradients; pass no transform")
    device = model.get_input_embeddings().weight.device
    sums = {name: torch.zeros(lin.weight.shape, dtype=torch.float32, device=lin.weight.device) for name, lin in linears.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(lin.weight) for lin in linears.values()}
    used = tokens = 0
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        with torch.enable_grad():
            for batch in batches:
                if "labels" not in batch:
                    raise CalibrationError(
                        f"{what} need `labels` in every calibration batch (the loss is the response NLL); load the "
                        "calibration set with with_response=True"
                    )
                # The positions HF's causal-LM loss averages over: labels shifted by one.
                count = int(token_mask(batch, "response")[..., 1:].sum())
                if count == 0:
                    continue
                for lin in linears.values():
                    lin.weight.grad = None
                inputs = model_inputs(batch, device)
                inputs["labels"] = batch["labels"].to(device)
                loss = model(**inputs).loss
                if not bool(torch.isfinite(loss)):
                    raise CalibrationError(f"{what}: the calibration loss is {loss.item()}; check the model/inputs")
                loss.backward()
                used += 1
                tokens += count
                for name, lin in linears.items():
                    grad = lin.weight.grad.detach().float()
                    if token_weighted:
                        sums[name] += grad * count
                    else:
                        sums[name] += grad if transform is None else transform(lin, grad)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for lin in linears.values():
            lin.weight.grad = None
    for name, tensor in sums.items():
        if reduce is not None:
            reduced = reduce(tensor)
            if reduced is not None and reduced is not tensor:
                tensor.copy_(reduced)
        if not bool(torch.isfinite(tensor).all()):
            raise CalibrationError(f"{name}: {what} hold NaN/inf; run the model in float32 for calibration")
    return sums, used, tokens
