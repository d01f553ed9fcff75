"""Per-evaluation-set metric groups used by ``LVLMModule.validation_step``.

An evaluation set has a *kind* (see :class:`hsr_pl.data.EvalSet`): ``harmful`` sets report the
attack success rate under every configured judge (each value named by its judge), ``utility`` sets
report accuracy against the reference answers, ``benign`` sets report the over-refusal rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .judges import Judge, make_judge
from .metrics import AttackSuccessRate, OverRefusalRate, UtilityAccuracy

__all__ = ["EvalSetMetrics", "build_eval_metrics"]


class EvalSetMetrics(nn.Module):
    """The metrics of one evaluation set; ``compute()`` returns ``{log key: value}``."""

    def __init__(self, kind: str, metrics: Sequence[nn.Module]) -> None:
        super().__init__()
        self.kind = kind
        self.metrics = nn.ModuleList(metrics)

    def update(self, replies: Sequence[str], references: Sequence[str], prompts: Sequence[str] | None = None) -> None:
        for metric in self.metrics:
            if isinstance(metric, UtilityAccuracy):
                metric.update(replies, references)
            else:
                metric.update(replies, prompts)

    def compute(self) -> dict[str, Tensor]:
        return {metric.log_key: metric.compute() for metric in self.metrics}

    def count(self) -> Tensor:
        return self.metrics[0].total if len(self.metrics) else torch.tensor(0)

    def reset(self) -> None:
        for metric in self.metrics:
            metric.reset()


def build_eval_metrics(
    kind: str,
    judges: Sequence[str | Judge] = ("keyword-gcg",),
    refusal: str | None = None,
    utility_match: str = "contains",
) -> EvalSetMetrics:
    """Metrics for an evaluation set of ``kind`` (harmful / utility / benign)."""
    built = [j if isinstance(j, Judge) else make_judge(j, refusal=refusal) for j in judges]
    if not built:
        raise ValueError("need at least one judge name (e.g. 'keyword-gcg')")
    if kind == "harmful":
        return EvalSetMetrics(kind, [AttackSuccessRate(j) for j in built])
    if kind == "utility":
        return EvalSetMetrics(kind, [UtilityAccuracy(utility_match)])
    if kind == "benign":
        refusal_judges = [j for j in built if j.detects_refusal]
        if not refusal_judges:
            raise ValueError("over-refusal needs a refusal-detecting judge (keyword-gcg or strict)")
        return EvalSetMetrics(kind, [OverRefusalRate(j) for j in refusal_judges])
    raise ValueError(f"unknown evaluation kind {kind!r}; choose harmful, utility or benign")
