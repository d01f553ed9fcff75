"""The evaluation wing: judges, guard-model judges and their prompt formats, per-reply scoring
rules, torchmetrics metrics, the per-set metric groups and the out-of-loop evaluation runner.

Who imports whom (no circle): ``base`` and ``guard_formats`` and ``scoring`` import nothing here;
``guard_judges`` imports ``base`` and ``guard_formats``; ``refusal_any`` imports ``base`` and
``organism``; ``judges`` (with :func:`make_judge`) imports those; ``metrics`` imports ``base`` and
``scoring``; ``groups`` imports ``judges`` and ``metrics``; ``intervals`` (bootstrap intervals)
imports nothing here.
"""

from .base import Judge
from .groups import EvalSetMetrics, build_eval_metrics
from .guard_judges import ClassifierJudge, GuardJudge, make_guard_judge
from .intervals import Interval, bootstrap_ci
from .judges import (
    CoherentComplianceJudge,
    KeywordJudge,
    LLMJudge,
    RefusalAnyJudge,
    StrictRefusalJudge,
    VLGuardKeywordJudge,
    check_judge,
    make_judge,
)
from .metrics import (
    ANLSScore,
    AttackSuccessRate,
    CategoryRate,
    ChoiceAccuracy,
    CircularAccuracy,
    JudgeAgreement,
    OverRefusalRate,
    UtilityAccuracy,
    safety_restoration_rate,
)
from .runner import evaluate, headline

__all__ = [
    "ANLSScore",
    "AttackSuccessRate",
    "CategoryRate",
    "ChoiceAccuracy",
    "CircularAccuracy",
    "ClassifierJudge",
    "CoherentComplianceJudge",
    "EvalSetMetrics",
    "GuardJudge",
    "Interval",
    "Judge",
    "JudgeAgreement",
    "KeywordJudge",
    "LLMJudge",
    "OverRefusalRate",
    "RefusalAnyJudge",
    "StrictRefusalJudge",
    "UtilityAccuracy",
    "VLGuardKeywordJudge",
    "bootstrap_ci",
    "build_eval_metrics",
    "evaluate",
    "headline",
    "make_guard_judge",
    "check_judge",
    "make_judge",
    "safety_restoration_rate",
]
