"""Neuron-level safety realignment (HSR step 2): restore the few pruned weights that matter for
safety inside the selected heads. Pure tensor code; the Lightning callback
``hsr_pl.callbacks.SafetyRealignment`` only orchestrates it.

* :mod:`.rule` — R = (T^s(q) ∩ T^u(max_p)) \\ T^u(p) on whole-matrix top fractions;
* :mod:`.slices` — which rows / columns of q/k/v/o belong to a head (``selection``);
* :mod:`.importance` — utility / safety importance from dense-model statistics;
* :mod:`.select` — budgets, the margin and gradient orders, N:M structure swaps;
* :mod:`.plan` — the per-linear plan; :mod:`.runner` — the model-level driver;
* :mod:`.auto` — ``budget: auto``: rounds of growing size, stopped on dev numbers;
* :mod:`.methods` — the method configurations (``MarginRule``, ``GradientOrder``) users choose;
* :mod:`.baselines` — the baselines and their variants; :mod:`.config` — validated settings.

The pruned set of a model pruned by another tool is read by :mod:`hsr_pl.models.checkpoints`.

See docs/realignment.md.
"""

from .auto import AutoBudget, AutoOutcome, Decision, DevPoint, auto_realign, schedule, stop_rule
from .baselines import random_heads, random_restore_masks
from .config import SCOPES, RealignConfig
from .errors import RealignConfigError, RealignError, RealignInputError
from .importance import (
    IMPORTANCE_KINDS,
    ImportanceStat,
    collect_importance,
    importance_scores,
    loss_gradients,
    refusal_gradients,
    refusal_nll,
)
from .methods import FLAT_KEYS, GradientOrder, MarginRule, RealignMethod, method_from_flat
from .plan import LinearPlan, LinearView, build_pools, plan_restoration
from .rule import candidate_mask, top_fraction_mask
from .runner import (
    DenseMeasurement,
    RealignResult,
    RealignSession,
    attention_linears,
    dense_pass,
    language_model_parameters,
    realign_model,
    restore_masks,
    round_sizes,
)
from .select import (
    ORDERS,
    Pool,
    gradient_gain,
    margin_keys,
    rank_percentiles,
    resolve_budget,
    select_top,
    structure_swaps,
)
from .slices import SELECTIONS, entry_heads, head_slice_mask

__all__ = [
    "AutoBudget",
    "AutoOutcome",
    "Decision",
    "DevPoint",
    "RealignSession",
    "auto_realign",
    "refusal_nll",
    "schedule",
    "stop_rule",
    "FLAT_KEYS",
    "GradientOrder",
    "MarginRule",
    "RealignMethod",
    "method_from_flat",
    "IMPORTANCE_KINDS",
    "ORDERS",
    "SCOPES",
    "SELECTIONS",
    "DenseMeasurement",
    "ImportanceStat",
    "LinearPlan",
    "LinearView",
    "Pool",
    "RealignConfig",
    "RealignConfigError",
    "RealignError",
    "RealignInputError",
    "RealignResult",
    "attention_linears",
    "build_pools",
    "candidate_mask",
    "collect_importance",
    "dense_pass",
    "entry_heads",
    "gradient_gain",
    "head_slice_mask",
    "importance_scores",
    "language_model_parameters",
    "loss_gradients",
    "refusal_gradients",
    "margin_keys",
    "plan_restoration",
    "random_heads",
    "random_restore_masks",
    "rank_percentiles",
    "realign_model",
    "restore_masks",
    "resolve_budget",
    "round_sizes",
    "select_top",
    "structure_swaps",
    "top_fraction_mask",
]
