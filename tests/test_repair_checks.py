"""Repair mode, what real third-party checkpoints hit (issue #20): problems refused in setup from
config.json and the safetensors headers (before the head scan, nothing written), explicit mask
files, N:M checkpoints kept N:M by default, and what the manifest records."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_repair import TRAIN, calibration, make_data, repair

from hsr_pl.callbacks import PrunedCheckpoint, SafetyHeadAttribution, SafetyRealignment
from hsr_pl.models.checkpoints import CheckpointError
from hsr_pl.models.mask_files import MASK_FILE, pack_bits, write_mask_file
from hsr_pl.models.tiny import build_tiny_llava
from hsr_pl.module import LVLMModule
from hsr_pl.pruning import PruningConfig, prune_model
from hsr_pl.report.manifest import realignment_manifest
from hsr_pl.state import get_state


@pytest.fixture
def folders(tmp_path):
    model, processor = build_tiny_llava(False, layers=2, heads=4)
    original = tmp_path / "original"
    model.save_pretrained(original)
    processor.save_pretrained(original)
    pruned_model = copy.deepcopy(model).eval()
    prune_model(pruned_model, calibration(processor), PruningConfig(method="wanda", sparsity=0.5))
    pruned = tmp_path / "pruned"
    pruned_model.save_pretrained(pruned)
    return original, pruned, model, pruned_model, processor


def scan_then_repair(tmp_path: Path, original: Path, pruned: Path) -> Path:
    """The full flow with a head scan first; returns where the scan would write its scores."""
    heads = tmp_path / "runs" / "heads.json"
    module = LVLMModule(str(original), max_new_tokens=1)
    callbacks = [SafetyHeadAttribution(positions="response", num_samples=2, top_h=2, when="validation_start",
                                       heatmap=False, output=str(heads)),
                 PrunedCheckpoint(str(pruned), when="validation_start"),
                 SafetyRealignment(num_samples=8, when="validation_start", table=False)]
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         default_root_dir=tmp_path / "runs", callbacks=callbacks)
    trainer.validate(module, datamodule=make_data(module.processor), verbose=False)
    return heads


def variant(pruned: Path, tmp_path: Path, name: str, edit) -> Path:
    folder = tmp_path / name
    shutil.copytree(pruned, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    save_file(edit(tensors), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_header_problems_are_refused_in_setup_before_the_head_scan(tmp_path, folders, monkeypatch):
    original, pruned, _, _, _ = folders
    scanned = []
    monkeypatch.setattr(SafetyHeadAttribution, "run", lambda *a, **k: scanned.append(1))
    q = next(k for k in load_file(str(pruned / "model.safetensors")) if k.endswith("layers.0.self_attn.q_proj.weight"))

    def parametrized(t):  # torchao before squash_mask: the weight lives in parametrizations.*
        t[q.replace(".weight", ".parametrizations.weight.original")] = t.pop(q)
        return t

    def reshaped(t):
        t[q] = t[q][:-1].contiguous()
        return t

    cases = {
        "torchao parametrizations .*squash_mask": variant(pruned, tmp_path, "unsquashed", parametrized),
        "matrix shapes differ": variant(pruned, tmp_path, "reshaped", reshaped),
        "as F16, narrower than the original": variant(pruned, tmp_path, "half", lambda t: {k: v.half() for k, v in t.items()}),
        "as I8 \\(quantized\\?\\)": variant(pruned, tmp_path, "int8", lambda t: {**t, q: t[q].to(torch.int8)}),
    }
    for pattern, folder in cases.items():
        with pytest.raises(CheckpointError, match=pattern):
            scan_then_repair(tmp_path, original, folder)
    with pytest.raises(CheckpointError, match="look swapped"):  # the dense model given as the pruned one
        scan_then_repair(tmp_path, pruned_as_original(tmp_path, original, pruned), original)
    other, _ = build_tiny_llava(False, layers=3, heads=4)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="num_hidden_layers=3 but the original has 2"):
        scan_then_repair(tmp_path, original, tmp_path / "other")
    assert not scanned and not (tmp_path / "runs" / "heads.json").exists()


def pruned_as_original(tmp_path: Path, original: Path, pruned: Path) -> Path:
    """The pruned weights in a folder that also holds the processor (so it loads as the model)."""
    folder = tmp_path / "pruned_with_processor"
    shutil.copytree(pruned, folder)
    for file in original.iterdir():
        if file.is_file() and not (folder / file.name).exists():
            shutil.copy(file, folder / file.name)
    return folder


# ------------------------------------------------------------------------------------ mask files
def test_pack_bits_equals_the_loop():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(5, 13, generator=g) > 0.5
    want = torch.zeros(5, 2, dtype=torch.uint8)
    for r in range(5):
        for c in range(13):
            if mask[r, c]:
                want[r, c // 8] |= 1 << (c % 8)
    assert torch.equal(pack_bits(mask), want)


@pytest.mark.parametrize(("meaning", "packing"), [("kept", "bits"), ("pruned", "bool")])
def test_a_mask_file_gives_the_pruned_set_when_zeros_cannot(tmp_path, folders, meaning, packing):
    """GPTQ after pruning (llm-compressor ≥ 0.13) overwrites the pruned zeros: the mask file tells."""
    original, pruned, dense, pruned_model, _ = folders
    names = list(get_state_targets(dense))
    modules = dict(pruned_model.named_modules())
    tool_pruned = {f"{n}.weight": modules[n].weight.detach() == 0 for n in names}
    g = torch.Generator().manual_seed(0)
    overwritten = copy.deepcopy(pruned_model)
    with torch.no_grad():
        for n in names:
            w = dict(overwritten.named_modules())[n].weight
            w[w == 0] = 1e-3 * torch.randn(int((w == 0).sum()), generator=g)  # no zero left
    folder = tmp_path / "gptq"
    overwritten.save_pretrained(folder)
    with pytest.raises(CheckpointError, match="has no pruned weight"):  # zeros alone cannot tell
        repair(tmp_path, original, folder)
    masks = {k: (~m if meaning == "kept" else m) for k, m in tool_pruned.items()}
    write_mask_file(folder / MASK_FILE, masks, meaning=meaning, packing=packing)
    module, (loader, _) = repair(tmp_path, original, folder)
    state = get_state(module)
    for n in names:
        assert torch.equal(state.pruned[n], tool_pruned[f"{n}.weight"]), n
    assert loader.report["masks"].endswith(MASK_FILE) and loader.report["nonzero_where_masked"] > 0


def test_a_mask_file_without_its_metadata_or_a_target_is_refused(tmp_path, folders):
    original, pruned, dense, _, _ = folders
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2, 2, dtype=torch.uint8)}, str(bare))
    with pytest.raises(CheckpointError, match="lacks the metadata"):
        PrunedCheckpoint(str(pruned), masks=str(bare))
    names = list(get_state_targets(dense))
    partial = tmp_path / "partial.safetensors"
    write_mask_file(partial, {f"{names[0]}.weight": torch.ones(64, 64, dtype=torch.bool)})
    with pytest.raises(CheckpointError, match="has no mask for"):
        repair(tmp_path, original, pruned, masks=str(partial))


def get_state_targets(model):
    from hsr_pl.models import get_adapter

    return get_adapter(model).target_linears()


# ------------------------------------------------------------------------ N:M and the manifest
def test_a_2_4_checkpoint_stays_2_4_by_default_and_the_manifest_says_so(tmp_path, folders):
    original, _, dense, _, processor = folders
    nm = copy.deepcopy(dense).eval()
    prune_model(nm, calibration(processor), PruningConfig(method="wanda", sparsity=None, mask_structure="2:4"))
    folder = tmp_path / "pruned24"
    nm.save_pretrained(folder)
    module, (_, realign) = repair(tmp_path, original, folder)
    state = get_state(module)
    assert realign.report["restored_params"] > 0 and realign.report["settings"]["preserve_structure"] is True
    for name, param in module.model.named_parameters():
        if name.removesuffix(".weight") in state.pruned:
            groups = (param.detach() != 0).reshape(param.shape[0], -1, 4).sum(-1)
            assert int(groups.max()) <= 2, name  # at most 2 of every 4 non-zero: still 2:4
    after = realignment_manifest(module, state)["pruning"]["after_restoring"]
    assert after["still_n_m"] is True and after["structure"] == "2:4"
    total = sum(m.numel() for m in state.pruned.values())
    zeros = sum(int((dict(module.model.named_modules())[n].weight == 0).sum()) for n in state.pruned)
    assert after["sparsity"] == pytest.approx(zeros / total)  # the exported weights' zeros, counted
    # preserve_structure: false still restores freely; the manifest then says the export is not 2:4.
    from hsr_pl.realign import MarginRule

    module = LVLMModule(str(original), max_new_tokens=1)
    callbacks = [PrunedCheckpoint(str(folder), when="validation_start"),
                 SafetyRealignment(heads=["0-1", "1-2"], num_samples=8, when="validation_start", table=False,
                                   method=MarginRule(preserve_structure=False))]
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=1, callbacks=callbacks).validate(
        module, datamodule=make_data(module.processor), verbose=False)
    after = realignment_manifest(module, get_state(module))["pruning"]["after_restoring"]
    assert after["still_n_m"] is False and after["structure"] is None


def test_unstructured_repair_reports_the_sparsity_after_restoring(tmp_path, folders):
    original, pruned, _, _, _ = folders
    module, (_, realign) = repair(tmp_path, original, pruned)
    state = get_state(module)
    after = realignment_manifest(module, state)["pruning"]["after_restoring"]
    total = sum(m.numel() for m in state.pruned.values())
    before = sum(int(m.sum()) for m in state.pruned.values())
    assert after["sparsity"] == pytest.approx((before - realign.report["restored_params"]) / total)
    assert after["still_n_m"] is None
    assert json.dumps(realignment_manifest(module, state))  # JSON-able
    assert TRAIN.is_file()


# ----------------------------------------------------------------------------- the Python entry
def test_repair_without_evaluation_prints_no_lightning_noise_and_one_restored_line(tmp_path, folders, capfd, caplog, recwarn):
    from hsr_pl.repair import repair as repair_api

    original, pruned, _, _, _ = folders
    with caplog.at_level("INFO"):
        repair_api(str(original), str(pruned), str(tmp_path / "out"), train_path=str(TRAIN), top_h=2,
                   attribution={"num_samples": 2}, num_samples=8, accelerator="cpu")
    captured = capfd.readouterr()
    text = captured.out + captured.err + caplog.text + "".join(str(w.message) for w in recwarn)
    for noise in ("Tip:", "GPU available", "TPU available", "Total length of", "max_steps=0", "LeafSpec"):
        assert noise not in text, noise
    assert "hsr-pl: repair mode" in text  # hsr-pl's own lines still pass
    said = re.findall(r"restored [\d,]+ pruned weights", captured.out + captured.err + caplog.text)
    assert len(said) == 1, said  # the table's caption only


def test_repair_takes_the_evaluation_settings_and_refuses_a_judge_blind_to_the_refusal(tmp_path, folders, capsys):
    from hsr_pl.repair import check_judges_match_refusal
    from hsr_pl.repair import repair as repair_api

    original, pruned, _, _, _ = folders
    refusal = "i am sorry i can not help with that"  # lower case: case-sensitive GCG keywords miss it
    eval_sets = [{"name": "harmful", "path": str(TRAIN), "split": "safety", "kind": "harmful", "num_samples": 1}]
    with pytest.raises(ValueError, match="judge 'keyword-gcg' does not count the model's refusal"):
        repair_api(str(original), str(pruned), str(tmp_path / "out"), train_path=str(TRAIN), eval_sets=eval_sets,
                   refusal=refusal, scores_path=None, top_h=2, num_samples=8, accelerator="cpu")
    assert not (tmp_path / "out").exists()
    check_judges_match_refusal(["keyword-gcg-nocase", "strict", "coherent-compliance"], refusal)
    check_judges_match_refusal(["keyword-gcg"], None)  # nothing known: nothing refused
    with pytest.raises(ValueError, match="organism|does not count"):  # the organism's refusal is known
        repair_api("organism", str(pruned), str(tmp_path / "out2"), train_path=str(TRAIN), eval_sets=eval_sets)
    manifest = repair_api(str(original), str(pruned), str(tmp_path / "out3"), train_path=str(TRAIN),
                          eval_sets=eval_sets, refusal=refusal, judges=["keyword-gcg-nocase", "strict"],
                          max_new_tokens=3, top_h=2, attribution={"num_samples": 2}, num_samples=8, accelerator="cpu")
    out = capsys.readouterr().out
    assert "keyword-gcg-nocase" in out and "strict" in out and manifest["restored"]["params"] > 0


def test_the_organism_repair_recipe_parses_with_judges_that_see_its_refusal(tmp_path, capsys):
    import yaml

    from hsr_pl.cli import run_cli
    from hsr_pl.evaluation.organism import REFUSAL
    from hsr_pl.repair import check_judges_match_refusal

    recipe = Path(__file__).resolve().parents[1] / "configs" / "repair_organism.yaml"
    config = yaml.safe_load(recipe.read_text())
    model = config["model"]["init_args"]
    assert model["model"] == "organism" and model["refusal"] == REFUSAL
    check_judges_match_refusal(model["judges"], REFUSAL)  # no judge blind to the organism's refusal
    assert config["data"]["class_path"].endswith("SyntheticDataModule")
    assert [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]] == [
        "SafetyHeadAttribution", "PrunedCheckpoint", "SafetyRealignment", "ExportPretrained"]
    with pytest.raises(SystemExit) as done:
        run_cli(["validate", "--config", str(recipe), "--print_config"])
    assert done.value.code in (0, None) and "PrunedCheckpoint" in capsys.readouterr().out


def test_repair_takes_a_data_module_instead_of_a_path(tmp_path, folders, capsys):
    from hsr_pl.repair import repair as repair_api

    original, pruned, _, _, processor = folders
    with pytest.raises(ValueError, match="give train_path .* or data"):
        repair_api(str(original), str(pruned), str(tmp_path / "none"))
    manifest = repair_api(str(original), str(pruned), str(tmp_path / "out"), data=make_data(processor), top_h=2,
                          attribution={"num_samples": 2}, num_samples=8, accelerator="cpu")
    assert manifest["restored"]["params"] > 0 and (tmp_path / "out" / "realignment.json").is_file()
    assert "keyword-gcg" not in capsys.readouterr().out  # its held-out sets were not evaluated (no sanity check)


def test_repair_defaults_to_the_automatic_budget_when_the_data_has_dev_sets(tmp_path, folders, capfd):
    """No method given: budget auto with a dev part (dev_fraction), the paper's rule (and one line) without."""
    from hsr_pl.repair import repair as repair_api

    original, pruned, _, _, _ = folders
    common = dict(train_path=str(TRAIN), top_h=2, attribution={"num_samples": 2}, num_samples=4, accelerator="cpu")
    rule = repair_api(str(original), str(pruned), str(tmp_path / "rule"), **common)
    assert "the automatic budget needs dev sets: give dev_fraction=0.2" in capfd.readouterr().err
    auto = repair_api(str(original), str(pruned), str(tmp_path / "auto"), dev_fraction=0.5, **common)
    assert rule["budget"]["order"] == "margin" and rule["auto"] is None
    assert auto["budget"]["order"] == "gradient" and auto["budget"]["setting"] == "auto"
    assert auto["restored"]["params"] == auto["auto"]["final"]["restored"] and auto["auto"]["stop"]["reason"]
    with pytest.raises(ValueError, match="dev_fraction goes with train_path"):
        repair_api(str(original), str(pruned), str(tmp_path / "x"), data=make_data(None), dev_fraction=0.2, top_h=2)


def test_the_gradient_gain_of_a_swapped_out_sparsegpt_entry_uses_the_value_a_restore_writes(tiny_llava):
    """SparseGPT moves kept weights; an N:M swap records the moved value as the entry's original, and
    a later restore writes that value back. The gain −g·w must score that value, not the dense one."""
    from hsr_pl.models import get_adapter
    from hsr_pl.realign.runner import DenseMeasurement, _views, attention_linears
    from hsr_pl.state import HSRState

    model, _ = tiny_llava
    adapter = get_adapter(model)
    linears = attention_linears(adapter)
    name = next(iter(linears))
    linear = linears[name][2]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        dense = linear.weight.detach().clone()
        pruned = torch.rand(dense.shape, generator=g) < 0.5
        state = HSRState()
        state.record_pruning(name, pruned, dense)
        moved = dense + 0.1 * torch.randn(dense.shape, generator=g)  # SparseGPT's update of kept weights
        moved[pruned] = 0
        swap = (~pruned) & (torch.rand(dense.shape, generator=g) < 0.05)
        state.add_pruned(name, swap, moved)  # an N:M swap-out of a kept (moved) weight
        moved[swap] = 0
        linear.weight.copy_(moved)
    measurement = DenseMeasurement("wanda", dense={name: dense})
    (view,) = _views(adapter, state, [name], linears, measurement, {name: pruned}, gains=True)
    written = state.original_weight(name, linear.weight.detach())  # what _apply writes on restore
    assert torch.equal(view.restore_values[swap], written[swap].float())
    assert not torch.equal(view.restore_values[swap], dense[swap].float())  # the test tells the two apart
    assert torch.equal(view.restore_values[pruned], dense[pruned].float())
    assert torch.equal(view.dense, dense.float())  # the importance scores still read the dense model
