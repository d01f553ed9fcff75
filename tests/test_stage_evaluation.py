"""StageEvaluation: dense / pruned / realigned evaluated in one run, baselines with HSR's restored
count, the budget curve, and the realigned model put back untouched for validate and export."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from hsr_pl.callbacks import ExportPretrained, Pruning, SafetyRealignment, StageEvaluation
from hsr_pl.data import VLGuardDataModule
from hsr_pl.evaluation.runner import evaluate
from hsr_pl.models.tiny import build_tiny_llava
from hsr_pl.module import LVLMModule
from hsr_pl.realign import RealignConfigError
from hsr_pl.state import get_state

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "tiny_vlguard" / "train.json"
REFUSAL = "i am sorry i cannot help with that ."


def make_module():
    model, processor = build_tiny_llava(False, layers=2, heads=4)
    return LVLMModule(model, processor=processor, max_new_tokens=3, judges=["keyword-gcg-nocase", "strict"],
                      refusal=REFUSAL)


def make_data(module):
    eval_sets = [
        {"name": "harmful_image", "path": str(TRAIN), "split": "safety", "kind": "harmful"},
        {"name": "harmful_text", "path": str(TRAIN), "split": "over_refusal", "kind": "harmful"},
        {"name": "utility", "path": str(TRAIN), "split": "utility", "kind": "utility", "num_samples": 3},
    ]
    return VLGuardDataModule(train_path=str(TRAIN), eval_sets=eval_sets, eval_batch_size=4, processor=module.processor,
                             num_samples=8)


@pytest.mark.slow
def test_stages_baselines_curve_and_the_realigned_model_put_back(tmp_path):
    module = make_module()
    realign = SafetyRealignment(heads=["0-1", "1-2"], order="gradient", budget=12, num_samples=8,
                                when="validation_start", table=False)
    stages = StageEvaluation(judge="keyword-gcg-nocase", baselines=True, curve_budgets=[4, 12], output_dir=str(tmp_path))
    seen = {}

    class Final(pl.Callback):
        def on_validation_start(self, trainer, pl_module):
            seen["weights"] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
            seen["restored"] = {k: v.clone() for k, v in get_state(pl_module).restored.items()}
            seen["eval"] = evaluate(pl_module, trainer.datamodule.val_dataloader())

    callbacks = [Pruning(num_samples=8, keep_originals=["."], when="validation_start"), realign, stages, Final(),
                 ExportPretrained(str(tmp_path / "out"), when="validation_end")]
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=callbacks)
    trainer.validate(module, datamodule=make_data(module), verbose=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("judge", "sparsity", "method", "top_h", "heads", "lm_params", "restored_params", "restored_ratio_lm",
                "rsr", "wall_s", "dense", "pruned", "realigned", "baselines", "curve"):
        assert key in summary, key
    for stage in ("dense", "pruned", "realigned"):
        for key in ("asr", "asr_text", "asr_image", "utility", "over_refusal", "n_harmful", "n_utility"):
            assert key in summary[stage], (stage, key)
        assert set(summary[stage]["judges"]) == {"keyword-gcg-nocase", "strict"}
    assert summary["restored_params"] == 12 == realign.report["restored_params"]
    assert summary["sparsity_after_restoring"] < summary["sparsity"] and "rsr_reason" in summary
    assert summary["heads"] == [[0, 1], [1, 2]] and summary["method"] == "wanda"
    base = summary["baselines"]
    assert set(base) == {"random", "random_in_heads", "none", "whole_heads", "released_slices", "random_heads", "margin_rule"}
    for name in ("random", "random_in_heads", "none", "random_heads"):
        assert base[name]["restored_params"] == 12, name
    assert base["whole_heads"]["restored_params"] > 12 and base["margin_rule"]["restored_params"] != 12
    assert base["released_slices"]["restored_params"] == 12
    assert [p["restored_params"] for p in summary["curve"]["hsr"]] == [4, 12]
    assert summary["curve"]["margin_rule"][-1]["budget"] is None
    # The realigned model is what validate and the export see: the same weights and restorations,
    # and its evaluation equals the 'realigned' stage.
    final = {k: v for k, v in module.model.state_dict().items()}
    assert all(torch.equal(final[k], v) for k, v in seen["weights"].items())
    assert all(torch.equal(seen["restored"][k], v) for k, v in get_state(module).restored.items())
    assert seen["eval"] == summary["realigned"]["sets"]
    manifest = json.loads((tmp_path / "out" / "realignment.json").read_text())
    assert manifest["restored"]["params"] == 12
    assert (tmp_path / "stages.png").is_file() and (tmp_path / "restored_weights_curve.png").is_file()
    # The stage table keeps every value visible in an 80-column console.
    from rich.console import Console

    from hsr_pl.report.stages import stage_table

    console = Console(width=80, record=True)
    console.print(stage_table(summary))
    text = console.export_text()
    assert "…" not in text and all(name in text for name in base) and "keyword-gcg-nocase" in text
    assert f"{100 * summary['realigned']['judges']['strict']['asr_image']:.1f}" in text


def test_bad_settings_and_missing_judge():
    with pytest.raises(RealignConfigError, match="curve_budgets"):
        StageEvaluation(curve_budgets=[0])
    with pytest.raises(RealignConfigError, match="curve_methods"):
        StageEvaluation(curve_methods=["magic"])
    stage = StageEvaluation(judge="coherent-compliance")
    with pytest.raises(RealignConfigError, match="not among the model's judges"):
        stage._judges(make_module())


def trainer_for(tmp_path, callbacks) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=callbacks)


def test_margin_baselines_outside_the_heads_layers(tmp_path):
    """Heads in one layer, margin order: the head-free and random-head baselines need the other
    layer's dense statistics too, which SafetyRealignment then measures."""
    module = make_module()
    realign = SafetyRealignment(heads=["0-1"], budget=6, num_samples=8, when="validation_start", table=False)
    stages = StageEvaluation(baselines=True, baseline_sets=["harmful_image"], output_dir=str(tmp_path))
    assert stages.needs_all_layers and not StageEvaluation().needs_all_layers
    callbacks = [Pruning(num_samples=8, when="validation_start"), realign, stages]
    trainer_for(tmp_path, callbacks).validate(module, datamodule=make_data(module), verbose=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    base = summary["baselines"]
    assert summary["restored_params"] == 6
    assert base["none"]["restored_params"] == 6 and base["random_heads"]["restored_params"] == 6
    assert summary["realignment"]["importance"] == "wanda"


def test_setup_refuses_a_flow_it_cannot_follow(tmp_path):
    module = make_module()
    with pytest.raises(RealignConfigError, match="put Pruning .* and SafetyRealignment in trainer.callbacks"):
        trainer_for(tmp_path, [Pruning(num_samples=8, when="validation_start"), StageEvaluation()]).validate(
            module, datamodule=make_data(module), verbose=False)
    (tmp_path / "file").write_text("x")
    callbacks = [Pruning(num_samples=8, when="validation_start"),
                 SafetyRealignment(heads=["0-1"], num_samples=8, when="validation_start", table=False),
                 StageEvaluation(output_dir=str(tmp_path / "file" / "run"))]
    with pytest.raises(ValueError, match="StageEvaluation output_dir"):
        trainer_for(tmp_path, callbacks).validate(module, datamodule=make_data(module), verbose=False)
    assert not get_state(module).pruned

    class TwoRanks:
        world_size = 2

    with pytest.raises(RealignConfigError, match="evaluates on one process, this run has 2"):
        StageEvaluation().setup(TwoRanks(), module, "validate")
