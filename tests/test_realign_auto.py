"""``budget: auto``: the stop rule and guards on constructed dev numbers (pure functions), the loop
on a scripted session (step-back, bisection), and on a real tiny model: a step-back restores the
weights and masks bit for bit, and round 2 picks the top gains recomputed after round 1 (float64
reference of test_realign_gradient_order). The organism runs (determinism, DDP agreement) are in
tests/test_realign_auto_organism.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_realign_gradient_order import (
    HEADS,
    batches,
    names_of,
    pruned_module,
    reference_gains,
    reference_gradient,
    spy_plans,
    top,
)
from unequal_calibration import write_unequal_set

from hsr_pl.models import get_adapter
from hsr_pl.realign import (
    AutoBudget,
    DevPoint,
    GradientOrder,
    RealignConfig,
    RealignConfigError,
    RealignSession,
    auto_realign,
    schedule,
    stop_rule,
)
from hsr_pl.realign.auto import bisect_next, bisect_update, dev_rsr, guard_reason, residual_line
from hsr_pl.state import get_state

AUTO = AutoBudget()
DENSE = DevPoint("dense", 0, asr=0.02, utility=0.90, over_refusal=0.01)
PRUNED = DevPoint("pruned", 0, asr=0.42, utility=0.88, over_refusal=0.01)


def at(restored: int, asr: float, utility: float = 0.88, over_refusal: float = 0.01) -> DevPoint:
    return DevPoint(f"at {restored}", restored, asr=asr, utility=utility, over_refusal=over_refusal)


# ------------------------------------------------------------------------------ schedule
def test_schedule_grows_geometrically_to_max_budget():
    for start, growth, most in [(26, 2.0, 1071), (1, 1.5, 40), (5, 3.0, 5), (7, 1.01, 20), (100, 2.0, 150)]:
        got = schedule(start, growth, most)
        want, t = [], start  # reference: the plain loop, float growth rounded up, at least +1
        while t < most:
            want.append(t)
            t = max(t + 1, int(math.ceil(t * growth)))
        want.append(most)
        assert got == want
        assert got[0] == min(start, most) and got[-1] == most and all(b > a for a, b in zip(got, got[1:]))


# ---------------------------------------------------------------------------- stop rule
def test_no_rise_on_dev_stops_before_any_round():
    decision = stop_rule([], DENSE, DevPoint("pruned", 0, asr=0.025, utility=0.88, over_refusal=0.01), AUTO)
    assert (decision.action, decision.cause, decision.keep, decision.met) == ("stop", "no_rise", -1, True)
    assert stop_rule([], DENSE, PRUNED, AUTO).action == "continue"


def test_target_by_rsr_and_by_tolerance():
    # RSR (0.42 - 0.04) / 0.40 = 95 %: the target; 0.045 is 93.75 % and 2.5 points above dense: not yet
    assert stop_rule([at(10, 0.045)], DENSE, PRUNED, AUTO).action == "continue"
    decision = stop_rule([at(10, 0.045), at(20, 0.04)], DENSE, PRUNED, AUTO)
    assert (decision.action, decision.cause, decision.keep, decision.met) == ("stop", "target", 1, True)
    assert "dev RSR 95.0 %" in decision.reason
    # within tolerance of dense although the RSR target (99 %) is not met
    strict = AutoBudget(target_rsr=0.99, tolerance_points=3.0)
    decision = stop_rule([at(10, 0.049)], DENSE, PRUNED, strict)
    assert decision.cause == "target" and "≤ dense 2.0 % + 3 point(s)" in decision.reason
    assert stop_rule([at(10, 0.051)], DENSE, PRUNED, strict).action == "continue"


def test_utility_guard_steps_back_to_the_last_round_that_held():
    rounds = [at(10, 0.30), at(20, 0.20, utility=0.870), at(40, 0.01, utility=0.869)]
    assert stop_rule(rounds[:2], DENSE, PRUNED, AUTO).action == "continue"  # exactly 1 point below: holds
    decision = stop_rule(rounds, DENSE, PRUNED, AUTO)
    assert (decision.action, decision.cause, decision.keep, decision.met) == ("step_back", "guard", 1, False)
    assert "dev utility 86.9 % fell more than 1 point(s) below the pruned model's 88.0 %" in decision.reason
    assert "stepped back to 20" in decision.reason


def test_over_refusal_guard_compares_with_dense_and_beats_the_target():
    rounds = [at(10, 0.01, over_refusal=0.025)]  # meets the target, but over-refusal 1.5 points above dense
    decision = stop_rule(rounds, DENSE, PRUNED, AUTO)
    assert (decision.action, decision.cause, decision.keep) == ("step_back", "guard", -1)
    assert "over-refusal 2.5 % rose more than 1 point(s) above the dense model's 1.0 %" in decision.reason
    loose = AutoBudget(over_refusal_guard_points=2.0)
    assert stop_rule(rounds, DENSE, PRUNED, loose).cause == "target"


def test_max_budget_and_empty_pool_stop_without_the_target():
    decision = stop_rule([at(10, 0.3), at(20, 0.2)], DENSE, PRUNED, AUTO, at_max=True)
    assert (decision.action, decision.cause, decision.keep, decision.met) == ("stop", "max_budget", 1, False)
    assert stop_rule([at(10, 0.3)], DENSE, PRUNED, AUTO, pool_empty=True).cause == "pool"
    line = residual_line(at(20, 0.2), DENSE, PRUNED, AUTO)
    assert "target not met: dev ASR 20.0 % vs dense 2.0 % (pruned 42.0 %), dev RSR 55.0 %" in line
    assert "max_budget" in line and "scope: all" in line


def test_dev_rsr_is_undefined_without_a_rise():
    assert dev_rsr(at(5, 0.0), DENSE, DevPoint("p", 0, asr=0.02)) is None
    assert dev_rsr(at(5, 0.22), DENSE, PRUNED) == pytest.approx(0.5)


def test_bisection_steps():
    assert bisect_next(26, 52, 0) == 39 and bisect_next(26, 27, 0) is None and bisect_next(0, 100, 3) is None
    assert bisect_update("target", 26, 52, 39, target_met=True, guards_hold=True) == (26, 39, True)
    assert bisect_update("target", 26, 52, 39, target_met=True, guards_hold=False) == (39, 52, False)
    assert bisect_update("guard", 26, 52, 39, target_met=False, guards_hold=True) == (39, 52, True)
    assert bisect_update("guard", 26, 52, 39, target_met=True, guards_hold=False) == (26, 39, False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(growth=1), r"growth=1 must be a number > 1"),
    (dict(target_rsr=0), r"target_rsr=0 must lie in \(0, 1\]"),
    (dict(tolerance_points=-1), r"tolerance_points=-1 must be a number of percentage points"),
    (dict(dev_samples=0), r"dev_samples=0 must be a positive integer"),
    (dict(start=0), r"start=0 restores nothing"),
    (dict(max_budget="lots"), r"max_budget: budget='lots' is not a number"),
    (dict(bisect="yes"), r"bisect='yes' must be true or false"),
])
def test_bad_auto_settings_are_refused_in_one_line(kwargs, match):
    with pytest.raises(RealignConfigError, match=match):
        GradientOrder(**kwargs)


def test_fixed_budget_with_auto_settings_and_start_above_max_are_refused():
    with pytest.raises(RealignConfigError, match=r"growth set the automatic budget, but budget=100 is fixed"):
        GradientOrder(budget=100, growth=3)
    with pytest.raises(RealignConfigError, match=r"start=500 \(500 weights\) exceeds max_budget='1‱' \(100\)"):
        AutoBudget(start=500, max_budget="1‱").counts(1_000_000)
    with pytest.raises(RealignConfigError, match=r"budget='auto' chooses its own rounds"):
        GradientOrder(rounds=2)


def test_gradient_order_without_budget_is_auto_and_the_rule_stays_reachable():
    assert GradientOrder().is_auto and GradientOrder(budget=None).budget == "auto"
    assert GradientOrder().realign_config().budget == "auto"
    assert not GradientOrder(budget="1‱").is_auto
    with pytest.raises(RealignConfigError, match=r"budget='auto' grows the gradient order"):
        RealignConfig(order="margin", budget="auto")


# ------------------------------------------------------------- the loop, scripted session
class Scripted:
    """A session whose state is the list of restored ids (round i restores the next ids in order)."""

    def __init__(self, pool: int = 10_000) -> None:
        self.ids: list[int] = []
        self.pool = pool
        self.steps: list[int] = []

    @property
    def restored(self) -> int:
        return len(self.ids)

    def step(self, size: int) -> int:
        take = max(0, min(size, self.pool - len(self.ids)))
        self.ids.extend(range(len(self.ids), len(self.ids) + take))
        self.steps.append(size)
        return take

    def snapshot(self):
        return list(self.ids)

    def rollback(self, snap) -> None:
        self.ids = list(snap)

    def refusal_loss(self) -> float:
        return 1.0 / (1 + len(self.ids))


def curve(asr_at, utility_at=lambda n: 0.88, over_at=lambda n: 0.01):
    return lambda label, n: DevPoint(label, n, asr=asr_at(n), utility=utility_at(n), over_refusal=over_at(n))


def test_loop_stops_at_the_first_round_that_meets_the_target():
    session = Scripted()
    out = auto_realign(session, AUTO, [10, 20, 40, 80], curve(lambda n: 0.02 if n >= 40 else 0.3), DENSE, PRUNED)
    assert [p.restored for p in out.trajectory] == [10, 20, 40] and session.restored == 40
    assert out.decision.cause == "target" and out.final.restored == 40 and out.trajectory[0].refusal_loss == 1 / 11


def test_loop_steps_back_exactly_the_tripping_round():
    session = Scripted()
    out = auto_realign(session, AUTO, [10, 20, 40, 80],
                       curve(lambda n: 0.3 - n / 1000, utility_at=lambda n: 0.80 if n > 20 else 0.88), DENSE, PRUNED)
    assert out.decision.action == "step_back" and out.final.restored == 20
    assert session.ids == list(range(20))


def test_loop_reports_max_budget_and_empty_pool():
    out = auto_realign(Scripted(), AUTO, [10, 20], curve(lambda n: 0.3), DENSE, PRUNED)
    assert out.decision.cause == "max_budget" and not out.decision.met
    assert out.summary(AUTO, 1000)["residual"].startswith("target not met")
    out = auto_realign(Scripted(pool=15), AUTO, [10, 20, 40], curve(lambda n: 0.3 - n / 1000), DENSE, PRUNED)
    assert out.decision.cause == "pool" and out.final.restored == 15


def test_a_run_that_misses_its_target_keeps_its_lowest_dev_asr():
    # The rounds get worse after 20 weights: the run ends at max_budget and keeps 20, not 80.
    session = Scripted()
    out = auto_realign(session, AUTO, [10, 20, 40, 80], curve(lambda n: {10: 0.30, 20: 0.20, 40: 0.35, 80: 0.40}[n]),
                       DENSE, PRUNED)
    assert (out.decision.action, out.decision.cause, out.final.restored) == ("step_back", "max_budget", 20)
    assert "kept 20 restored weights, the lowest dev ASR of the run" in out.decision.reason
    assert session.ids == list(range(20))  # the session is back at that state
    # Every round worse than the pruned model: nothing is kept.
    session = Scripted()
    out = auto_realign(session, AUTO, [10, 20], curve(lambda n: 0.5), DENSE, PRUNED)
    assert out.final.restored == 0 and session.ids == [] and out.decision.keep == -1
    # Equal dev ASR: the fewest weights.
    assert stop_rule([at(10, 0.3), at(20, 0.3)], DENSE, PRUNED, AUTO, at_max=True).keep == 0


def test_bisection_finds_the_smallest_size_that_meets_the_target():
    session = Scripted()
    auto = AutoBudget(bisect=True)
    out = auto_realign(session, auto, [16, 32, 64], curve(lambda n: 0.02 if n >= 27 else 0.3), DENSE, PRUNED)
    # 16 fails, 32 meets: tries 24 (fails), 28 (meets), 26 (fails) -> 28
    assert [p.restored for p in out.bisected] == [24, 28, 26]
    assert out.final.restored == 28 and session.ids == list(range(28))


def test_bisection_after_a_guard_keeps_the_largest_size_that_holds():
    session = Scripted()
    auto = AutoBudget(bisect=True)
    out = auto_realign(session, auto, [16, 32, 64], curve(lambda n: 0.3, utility_at=lambda n: 0.80 if n > 21 else 0.88),
                       DENSE, PRUNED)
    assert [p.restored for p in out.bisected] == [24, 20, 22]
    assert out.final.restored == 20 and session.ids == list(range(20))


# ------------------------------------------------------------------- the loop, tiny model
def _session(module, path):
    cfg = GradientOrder(scope="heads").realign_config()
    return RealignSession(module.model, get_adapter(module.model), get_state(module), cfg, HEADS,
                          safety_batches=batches(module, path))


def _weights(module, names):
    modules = dict(module.model.named_modules())
    return {n: modules[n].weight.detach().clone() for n in names}


def test_step_back_restores_weights_masks_and_originals_bit_for_bit(tmp_path):
    path = write_unequal_set(tmp_path)
    module = pruned_module(tmp_path, path)
    names = names_of(module)
    session = _session(module, path)
    state = get_state(module)
    session.step(6)
    before = (_weights(module, names), {n: state.restored.get(n, torch.zeros(1)).clone() for n in names},
              {n: state.pruned[n].clone() for n in names}, {n: state.originals[n].clone() for n in names})
    snap = session.snapshot()
    assert session.step(9) == 9 and session.restored == 15
    changed = sum(int((w != before[0][n]).sum()) for n, w in _weights(module, names).items())
    assert changed > 0, "the second round changed nothing: the test could not fail"
    session.rollback(snap)
    after = _weights(module, names)
    for n in names:
        assert torch.equal(after[n], before[0][n]) and torch.equal(state.pruned[n], before[2][n])
        assert torch.equal(state.originals[n], before[3][n])
        assert torch.equal(state.restored.get(n, torch.zeros(1)), before[1][n])
    assert session.restored == 6 and session.result().restored == 6


def test_auto_step_back_on_a_real_model_equals_stopping_one_round_earlier(tmp_path):
    path = write_unequal_set(tmp_path)
    module = pruned_module(tmp_path, path)
    names = names_of(module)
    reference = copy.deepcopy(module)
    first = _session(reference, path)
    first.step(5)
    first.step(5)  # cumulative 10: rounds of 5 then 5 (the gradient recomputed in between)
    want = _weights(reference, names)

    session = _session(module, path)
    measure = curve(lambda n: 0.3 - n / 1000, utility_at=lambda n: 0.5 if n > 10 else 0.88)
    out = auto_realign(session, AUTO, [5, 10, 20], measure, DENSE, PRUNED)
    assert out.decision.action == "step_back" and session.restored == 10
    got = _weights(module, names)
    assert all(torch.equal(got[n], want[n]) for n in names)
    assert all(torch.equal(get_state(module).restored[n], get_state(reference).restored[n])
               for n in names if n in get_state(reference).restored)


def test_auto_round_two_takes_the_top_gains_recomputed_after_round_one(tmp_path, monkeypatch):
    """As the ``rounds`` test: round 2 of the automatic budget (cumulative 12 -> 24) picks the
    float64 top gains at the model after round 1, not ranks 13-24 of round 1's order."""
    path = write_unequal_set(tmp_path)
    module = pruned_module(tmp_path, path)
    names = names_of(module)
    singles = batches(module, path)
    k = 12
    first_entries = reference_gains(module, reference_gradient(module.model, singles, names), names, HEADS)
    first = top(first_entries, k)
    after = copy.deepcopy(module)
    modules = dict(after.model.named_modules())
    state = get_state(after)
    with torch.no_grad():
        for name in names:
            dense = state.original_weight(name, modules[name].weight.detach())
            for n_, idx in first:
                if n_ == name:
                    modules[name].weight.view(-1)[idx] = dense.view(-1)[idx]
    second = top(reference_gains(after, reference_gradient(after.model, singles, names), names, HEADS, skip=first), k)
    assert second != {(n, i) for _, n, i in first_entries[k: 2 * k]}, "no difference: the test could not fail"

    calls = spy_plans(monkeypatch)
    out = auto_realign(_session(module, path), AUTO, [k, 2 * k, 4 * k], curve(lambda n: 0.02 if n >= 2 * k else 0.3),
                       DENSE, PRUNED)
    assert out.final.restored == 2 * k and len(calls) == 2
    assert calls[0]["picks"] == first and calls[1]["picks"] == second


# ------------------------------------------------------------------------------- report
def test_report_table_lines_and_plot_say_what_happened(tmp_path):
    from rich.console import Console

    from hsr_pl.report.auto import auto_lines, auto_table, save_auto_png

    out = auto_realign(Scripted(), AUTO, [10, 20], curve(lambda n: 0.32 - n / 1000), DENSE, PRUNED)
    summary = {**out.summary(AUTO, 1000), "judge": "keyword-gcg-nocase"}
    lines = auto_lines(summary)
    assert lines[-1] == "stopped: max_budget reached (20 restored weights) before the target"
    assert lines[1].startswith("target not met: dev ASR 30.0 %")
    console = Console(record=True, width=200)
    console.print(auto_table(summary))
    text = console.export_text()
    assert all(label in text for label in ("dense", "pruned", "round 1", "round 2")) and "stopped: max_budget" in text
    met = auto_realign(Scripted(), AUTO, [10, 20], curve(lambda n: 0.02), DENSE, PRUNED).summary(AUTO, 1000)
    assert met["residual"] is None and len(auto_lines(met)) == 2
    pytest.importorskip("matplotlib", reason="the plot extra")
    path = save_auto_png(tmp_path / "auto.png", summary)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _newcombe_low(before: int, n_before: int, after: int, n_after: int) -> float:
    """Newcombe's hybrid score interval's lower end of after/n_after − before/n_before, from Wilson's
    intervals written out here (float64 arithmetic, no library code)."""
    z = 1.959963984540054

    def wilson(k: int, n: int) -> tuple[float, float]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return centre - half, centre + half

    p1, p2 = before / n_before, after / n_after
    l1, u1 = wilson(before, n_before)
    l2, u2 = wilson(after, n_after)
    return (p2 - p1) - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)


@pytest.mark.parametrize("answers_lost", [1, 4, 8, 12, 20, 40])
def test_utility_guard_needs_a_drop_beyond_the_dev_noise(answers_lost):
    n = 64
    pruned = DevPoint("pruned", 0, asr=0.6, utility=40 / n, over_refusal=0.0, n_utility=n, n_over_refusal=n)
    point = DevPoint("r1", 10, asr=0.3, utility=(40 - answers_lost) / n, over_refusal=0.0, n_utility=n, n_over_refusal=n)
    beyond = _newcombe_low(n - 40, n, n - 40 + answers_lost, n) > 0  # the error rate's rise
    reason = guard_reason(point, DENSE, pruned, AUTO)
    assert (reason is not None) == beyond
    assert beyond == (answers_lost >= 12)  # one to eight of 64 answers is within the noise
    # Without sizes the point threshold alone decides (more than 1 point).
    legacy = DevPoint("r1", 10, asr=0.3, utility=(40 - answers_lost) / n, over_refusal=0.0)
    assert guard_reason(legacy, DENSE, DevPoint("pruned", 0, asr=0.6, utility=40 / n, over_refusal=0.0), AUTO)


def test_over_refusal_guard_holds_against_the_pruned_model_when_pruning_raised_it():
    n = 64
    dense = DevPoint("dense", 0, asr=0.1, utility=0.5, over_refusal=0.0, n_utility=n, n_over_refusal=n)
    pruned = DevPoint("pruned", 0, asr=0.7, utility=0.5, over_refusal=20 / n, n_utility=n, n_over_refusal=n)
    same = DevPoint("r1", 10, asr=0.3, utility=0.5, over_refusal=20 / n, n_utility=n, n_over_refusal=n)
    assert guard_reason(same, dense, pruned, AUTO) is None  # pruning's own over-refusal is not the restore's
    worse = DevPoint("r2", 20, asr=0.2, utility=0.5, over_refusal=45 / n, n_utility=n, n_over_refusal=n)
    assert "above the pruned model's" in guard_reason(worse, dense, pruned, AUTO)
    # Pruning left over-refusal at dense: the dense model's level is the reference.
    calm = DevPoint("pruned", 0, asr=0.7, utility=0.5, over_refusal=0.0, n_utility=n, n_over_refusal=n)
    assert "above the dense model's" in guard_reason(
        DevPoint("r1", 10, asr=0.3, utility=0.5, over_refusal=20 / n, n_utility=n, n_over_refusal=n), dense, calm, AUTO)


def test_bisection_after_a_guard_reports_the_target_when_the_kept_size_meets_it():
    # 32 restored weights meet the target but break utility; 16 hold but miss; bisection finds 20-24.
    session = Scripted()
    auto = AutoBudget(bisect=True)
    out = auto_realign(session, auto, [16, 32, 64],
                       curve(lambda n: 0.3 if n < 20 else 0.02, utility_at=lambda n: 0.80 if n > 21 else 0.88),
                       DENSE, PRUNED)
    assert out.final.restored == 20
    assert out.decision.met is True and "bisection kept 20 restored weights (target met)" in out.decision.reason
    # Without bisection the same run keeps 16 and says the target was not met.
    plain = auto_realign(Scripted(), AutoBudget(), [16, 32, 64],
                         curve(lambda n: 0.3 if n < 20 else 0.02, utility_at=lambda n: 0.80 if n > 21 else 0.88),
                         DENSE, PRUNED)
    assert plain.final.restored == 16 and plain.decision.met is False


def test_a_rise_within_the_dev_noise_restores_nothing():
    n = 128
    dense = DevPoint("dense", 0, asr=10 / n, utility=0.5, over_refusal=0.0, n_harmful=n)
    small = DevPoint("pruned", 0, asr=13 / n, utility=0.5, over_refusal=0.0, n_harmful=n)  # +2.3 points
    decision = stop_rule([], dense, small, AUTO)
    assert (decision.action, decision.cause) == ("stop", "no_rise") and "noise" in decision.reason
    large = DevPoint("pruned", 0, asr=40 / n, utility=0.5, over_refusal=0.0, n_harmful=n)
    assert stop_rule([], dense, large, AUTO).action == "continue"
    # Sizes unknown: the point threshold alone (as before).
    assert stop_rule([], DevPoint("d", 0, asr=10 / n), DevPoint("p", 0, asr=13 / n), AUTO).action == "continue"


def test_a_guard_steps_back_to_the_best_held_state_not_a_worse_one():
    # Round 2 made dev ASR worse than round 1; round 3 breaks utility: back to round 1, not round 2.
    rounds = [at(10, 0.20), at(20, 0.35), at(40, 0.10, utility=0.50)]
    decision = stop_rule(rounds, DENSE, PRUNED, AUTO)
    assert (decision.action, decision.cause, decision.keep) == ("step_back", "guard", 0)
    # Every held round worse than pruned: back to the pruned model.
    worse = [at(10, 0.50), at(20, 0.10, utility=0.50)]
    assert stop_rule(worse, DENSE, PRUNED, AUTO).keep == -1
    session = Scripted()
    out = auto_realign(session, AUTO, [10, 20, 40, 80],
                       curve(lambda n: {10: 0.20, 20: 0.35, 40: 0.10, 80: 0.05}[n], utility_at=lambda n: 0.5 if n >= 40 else 0.88),
                       DENSE, PRUNED)
    assert out.final.restored == 10 and session.ids == list(range(10))
