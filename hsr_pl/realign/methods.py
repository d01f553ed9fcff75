"""How realignment orders the pruned weights and how many it restores: one class per method.

``SafetyRealignment(method=...)`` takes one of these (``class_path`` in YAML)::

    method: {class_path: hsr_pl.realign.MarginRule, init_args: {p: auto, q: 0.5, max_p: 0.7}}
    method: {class_path: hsr_pl.realign.GradientOrder, init_args: {budget: "1‱", rounds: 1}}
    method: {class_path: hsr_pl.realign.GradientOrder, init_args: {budget: auto, max_budget: "1‰"}}

Each holds only its own fields, so no setting of one method can be given to the other. Both share
the budget (how many weights) and ``preserve_structure`` (N:M masks stay N:M); a new order, or an
automatic budget, is a new subclass or field here — the callback does not change. The settings
every method shares (importance, selection, heads, calibration) stay on the callback;
:meth:`RealignMethod.realign_config` joins them into the :class:`~hsr_pl.realign.RealignConfig`
the tensor code runs on.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from .auto import AUTO_FIELDS, AutoBudget
from .config import RealignConfig
from .errors import RealignConfigError
from .select import resolve_budget

__all__ = ["FLAT_KEYS", "GradientOrder", "MarginRule", "RealignMethod", "method_from_flat"]

FLAT_KEYS = ("order", "p", "q", "max_p", "budget", "rounds", "scope", "utility_weight", "preserve_structure")
"""The method settings that SafetyRealignment once took directly (deprecated there)."""


class RealignMethod:
    """Base of the realignment methods: the budget and N:M handling every order shares.

    Args:
        budget: cap on restored weights — an int count, a float fraction of the language model's
            parameters, or a string such as ``"1‱"``; None restores the method's whole set.
        preserve_structure: keep N:M masks exactly N:M by swapping out a kept weight per restore.
            None (default): yes when the pruner's masks are exactly N:M (a 2:4 model stays 2:4),
            no when they are unstructured; False restores freely even in N:M masks.
    """

    order: ClassVar[str]

    def __init__(self, budget: int | float | str | None = None, preserve_structure: bool | None = None) -> None:
        # A method that restores nothing is a mistake, not a setting (the tensor code allows 0 for its edge cases).
        if budget is not None and not isinstance(budget, bool) and resolve_budget(budget, 1 << 62) == 0:
            raise RealignConfigError(
                f"budget={budget!r} restores nothing; give a positive count (e.g. 100) or a fraction (e.g. '1‱'), or "
                "drop budget for no cap"
            )
        self.budget = budget
        self.preserve_structure = None if preserve_structure is None else bool(preserve_structure)

    @property
    def is_auto(self) -> bool:
        """True when the budget is found on dev data (GradientOrder's ``budget: auto``)."""
        return False

    def init_args(self) -> dict[str, Any]:
        """This method's own fields (what YAML's ``init_args`` holds)."""
        raise NotImplementedError

    def realign_config(self, *, importance: str = "wanda", selection: str = "head") -> RealignConfig:
        """The full settings of the tensor code: this method's fields and the shared ones."""
        return RealignConfig(order=self.order, importance=importance, selection=selection, **self.init_args())

    @property
    def needs_dense(self) -> bool:
        """Whether the dense model's importance statistics are needed to pick (not only for baselines)."""
        return bool(self.preserve_structure)

    def yaml(self) -> str:
        """One line of YAML that gives this method to SafetyRealignment."""
        defaults = type(self)._defaults()
        args = {k: v for k, v in self.init_args().items() if k not in defaults or defaults[k] != v}
        inner = ", ".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in args.items())
        return f"method: {{class_path: hsr_pl.realign.{type(self).__name__}, init_args: {{{inner}}}}}"

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        import inspect

        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.init_args() == self.init_args()

    def __hash__(self) -> int:
        return hash((type(self).__name__, json.dumps(self.init_args(), sort_keys=True, default=str)))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"


class MarginRule(RealignMethod):
    """The paper's rule: R = (T^s(q) ∩ T^u(max_p)) \\ T^u(p), ranked by the safety-minus-utility
    rank-percentile margin and truncated by the budget (None: all of R).

    Args:
        p: utility fraction that stands for "what the pruner kept"; ``"auto"`` (default) is
            ``1 − sparsity`` of each module, the paper's 0.5 at 50 % sparsity.
        q: top safety fraction (paper 0.5).
        max_p: upper end of the utility band (paper 0.7); must stay above p.
        budget, preserve_structure: see :class:`RealignMethod`.
    """

    order = "margin"

    def __init__(
        self,
        p: float | str = "auto",
        q: float = 0.5,
        max_p: float = 0.7,
        budget: int | float | str | None = None,
        preserve_structure: bool | None = None,
    ) -> None:
        super().__init__(budget, preserve_structure)
        checked = RealignConfig(order="margin", p=p, q=q, max_p=max_p, budget=budget)  # the one set of checks
        self.p, self.q, self.max_p = checked.p, checked.q, checked.max_p

    def init_args(self) -> dict[str, Any]:
        return {"p": self.p, "q": self.q, "max_p": self.max_p, "budget": self.budget,
                "preserve_structure": self.preserve_structure}

    @property
    def needs_dense(self) -> bool:
        return True  # the margin ranks by the dense model's importance


class GradientOrder(RealignMethod):
    """Rank every pruned weight in scope by the first-order drop of the refusal loss that restoring
    it gives at the pruned model (``gain = −g_s·w − λ·g_u·w``), and restore the top ``budget``.

    Args:
        budget: ``"auto"`` (default): grow the set round by round and stop on dev data
            (:mod:`hsr_pl.realign.auto`; needs a data module with a dev part); or a fixed cap — an
            int count, a float fraction of the language model's parameters, or a string such as
            ``"1‱"``.
        rounds: a fixed budget restored in this many steps, recomputing the gradient after each.
        scope: ``heads`` (the selected heads' slices, default) or ``all`` (every attention
            projection whose originals were kept: no heads needed).
        utility_weight: λ, the weight of the benign-answer gradient (0 = refusal loss only).
        preserve_structure: see :class:`RealignMethod`.
        start, growth, max_budget, target_rsr, tolerance_points, utility_guard_points,
        over_refusal_guard_points, dev_samples, bisect, judge: the automatic budget's settings
            (:class:`hsr_pl.realign.auto.AutoBudget`; only with ``budget: auto``). ``dev_samples``
            also sizes the one dev check after a fixed budget.
    """

    order = "gradient"

    def __init__(
        self,
        budget: int | float | str | None = "auto",
        rounds: int = 1,
        scope: str = "heads",
        utility_weight: float = 0.0,
        preserve_structure: bool | None = None,
        start: int | float | str = "0.25‱",
        growth: float = 2.0,
        max_budget: int | float | str = "1‰",
        target_rsr: float = 0.95,
        tolerance_points: float = 1.0,
        utility_guard_points: float = 1.0,
        over_refusal_guard_points: float = 1.0,
        dev_samples: int = 64,
        bisect: bool = False,
        judge: str | None = None,
    ) -> None:
        if budget is None or (isinstance(budget, str) and budget.strip() == "auto"):
            budget = "auto"  # no budget for the gradient order: find it on dev data
        RealignMethod.__init__(self, None if budget == "auto" else budget, preserve_structure)
        self.budget = budget
        checked = RealignConfig(order="gradient", budget=budget, rounds=rounds, scope=scope, utility_weight=utility_weight)
        self.rounds, self.scope, self.utility_weight = checked.rounds, checked.scope, checked.utility_weight
        self.auto = AutoBudget(start=start, growth=growth, max_budget=max_budget, target_rsr=target_rsr,
                               tolerance_points=tolerance_points, utility_guard_points=utility_guard_points,
                               over_refusal_guard_points=over_refusal_guard_points, dev_samples=dev_samples,
                               bisect=bisect, judge=judge)
        if budget != "auto":
            changed = [k for k, v in self.auto.to_dict().items() if k not in ("dev_samples", "judge")
                       and v != getattr(AutoBudget, k)]
            if changed:
                raise RealignConfigError(
                    f"{', '.join(changed)} set the automatic budget, but budget={budget!r} is fixed; use budget: auto or "
                    "drop them"
                )

    @property
    def is_auto(self) -> bool:
        """True when the budget is found on dev data (``budget: auto``)."""
        return self.budget == "auto"

    def init_args(self) -> dict[str, Any]:
        args = {"budget": self.budget, "rounds": self.rounds, "scope": self.scope,
                "utility_weight": self.utility_weight, "preserve_structure": self.preserve_structure}
        return {**args, **self.auto.to_dict()}

    def realign_config(self, *, importance: str = "wanda", selection: str = "head") -> RealignConfig:
        args = {k: v for k, v in self.init_args().items() if k not in AUTO_FIELDS}
        return RealignConfig(order=self.order, importance=importance, selection=selection, **args)


def method_from_flat(**flat: Any) -> RealignMethod | None:
    """The method that the deprecated flat keys (:data:`FLAT_KEYS`) describe; None when none is given.

    They are checked together as before (so the same mistakes give the same messages); settings of
    the other method, which it never used, are dropped.
    """
    given = {k: v for k, v in flat.items() if v is not None}
    if not given:
        return None
    cfg = RealignConfig(**given)
    if cfg.order == "gradient":
        return GradientOrder(budget=cfg.budget, rounds=cfg.rounds, scope=cfg.scope, utility_weight=cfg.utility_weight,
                             preserve_structure=given.get("preserve_structure"))
    return MarginRule(p=cfg.p, q=cfg.q, max_p=cfg.max_p, budget=cfg.budget, preserve_structure=given.get("preserve_structure"))
