"""Issue 21, items 5 and 11 through ``hsr_pl.repair.repair()``: the pruned checkpoint is checked
before any work (the head scan never starts) and a damaged one exports nothing.

The CLI side of the same refusals is in tests/test_bad_inputs.py (``repair-*`` cases)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hsr_pl.callbacks.head_attribution as attribution
from hsr_pl.models.checkpoints import CheckpointError
from hsr_pl.models.tiny import build_tiny_llava
from hsr_pl.repair import repair

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "tiny_vlguard" / "train.json"


def pair(tmp_path: Path) -> tuple[Path, Path]:
    """An original tiny LLaVA and a copy with a seeded random half of each decoder projection zeroed
    (unstructured: an N:M pattern would make repair keep the structure by swapping kept weights out)."""
    model, processor = build_tiny_llava(False, layers=2, heads=4)
    original, pruned = tmp_path / "original", tmp_path / "pruned"
    for folder in (original, pruned):
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    tensors = load_file(pruned / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for key in sorted(tensors):
        if re.search(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", key):
            tensors[key][torch.rand(tensors[key].shape, generator=generator) < 0.5] = 0
    save_file(tensors, pruned / "model.safetensors", metadata={"format": "pt"})
    return original, pruned


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_repair_refuses_non_finite_pruned_weights_before_the_scan(tmp_path, monkeypatch, bad):
    original, pruned = pair(tmp_path)
    tensors = load_file(pruned / "model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("layers.0.mlp.up_proj.weight"))
    tensors[key][2, 3] = bad  # a kept entry (odd column)
    save_file(tensors, pruned / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(attribution, "head_scores", lambda *a, **k: pytest.fail("the head scan started"))
    with pytest.raises(CheckpointError, match=r"up_proj.weight holds 1 NaN/inf value\(s\); the checkpoint is damaged"):
        repair(str(original), str(pruned), str(tmp_path / "repaired"), train_path=str(TRAIN), top_h=2,
               attribution={"num_samples": 2}, num_samples=4, accelerator="cpu")
    assert not (tmp_path / "repaired").exists()


def test_an_unpruned_copy_is_refused_before_the_scan(tmp_path, monkeypatch):
    original, _ = pair(tmp_path)
    monkeypatch.setattr(attribution, "head_scores", lambda *a, **k: pytest.fail("the head scan started"))
    with pytest.raises(CheckpointError, match="has no pruned weight in the 14 target linears"):
        repair(str(original), str(original), str(tmp_path / "repaired"), train_path=str(TRAIN), top_h=2,
               attribution={"num_samples": 2}, num_samples=4, accelerator="cpu")


def test_a_finite_pruned_checkpoint_still_repairs(tmp_path):
    """The preflight load is handed to the work: the repaired model is the pruned one plus restorations."""
    original, pruned = pair(tmp_path)
    manifest = repair(str(original), str(pruned), str(tmp_path / "repaired"), train_path=str(TRAIN), top_h=2,
                      attribution={"num_samples": 2}, num_samples=4, accelerator="cpu")
    saved = load_file(tmp_path / "repaired" / "model.safetensors")
    theirs = load_file(pruned / "model.safetensors")
    mine = load_file(original / "model.safetensors")
    restored = 0
    for key, value in theirs.items():
        if key in saved:
            differ = saved[key] != value
            assert torch.equal(saved[key][differ], mine[key][differ]), key  # only originals come back
            restored += int(differ.sum())
    assert restored == manifest["restored"]["params"] > 0
