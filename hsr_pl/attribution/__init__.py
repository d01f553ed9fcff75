"""Safety-head attribution (Ships): score every attention head by how much ablating it
moves the model's behaviour on harmful prompts. Pure tensor code; the Lightning callback
``hsr_pl.callbacks.SafetyHeadAttribution`` only orchestrates it.

Engines (same arguments, same ``{"<layer>-<head>": score}`` result):

* ``naive`` — one full forward per ablated head (the reference).
* ``exact`` — identical scores; re-runs only layers l..L-1 and batches heads.
* ``gradient`` — first-order estimate from one forward + backward per batch (KL only).

See docs/attribution.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import nn

from hsr_pl.state import parse_head_key

from .ablation import ABLATION_MODES, HeadAblation, HeadScaling, o_proj_input_means
from .common import ProgressFn, resolve_targets
from .errors import HeadAttributionError
from .exact import exact_head_scores
from .gradient import gradient_head_scores
from .naive import naive_head_scores
from .scores import (
    POSITIONS,
    SCORES,
    ScoreConfig,
    kl_per_position,
    reference_score,
    score_positions,
    subspace_score,
)
from .sharding import assign_heads

__all__ = [
    "HeadAttributionError",
    "ABLATION_MODES",
    "ENGINES",
    "POSITIONS",
    "SCORES",
    "HeadAblation",
    "HeadScaling",
    "ProgressFn",
    "ScoreConfig",
    "assign_heads",
    "exact_head_scores",
    "gradient_head_scores",
    "head_scores",
    "kl_per_position",
    "naive_head_scores",
    "o_proj_input_means",
    "reference_score",
    "resolve_targets",
    "score_positions",
    "subspace_score",
    "top_heads",
]

ENGINES = ("exact", "naive", "gradient")


def head_scores(
    model: nn.Module,
    batches: Sequence[Mapping[str, object]],
    cfg: ScoreConfig | None = None,
    *,
    engine: str = "exact",
    layers: Iterable[int] | None = None,
    heads: Iterable[tuple[int, int] | str] | None = None,
    progress: ProgressFn | None = None,
    **engine_kwargs: object,
) -> dict[str, float]:
    """Dispatch to one engine; ``engine_kwargs`` go to it (e.g. ``max_batch_heads`` for exact)."""
    cfg = cfg or ScoreConfig()
    if engine == "exact":
        fn = exact_head_scores
    elif engine == "naive":
        fn = naive_head_scores
    elif engine == "gradient":
        fn = gradient_head_scores
    else:
        raise ValueError(f"engine={engine!r} is not one of {ENGINES}; 'exact' gives the naive loop's scores faster")
    return fn(model, batches, cfg, layers=layers, heads=heads, progress=progress, **engine_kwargs)


def top_heads(scores: Mapping[str, float], h: int) -> list[tuple[int, int]]:
    """The ``h`` highest-scoring ``(layer, head)`` pairs, best first (ties: lower layer, head)."""
    if h < 0:
        raise ValueError(f"top_h={h} must be ≥ 0")
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], parse_head_key(kv[0])))
    return [parse_head_key(key) for key, _ in ranked[:h]]
