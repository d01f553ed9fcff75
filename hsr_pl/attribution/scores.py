"""Score functions of safety-head attribution (Ships), pure tensor code.

* :func:`kl_per_position` — KL(p ‖ p_ablated) of next-token distributions, p = intact.
* :func:`score_positions` — which positions a prompt's KL is averaged over: the last prompt
  token (``last``) or, with a teacher-forced aligned response, the last prompt token plus every
  response position whose next token is still part of the response (``response``).
* :func:`per_prompt_mean` — mean per prompt, so long responses do not outweigh short ones.
* :func:`subspace_score` — generalized Ships: principal angles between the top-r left singular
  subspaces of the n×d matrices of final hidden states, intact vs ablated.
* :func:`reference_score` — the released HSR script's angle between column 0 of the
  column-normalised matrices (no SVD), for reproduction only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .ablation import validate_ablation

__all__ = [
    "POSITIONS",
    "SCORES",
    "ScoreConfig",
    "kl_per_position",
    "last_prompt_index",
    "per_prompt_mean",
    "reference_score",
    "score_positions",
    "subspace_score",
]

SCORES = ("kl", "subspace", "reference")
POSITIONS = ("last", "response")


@dataclass(frozen=True)
class ScoreConfig:
    """What to measure and how to ablate; shared by every engine.

    Attributes:
        score: ``kl`` (per-prompt Ships), ``subspace`` (principal angles) or ``reference``.
        positions: ``last`` or ``response`` (KL only; subspace scores always use the last
            prompt token).
        ablation: see :mod:`hsr_pl.attribution.ablation`.
        epsilon: scale of the ``head`` / ``qkv`` ablations.
        r_max: number of principal angles summed by ``subspace``.
    """

    score: str = "kl"
    positions: str = "last"
    ablation: str = "head"
    epsilon: float = 1e-5
    r_max: int = 1

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r} is not one of {SCORES}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r} is not one of {POSITIONS}")
        validate_ablation(self.ablation, self.epsilon)
        if int(self.r_max) < 1:
            raise ValueError(f"r_max={self.r_max!r} must be a positive integer (default 1)")


def last_prompt_index(batch: dict) -> Tensor:
    """``[B]`` index of each row's last prompt token.

    With ``labels`` (prompt + teacher-forced response, -100 on prompt and padding) it is the
    position just before the first response label; without labels the prompts are left padded
    and end at ``T - 1``.
    """
    input_ids = batch["input_ids"]
    B, T = input_ids.shape
    labels = batch.get("labels")
    if labels is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    is_resp = labels != -100
    if not bool(is_resp.any(dim=1).all()):
        raise ValueError("a row of 'labels' has no response token (all -100): cannot find its prompt end")
    first = is_resp.float().argmax(dim=1)
    if bool((first == 0).any()):
        raise ValueError("a response starts at position 0: there is no prompt token before it")
    return first - 1


def score_positions(batch: dict, positions: str) -> Tensor:
    """``[B, T]`` bool mask of the positions whose next-token distribution is scored.

    ``last``: the last prompt token. ``response``: positions t with ``labels[t + 1] != -100``
    (the next token is a response token) — the last prompt token and every response token but
    the final one; this needs ``labels`` in the batch (calibration data with the response).
    """
    input_ids = batch["input_ids"]
    B, T = input_ids.shape
    mask = torch.zeros(B, T, dtype=torch.bool, device=input_ids.device)
    if positions == "last":
        mask[torch.arange(B, device=input_ids.device), last_prompt_index(batch)] = True
        return mask
    if positions != "response":
        raise ValueError(f"positions={positions!r} is not one of {POSITIONS}")
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(
            "positions='response' needs batches with 'labels' (the teacher-forced aligned response); "
            "load the calibration set with with_response=True, or use positions='last'"
        )
    last_prompt_index(batch)  # validates that each row has a prompt and a response
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def kl_per_position(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p ‖ q) over the last dim, computed in at least float32: ``[..., V] -> [...]``."""
    dtype = torch.promote_types(logits_p.dtype, torch.float32)
    logp = torch.log_softmax(logits_p.to(dtype), dim=-1)
    logq = torch.log_softmax(logits_q.to(dtype), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def per_prompt_mean(values: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Mean of ``values[k]`` grouped by ``rows[k]`` -> ``[num_rows]`` (each row needs ≥ 1 value)."""
    sums = torch.zeros(num_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    counts = torch.bincount(rows, minlength=num_rows).to(values.dtype)
    return sums / counts


def _degrees_arccos(x: Tensor) -> Tensor:
    return torch.rad2deg(torch.arccos(x.clamp(0.0, 1.0)))


def subspace_score(intact: Tensor, ablated: Tensor, r_max: int = 1) -> float:
    """The generalized Ships score: Σ_{r ≤ r_max} degrees(arccos σ_r(U_rᵀ U'_r)).

    ``intact`` and ``ablated`` are ``[n, d]`` (one row per prompt); U_r, U'_r are their top-r left
    singular vectors, and σ_r(U_rᵀ U'_r) is the r-th (smallest) singular value of that r×r
    product: the cosine of the largest principal angle between the two r-dimensional
    subspaces. Each r adds one angle, so r_max = 1 is the angle between the leading directions.
    Cosines are clamped into [0, 1] before arccos since rounding can push them past 1.
    """
    if intact.shape != ablated.shape or intact.dim() != 2:
        raise ValueError(f"need two [n, d] matrices of equal shape, got {tuple(intact.shape)}, {tuple(ablated.shape)}")
    r_top = min(int(r_max), *intact.shape)
    dtype = torch.promote_types(intact.dtype, torch.float32)
    u = torch.linalg.svd(intact.to(dtype), full_matrices=False).U
    u2 = torch.linalg.svd(ablated.to(dtype), full_matrices=False).U
    total = 0.0
    for r in range(1, r_top + 1):
        sigma_r = torch.linalg.svdvals(u[:, :r].T @ u2[:, :r])[r - 1]
        total += float(_degrees_arccos(sigma_r))
    return total


def reference_score(intact: Tensor, ablated: Tensor) -> float:
    """The released script's angle: L2-normalise each column over the n prompts, keep column 0
    of each matrix, return degrees(arccos |a·b|)."""
    if intact.shape != ablated.shape or intact.dim() != 2:
        raise ValueError(f"need two [n, d] matrices of equal shape, got {tuple(intact.shape)}, {tuple(ablated.shape)}")
    dtype = torch.promote_types(intact.dtype, torch.float32)
    a = torch.nn.functional.normalize(intact.to(dtype), dim=0)[:, 0]
    b = torch.nn.functional.normalize(ablated.to(dtype), dim=0)[:, 0]
    return float(_degrees_arccos((a @ b).abs()))
