"""``budget: auto`` — grow the gradient order's restore set round by round until the dev numbers say stop.

A fixed budget that suits one model leaves most of the damage on another, so the budget is found
on a held-out *dev* split instead of guessed. The rounds restore the top entries of the gradient
order (the gradient recomputed at the current model before each round, as ``rounds`` does);
their cumulative sizes grow geometrically from ``start`` by ``growth`` up to ``max_budget``. After
each round the dev sets are evaluated (harmful-dev ASR under the run's headline judge, dev utility,
dev over-refusal) and :func:`stop_rule` decides:

* **target** — dev RSR ≥ ``target_rsr``, or dev ASR ≤ dense + ``tolerance_points``: stop here;
* **guard** — dev utility more than ``utility_guard_points`` below the *pruned* model's, or dev
  over-refusal more than ``over_refusal_guard_points`` above the higher of the dense and the pruned
  model's, in both cases beyond the dev sets' noise (:func:`guard_reason`): step back to the last
  round that held (its restores are undone exactly);
* **max_budget** — the next round would pass it, or the pool is empty: stop, target not met.

Optionally (``bisect``) a few cheap bisection steps between the last two sizes look for a smaller
set that still meets the target (or a larger one that still holds the guards).

Everything that decides is a pure function of numbers here (:func:`schedule`, :func:`stop_rule`,
:func:`bisect_next`, :func:`bisect_update`); :func:`auto_realign` runs the loop on a
:class:`~hsr_pl.realign.runner.RealignSession` with a ``measure`` function that the caller supplies
(SafetyRealignment evaluates the dev sets with :mod:`hsr_pl.evaluation`). Under DDP every rank
receives the same, all-gathered dev numbers, so every rank takes the same decision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from ..evaluation.metrics import rise_interval
from .errors import RealignConfigError
from .select import resolve_budget

__all__ = [
    "AUTO_FIELDS",
    "AutoBudget",
    "AutoOutcome",
    "Decision",
    "DevPoint",
    "auto_realign",
    "bisect_next",
    "bisect_update",
    "dev_rsr",
    "guard_reason",
    "point_from_headlines",
    "residual_line",
    "schedule",
    "stop_rule",
    "target_reason",
]

AUTO_FIELDS = ("start", "growth", "max_budget", "target_rsr", "tolerance_points", "utility_guard_points",
               "over_refusal_guard_points", "dev_samples", "bisect", "judge")
"""GradientOrder's settings that only ``budget: auto`` uses."""

BISECT_STEPS = 3
"""At most this many bisection steps (each: one gradient pass and one dev evaluation)."""


def _points(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise RealignConfigError(f"{name}={value!r} must be a number of percentage points in [0, 100], e.g. 1.0")
    return float(value)


@dataclass(frozen=True)
class AutoBudget:
    """The settings of ``budget: auto`` (GradientOrder's fields of the same names).

    Attributes:
        start: the first round's cumulative size (a count or fraction, as ``budget``).
        growth: each next cumulative size is ``growth`` times the last (> 1).
        max_budget: the most the rounds may restore together.
        target_rsr: stop once the dev restoration rate reaches this (in (0, 1]).
        tolerance_points: or once dev ASR is within this many points of the dense model's.
        utility_guard_points / over_refusal_guard_points: the guards (points, see the module doc).
        dev_samples: prompts per dev set.
        bisect: refine between the last two sizes (at most :data:`BISECT_STEPS` steps).
        judge: the judge of the dev ASR; None: the model's first judge (the run's headline).
    """

    start: int | float | str = "0.25‱"
    growth: float = 2.0
    max_budget: int | float | str = "1‰"
    target_rsr: float = 0.95
    tolerance_points: float = 1.0
    utility_guard_points: float = 1.0
    over_refusal_guard_points: float = 1.0
    dev_samples: int = 64
    bisect: bool = False
    judge: str | None = None

    def __post_init__(self) -> None:
        for name in ("start", "max_budget"):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip() == "auto":
                raise RealignConfigError(f"{name}='auto' is not a size; give a count (e.g. 25) or a fraction (e.g. '0.25‱')")
            try:
                if resolve_budget(value, 1 << 62) in (None, 0):
                    raise RealignConfigError(f"{name}={value!r} restores nothing; give a positive count or fraction")
            except RealignConfigError as err:
                raise RealignConfigError(f"{name}: {err}") from None
        if isinstance(self.growth, bool) or not isinstance(self.growth, (int, float)) or not self.growth > 1:
            raise RealignConfigError(f"growth={self.growth!r} must be a number > 1 (e.g. 2: each round doubles the total)")
        if isinstance(self.target_rsr, bool) or not isinstance(self.target_rsr, (int, float)) \
                or not 0 < self.target_rsr <= 1:
            raise RealignConfigError(f"target_rsr={self.target_rsr!r} must lie in (0, 1] (e.g. 0.95)")
        for name in ("tolerance_points", "utility_guard_points", "over_refusal_guard_points"):
            object.__setattr__(self, name, _points(getattr(self, name), name))
        if isinstance(self.dev_samples, bool) or not isinstance(self.dev_samples, int) or self.dev_samples < 1:
            raise RealignConfigError(f"dev_samples={self.dev_samples!r} must be a positive integer (prompts per dev set)")
        if not isinstance(self.bisect, bool):
            raise RealignConfigError(f"bisect={self.bisect!r} must be true or false")
        if self.judge is not None and (not isinstance(self.judge, str) or not self.judge):
            raise RealignConfigError(f"judge={self.judge!r} must be a judge name of the model (or None: its first)")
        object.__setattr__(self, "growth", float(self.growth))
        object.__setattr__(self, "target_rsr", float(self.target_rsr))

    def counts(self, lm_params: int) -> tuple[int, int]:
        """``(start, max_budget)`` as weight counts; refused when start exceeds max_budget."""
        first, most = resolve_budget(self.start, lm_params), resolve_budget(self.max_budget, lm_params)
        if first < 1 or most < 1:
            raise RealignConfigError(
                f"start={self.start!r} / max_budget={self.max_budget!r} give {first} / {most} weights of {lm_params:,}: "
                "less than one; give counts (e.g. start: 5)"
            )
        if first > most:
            raise RealignConfigError(
                f"start={self.start!r} ({first} weights) exceeds max_budget={self.max_budget!r} ({most}); lower start "
                "or raise max_budget"
            )
        return first, most

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DevPoint:
    """The dev numbers of one model state (fractions in [0, 1]).

    ``asr`` is the headline judge's mean over the harmful dev sets; ``asr_by_judge`` every judge's.
    """

    label: str
    restored: int
    asr: float
    utility: float | None = None
    over_refusal: float | None = None
    asr_by_judge: dict[str, float] = field(default_factory=dict)
    refusal_loss: float | None = None
    seconds: float = 0.0
    n_utility: int | None = None  # prompts behind ``utility`` / ``over_refusal`` / ``asr`` (None: unknown)
    n_over_refusal: int | None = None
    n_harmful: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """What :func:`stop_rule` says: ``continue``, ``stop`` or ``step_back``; ``keep`` is the index of
    the trajectory point to end at (-1: the pruned model, nothing restored); ``met``: target reached."""

    action: str
    reason: str
    keep: int
    met: bool = False
    cause: str = ""  # "target", "guard", "max_budget", "no_rise", "pool" ("" while continuing)


def dev_rsr(point: DevPoint, dense: DevPoint, pruned: DevPoint) -> float | None:
    """(ASR_pruned − ASR_now) / (ASR_pruned − ASR_dense) on dev; None when pruning raised no ASR."""
    rise = pruned.asr - dense.asr
    if rise <= 0:
        return None
    return (pruned.asr - point.asr) / rise


def target_reason(point: DevPoint, dense: DevPoint, pruned: DevPoint, auto: AutoBudget) -> str | None:
    """Why ``point`` meets the target (None: it does not)."""
    rsr = dev_rsr(point, dense, pruned)
    if rsr is not None and rsr >= auto.target_rsr - 1e-12:
        return f"dev RSR {100 * rsr:.1f} % ≥ target {100 * auto.target_rsr:.1f} %"
    if point.asr <= dense.asr + auto.tolerance_points / 100 + 1e-12:
        return (f"dev ASR {100 * point.asr:.1f} % ≤ dense {100 * dense.asr:.1f} % + {auto.tolerance_points:g} "
                "point(s)")
    return None


def _beyond_noise(worse: float, reference: float, n_point: int | None, n_reference: int | None) -> bool:
    """Whether a move from ``reference`` to ``worse`` (fractions, worse > reference) is more than the
    noise of the dev sets: the 95 % interval of the difference (Newcombe's, as if the two evaluations
    were independent, which makes it wider than a paired one) lies above zero. Unknown sizes: yes."""
    if n_point is None or n_reference is None or n_point <= 0 or n_reference <= 0:
        return True
    low = rise_interval(round(reference * n_reference), n_reference, round(worse * n_point), n_point)[1]
    return low > 0


def guard_reason(point: DevPoint, dense: DevPoint, pruned: DevPoint, auto: AutoBudget) -> str | None:
    """Which guard ``point`` trips (None: both hold). Unmeasured numbers (no such dev set) hold.

    A guard trips when the move is more than its points *and* more than the dev sets' noise (the
    interval of the change excludes zero): on 64 prompts one answer is 1.6 points, so a point
    threshold alone would step back on a single changed reply. Over-refusal is held against the
    higher of the dense and the pruned model's: realignment may not add over-refusal, but pruning's
    own is not the restore's fault (a model whose pruning raised over-refusal would otherwise never
    keep a round).
    """
    if point.utility is not None and pruned.utility is not None \
            and point.utility < pruned.utility - auto.utility_guard_points / 100 - 1e-12 \
            and _beyond_noise(1 - point.utility, 1 - pruned.utility, point.n_utility, pruned.n_utility):
        return (f"dev utility {100 * point.utility:.1f} % fell more than {auto.utility_guard_points:g} point(s) below "
                f"the pruned model's {100 * pruned.utility:.1f} % (beyond the dev sets' noise)")
    if point.over_refusal is not None and dense.over_refusal is not None:
        base, whose = dense, "dense"
        if pruned.over_refusal is not None and pruned.over_refusal > dense.over_refusal:
            base, whose = pruned, "pruned"
        if point.over_refusal > base.over_refusal + auto.over_refusal_guard_points / 100 + 1e-12 \
                and _beyond_noise(point.over_refusal, base.over_refusal, point.n_over_refusal, base.n_over_refusal):
            return (f"dev over-refusal {100 * point.over_refusal:.1f} % rose more than {auto.over_refusal_guard_points:g} "
                    f"point(s) above the {whose} model's {100 * base.over_refusal:.1f} % (beyond the dev sets' noise)")
    return None


def schedule(start: int, growth: float, max_count: int) -> list[int]:
    """Cumulative sizes ``start, ⌈start·g⌉, …`` (each at least one more), the last one ``max_count``."""
    if start < 1 or max_count < start or growth <= 1:
        raise RealignConfigError(f"schedule needs 1 ≤ start ≤ max_count and growth > 1 (got {start}, {max_count}, {growth})")
    totals, total = [], start
    while total < max_count:
        totals.append(total)
        total = max(total + 1, math.ceil(total * growth))
    totals.append(max_count)
    return totals


def stop_rule(
    trajectory: Sequence[DevPoint], dense: DevPoint, pruned: DevPoint, auto: AutoBudget, *, at_max: bool = False,
    pool_empty: bool = False,
) -> Decision:
    """Decide after the last point of ``trajectory`` (the rounds so far; empty: before round 1).

    Order: the guards first (a round that reaches the target by breaking utility is not kept), then
    the target, then ``at_max`` (the schedule is spent) / ``pool_empty`` (nothing left to restore).
    """
    if not trajectory:
        if pruned.asr <= dense.asr + auto.tolerance_points / 100 + 1e-12:
            return Decision("stop", f"pruning did not raise dev ASR beyond dense + {auto.tolerance_points:g} point(s) "
                                    f"({100 * dense.asr:.1f} → {100 * pruned.asr:.1f} %): nothing to restore",
                            -1, met=True, cause="no_rise")
        if not _beyond_noise(pruned.asr, dense.asr, pruned.n_harmful, dense.n_harmful):
            # A rise of a reply or two would make one round "meet" the target on a one-prompt denominator.
            return Decision("stop", f"pruning's dev ASR rise ({100 * dense.asr:.1f} → {100 * pruned.asr:.1f} %) is within "
                                    "the dev sets' noise: nothing to restore (more dev prompts would tell)",
                            -1, met=True, cause="no_rise")
        return Decision("continue", "", -1)
    last = len(trajectory) - 1
    point = trajectory[last]
    tripped = guard_reason(point, dense, pruned, auto)
    if tripped is not None:
        # Back to the held state with the lowest dev ASR (the pruned model included; the fewest weights
        # on ties): in a monotone run that is the round before this one.
        held = [i for i in range(last) if guard_reason(trajectory[i], dense, pruned, auto) is None]
        best = min(held, key=lambda i: (trajectory[i].asr, trajectory[i].restored), default=-1)
        keep = -1 if best < 0 or pruned.asr <= trajectory[best].asr else best
        back_to = trajectory[keep].restored if keep >= 0 else 0
        met = keep >= 0 and target_reason(trajectory[keep], dense, pruned, auto) is not None
        return Decision("step_back", f"{tripped} at {point.restored:,} restored weights: stepped back to {back_to:,}",
                        keep, met=met, cause="guard")
    reached = target_reason(point, dense, pruned, auto)
    if reached is not None:
        return Decision("stop", f"{reached} at {point.restored:,} restored weights", last, met=True, cause="target")
    if pool_empty or at_max:
        why = (f"no pruned weight left in scope after {point.restored:,} restored weights" if pool_empty
               else f"max_budget reached ({point.restored:,} restored weights) before the target")
        # Target missed: keep the state with the lowest dev ASR (the fewest weights on ties), the pruned
        # model included, so a run whose rounds made things worse never returns a worse model.
        best = min(range(last + 1), key=lambda i: (trajectory[i].asr, trajectory[i].restored))
        keep = -1 if pruned.asr <= trajectory[best].asr else best
        if keep != last:
            back_to = trajectory[keep].restored if keep >= 0 else 0
            why += f": kept {back_to:,} restored weights, the lowest dev ASR of the run"
        return Decision("stop" if keep == last else "step_back", why, keep, cause="pool" if pool_empty else "max_budget")
    return Decision("continue", "", last)


def bisect_next(lo: int, hi: int, steps_done: int, max_steps: int = BISECT_STEPS) -> int | None:
    """The next size to try strictly between ``lo`` and ``hi`` (None: done)."""
    if steps_done >= max_steps or hi - lo < 2:
        return None
    return (lo + hi) // 2


def bisect_update(cause: str, lo: int, hi: int, mid: int, target_met: bool, guards_hold: bool) -> tuple[int, int, bool]:
    """``(lo, hi, keep_mid)`` after trying ``mid``.

    ``cause == "target"``: ``hi`` met the target, ``lo`` did not; a mid that meets it (guards holding)
    becomes the new ``hi`` (the smaller set is kept), else the new ``lo``. ``cause == "guard"``: ``lo``
    held the guards, ``hi`` tripped one; a mid that holds becomes the new ``lo`` (kept), else ``hi``.
    """
    if cause == "target":
        good = target_met and guards_hold
        return (lo, mid, True) if good else (mid, hi, False)
    if cause == "guard":
        return (mid, hi, True) if guards_hold else (lo, mid, False)
    raise RealignConfigError(f"bisection follows a target or guard stop, not {cause!r}")


def residual_line(final: DevPoint, dense: DevPoint, pruned: DevPoint, auto: AutoBudget | None = None,
                  scope: str = "heads", fixed: bool = False) -> str:
    """One line on the damage left when the target was not met, and what to try (``fixed``: after a
    fixed budget's dev check)."""
    rsr = dev_rsr(final, dense, pruned)
    rsr_text = "n/a" if rsr is None else f"{100 * rsr:.1f} %"
    tries = ["a larger budget" if fixed else "a larger max_budget"]
    if scope == "heads":
        tries.append("scope: all")
    tries.append("budget: auto" if fixed else "a fixed budget with rounds")
    target = f" (target {100 * auto.target_rsr:.0f} %)" if auto is not None else ""
    return (f"target not met: dev ASR {100 * final.asr:.1f} % vs dense {100 * dense.asr:.1f} % (pruned "
            f"{100 * pruned.asr:.1f} %), dev RSR {rsr_text}{target}; try {', '.join(tries)}")


@dataclass
class AutoOutcome:
    """What the automatic budget did: the dev trajectory, the decision and the final count."""

    dense: DevPoint
    pruned: DevPoint
    trajectory: list[DevPoint]
    decision: Decision
    final: DevPoint
    schedule: list[int]
    bisected: list[DevPoint] = field(default_factory=list)

    @property
    def restored(self) -> int:
        return self.final.restored

    def summary(self, auto: AutoBudget, lm_params: int, scope: str = "heads") -> dict[str, Any]:
        """JSON-able: settings, dense / pruned / every round / bisection, the stop reason and residual."""
        rsr = dev_rsr(self.final, self.dense, self.pruned)
        return {
            "settings": auto.to_dict(),
            "schedule": list(self.schedule),
            "max_budget_params": self.schedule[-1] if self.schedule else None,
            "lm_params": lm_params,
            "dense": self.dense.to_dict(),
            "pruned": self.pruned.to_dict(),
            "rounds": [p.to_dict() for p in self.trajectory],
            "bisection": [p.to_dict() for p in self.bisected],
            "final": self.final.to_dict(),
            "final_rsr": rsr,
            "stop": {"action": self.decision.action, "cause": self.decision.cause, "reason": self.decision.reason,
                     "target_met": self.decision.met},
            "residual": None if self.decision.met else residual_line(self.final, self.dense, self.pruned, auto, scope),
        }


class AutoSession(Protocol):
    """What :func:`auto_realign` needs of a realignment in progress
    (:class:`~hsr_pl.realign.runner.RealignSession` is one)."""

    @property
    def restored(self) -> int:
        """Weights restored so far."""

    def step(self, size: int) -> int:
        """Restore the top ``size`` entries (gradient at the current model); the count restored."""

    def snapshot(self) -> Any:
        """The state now, for :meth:`rollback`."""

    def rollback(self, snap: Any) -> None:
        """Put the state of ``snap`` back exactly."""

    def refusal_loss(self) -> float | None:
        """The refusal NLL at the current model."""


def auto_realign(
    session: AutoSession,
    auto: AutoBudget,
    sizes: Sequence[int],
    measure: Callable[[str, int], DevPoint],
    dense: DevPoint,
    pruned: DevPoint,
    *,
    log: Callable[[str], None] | None = None,
) -> AutoOutcome:
    """Run the rounds of ``sizes`` (cumulative, :func:`schedule`) until :func:`stop_rule` stops.

    ``measure(label, restored)`` evaluates the dev sets at the current model and returns a
    :class:`DevPoint` (every rank must return the same numbers). The session is left at the state
    of the decision's ``keep`` point; a stepped-back round's restores are undone exactly.
    """
    say = log or (lambda _line: None)
    trajectory: list[DevPoint] = []
    decision = stop_rule(trajectory, dense, pruned, auto)
    snaps = [session.snapshot()]  # snaps[i]: the state before round i (snaps[0]: the pruned model)
    best = -1  # the round with the lowest dev ASR so far (-1: the pruned model)
    while decision.action == "continue":
        index = len(trajectory)
        start = time.perf_counter()
        want = sizes[index] - session.restored
        done = session.step(want)
        loss = session.refusal_loss()
        point = measure(f"round {index + 1}", session.restored)
        point.refusal_loss, point.seconds = loss, round(time.perf_counter() - start, 3)
        trajectory.append(point)
        say(_round_line(point, dense, pruned))
        at_max = index + 1 >= len(sizes)
        decision = stop_rule(trajectory, dense, pruned, auto, at_max=at_max, pool_empty=done < want)
        if decision.action == "continue":
            # Kept: the pruned model, the state after the best round so far (where a run that misses
            # its target steps back to) and the state before the newest round (a guard's step-back and
            # bisection start there); the others are freed, not hoarded.
            if best < 0 or point.asr < trajectory[best].asr:
                best = index
            snaps.append(session.snapshot())
            snaps = [snap if i in (0, best + 1, len(snaps) - 1) else None for i, snap in enumerate(snaps)]
    if decision.action == "step_back":
        assert snaps[decision.keep + 1] is not None, "a step-back returns to a state that was kept"
        session.rollback(snaps[decision.keep + 1])
    final = trajectory[decision.keep] if decision.keep >= 0 else pruned
    bisected: list[DevPoint] = []
    contiguous = decision.cause == "target" or decision.keep == len(trajectory) - 2  # bisect between neighbours only
    if auto.bisect and decision.cause in ("target", "guard") and trajectory and contiguous:
        before = final
        final = _bisect(session, auto, decision, trajectory, snaps, measure, dense, pruned, bisected, say)
        if final is not before:  # the decision must describe the state that is kept
            met = target_reason(final, dense, pruned, auto) is not None
            decision = replace(decision, met=met, reason=f"{decision.reason}; bisection kept {final.restored:,} "
                                                        f"restored weights ({'target met' if met else 'target not met'})")
    return AutoOutcome(dense=dense, pruned=pruned, trajectory=trajectory, decision=decision, final=final,
                       schedule=list(sizes), bisected=bisected)


def _bisect(session, auto, decision, trajectory, snaps, measure, dense, pruned, bisected, say) -> DevPoint:
    """Refine between the last two sizes; leaves the session at the chosen state and returns its point.

    Each try grows the set from the state at ``lo`` (the gradient recomputed there), so a try is
    what a round of that size would have restored; the chosen state is kept as a snapshot.
    """
    if decision.cause == "target":  # the session is at the point that met the target
        hi_i = decision.keep
        lo_i = hi_i - 1
        chosen = trajectory[hi_i]
    else:  # a guard: the session was stepped back to keep
        lo_i, hi_i = decision.keep, len(trajectory) - 1
        chosen = trajectory[lo_i] if lo_i >= 0 else pruned
    chosen_snap = session.snapshot()
    base = snaps[lo_i + 1]  # the state at lo
    lo = trajectory[lo_i].restored if lo_i >= 0 else 0
    hi = trajectory[hi_i].restored
    session.rollback(base)
    steps = 0
    while (mid := bisect_next(lo, hi, steps)) is not None:
        steps += 1
        start = time.perf_counter()
        session.step(mid - lo)
        loss = session.refusal_loss()
        point = measure(f"bisect {steps}", session.restored)
        point.refusal_loss, point.seconds = loss, round(time.perf_counter() - start, 3)
        bisected.append(point)
        say(_round_line(point, dense, pruned))
        met = target_reason(point, dense, pruned, auto) is not None
        holds = guard_reason(point, dense, pruned, auto) is None
        new_lo, hi, keep = bisect_update(decision.cause, lo, hi, point.restored, met, holds)
        if keep:
            chosen, chosen_snap = point, session.snapshot()
        if new_lo != lo:  # lo moved up to this try: later tries grow from here
            base = session.snapshot()
        else:
            session.rollback(base)
        lo = new_lo
    session.rollback(chosen_snap)
    return chosen


def _round_line(point: DevPoint, dense: DevPoint, pruned: DevPoint) -> str:
    rsr = dev_rsr(point, dense, pruned)
    parts = [f"{point.label}: {point.restored:,} restored", f"dev ASR {100 * point.asr:.1f} %",
             "RSR " + ("n/a" if rsr is None else f"{100 * rsr:.1f} %")]
    if point.utility is not None:
        parts.append(f"utility {100 * point.utility:.1f} %")
    if point.over_refusal is not None:
        parts.append(f"over-refusal {100 * point.over_refusal:.1f} %")
    if point.refusal_loss is not None:
        parts.append(f"refusal NLL {point.refusal_loss:.4f}")
    parts.append(f"{point.seconds:.1f} s")
    return ", ".join(parts)


def point_from_headlines(label: str, restored: int, rows: Mapping[str, Mapping[str, Any]], judge: str | None = None) -> DevPoint:
    """A :class:`DevPoint` from ``{judge: headline}`` rows (:func:`hsr_pl.evaluation.dev.dev_headlines`);
    ``judge`` None takes the first judge (the module's first: the run's headline)."""
    if not rows:
        raise RealignConfigError("the dev sets hold no harmful or benign prompts, so no judge was run; check the dev data")
    judge = judge or next(iter(rows))
    if judge not in rows:
        raise RealignConfigError(f"judge={judge!r} is not among the model's judges {list(rows)}; add it to "
                                 "model.init_args.judges or drop GradientOrder's judge")
    head = rows[judge]
    if head.get("asr") is None:
        raise RealignConfigError("the dev sets hold no harmful prompts, so dev ASR is unknown; check the dev data")
    by_judge = {j: float(r["asr"]) for j, r in rows.items() if r.get("asr") is not None}
    return DevPoint(label=label, restored=restored, asr=float(head["asr"]), utility=head.get("utility"),
                    over_refusal=head.get("over_refusal"), asr_by_judge=by_judge,
                    n_utility=head.get("n_utility") or None, n_over_refusal=head.get("n_benign") or None,
                    n_harmful=head.get("n_harmful") or None)
