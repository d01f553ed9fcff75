"""One configuration class per realignment method (issue 17, item 3), and the deprecation shim that
keeps SafetyRealignment's old flat keys working."""

from __future__ import annotations

import inspect

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback
from test_realignment_callback import HEADS, make_module, run_validate

from hsr_pl.callbacks import SafetyRealignment
from hsr_pl.realign import GradientOrder, MarginRule, RealignConfig, RealignConfigError, RealignMethod
from hsr_pl.state import get_state


# ------------------------------------------------------------------------------- the classes
def test_each_method_gives_the_flat_config_it_stands_for():
    assert MarginRule().realign_config() == RealignConfig()
    assert MarginRule(p=0.3, q=0.4, max_p=0.9, budget="1‱").realign_config(importance="snip", selection="reference") \
        == RealignConfig(p=0.3, q=0.4, max_p=0.9, budget="1‱", importance="snip", selection="reference")
    assert GradientOrder(budget=5, rounds=2, scope="all", utility_weight=0.5, preserve_structure=True).realign_config() \
        == RealignConfig(order="gradient", budget=5, rounds=2, scope="all", utility_weight=0.5, preserve_structure=True)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: MarginRule(p=0.8), r"p=0.8 must lie in \(0, max_p=0.7\)"),
    (lambda: MarginRule(q=0), "q=0.0 must lie in"),
    (lambda: MarginRule(max_p=1.5), "max_p=1.5"),
    (lambda: MarginRule(p="half"), "p='half' must be a number"),
    (lambda: MarginRule(budget="lots"), "budget='lots' is not a number"),
    (lambda: GradientOrder(rounds=2), r"budget='auto' chooses its own rounds"),
    (lambda: GradientOrder(budget=5, rounds=0), "rounds=0 must be a positive integer"),
    (lambda: GradientOrder(budget=5, scope="everything"), "scope='everything' is unknown"),
    (lambda: GradientOrder(budget=5, utility_weight=-1), "utility_weight=-1 must be a number ≥ 0"),
    (lambda: GradientOrder(budget=-3), "budget=-3 must be ≥ 0"),
])
def test_bad_method_settings_fail_with_the_fix(make, match):
    with pytest.raises(RealignConfigError, match=match):
        make()


def test_a_method_holds_only_its_own_fields():
    margin = set(inspect.signature(MarginRule).parameters)
    gradient = set(inspect.signature(GradientOrder).parameters)
    assert margin == {"p", "q", "max_p", "budget", "preserve_structure"}
    assert gradient == {"budget", "rounds", "scope", "utility_weight", "preserve_structure", "start", "growth",
                        "max_budget", "target_rsr", "tolerance_points", "utility_guard_points",
                        "over_refusal_guard_points", "dev_samples", "bisect", "judge"}
    with pytest.raises(TypeError):
        MarginRule(rounds=2)
    with pytest.raises(TypeError):
        GradientOrder(budget=5, p=0.5)


def test_safety_realignment_takes_at_most_13_arguments_of_its_own():
    params = inspect.signature(SafetyRealignment).parameters.values()
    named = [p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert len(named) <= 13, named
    assert "order" not in named and "rounds" not in named and "heads_path" not in named


@pytest.mark.parametrize("method", [
    MarginRule(), MarginRule(p=0.4, max_p=0.8, budget="1‱", preserve_structure=True),
    GradientOrder(budget=100), GradientOrder(budget=1e-4, rounds=3, scope="all", utility_weight=0.25),
])
def test_the_yaml_line_parses_back_to_the_same_method(method):
    parsed = parse_callback(yaml.safe_load(method.yaml()))
    assert parsed.method == method and parsed.config == method.realign_config()


# ------------------------------------------------------------------------ the deprecation shim
def parse_callback(init_args: dict) -> SafetyRealignment:
    """SafetyRealignment from YAML ``init_args`` the way the CLI builds it (jsonargparse)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--cb", type=Callback)
    cfg = parser.parse_object({"cb": {"class_path": "hsr_pl.callbacks.SafetyRealignment",
                                      "init_args": {"heads": HEADS, **init_args}}})
    return parser.instantiate(cfg).cb


FLAT_AND_NEW = [
    ({"order": "gradient", "budget": "1‱"}, {"method": {"class_path": "hsr_pl.realign.GradientOrder",
                                                       "init_args": {"budget": "1‱"}}}),
    ({"p": 0.4, "q": 0.5, "max_p": 0.8, "budget": 12},
     {"method": {"class_path": "hsr_pl.realign.MarginRule", "init_args": {"p": 0.4, "max_p": 0.8, "budget": 12}}}),
    ({"order": "gradient", "budget": 7, "rounds": 2, "scope": "all", "utility_weight": 0.5},
     {"method": {"class_path": "hsr_pl.realign.GradientOrder",
                 "init_args": {"budget": 7, "rounds": 2, "scope": "all", "utility_weight": 0.5}}}),
]


@pytest.mark.parametrize(("flat", "new"), FLAT_AND_NEW)
def test_old_flat_yaml_keys_give_the_new_method_and_one_line_that_shows_it(flat, new, capsys):
    capsys.readouterr()
    old = parse_callback(flat)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hsr-pl: SafetyRealignment's keys ") and "deprecated" in err[0]
    modern = parse_callback(new)
    assert capsys.readouterr().err == ""
    assert old.method == modern.method and old.settings() == modern.settings()
    # The line's YAML is the new form: it parses back to the same callback.
    printed = yaml.safe_load(err[0].split("write instead: ", 1)[1])
    assert parse_callback(printed).method == modern.method


def test_old_flat_keys_keep_the_old_checks():
    for flat, match in [({"rounds": 2}, "rounds > 1"), ({"scope": "all"}, "scope='all'"),
                        ({"utility_weight": 0.5}, "utility_weight"), ({"order": "gradient"}, "needs a budget"),
                        ({"order": "random"}, "order='random' is unknown")]:
        with pytest.raises(RealignConfigError, match=match):
            SafetyRealignment(heads=HEADS, **flat)


def test_method_and_flat_keys_together_are_refused():
    with pytest.raises(RealignConfigError, match="give method or the deprecated flat keys"):
        SafetyRealignment(heads=HEADS, method=MarginRule(), budget=5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'order_by'"):
        SafetyRealignment(heads=HEADS, order_by="margin")


def test_heads_path_is_a_deprecated_alias_of_scores_path(tmp_path, capsys):
    scores = tmp_path / "scores.json"
    scores.write_text('{"0-0": 1.0, "0-1": 3.0, "1-0": 2.0, "1-1": 0.5}')
    capsys.readouterr()
    old = SafetyRealignment(heads_path=str(scores), top_h=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "heads_path" in err[0] and f'scores_path: "{scores}"' in err[0]
    new = SafetyRealignment(scores_path=str(scores), top_h=2)
    assert old.settings() == new.settings() and old.scores_path == new.scores_path
    with pytest.raises(RealignConfigError, match="not both"):
        SafetyRealignment(heads_path=str(scores), scores_path=str(scores), top_h=2)


@pytest.mark.parametrize(("flat", "method"), [
    (dict(order="gradient", budget=6), GradientOrder(budget=6)),
    (dict(p=0.5, q=0.5, max_p=0.9), MarginRule(p=0.5, max_p=0.9)),
])
def test_old_and_new_form_restore_the_same_weights(tmp_path, flat, method, capsys):
    restored = []
    for i, kwargs in enumerate((flat, {"method": method})):
        module = make_module()
        torch.manual_seed(0)
        realign = SafetyRealignment(heads=HEADS, num_samples=8, when="validation_start", table=False, **kwargs)
        run_validate(tmp_path / str(i), module, realign)
        restored.append({n: m.clone() for n, m in get_state(module).restored.items()})
    assert restored[0].keys() == restored[1].keys() and restored[0]
    assert all(torch.equal(restored[0][n], restored[1][n]) for n in restored[0])
    assert sum(int(m.sum()) for m in restored[0].values()) > 0


def test_the_method_is_the_plug_in_point():
    """A new method is a subclass; SafetyRealignment runs whatever flat config it gives."""

    class Wider(MarginRule):
        def __init__(self, budget: int | None = None) -> None:
            super().__init__(p=0.3, max_p=0.9, budget=budget)

    realign = SafetyRealignment(heads=HEADS, method=Wider(budget=4))
    assert isinstance(realign.method, RealignMethod)
    assert realign.config == RealignConfig(p=0.3, max_p=0.9, budget=4)


def test_an_n_m_run_resumes_under_the_same_settings():
    """run() switches preserve_structure on for N:M masks when the method leaves it unset; the
    settings a checkpoint stores stay the configured ones, so a resume is not refused."""
    from dataclasses import replace

    from hsr_pl.callbacks import SafetyRealignment

    ran = SafetyRealignment(heads=["0-0"])
    ran.config = replace(ran.config, preserve_structure=True)  # what run() does for 2:4 masks
    saved = ran.state_dict()
    fresh = SafetyRealignment(heads=["0-0"])
    fresh.load_state_dict(saved)  # refused as "other settings" when the effective value was stored
    assert saved["settings"]["preserve_structure"] is None
