"""Guards that sit below the CLI: NaN/inf weights, statistics and scores; what the partial scan
file records; top_h=0; the calibration count used; early checks of the data module."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from hsr_pl.callbacks import Pruning, SafetyHeadAttribution
from hsr_pl.data import VLGuardDataModule
from hsr_pl.models import get_adapter
from hsr_pl.models.tiny import build_tiny_llava
from hsr_pl.module import LVLMModule, ModelLoadError
from hsr_pl.pruning import CalibrationError, DamagedModelError, PruningConfig, prune_model
from hsr_pl.report.heads import read_partial
from hsr_pl.state import get_state

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "tiny_vlguard" / "train.json"


def make_module() -> LVLMModule:
    model, processor = build_tiny_llava(False, layers=2, heads=4)
    return LVLMModule(model, processor=processor, max_new_tokens=1)


def make_data(module: LVLMModule, cls: type[VLGuardDataModule] = VLGuardDataModule, **kwargs) -> VLGuardDataModule:
    eval_sets = [{"name": "harmful", "path": str(TRAIN), "split": "safety", "kind": "harmful", "num_samples": 1}]
    return cls(train_path=str(TRAIN), eval_sets=eval_sets, eval_batch_size=1, processor=module.processor, **kwargs)


def validate(tmp_path, callback, module=None, data_cls=VLGuardDataModule):
    module = module or make_module()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path, callbacks=[callback])
    trainer.validate(module, datamodule=make_data(module, data_cls), verbose=False)
    return module


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class NaNPixels(VLGuardDataModule):
    """Calibration images that are NaN: finite weights, non-finite outputs."""

    def calibration_dataloader(self, *args, **kwargs):
        rows = []
        for batch in super().calibration_dataloader(*args, **kwargs):
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
            rows.append(batch)
        return rows


# ----------------------------------------------------------------------------- NaN weights
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nan_weights_are_refused_before_any_change_naming_the_parameter(method):
    module = make_module()
    adapter = get_adapter(module.model)
    with torch.no_grad():
        adapter.projections(1)["o"].weight[2, 3] = float("nan")
    before = snapshot(module.model)
    name = adapter.name_of(adapter.projections(1)["o"]) + ".weight"
    batches = None if method == "magnitude" else [{"input_ids": torch.tensor([[2, 5, 8, 9]])}]
    with pytest.raises(DamagedModelError, match=rf"weight {name} holds 1 NaN/inf value\(s\) before pruning"):
        prune_model(module.model, batches, PruningConfig(method, tokens="all"))
    after = module.model.state_dict()
    assert all(torch.equal(after[k].nan_to_num(7.0), v.nan_to_num(7.0)) for k, v in before.items())


def test_head_attribution_refuses_nan_weights_before_reading_data(tmp_path, monkeypatch):
    module = make_module()
    with torch.no_grad():
        get_adapter(module.model).projections(0)["q"].weight[0, 0] = float("inf")
    monkeypatch.setattr(VLGuardDataModule, "calibration_dataloader", lambda *a, **k: pytest.fail("data was read"))
    with pytest.raises(ModelLoadError, match=r"weight .*layers.0.self_attn.q_proj.weight holds 1 NaN/inf"):
        validate(tmp_path, SafetyHeadAttribution(num_samples=2, top_h=2, when="validation_start"), module)


def test_nan_scores_are_never_written(tmp_path):
    out = tmp_path / "heads" / "scores.json"
    callback = SafetyHeadAttribution(num_samples=2, top_h=2, when="validation_start", output=str(out), heatmap=False)
    with pytest.raises(ValueError, match=r"head attribution \(layer 0\) gave NaN/inf scores for heads \['0-0'"):
        validate(tmp_path, callback, data_cls=NaNPixels)
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no partial, no scores, no PNG


def test_pruning_statistic_overflow_names_the_linear_and_the_inputs():
    module = make_module()
    batches = [{"input_ids": torch.tensor([[2, 5, 8, 9]])}]
    with torch.no_grad():
        module.model.model.language_model.layers[0].input_layernorm.weight.fill_(3e38)  # finite, but x**2 overflows
    with pytest.raises(CalibrationError, match=r"q_proj: the inputs reaching this linear hold NaN/inf .*weights are finite"):
        prune_model(module.model, batches, PruningConfig("wanda", tokens="all"))


# --------------------------------------------------------------------------- partial file
class ScanKilled(RuntimeError):
    pass


class KilledAfterFirstLayer(SafetyHeadAttribution):
    def on_layer_scored(self, layer, scores):
        super().on_layer_scored(layer, scores)
        raise ScanKilled("killed after layer 0")


def test_partial_file_records_what_decides_the_scores(tmp_path):
    out = tmp_path / "scores.json"
    killed = KilledAfterFirstLayer(num_samples=100, top_h=3, when="validation_start", output=str(out), heatmap=False)
    with pytest.raises(ScanKilled):
        validate(tmp_path, killed)
    header, scores = read_partial(tmp_path / "scores.partial.json")
    assert header["num_samples_requested"] == 100 and header["top_h"] == 3
    assert header["num_samples"] < 100  # the samples actually used: the split is smaller
    assert len(scores) == 4 and all(math.isfinite(v) for v in scores.values())
    # Same scan, another top_h: the partial file is refused instead of silently reused.
    other = SafetyHeadAttribution(num_samples=100, top_h=2, when="validation_start", output=str(out), resume=True)
    with pytest.raises(ValueError, match="resume refused: .*top_h: 3 there vs 2 now"):
        validate(tmp_path, other)


def test_checkpoint_settings_keep_their_keys():
    # Lightning checkpoints compare settings(); the partial-file-only key must not leak into them.
    settings = SafetyHeadAttribution(num_samples=7, top_h=2).settings()
    assert "num_samples_requested" not in settings and settings["num_samples"] == 7 and settings["top_h"] == 2


def test_top_h_zero_scores_every_head_and_selects_none(tmp_path, caplog):
    out = tmp_path / "scores.json"
    with caplog.at_level(logging.INFO):
        module = validate(tmp_path, SafetyHeadAttribution(num_samples=1, top_h=0, when="validation_start",
                                                          output=str(out), heatmap=False))
    assert len(json.loads(out.read_text())) == 8 and get_state(module).top_heads == []
    assert json.loads((tmp_path / "scores.top.json").read_text())["heads"] == []
    assert "top_h=0: scoring only, no heads are selected" in caplog.text


# ------------------------------------------------------------------------ data module
def test_calibration_uses_what_there_is_and_says_so(caplog):
    module = make_module()
    data = make_data(module)
    with caplog.at_level(logging.INFO):
        selected = data.calibration_dataset("safety", 500)
    assert 0 < len(selected) < 500
    assert f"has {len(selected)} examples, fewer than the 500 requested; using all {len(selected)}" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_samples=0), r"VLGuardDataModule: num_samples=0 must be a positive integer"),
        (dict(num_samples=True), r"num_samples=True must be a positive integer"),
        (dict(eval_batch_size=-1), r"eval_batch_size=-1 must be a positive integer"),
        (dict(num_workers=-2), r"num_workers=-2 must be an integer ≥ 0"),
        (dict(max_length=0), r"max_length=0 must be a positive integer or null"),
    ],
)
def test_data_module_counts_are_checked_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VLGuardDataModule(train_path=str(TRAIN), **kwargs)


def test_text_only_records_need_an_explicit_allow(tmp_path):
    records = json.loads(TRAIN.read_text())
    for record in records:
        record["image"] = None
    path = tmp_path / "text.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match="record 0 has no image; .*allow_text_only: true"):
        VLGuardDataModule(train_path=str(path)).setup("fit")
    data = VLGuardDataModule(train_path=str(path), allow_text_only=True)
    data.setup("fit")
    assert all(e["image"] is None for e in data.examples(str(path)))


def test_pruning_calibration_split_is_checked_in_init():
    with pytest.raises(ValueError, match=r"Pruning.calibration='utilty' is not a calibration split"):
        Pruning(calibration="utilty")
    assert Pruning(calibration="safety+over_refusal").calibration == "safety+over_refusal"
