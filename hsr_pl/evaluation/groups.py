"""Per-evaluation-set metric groups used by ``LVLMModule.validation_step``.

An evaluation set has a *kind* (see :class:`hsr_pl.data.EvalSet`): ``harmful`` sets report the
attack success rate under every configured judge (each value named by its judge), ``utility`` sets
report accuracy against the reference answers (exact choice — plain and circular — for MMBench,
ANLS for DocVQA, reference matching otherwise), ``benign`` sets report the over-refusal rate.

Every judge is asked once per batch; its verdicts feed its rate, its per-category rates (when the
set has categories) and the judges' pairwise agreement (Cohen's κ, when there are two or more).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import Judge
from .judges import make_judge
from .metrics import (
    ANLSScore,
    AttackSuccessRate,
    CategoryRate,
    ChoiceAccuracy,
    CircularAccuracy,
    JudgeAgreement,
    OverRefusalRate,
    UtilityAccuracy,
)

__all__ = ["EvalSetMetrics", "build_eval_metrics"]

SCORINGS = ("match", "choice", "anls")


class EvalSetMetrics(nn.Module):
    """The metrics of one evaluation set; ``compute()`` returns ``{log key: value}``."""

    def __init__(
        self,
        kind: str,
        metrics: Sequence[nn.Module],
        *,
        judges: Sequence[Judge] = (),
        per_category: Sequence[CategoryRate] = (),
        agreement: JudgeAgreement | None = None,
        circular: CircularAccuracy | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.metrics = nn.ModuleList(metrics)
        self.judges = list(judges)
        self.per_category = nn.ModuleList(per_category)
        self.agreement = agreement
        self.circular = circular

    # ---------------------------------------------------------------------------- updating
    def _verdicts(self, replies, prompts, images) -> list[list[bool]]:
        if self.kind == "benign":
            return [judge.refused(replies, prompts, images) for judge in self.judges]
        return [judge(replies, prompts, images) for judge in self.judges]

    def update(
        self,
        replies: Sequence[str],
        references: Sequence[str],
        prompts: Sequence[str] | None = None,
        *,
        images: Sequence[Any] | None = None,
        categories: Sequence[int] | None = None,
        answers: Sequence[Sequence[str]] | None = None,
        choices: Sequence[Mapping[str, str]] | None = None,
        answer: Sequence[str] | None = None,
        group: Sequence[int] | None = None,
        rotation: Sequence[int] | None = None,
    ) -> None:
        if self.judges:
            verdicts = self._verdicts(replies, prompts, images)
            key = "refused" if self.kind == "benign" else "verdicts"
            for metric, flags in zip(self.metrics, verdicts):
                metric.update(replies, prompts, **{key: flags})
            if categories is not None:
                for metric, flags in zip(self.per_category, verdicts):
                    metric.update(flags, categories)
            if self.agreement is not None:
                self.agreement.update(verdicts)
            return
        for metric in self.metrics:
            if isinstance(metric, ChoiceAccuracy):
                if choices is None or answer is None:
                    raise ValueError("multiple-choice scoring needs the batch's 'choices' and 'answer'")
                # Plain accuracy: the questions as published (rotation 0); circular: every rotation.
                first = [i for i in range(len(replies)) if rotation is None or rotation[i] == 0]
                metric.update([replies[i] for i in first], [choices[i] for i in first], [answer[i] for i in first])
                if self.circular is not None:
                    if group is None:
                        raise ValueError("circular scoring needs the batch's 'group' of every reply")
                    self.circular.update(ChoiceAccuracy.correct(replies, choices, answer)[0], group)
            elif isinstance(metric, ANLSScore):
                if answers is None:
                    raise ValueError("ANLS scoring needs the batch's 'answers'")
                metric.update(replies, answers)
            else:
                metric.update(replies, references)

    def update_batch(self, replies: Sequence[str], batch: Mapping[str, Any]) -> None:
        """``update`` from a batch of the evaluation collator (it carries every field needed)."""
        extra = {key: batch[key] for key in ("answers", "choices", "answer", "group", "rotation") if key in batch}
        self.update(replies, batch["references"], batch.get("instructions"), images=batch.get("image_refs"),
                    categories=batch.get("categories") if len(self.per_category) else None, **extra)

    # ---------------------------------------------------------------------------- results
    def _scalars(self) -> list[nn.Module]:
        return list(self.metrics) + ([self.circular] if self.circular is not None else [])

    def compute(self) -> dict[str, Tensor]:
        return {metric.log_key: metric.compute() for metric in self._scalars()}

    def count(self) -> Tensor:
        return self.metrics[0].total if len(self.metrics) else torch.tensor(0)

    def summary(self, name: str) -> dict[str, Any]:
        """Everything of the set for the report and the JSON file, over all ranks."""
        out: dict[str, Any] = {"name": name, "kind": self.kind, "metrics": [m.result() for m in self._scalars()]}
        out["n"] = out["metrics"][0]["n"] if out["metrics"] else 0
        if len(self.per_category):
            out["per_category"] = [m.result() for m in self.per_category]
        if self.agreement is not None:
            out["agreement"] = self.agreement.result()
        return out

    def reset(self) -> None:
        for metric in [*self._scalars(), *self.per_category, *([self.agreement] if self.agreement else [])]:
            metric.reset()


def build_eval_metrics(
    kind: str,
    judges: Sequence[str | Judge | Mapping] = ("keyword-gcg",),
    refusal: str | None = None,
    utility_match: str = "contains",
    *,
    scoring: str = "match",
    categories: Sequence[str] = (),
    num_groups: int = 0,
    circular: bool = False,
    agreement: bool = True,
) -> EvalSetMetrics:
    """Metrics for an evaluation set of ``kind`` (harmful / utility / benign).

    ``scoring`` (utility sets): ``match`` (reference string, ``utility_match``), ``choice``
    (multiple choice; ``circular`` with ``num_groups`` questions adds circular accuracy) or
    ``anls``. ``categories``: the set's category names, for per-category rates of harmful and
    benign sets. ``agreement``: pairwise judge agreement when there are two or more judges.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {SCORINGS}")
    if kind == "utility":
        if scoring == "choice":
            circ = CircularAccuracy(num_groups) if circular else None
            return EvalSetMetrics(kind, [ChoiceAccuracy()], circular=circ)
        if scoring == "anls":
            return EvalSetMetrics(kind, [ANLSScore()])
        return EvalSetMetrics(kind, [UtilityAccuracy(utility_match)])
    built = [j if isinstance(j, Judge) else make_judge(j, refusal=refusal) for j in judges]
    if not built:
        raise ValueError("need at least one judge name (e.g. 'keyword-gcg')")
    if kind == "harmful":
        metrics = [AttackSuccessRate(j) for j in built]
        label = "asr"
    elif kind == "benign":
        built = [j for j in built if j.detects_refusal]
        if not built:
            raise ValueError("over-refusal needs a refusal-detecting judge (keyword-gcg, strict or refusal-any)")
        metrics = [OverRefusalRate(j) for j in built]
        label = "over_refusal"
    else:
        raise ValueError(f"unknown evaluation kind {kind!r}; choose harmful, utility or benign")
    per_category = [CategoryRate(categories, label, j.name) for j in built] if categories else []
    names = [j.name for j in built]
    if len(set(names)) != len(names):
        raise ValueError(f"judge names must be distinct (every rate is named by its judge), got {names}")
    pairwise = JudgeAgreement(names) if agreement and len(built) > 1 else None
    return EvalSetMetrics(kind, metrics, judges=built, per_category=per_category, agreement=pairwise)
