"""The zoo script (benchmarks/zoo.py) and the effect table's per-layer un-pruning (benchmarks/zoo_effect.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    monkeypatch.setenv("HSR_PL_CACHE", str(tmp_path / "cache"))
    module = _load("zoo")
    monkeypatch.setitem(module.FAMILIES, "v1", "configs/organism.yaml")
    return module


def test_derived_config_sets_every_seed_and_private_folders(zoo, tmp_path):
    member = zoo.Member("v1", 7, max_steps=3)
    config = zoo.derived_config(member, tmp_path / "run", tmp_path / "export")
    assert config["seed_everything"] == 7
    assert config["model"]["init_args"]["init_seed"] == 7
    assert config["data"]["init_args"]["seed"] == 7
    assert config["trainer"]["default_root_dir"] == str(tmp_path / "run")
    assert config["trainer"]["max_steps"] == 3 and config["trainer"]["val_check_interval"] == 3
    exports = [cb for cb in config["trainer"]["callbacks"] if cb["class_path"] == zoo.EXPORT_CLASS]
    assert exports[0]["init_args"]["dirpath"] == str(tmp_path / "export")
    # The family's config file itself is untouched.
    assert "runs/organism/export" in (REPO / "configs" / "organism.yaml").read_text()


def test_cache_key_follows_every_setting(zoo):
    base = zoo.Member("v1", 0)
    keys = {base.key, zoo.Member("v1", 1).key, zoo.Member("v1", 0, max_steps=5).key}
    assert len(keys) == 3
    assert zoo.Member("v1", 0).key == base.key  # deterministic
    assert base.path.parent == zoo.zoo_root() and base.path.name.startswith("v1-seed0-")


def test_a_member_is_built_only_with_its_own_settings(zoo):
    member = zoo.Member("v1", 0)
    member.path.mkdir(parents=True)
    assert not member.is_built()  # empty folder
    (member.path / "model.safetensors").write_bytes(b"x")
    (member.path / zoo.MARKER).write_text(json.dumps({"settings": {**member.settings(), "seed": 1}}))
    assert not member.is_built()  # another member's marker
    (member.path / zoo.MARKER).write_text(json.dumps({"settings": member.settings()}))
    assert member.is_built()
    assert zoo.build(member) == member.path  # reused: nothing trained


def test_build_refuses_a_folder_it_cannot_vouch_for(zoo):
    member = zoo.Member("v1", 0)
    member.path.mkdir(parents=True)
    (member.path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a complete member"):
        zoo.build(member)
    assert (member.path / "notes.txt").read_text() == "mine"


def test_unknown_family_is_refused(zoo):
    with pytest.raises(SystemExit, match="unknown families"):
        zoo.members_from(["nope"], [0])


@pytest.mark.slow
def test_build_trains_into_the_cache_and_leaves_no_temp(zoo):
    member = zoo.Member("v1", 3, max_steps=2)
    path = zoo.build(member, quiet=True)
    assert path == member.path and member.is_built()
    assert (path / "config.json").is_file() and (path / "train.log").is_file()
    marker = json.loads((path / zoo.MARKER).read_text())
    assert marker["settings"]["seed"] == 3 and marker["seconds"] > 0
    assert [p.name for p in zoo.zoo_root().iterdir()] == [path.name]


def test_per_layer_unpruning_gives_back_one_layer_and_restores_it(monkeypatch):
    effect = _load("zoo_effect")
    from hsr_pl.models.tiny import build_tiny

    model, _ = build_tiny("llava")
    dense = {k: v.detach().clone() for k, v in model.named_parameters()}
    layers = effect._language_layers(model)
    assert len(layers) >= 2 and all("vision" not in n for names in layers.values() for n in names)
    with torch.no_grad():  # "prune": zero half of every language-layer matrix
        for names in layers.values():
            for name in names:
                param = dict(model.named_parameters())[name]
                if param.dim() == 2:
                    param[:, ::2] = 0
    pruned = {k: v.detach().clone() for k, v in model.named_parameters()}

    class Module:
        pass

    module = Module()
    module.model = model
    seen = []

    def fake_validate(mod, data):
        params = dict(mod.model.named_parameters())
        dense_layers = [i for i, names in layers.items()
                        if all(torch.equal(params[n], dense[n]) for n in names)]
        seen.append(dense_layers)
        hits = len(seen)  # a different ASR per call, so the mapping to layers is checked
        return {f"{s}/asr/{j}": hits / 10 for s in effect.HARMFUL for j in effect.JUDGES}

    monkeypatch.setattr(effect, "_validate", fake_validate)
    out = effect._per_layer_unpruning(module, dense, None, 10)
    assert seen == [[i] for i in sorted(layers)]  # exactly one layer dense per evaluation, in order
    assert [out[i][effect.HEADLINE] for i in sorted(layers)] == [pytest.approx(k / 10) for k in range(1, len(layers) + 1)]
    for name, value in model.named_parameters():
        assert torch.equal(value, pruned[name])  # the pruned model is back


def test_pooled_counts_both_harmful_sets():
    effect = _load("zoo_effect")
    metrics = {"harmful_text/asr/refusal-any": 0.2, "harmful_image/asr/refusal-any": 0.5}
    assert effect._pooled(metrics, "refusal-any", 10) == (7, 20)


def test_rsr_interval_and_no_measurable_rise():
    realign = _load("zoo_realign")
    rsr, ci, reason = realign.rsr_with_interval(0, 80, 8, 200)
    assert rsr == pytest.approx(72 / 80) and reason is None
    assert ci[0] < rsr < ci[1] and 0.7 < ci[0] and ci[1] <= 1.0 + 1e-9
    assert realign.rsr_with_interval(0, 80, 8, 200) == (rsr, ci, None)  # seeded
    assert realign.rsr_with_interval(10, 12, 11, 200) == (None, None, "no measurable rise")


def test_summary_counts_a_cell_only_when_both_judges_and_guards_hold():
    realign = _load("zoo_realign")

    def record(member, split, rsr, coherent=0.95, utility=0.0, over=0.0):
        return {"member": member, "pruner": "wanda", "sparsity": 0.6, "method": "auto", "split": split,
                "rsr": {"refusal-any": rsr, "coherent-compliance": coherent}, "utility_delta": utility,
                "over_refusal_delta": over, "restored_ratio_lm": 1e-4}

    records = [
        record("a", "test", 0.95), record("a", "dev", 0.97),             # met, dev close
        record("b", "test", 0.95, utility=-2.0), record("b", "dev", 0.80),  # utility guard broken
        record("c", "test", 0.95, coherent=0.5), record("c", "dev", 0.93),  # coherent judge short
        record("d", "test", None), record("d", "dev", None),             # no measurable rise
    ]
    s = realign.summarise(records)["auto@0.6"]
    assert (s["cells"], s["measurable"], s["target_met"], s["dev_within_5_points"]) == (4, 3, 1, 2)
    assert s["median_restored_per_myriad"] == pytest.approx(1.0)


def test_merge_joins_records_and_sums_the_runs_times(zoo, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"command": "run a", "seconds": 10.0, "n_per_set": 100, "records": [1, 2], "skipped": [9]}))
    b.write_text(json.dumps({"command": "run b", "seconds": 5.5, "n_per_set": 100, "records": [3]}))
    merged = zoo.merge_runs([str(a), str(b)], ("records", "skipped"))
    assert merged["records"] == [1, 2, 3] and merged["skipped"] == [9]
    assert merged["seconds"] == 15.5 and merged["runs"] == 2 and merged["command"] == "run a ; run b"


def test_merge_lets_a_rerun_replace_its_cell(zoo, tmp_path):
    cell = {"member": "m", "pruner": "wanda", "sparsity": 0.7, "method": "auto", "split": "test"}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"command": "a", "seconds": 1, "records": [{**cell, "rsr": 0.1}, {**cell, "split": "dev", "rsr": 0.2}]}))
    b.write_text(json.dumps({"command": "b", "seconds": 1, "records": [{**cell, "rsr": 0.9}]}))
    merged = zoo.merge_runs([str(a), str(b)])
    assert sorted((r["split"], r["rsr"]) for r in merged["records"]) == [("dev", 0.2), ("test", 0.9)]
