"""Every real-model recipe in configs/models/ stays valid: parsed by the real CLI with a tiny model of
the same family saved where the checkpoint would be, and run through validate (head scan, pruning,
realignment, evaluation, export) on the tiny VLGuard fixture; the DDP overrides of the README parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hsr_pl.cli import run_cli
from hsr_pl.models.tiny import build_tiny, save_tiny

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "tiny_vlguard" / "train.json"
# audit_*.yaml recipes compare two checkpoints (no HSR run): tests/test_audit.py runs them.
RECIPES = sorted(p for p in (ROOT / "configs" / "models").glob("*.yaml") if not p.stem.startswith("audit_"))
FAMILY = {
    "llava_next_vicuna_7b": "llava_next", "qwen2_vl_7b": "qwen2_vl", "qwen2_5_vl_7b": "qwen2_5_vl",
    "llama_3_2_11b_vision": "mllama", "gemma3_4b": "gemma3", "smolvlm": "smolvlm",
}


def test_every_recipe_has_a_tiny_family():
    assert sorted(p.stem for p in RECIPES) == sorted(FAMILY)


def tiny_config(recipe: Path, tmp_path: Path) -> Path:
    family = FAMILY[recipe.stem]
    model, processor = build_tiny(family, gqa=True)
    folder = save_tiny(model, processor, tmp_path / "model")
    config = yaml.safe_load(recipe.read_text())
    model_args = config["model"]["init_args"]
    assert model_args["model"].startswith("/models/") and model_args["dtype"] == "bfloat16"
    model_args.update(model=str(folder), dtype="float32", max_new_tokens=2)
    data = config["data"]["init_args"]
    data.update(train_path=str(TRAIN), image_root=None, num_samples=4)
    for eval_set in data["eval_sets"]:
        eval_set.update(path=str(TRAIN), image_root=None, num_samples=1)
    trainer = config["trainer"]
    assert trainer["accelerator"] == "gpu"
    trainer.update(accelerator="cpu", default_root_dir=str(tmp_path / "runs"), enable_progress_bar=False)
    for callback in trainer["callbacks"]:
        args = callback["init_args"]
        for key in ("num_samples",):
            if key in args:
                args[key] = 4
        if "top_h" in args:
            args["top_h"] = 2
        for key in ("output", "dirpath"):
            if key in args:
                args[key] = str(tmp_path / "runs" / Path(args[key]).name)
    path = tmp_path / recipe.name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_with_a_tiny_model_of_its_family(tmp_path, recipe):
    path = tiny_config(recipe, tmp_path)
    run_cli(["validate", "--config", str(path)])
    manifest = json.loads((tmp_path / "runs" / "realigned" / "realignment.json").read_text())
    assert manifest["pruning"]["method"] == "wanda" and manifest["pruning"]["sparsity"] == 0.5
    assert len(manifest["heads"]) == 2 and manifest["rule"]["p"] == "auto"
    assert json.loads((tmp_path / "runs" / "head_scores.json").read_text())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_ddp_overrides_parse(tmp_path, recipe, capsys):
    path = tiny_config(recipe, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["validate", "--config", str(path), "--trainer.devices=8", "--trainer.strategy=ddp", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert str(printed["trainer"]["devices"]) == "8" and printed["trainer"]["strategy"] == "ddp"
