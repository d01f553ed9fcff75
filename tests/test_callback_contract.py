"""The callbacks' contract (issue 17): callbacks talk through declared members and HSRState only.

* no callback module imports another callback module (the private helpers ``_calibration``,
  ``_common``, ``_masks`` and ``base`` are allowed);
* ``getattr`` / ``hasattr`` in ``callbacks/`` only look at the trainer, the LightningModule, the
  data module, a data loader or the state — never at another callback;
* a look-alike that is not a declared pruner (``MaskHolder``) is not taken for one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

from hsr_pl.callbacks import SafetyRealignment, StageEvaluation
from hsr_pl.realign import RealignInputError

CALLBACKS = Path(__file__).resolve().parents[1] / "callbacks"
HELPERS = {"_calibration", "_common", "_masks", "base"}
# What getattr/hasattr may look at in callbacks/: none of them is a callback.
ALLOWED_ROOTS = {"trainer", "pl_module", "datamodule", "loader", "dataset", "state"}


def sources() -> list[Path]:
    return sorted(CALLBACKS.glob("*.py"))


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.name)
def test_a_callback_imports_no_other_callback_module(path):
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                imported |= {node.module} if node.module else {a.name for a in node.names}
            elif node.module and node.module.startswith("hsr_pl.callbacks."):
                imported.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            imported |= {a.name.split(".")[2] for a in node.names if a.name.startswith("hsr_pl.callbacks.")}
    if path.stem == "__init__":
        return  # the package lists the callbacks
    assert imported <= HELPERS, f"{path.name} imports callback module(s) {sorted(imported - HELPERS)}"


def _root(node: ast.expr) -> str:
    """The variable a (possibly nested) ``getattr``/attribute chain starts from."""
    while True:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
            node = node.args[0]
        elif isinstance(node, ast.Attribute):
            node = node.value
        else:
            return node.id if isinstance(node, ast.Name) else ast.dump(node)


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.name)
def test_no_callback_probes_another_for_undeclared_members(path):
    probes = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            root = _root(node.args[0])
            if root not in ALLOWED_ROOTS:
                probes.append(f"line {node.lineno}: {node.func.id}({ast.unparse(node.args[0])}, ...)")
    assert not probes, f"{path.name} probes objects that may be callbacks: {probes}"


def test_the_probe_check_catches_a_probe():
    code = "def f(trainer):\n    return [getattr(cb, 'fills_masks', False) for cb in trainer.callbacks]\n"
    call = next(n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "getattr")
    assert _root(call.args[0]) == "cb" and _root(ast.parse("getattr(trainer.datamodule, 'seed')").body[0].value) == "trainer"


class LookAlike(Callback):
    """Has every member the old code probed for, but declares nothing."""

    fills_masks = True
    provides = frozenset({"masks"})
    importance = "snip"
    changes_kept_weights = False


def test_a_look_alike_is_not_taken_for_a_pruner():
    realign = SafetyRealignment(heads=["0-1"], num_samples=2, when="validation_start", table=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[LookAlike(), realign])
    with pytest.raises(RealignInputError, match="no pruner before it"):
        realign.setup(trainer, pl.LightningModule(), "validate")


def test_stage_evaluation_needs_declared_providers():
    stages = StageEvaluation()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[LookAlike(), SafetyRealignment(heads=["0-1"], num_samples=2), stages])
    with pytest.raises(ValueError, match="follows a dense -> pruned -> realigned run"):
        stages.setup(trainer, pl.LightningModule(), "validate")


def test_declared_members_have_defaults_on_the_bases():
    from hsr_pl.callbacks import PrunedCheckpoint, Pruning, SafetyHeadAttribution
    from hsr_pl.callbacks._masks import MaskHolder
    from hsr_pl.callbacks.base import HSRCallback

    assert HSRCallback.provides == frozenset() and MaskHolder.provides == {"masks"}
    assert SafetyHeadAttribution.provides == {"head_scores"} and SafetyRealignment.provides == {"realignment"}
    assert Pruning(method="magnitude").importance == "wanda" and Pruning(method="snip").importance == "snip"
    assert Pruning(method="sparsegpt").changes_kept_weights and not Pruning().changes_kept_weights
    assert Pruning(mask_structure="2:4").planned_structure == (2, 4) and Pruning().planned_structure is None
    assert Pruning.structure_known_before_pruning and not PrunedCheckpoint.structure_known_before_pruning
    assert not StageEvaluation().needs_all_layers and StageEvaluation(baselines=True).needs_all_layers


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.name)
def test_callbacks_raise_their_own_error_classes(path):
    """No bare ValueError / RuntimeError / FileNotFoundError: each callback has its own (ValueError) class."""
    bare = [
        f"line {node.lineno}: {ast.unparse(node.exc)[:60]}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name)
        and node.exc.func.id in ("ValueError", "RuntimeError", "FileNotFoundError", "TypeError", "Exception")
    ]
    assert not bare, f"{path.name} raises bare built-in errors: {bare}"


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(score="nope"), "score='nope'"),
    (dict(num_samples=0), "num_samples=0 must be a positive integer"),
    (dict(calibration="harmful"), "calibration='harmful' is not a calibration split"),
    (dict(top_h=-1), "top_h=-1 must be an integer ≥ 0"),
    (dict(output="scores.txt"), "must be a .json file path"),
    (dict(scores_path="/nonexistent/scores.json"), "does not exist"),
    (dict(when="never"), "choose one or both"),
])
def test_head_attribution_raises_its_own_error(kwargs, match):
    from hsr_pl.callbacks import SafetyHeadAttribution
    from hsr_pl.callbacks.head_attribution import HeadAttributionError

    with pytest.raises(HeadAttributionError, match=match) as info:
        SafetyHeadAttribution(**kwargs)
    assert isinstance(info.value, ValueError)  # existing `except ValueError` keeps working


def _example(cls) -> dict:
    import inspect
    import re

    import yaml

    doc = inspect.getdoc(cls)
    found = re.search(r"Example[^\n]*::\n\n((?:    .*\n?)+)", doc)
    assert found, f"{cls.__name__}'s docstring has no YAML example"
    return yaml.safe_load("\n".join(line[4:] for line in found.group(1).splitlines()))[0]


@pytest.mark.parametrize("name", ["ExportPretrained", "PrunedCheckpoint", "Pruning", "SafetyAudit", "SafetyHeadAttribution",
                                  "SafetyRealignment", "StageEvaluation"])
def test_every_callback_docstring_has_a_yaml_example_that_parses(name):
    from jsonargparse import ArgumentParser

    import hsr_pl.callbacks as callbacks

    example = _example(getattr(callbacks, name))
    assert example["class_path"] == f"hsr_pl.callbacks.{name}"
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--cb", type=Callback)
    parsed = parser.parse_object({"cb": example})  # types and names checked as the CLI checks them
    assert parsed.cb.class_path == f"hsr_pl.callbacks.{name}"


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.name)
def test_no_callback_reads_another_callbacks_private_state(path):
    """``other._x`` only inside base.py (HSRCallback's own lifecycle on its instances)."""
    if path.name == "base.py":
        return
    reads = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    ]
    assert not reads, f"{path.name} reads private members of other objects: {reads}"


def test_stage_evaluation_reads_only_what_realignment_publishes():
    """StageEvaluation learns HSR's settings, result and dense statistics from HSRState.realignment_run,
    not from SafetyRealignment's attributes."""
    tree = ast.parse((CALLBACKS / "stages.py").read_text())
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
             and isinstance(node.value, ast.Name) and node.value.id == "source"}
    assert not names, f"StageEvaluation reads {sorted(names)} of the realignment callback"
