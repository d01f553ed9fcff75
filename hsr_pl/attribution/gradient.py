"""The gradient engine: every head's effect from one forward + backward per batch.

Each head's o_proj input slice is written as x_h → c_h + α_{r,l,h} (x_h − c_h), with one α per
batch row r (prompt), layer l and head h, all 1 at the intact point; c_h is the calibration mean
for ``ablation='mean'`` and 0 otherwise. Ablation moves α from 1 to ε (``head``, ``qkv``) or 0
(``zero``, ``mean``): Δα = −(1 − ε) or −1.

Why not a Taylor estimate of the KL itself: KL(p ‖ p_α) is minimal at α = 1, so its first
derivative there is exactly 0. The estimate used instead is the first-order change of the
log-likelihood of the target tokens y_t at the scored positions,

    score_h ≈ mean over prompts of | Δα · ∂/∂α_h  mean_t log p_t(y_t) |,

with y_t the aligned response (``labels``: the teacher-forced refusal) or, at the last prompt
position without labels, the intact model's top token. For a confident model p_t is nearly
one-hot on y_t, and then KL(p ‖ q) = Σ_v p_v log(p_v / q_v) ≈ log p(y) − log q(y): the KL *is*
the drop in the target's log-likelihood, whose first-order term is what we compute. The absolute
value keeps heads whose removal makes the target more likely (they still change behaviour).

What it cannot see: the query/key scaling of the ``head`` / ``qkv`` modes. With the head's
output also scaled by ε, the query/key scaling changes the result only at O(ε), so ignoring it
is consistent. ``qkv`` under GQA ablates a whole KV group, whose first-order effect is the sum
of the group's per-head derivatives (linearity), which every head of the group then shares.
``estimator='fisher'`` is the alternative for models that are not confident (random-init
benchmarks): the second-order term KL ≈ ½ Δα² F with F = Σ_v p_v (∂ log p_v/∂α)², the Fisher
information of α, estimated without bias by sampling v_t ~ p_t and a random sign s_t per scored
position: E[(∂/∂α Σ_t s_t log p_t(v_t))²] = Σ_t F_t. Each probe costs one extra backward (the
forward is shared); the estimate is noisy (χ²-like per prompt) and averages down over prompts
and probes.

Dataset-level scores (``subspace``, ``reference``) are not differentiable at the intact point
(arccos at cosine 1), so this engine supports ``score='kl'`` only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from hsr_pl.models.adapters import ModelAdapter, get_adapter
from hsr_pl.state import head_key

from .ablation import HeadScaling
from .common import IntactBatch, ProgressFn, intact_pass, prepare_batches, resolve_targets
from .scores import ScoreConfig, per_prompt_mean

__all__ = ["gradient_head_scores"]


def _targets_tokens(item: IntactBatch, batch: Mapping[str, object]) -> Tensor:
    """Token whose log-likelihood is differentiated at each scored position."""
    labels = batch.get("labels")
    if isinstance(labels, Tensor):
        nxt = labels.to(item.rows.device)[item.rows, item.cols + 1]
        if bool((nxt != -100).all()):
            return nxt
    return item.logits.argmax(-1)


def gradient_head_scores(
    model: nn.Module,
    batches: Sequence[Mapping[str, object]],
    cfg: ScoreConfig | None = None,
    *,
    layers: Iterable[int] | None = None,
    heads: Iterable[tuple[int, int] | str] | None = None,
    progress: ProgressFn | None = None,
    adapter: ModelAdapter | None = None,
    estimator: str = "loglik",
    probes: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """First-order estimates of every targeted head's score (see the module docstring).

    Arguments as in :func:`~hsr_pl.attribution.naive.naive_head_scores`; ``cfg.score`` must be
    ``kl``. ``progress`` is called once per layer after the last batch (all layers finish
    together in this engine). ``estimator``: ``loglik`` (default, deterministic) or ``fisher``
    (``probes`` Monte-Carlo backward passes per batch, seeded by ``seed``).
    """
    if estimator not in ("loglik", "fisher"):
        raise ValueError(f"estimator={estimator!r} is not 'loglik' or 'fisher'")
    if int(probes) < 1:
        raise ValueError(f"probes={probes!r} must be ≥ 1")
    cfg = cfg or ScoreConfig()
    if cfg.score != "kl":
        raise ValueError(
            f"engine='gradient' estimates KL scores only (score={cfg.score!r} is not differentiable at "
            "the intact model); use engine='exact' for subspace/reference scores"
        )
    adapter = adapter or get_adapter(model)
    targets = resolve_targets(adapter, layers, heads)
    if not targets:
        return {}
    layer_list = list(targets)
    if cfg.ablation == "mean":
        items, means = intact_pass(model, adapter, batches, cfg, layer_list)
    else:
        # The forward at α = 1 is the intact forward: no separate intact pass is needed.
        items, means = prepare_batches(model, batches, cfg), {}
    num_heads = max(adapter.geometry(layer).num_heads for layer in layer_list)
    delta = (1.0 - cfg.epsilon) if cfg.ablation in ("head", "qkv") else 1.0
    centers = means if cfg.ablation == "mean" else None

    generator = torch.Generator().manual_seed(int(seed))
    per_prompt: list[Tensor] = []  # [B, n_layers, H] score estimate per prompt
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for item, batch in zip(items, batches):
            device = item.rows.device
            dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
            alpha = torch.ones(item.batch_size, len(layer_list), num_heads, dtype=dtype, device=device, requires_grad=True)
            counts = torch.bincount(item.rows, minlength=item.batch_size).to(dtype)
            with torch.enable_grad(), HeadScaling(adapter, layer_list, alpha, centers):
                logits = model(**item.inputs, use_cache=False).logits[item.rows, item.cols]
                logq = torch.log_softmax(logits.to(dtype), dim=-1)
                if item.logits is None:
                    item.logits = logits.detach()
                if estimator == "loglik":
                    y = _targets_tokens(item, batch)
                    logp = logq.gather(-1, y[:, None]).squeeze(-1)
                    (grad,) = torch.autograd.grad(per_prompt_mean(logp, item.rows, item.batch_size).sum(), alpha)
                    per_prompt.append(_group(grad.detach() * delta, adapter, layer_list, cfg).abs())
                    continue
                probs = logq.detach().exp().cpu()
                total = torch.zeros_like(alpha)
                for s in range(int(probes)):
                    v = torch.multinomial(probs, 1, generator=generator).to(device)
                    sign = (torch.randint(0, 2, (v.shape[0],), generator=generator) * 2 - 1).to(device, dtype)
                    probe = (sign * logq.gather(-1, v).squeeze(-1)).sum()
                    (grad,) = torch.autograd.grad(probe, alpha, retain_graph=s < int(probes) - 1)
                    total += _group(grad.detach(), adapter, layer_list, cfg) ** 2
                est = 0.5 * delta**2 * total / int(probes) / counts[:, None, None]
                per_prompt.append(est)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)

    values_all = torch.cat(per_prompt).mean(0)  # [n_layers, H]
    scores: dict[str, float] = {}
    for k, (layer, layer_heads) in enumerate(targets.items()):
        values = values_all[k]
        done = {head_key(layer, h): float(values[h]) for h in layer_heads}
        scores.update(done)
        if progress is not None:
            progress(layer, done)
    return scores


def _group(grad: Tensor, adapter: ModelAdapter, layers: list[int], cfg: ScoreConfig) -> Tensor:
    """For ``qkv``, replace each head's derivative by its KV group's sum (the group is ablated
    jointly, so the first-order effect is the sum along the group direction)."""
    if cfg.ablation != "qkv":
        return grad
    out = grad.clone()
    for k, layer in enumerate(layers):
        geo = adapter.geometry(layer)
        g = grad[:, k, : geo.num_heads].reshape(grad.shape[0], geo.num_kv_heads, geo.group_size)
        out[:, k, : geo.num_heads] = g.sum(-1).repeat_interleave(geo.group_size, dim=1)
    return out
