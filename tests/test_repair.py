"""Repair mode: realign a checkpoint that another tool pruned, given the original checkpoint.

Checked: the inferred pruned set, that the model ends as the pruned checkpoint plus restorations,
that the result equals the in-process Pruning path, torchao's WandaSparsifier (with and without
squash_mask), compressed-tensors sparse-bitmask / sparse-24-bitmask files written here in that
layout, and the refusals (quantized, no zeros, other architecture, missing weights)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import require_torchao
from safetensors.torch import load_file, save_file

from hsr_pl.callbacks import PrunedCheckpoint, Pruning, SafetyRealignment
from hsr_pl.data import VLGuardDataModule
from hsr_pl.models import get_adapter
from hsr_pl.models.checkpoints import (
    CheckpointError,
    decode_sparse24_bitmask,
    decode_sparse_bitmask,
    unpack_bitmask,
)
from hsr_pl.models.tiny import build_tiny_llava
from hsr_pl.module import LVLMModule
from hsr_pl.pruning import PruningConfig, prune_model
from hsr_pl.report.manifest import realignment_manifest
from hsr_pl.state import get_state

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "tiny_vlguard" / "train.json"
HEADS = ["0-1", "1-2"]


def make_data(processor) -> VLGuardDataModule:
    eval_sets = [{"name": "harmful", "path": str(TRAIN), "split": "safety", "kind": "harmful", "num_samples": 1}]
    return VLGuardDataModule(train_path=str(TRAIN), eval_sets=eval_sets, eval_batch_size=1, processor=processor,
                             num_samples=8)


def calibration(processor, split="utility", n=8):
    loader = make_data(processor).calibration_dataloader(split, n, with_response=True, batch_size=1)
    return [{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in loader]


def _saved_pair(tmp_path, method: str, built=None, **pruning):
    """An original tiny LLaVA (``built``: a (model, processor) pair, else a new one) and a copy pruned
    by ``method`` (50 % unless ``pruning`` says otherwise), each saved with save_pretrained."""
    model, processor = built or build_tiny_llava(False, layers=2, heads=4)
    original = tmp_path / "original"
    model.save_pretrained(original)
    processor.save_pretrained(original)
    pruned_model = copy.deepcopy(model).eval()
    prune_model(pruned_model, calibration(processor), PruningConfig(method=method, **{"sparsity": 0.5, **pruning}))
    pruned = tmp_path / "pruned"
    pruned_model.save_pretrained(pruned)
    return original, pruned, model, pruned_model, processor


@pytest.fixture
def checkpoints(tmp_path):
    """An original tiny LLaVA and a Wanda-pruned copy, each saved with save_pretrained."""
    return _saved_pair(tmp_path, "wanda")


def repair(tmp_path, original: Path, pruned: Path, realign=True, **kwargs):
    module = LVLMModule(str(original), max_new_tokens=1)
    callbacks = [PrunedCheckpoint(str(pruned), when="validation_start", **kwargs)]
    if realign:
        callbacks.append(SafetyRealignment(heads=HEADS, num_samples=8, when="validation_start", table=False))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         default_root_dir=tmp_path, callbacks=callbacks)
    trainer.validate(module, datamodule=make_data(module.processor), verbose=False)
    return module, callbacks


def test_repair_infers_the_pruned_set_and_keeps_the_pruned_weights(tmp_path, checkpoints):
    original, pruned, dense, pruned_model, _ = checkpoints
    module, (loader, realign) = repair(tmp_path, original, pruned)
    state = get_state(module)
    dense_p = dict(dense.named_parameters())
    pruned_p = dict(pruned_model.named_parameters())
    targets = get_adapter(module.model).target_linears()
    assert sorted(state.pruned) == sorted(targets)
    for name in targets:
        want = (pruned_p[f"{name}.weight"] == 0) & (dense_p[f"{name}.weight"] != 0)
        assert torch.equal(state.pruned[name], want), name
    restored = sum(int(m.sum()) for m in state.restored.values())
    assert restored > 0 and restored == realign.report["restored_params"]
    for name, param in module.model.named_parameters():
        module_name = name.removesuffix(".weight")
        if module_name in state.restored:
            mask = state.restored[module_name]
            assert torch.equal(param.detach()[mask], dense_p[name].detach()[mask])
            assert torch.equal(param.detach()[~mask], pruned_p[name].detach()[~mask])
        else:
            assert torch.equal(param.detach(), pruned_p[name].detach()), name
    assert loader.report["format"] == "dense" and loader.report["pruned_outside_targets"] == {}
    assert state.method.startswith("checkpoint:") and state.structure is None


def test_sparsegpt_checkpoint_keeps_its_moved_weights_and_restores_the_originals(tmp_path):
    """SparseGPT also changes kept weights: repair infers the pruned set from the zeros, leaves every
    entry it does not restore exactly as SparseGPT wrote it, and writes the original checkpoint's
    values into the restored ones."""
    original, pruned, model, sparsegpt, processor = _saved_pair(tmp_path, "sparsegpt")
    dense_p = dict(model.named_parameters())
    pruned_p = dict(sparsegpt.named_parameters())
    module, (_, realign) = repair(tmp_path, original, pruned)
    state = get_state(module)
    moved = 0
    for name in state.pruned:
        d, p = dense_p[f"{name}.weight"].detach(), pruned_p[f"{name}.weight"].detach()
        assert torch.equal(state.pruned[name], (p == 0) & (d != 0)), name
        moved += int(((p != d) & (p != 0)).sum())
    assert moved > 0, "SparseGPT moved no kept weight: the test would not tell the two values apart"
    restored = sum(int(m.sum()) for m in state.restored.values())
    assert restored > 0 and restored == realign.report["restored_params"]
    for name, param in module.model.named_parameters():
        module_name = name.removesuffix(".weight")
        now, p, d = param.detach(), pruned_p[name].detach(), dense_p[name].detach()
        mask = state.restored.get(module_name, torch.zeros(now.shape, dtype=torch.bool))
        assert torch.equal(now[mask], d[mask]), name  # the original checkpoint's values
        assert torch.equal(now[~mask], p[~mask]), name  # SparseGPT's values, moved ones included


def test_repair_equals_pruning_in_process(tmp_path, checkpoints):
    original, pruned, _, _, processor = checkpoints
    repaired, _ = repair(tmp_path, original, pruned)
    module = LVLMModule(str(original), max_new_tokens=1)
    callbacks = [Pruning(method="wanda", num_samples=8, when="validation_start"),
                 SafetyRealignment(heads=HEADS, num_samples=8, when="validation_start", table=False)]
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=1, callbacks=callbacks).validate(
        module, datamodule=make_data(module.processor), verbose=False)
    a, b = get_state(repaired), get_state(module)
    assert sorted(a.restored) == sorted(b.restored)
    for name in a.restored:
        assert torch.equal(a.restored[name], b.restored[name]), name
    for (n1, p1), (_, p2) in zip(repaired.model.named_parameters(), module.model.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_torchao_wanda_sparsifier_checkpoint(tmp_path, checkpoints):
    require_torchao()
    from torchao.sparsity import WandaSparsifier

    original, _, dense, _, processor = checkpoints
    model = copy.deepcopy(dense).eval()
    names = [n for n in get_adapter(model).target_linears()]
    sparsifier = WandaSparsifier(sparsity_level=0.5)
    sparsifier.prepare(model, config=[{"tensor_fqn": f"{n}.weight"} for n in names])
    with torch.no_grad():
        for batch in calibration(processor):
            model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    sparsifier.step()
    unsquashed = tmp_path / "torchao_unsquashed"
    torch_state = {k: v.contiguous() for k, v in model.state_dict().items()}
    unsquashed.mkdir()
    save_file(torch_state, str(unsquashed / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(original / "config.json", unsquashed / "config.json")
    with pytest.raises(CheckpointError, match="torchao parametrizations.*squash_mask"):
        repair(tmp_path, original, unsquashed)
    sparsifier.squash_mask()
    squashed = tmp_path / "torchao"
    model.save_pretrained(squashed)
    module, (loader, realign) = repair(tmp_path, original, squashed)
    state = get_state(module)
    weights = dict(model.named_modules())
    for name in names:
        assert torch.equal(state.pruned[name], (weights[name].weight == 0) & (dict(dense.named_modules())[name].weight != 0))
    assert 0.45 < state.sparsity < 0.55 and realign.report["restored_params"] > 0


# --------------------------------------------------------------------- compressed-tensors
def pack_bits_loop(mask: torch.Tensor) -> torch.Tensor:
    """Reference packing: byte k of a row holds columns 8k..8k+7, column 8k + b in bit b."""
    rows, cols = mask.shape
    out = torch.zeros(rows, (cols + 7) // 8, dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            if mask[r, c]:
                out[r, c // 8] |= 1 << (c % 8)
    return out


def compress_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = weight != 0
    counts = mask.sum(1)
    return {"compressed": weight[mask], "bitmask": pack_bits_loop(mask), "shape": torch.tensor(list(weight.shape)),
            "row_offsets": torch.cumsum(counts, 0) - counts}


def compress_24(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, cols = weight.shape
    keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
    keep.scatter_(2, weight.abs().reshape(rows, cols // 4, 4).topk(2, dim=-1).indices, True)
    keep = keep.reshape(rows, cols)
    return {"compressed": weight[keep].reshape(rows, cols // 2), "bitmask": pack_bits_loop(keep),
            "shape": torch.tensor(list(weight.shape)).reshape(-1, 1)}


@pytest.mark.parametrize("cols", [5, 8, 13, 64])
def test_bitmask_decoding_equals_the_loop(cols):
    g = torch.Generator().manual_seed(cols)
    weight = torch.randn(6, cols, generator=g) * (torch.rand(6, cols, generator=g) < 0.4)
    parts = compress_bitmask(weight)
    assert torch.equal(unpack_bitmask(parts["bitmask"], cols), weight != 0)
    assert torch.equal(decode_sparse_bitmask(parts["compressed"], parts["bitmask"], parts["shape"]), weight)
    if cols % 4 == 0:
        w24 = weight.clone()
        parts = compress_24(w24)
        dense = decode_sparse24_bitmask(parts["compressed"], parts["bitmask"], parts["shape"])
        keep = unpack_bitmask(parts["bitmask"], cols)
        assert torch.equal(dense[keep], w24[keep]) and bool((dense[~keep] == 0).all())


def write_compressed(source: Path, target: Path, fmt: str, shards: int = 1) -> None:
    """Re-write a save_pretrained folder in compressed-tensors' sparse layout (as older
    llm-compressor releases did): every 2-D projection weight becomes its compressed parts."""
    target.mkdir()
    tensors = load_file(str(source / "model.safetensors"))
    out = {}
    for key, value in tensors.items():
        if key.endswith("proj.weight") and value.ndim == 2 and value.shape[1] % 4 == 0:
            parts = compress_24(value) if fmt == "sparse-24-bitmask" else compress_bitmask(value)
            for suffix, part in parts.items():
                out[f"{key[: -len('.weight')]}.{suffix}"] = part
        else:
            out[key] = value
    keys = sorted(out)
    if shards == 1:
        save_file(out, str(target / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: out[k] for k in keys[i::shards]}
            save_file(part, str(target / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": fmt, "config_groups": {},
        "sparsity_config": {"format": fmt, "sparsity_structure": "2:4" if "24" in fmt else "unstructured",
                            "global_sparsity": 0.5, "targets": ["Linear"], "ignore": ["lm_head"]},
    }
    (target / "config.json").write_text(json.dumps(config))
    (target / "recipe.yaml").write_text("sparsity_stage:\n  SparseGPTModifier:\n    sparsity: 0.5\n")


@pytest.mark.parametrize(("fmt", "shards"), [("sparse-bitmask", 1), ("sparse-bitmask", 3), ("sparse-24-bitmask", 1)])
def test_compressed_tensors_checkpoints_are_decoded(tmp_path, checkpoints, fmt, shards):
    original, pruned, dense, pruned_model, processor = checkpoints
    if fmt == "sparse-24-bitmask":
        pruned_model = copy.deepcopy(dense).eval()
        prune_model(pruned_model, calibration(processor), PruningConfig(method="wanda", sparsity=None, mask_structure="2:4"))
        pruned = tmp_path / "pruned24"
        pruned_model.save_pretrained(pruned)
    compressed = tmp_path / f"compressed-{fmt}-{shards}"
    write_compressed(pruned, compressed, fmt, shards)
    module, (loader, realign) = repair(tmp_path, original, compressed)
    assert loader.report["format"] == fmt and loader.report["recipe_yaml"]
    state = get_state(module)
    theirs = dict(pruned_model.named_modules())
    extra = 0  # a 2:4 checkpoint stays 2:4 by default: each restore swaps out a kept weight (pruned now)
    for name, mask in state.pruned.items():
        tool = (theirs[name].weight == 0) & (dict(dense.named_modules())[name].weight != 0)
        assert torch.equal(mask & tool, tool), name
        extra += int((mask & ~tool).sum())
    assert extra == realign.report["swapped_out_params"] == (realign.report["restored_params"] if fmt == "sparse-24-bitmask" else 0)
    assert state.structure == ((2, 4) if fmt == "sparse-24-bitmask" else None)
    assert realign.report["restored_params"] > 0


# --------------------------------------------------------------------------------- refusals
def test_refusals_name_the_problem(tmp_path, checkpoints):
    original, pruned, dense, _, _ = checkpoints
    quantized = tmp_path / "quantized"
    shutil.copytree(pruned, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantized .*quant_method='gptq'"):
        repair(tmp_path, original, quantized)
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                     "config_groups": {"group_0": {"weights": {"num_bits": 4}}}}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="compressed-tensors quantized"):
        repair(tmp_path, original, quantized)
    with pytest.raises(CheckpointError, match="has no pruned weight"):
        repair(tmp_path, original, original)
    other, _ = build_tiny_llava(False, layers=3, heads=4)
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir)
    with pytest.raises(CheckpointError, match="num_hidden_layers=3 but the original has 2"):
        repair(tmp_path, original, other_dir)
    text_only = tmp_path / "text"
    shutil.copytree(pruned, text_only)
    config = json.loads((text_only / "config.json").read_text())
    config["model_type"] = "llama"
    (text_only / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="is a 'llama' model but the original is 'llava'"):
        repair(tmp_path, original, text_only)
    with pytest.raises(ValueError, match="no such folder"):
        PrunedCheckpoint(str(tmp_path / "nowhere"))
    pickled = tmp_path / "pickled"  # a pickle-only pruned checkpoint is never unpickled
    shutil.copytree(pruned, pickled)
    for file in pickled.glob("*.safetensors"):
        file.rename(file.with_suffix(".bin"))
    with pytest.raises(ValueError, match="holds only pickle weights"):
        repair(tmp_path, original, pickled)
    cut = tmp_path / "cut"
    shutil.copytree(pruned, cut)
    weights = next(cut.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        repair(tmp_path, original, cut)


def test_modules_pruned_outside_the_targets_are_reported_and_kept(tmp_path, checkpoints, caplog, recwarn):
    original, pruned, _, pruned_model, _ = checkpoints
    tool = copy.deepcopy(pruned_model)
    # Like llm-compressor: the vision tower, the projector and lm_head pruned too (more than four modules).
    outside = [n for n, m in tool.named_modules() if isinstance(m, torch.nn.Linear)
               and ("vision" in n or "projector" in n or n == "lm_head")]
    assert len(outside) > 4 and "lm_head" in outside
    with torch.no_grad():
        for name in outside:
            weight = dict(tool.named_modules())[name].weight
            weight[:, : weight.shape[1] // 2] = 0
    vision = outside[0]
    weight = dict(tool.named_modules())[vision].weight
    folder = tmp_path / "tool"
    tool.save_pretrained(folder)
    with caplog.at_level("INFO"):
        module, (loader, _) = repair(tmp_path, original, folder)
    lines = [r.getMessage() for r in caplog.records if "outside the targets" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and all(name in lines[0] for name in outside), lines
    assert not [w for w in recwarn if "outside the targets" in str(w.message)]  # a line, not a UserWarning
    assert set(loader.report["pruned_outside_targets"]) == set(outside)
    manifest = realignment_manifest(module, get_state(module))
    assert set(manifest["pruning"]["checkpoint"]["pruned_outside_targets"]) == set(outside)
    assert manifest["pruning"]["checkpoint"]["format"] == "dense"
    assert torch.equal(dict(module.model.named_modules())[vision].weight, weight)
    assert vision not in get_state(module).pruned


# ----------------------------------------------------------------------- Python API and config
def test_python_repair_equals_the_callback_flow(tmp_path, checkpoints):
    from hsr_pl.callbacks import SafetyHeadAttribution
    from hsr_pl.repair import repair as repair_api

    original, pruned, _, _, _ = checkpoints
    before = load_file(str(pruned / "model.safetensors"))
    manifest = repair_api(str(original), str(pruned), str(tmp_path / "repaired"), train_path=str(TRAIN),
                          top_h=2, attribution={"num_samples": 2}, num_samples=8, accelerator="cpu")
    # The same callbacks in one validate, in-process.
    module = LVLMModule(str(original), max_new_tokens=1)
    callbacks = [SafetyHeadAttribution(positions="response", num_samples=2, top_h=2, when="validation_start", heatmap=False),
                 PrunedCheckpoint(str(pruned), when="validation_start"),
                 SafetyRealignment(num_samples=8, when="validation_start", table=False)]
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=1, callbacks=callbacks).validate(
        module, datamodule=make_data(module.processor), verbose=False)
    assert manifest["restored"]["params"] == callbacks[2].report["restored_params"] > 0
    assert [[h["layer"], h["head"]] for h in manifest["heads"]] == [list(p) for p in callbacks[0].top]
    from transformers import AutoModelForImageTextToText

    saved = AutoModelForImageTextToText.from_pretrained(tmp_path / "repaired")
    for (name, a), (_, b) in zip(saved.named_parameters(), module.model.named_parameters()):
        assert torch.equal(a, b), name
    after = load_file(str(pruned / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the input checkpoint is untouched


def test_repair_config_runs_through_the_cli(tmp_path, checkpoints, capsys):
    import yaml

    from hsr_pl.cli import run_cli

    original, pruned, _, _, _ = checkpoints
    config = yaml.safe_load((ROOT / "configs" / "repair.yaml").read_text())
    config["model"]["init_args"].update(model=str(original), dtype="float32", max_new_tokens=2)
    data = config["data"]["init_args"]
    data.update(train_path=str(TRAIN), image_root=None, num_samples=8)
    for eval_set in data["eval_sets"]:
        eval_set.update(path=str(TRAIN), image_root=None, num_samples=2)
    trainer = config["trainer"]
    trainer.update(accelerator="cpu", default_root_dir=str(tmp_path / "runs"), enable_progress_bar=False)
    cbs = trainer["callbacks"]
    cbs[0]["init_args"].update(num_samples=2, top_h=2, output=str(tmp_path / "runs" / "heads.json"))
    cbs[1]["init_args"]["path"] = str(pruned)
    cbs[2]["init_args"].update(num_samples=8, output=str(tmp_path / "runs" / "realignment.json"))
    cbs[3]["init_args"]["dirpath"] = str(tmp_path / "runs" / "realigned")
    path = tmp_path / "repair.yaml"
    path.write_text(yaml.safe_dump(config))
    run_cli(["validate", "--config", str(path)])
    manifest = json.loads((tmp_path / "runs" / "realigned" / "realignment.json").read_text())
    assert manifest["restored"]["params"] == json.loads((tmp_path / "runs" / "realignment.json").read_text())["restored_params"] > 0
    assert "vlguard_unsafes" in capsys.readouterr().out



def test_the_decoder_never_reads_a_mask_file_as_weights(tmp_path):
    """The compressed-tensors decoder gathers the folder's safetensors files: the default mask file
    beside them, keyed by the weights' names, must not become one of them (0/1 values as weights)."""
    from hsr_pl.models.checkpoints import _decoded_copy
    from hsr_pl.models.mask_files import MASK_FILE

    weight = torch.randn(4, 8) * (torch.rand(4, 8) < 0.5)
    folder, into = tmp_path / "compressed", tmp_path / "decoded"
    folder.mkdir()
    into.mkdir()
    parts = {f"layers.0.q_proj.{k}": v for k, v in compress_bitmask(weight).items()}
    save_file(parts, str(folder / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    save_file({"layers.0.q_proj.weight": weight == 0}, str(folder / MASK_FILE), metadata={"format": "pt"})
    _decoded_copy(folder, "sparse-bitmask", {"model_type": "llama"}, into)
    assert not (into / MASK_FILE).exists()
    decoded = load_file(str(into / "model-00001-of-00001.safetensors"))
    assert torch.equal(decoded["layers.0.q_proj.weight"], weight)


def test_a_2_4_checkpoint_whose_original_held_zeros_is_seen_and_kept_2_4(tmp_path):
    """Wanda scores an exact zero of the original lowest, so it is always one of its group's pruned
    pair; the pruned set (zero now, non-zero before) leaves it out and that group looks 1:4. Repair
    must still see 2:4 and keep it through realignment."""
    model, processor = build_tiny_llava(False, layers=2, heads=4)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "o_proj"):
            weight = dict(model.named_modules())[f"model.language_model.layers.0.self_attn.{name}"].weight
            weight[:, 1::16] = 0.0  # one exact zero in every fourth group of four
    original, pruned, *_ = _saved_pair(tmp_path, "wanda", (model, processor), sparsity=None, mask_structure="2:4")
    module, (loader, realign) = repair(tmp_path, original, pruned)
    state = get_state(module)
    assert state.structure == (2, 4)
    assert realign.report["restored_params"] > 0
    for name in get_adapter(module.model).target_linears():
        weight = dict(module.model.named_modules())[name].weight.detach()
        nonzero = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert int(nonzero.max()) <= 2, name  # still 2:4 after restoring
