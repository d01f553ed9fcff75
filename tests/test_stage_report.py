"""The stage report says what was measured (issue #20): a rise within noise gives no restoration
rate, the sparsity prints as measured, the table is whole off a terminal, baselines' utility is
never a mean over other sets than the stages', and a left-out baseline says why."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console

from hsr_pl.callbacks.stages import measurable_rise, pooled_asr
from hsr_pl.evaluation.metrics import rise_interval, wilson_interval
from hsr_pl.realign import RealignConfig
from hsr_pl.realign.baselines import left_out_baselines, variant_config
from hsr_pl.realign.errors import RealignConfigError
from hsr_pl.report.stages import closing_line, print_stage_table


def test_wilson_and_newcombe_match_the_published_examples_and_a_slow_reference():
    # Newcombe (1998), Statistics in Medicine 17:873-890: 81/263 -> Wilson [0.2553, 0.3662];
    # 56/70 - 48/80 -> hybrid score interval [0.0524, 0.3339].
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    rise, low, high = rise_interval(48, 80, 56, 70)
    assert (round(rise, 4), round(low, 4), round(high, 4)) == (0.2, 0.0524, 0.3339)
    # Wilson's bounds are the roots of |p - x| = z * sqrt(x (1 - x) / n): bisect them in float64.
    z = 1.959963984540054
    for hits, n in [(0, 10), (1, 600), (7, 9), (10, 10)]:
        p = hits / n

        def f(x, hits=hits, n=n, p=p):
            return (p - x) ** 2 - z * z * x * (1 - x) / n

        def root(a, b, f=f):
            for _ in range(200):
                m = (a + b) / 2
                a, b = (m, b) if (f(a) > 0) == (f(m) > 0) else (a, m)
            return (a + b) / 2

        want_low = 0.0 if hits == 0 else root(0.0, p)
        want_high = 1.0 if hits == n else root(p, 1.0)
        got = wilson_interval(hits, n)
        assert math.isclose(got[0], want_low, abs_tol=1e-9) and math.isclose(got[1], want_high, abs_tol=1e-9)


def results(asr: float, n: int = 600) -> dict:
    return {"harmful_image": {"kind": "harmful", "n": n, "asr[kw]": asr}}


def test_one_reply_of_600_is_no_measurable_rise():
    assert pooled_asr(results(1 / 600), "kw") == (1, 600)
    reason = measurable_rise(results(0.0), results(1 / 600), "kw")
    assert reason and reason.startswith("no measurable rise") and "includes 0" in reason
    assert measurable_rise(results(0.0), results(0.4), "kw") is None


def summary(**overrides) -> dict:
    row = {"asr": 0.0, "utility": 0.8, "over_refusal": 0.0, "judges": {"kw": {"asr": 0.0, "asr_image": 0.0}}}
    base = {
        "judge": "kw", "judges": ["kw"], "harmful_sets": ["harmful_image"], "method": "wanda", "sparsity": 0.5952,
        "heads": [[0, 1]], "restored_params": 107, "restored_ratio_lm": 1e-4, "rsr": 1.0,
        "dense": row, "pruned": {**row, "asr": 1 / 600, "judges": {"kw": {"asr": 1 / 600, "asr_image": 1 / 600}}},
        "realigned": row,
        "baselines": {"random": {"asr": 0.0, "rsr": 1.0, "restored_params": 107, "utility": None, "over_refusal": 0.0,
                                 "judges": {"kw": {"asr": 0.0, "asr_image": 0.0}}}},
        "baselines_left_out": {"whole_heads": "left out under preserve_structure: it inverts the heads' masks"},
    }
    return {**base, **overrides}


def test_no_ratio_for_a_rise_within_noise_and_the_measured_sparsity():
    s = summary(rsr=None, rsr_reason=measurable_rise(results(0.0), results(1 / 600), "kw"))
    line = closing_line(s)
    assert "no measurable rise" in line and "of the lost safety restored" not in line
    assert "59.52 %" in line
    out = io.StringIO()
    print_stage_table(s, Console(file=out, width=80))
    text = out.getvalue()
    assert "no rise" in text and "100.0" not in text.split("random")[1].split("\n")[0]
    assert "59.52 %" in text and "whole_heads left out under preserve_structure" in " ".join(text.split())


def test_the_stage_table_is_not_cut_at_80_columns_off_a_terminal():
    many = {f"baseline_with_a_long_name_{i}_" + "x" * 50: summary()["baselines"]["random"] for i in range(3)}
    s = summary(baselines=many, judges=["kw", "strict-judge", "another-judge"],
                dense={**summary()["dense"], "judges": {j: {"asr": 0.0, "asr_image": 0.0} for j in ("kw", "strict-judge", "another-judge")}})
    for stage in ("pruned", "realigned"):
        s[stage] = {**s["dense"]}
    for b in many.values():
        b["judges"] = s["dense"]["judges"]
    out = io.StringIO()
    print_stage_table(s, Console(file=out, width=80))  # a file: not a terminal
    rows = [line for line in out.getvalue().splitlines() if line.lstrip().startswith("baseline_with")]
    assert len(rows) == 3 and all(name in out.getvalue() for name in many)
    assert all("…" not in line for line in rows) and max(len(line) for line in rows) > 80


def test_whole_heads_is_left_out_under_preserve_structure_with_its_reason():
    cfg = RealignConfig(order="gradient", budget=10, preserve_structure=True)
    assert "inverts the heads' masks" in left_out_baselines(cfg)["whole_heads"]
    with pytest.raises(RealignConfigError, match="whole_heads.*preserve_structure"):
        variant_config(cfg, "whole_heads", None)
    assert left_out_baselines(RealignConfig(order="gradient", budget=10)) == {}
    assert variant_config(RealignConfig(), "whole_heads", None).selection == "whole_heads"


def test_the_renamed_baselines_and_their_old_names():
    from hsr_pl.callbacks import StageEvaluation
    from hsr_pl.realign.baselines import BASELINES

    assert "released_slices" in BASELINES and "margin_rule" in BASELINES
    assert "reference" not in BASELINES and "paper_rule" not in BASELINES  # they never used the published p
    stages = StageEvaluation(curve_methods=["paper_rule", "reference", "hsr"])
    assert stages.curve_methods == ["margin_rule", "released_slices", "hsr"]
