"""``RealignConfig``: every setting of the neuron-level restoration, validated in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import RealignConfigError
from .importance import IMPORTANCE_KINDS
from .select import ORDERS, resolve_budget
from .slices import SELECTIONS

__all__ = ["SCOPES", "RealignConfig"]

SCOPES = ("heads", "all")


def _fraction(value: object, name: str, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RealignConfigError(f"{name}={value!r} must be a number in (0, 1] ({hint})")
    return float(value)


@dataclass(frozen=True)
class RealignConfig:
    """How HSR picks the pruned weights to restore.

    Attributes:
        p: utility fraction that stands for "what the pruner kept"; ``"auto"`` (default) is
            ``1 − sparsity`` of each module, the paper's 0.5 at 50 % sparsity.
        q: top safety fraction (paper 0.5).
        max_p: upper end of the utility band (paper 0.7); must stay above p.
        importance: the score both importances use: ``wanda`` (default), ``sparsegpt``,
            ``magnitude`` or ``snip``.
        selection: ``head`` (default: the heads' own rows / columns), ``reference`` (the released
            script: input-column slices for q/k/v, all of o_proj), ``none`` (no head restriction)
            or ``whole_heads`` (every pruned weight of the heads' slices).
        order: ``margin`` (safety-minus-utility rank percentile gap; the paper's rule, truncated
            by the budget) or ``gradient`` (first-order drop of the refusal loss at the pruned
            model; needs a budget).
        budget: cap on restored weights — an int count, a float fraction of the language
            model's parameters, or a string such as ``"1‱"``; None restores the whole rule set;
            ``"auto"`` (gradient order only) is found round by round on dev data
            (:mod:`hsr_pl.realign.auto`).
        rounds: ``gradient`` only: restore the budget in this many steps, recomputing the
            gradient after each.
        scope: ``gradient`` only: ``heads`` (the selected heads' slices, default) or ``all`` (every
            attention projection whose originals were kept).
        preserve_structure: keep N:M masks exactly N:M by swapping out a kept weight per restore.
        utility_weight: ``gradient`` only: λ in ``gain = −g_s·w − λ·g_u·w`` (0 = refusal loss only).
    """

    p: float | str = "auto"
    q: float = 0.5
    max_p: float = 0.7
    importance: str = "wanda"
    selection: str = "head"
    order: str = "margin"
    budget: int | float | str | None = None
    rounds: int = 1
    scope: str = "heads"
    preserve_structure: bool = False
    utility_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.p != "auto":
            p = _fraction(self.p, "p", "the kept utility fraction; 'auto' = 1 - sparsity")
            object.__setattr__(self, "p", p)
        q = _fraction(self.q, "q", "the top safety fraction; paper 0.5")
        max_p = _fraction(self.max_p, "max_p", "the top of the utility band; paper 0.7")
        object.__setattr__(self, "q", q)
        object.__setattr__(self, "max_p", max_p)
        if not 0.0 < q <= 1.0:
            raise RealignConfigError(f"q={q} must lie in (0, 1] (the top safety fraction; paper 0.5)")
        if not 0.0 < max_p <= 1.0:
            raise RealignConfigError(f"max_p={max_p} must lie in (0, 1] (paper 0.7)")
        if self.p != "auto" and not 0.0 < self.p < max_p:
            raise RealignConfigError(f"p={self.p} must lie in (0, max_p={max_p}); use p: auto to follow the sparsity")
        if self.importance not in IMPORTANCE_KINDS:
            raise RealignConfigError(f"importance={self.importance!r} is unknown; choose one of {IMPORTANCE_KINDS}")
        if self.selection not in SELECTIONS:
            raise RealignConfigError(f"selection={self.selection!r} is unknown; choose one of {SELECTIONS}")
        if self.order not in ORDERS:
            raise RealignConfigError(f"order={self.order!r} is unknown; choose one of {ORDERS}")
        if self.scope not in SCOPES:
            raise RealignConfigError(f"scope={self.scope!r} is unknown; choose one of {SCOPES}")
        if self.budget == "auto":
            if self.order != "gradient":
                raise RealignConfigError(
                    "budget='auto' grows the gradient order round by round; it needs order='gradient' (GradientOrder)"
                )
        else:
            resolve_budget(self.budget, 1_000_000)  # validates the form; the count needs the model
        if self.order == "gradient" and self.budget is None:
            raise RealignConfigError(
                "order='gradient' ranks every pruned weight in scope and needs a budget (e.g. budget: 100, '1‱' or 'auto')"
            )
        if self.budget == "auto" and self.rounds != 1:
            raise RealignConfigError(
                "budget='auto' chooses its own rounds (start, growth); drop rounds, or give a fixed budget with rounds"
            )
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise RealignConfigError(f"rounds={self.rounds!r} must be a positive integer")
        if self.rounds > 1 and self.order != "gradient":
            raise RealignConfigError("rounds > 1 recomputes the gradient between steps; it needs order='gradient'")
        if self.scope == "all" and self.order != "gradient":
            raise RealignConfigError("scope='all' widens the gradient order's pool; with order='margin' use selection='none'")
        if self.selection == "none" and self.order == "gradient" and self.scope == "heads":
            raise RealignConfigError("selection='none' has no heads to scope to; with order='gradient' use scope='all'")
        if isinstance(self.utility_weight, bool) or not isinstance(self.utility_weight, (int, float)) or self.utility_weight < 0:
            raise RealignConfigError(f"utility_weight={self.utility_weight!r} must be a number ≥ 0")
        if self.utility_weight and self.order != "gradient":
            raise RealignConfigError("utility_weight weighs the benign-answer gradient; it needs order='gradient'")
        object.__setattr__(self, "utility_weight", float(self.utility_weight))
        object.__setattr__(self, "preserve_structure", bool(self.preserve_structure))

    @property
    def needs_heads(self) -> bool:
        """False only for the head-free baselines (selection none; gradient over scope all)."""
        return self.selection != "none" and not (self.order == "gradient" and self.scope == "all")

    def to_dict(self) -> dict:
        return asdict(self)
