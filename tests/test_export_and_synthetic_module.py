"""ExportPretrained (atomic save_pretrained) and SyntheticDataModule (generated on first use)."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from hsr_pl.callbacks import ExportPretrained
from hsr_pl.data import SyntheticDataModule
from hsr_pl.data.synthetic_module import SYNTHETIC_EVAL_SETS, ensure_synthetic
from hsr_pl.export import ExportError, save_pretrained_atomic
from hsr_pl.module import LVLMModule
from hsr_pl.state import get_state

SMALL = dict(seed=0, n_train=60, n_calib=8, n_eval=6, harmful_fraction=0.15)


def test_synthetic_module_generates_once_and_maps_eval_sets(tmp_path, tiny_llava):
    _, processor = tiny_llava
    dm = SyntheticDataModule(**SMALL, data_dir=str(tmp_path / "syn"), processor=processor, batch_size=4)
    stamp = (tmp_path / "syn" / "manifest.json").stat().st_mtime_ns
    again = SyntheticDataModule(**SMALL, data_dir=str(tmp_path / "syn"), processor=processor)
    assert (tmp_path / "syn" / "manifest.json").stat().st_mtime_ns == stamp  # reused, not regenerated
    assert [e.name for e in again.eval_sets] == [n.removeprefix("eval_") for n in SYNTHETIC_EVAL_SETS if n.startswith("eval_")]
    kinds = {e.name: (e.split, e.kind) for e in dm.eval_sets}
    assert kinds["harmful_text"] == ("over_refusal", "harmful")
    assert kinds["harmful_image"] == ("safety", "harmful")
    assert kinds["benign"] == ("utility", "benign")
    dm.setup("fit")
    # Every harmful eval example is a refusal; every benign one is answered.
    for eval_set in dm.eval_sets:
        rows = dm.examples(eval_set.path)
        refusals = {e["response"].startswith("i am sorry") for e in rows if e["split"] == eval_set.split}
        assert refusals == ({True} if eval_set.kind == "harmful" else {False}), eval_set.name
    batch = next(iter(dm.calibration_dataloader("utility", 4, batch_size=4)))
    assert (batch["labels"] != -100).any(dim=1).all()
    # Different settings -> regenerated into the same folder.
    changed = ensure_synthetic(tmp_path / "syn", **{**SMALL, "seed": 1})
    assert json.loads((changed / "manifest.json").read_text())["seed"] == 1
    with pytest.raises(ValueError, match="unknown synthetic eval splits"):
        SyntheticDataModule(**SMALL, data_dir=str(tmp_path / "syn"), eval_splits=["eval_toxic"])


def test_synthetic_module_selects_the_dev_twins(tmp_path):
    folder = str(tmp_path / "syn")
    dev = SyntheticDataModule(**SMALL, data_dir=folder, eval_part="dev", eval_splits=["eval_harmful_text", "eval_utility"])
    assert [(e.name, e.split, e.kind) for e in dev.eval_sets] == [
        ("dev_harmful_text", "over_refusal", "harmful"), ("dev_utility", "utility", "utility")]
    assert all(e.path.endswith(f"{e.name}.json") for e in dev.eval_sets)
    named = SyntheticDataModule(**SMALL, data_dir=folder, eval_splits=["dev_benign", "eval_benign"])
    assert [e.name for e in named.eval_sets] == ["dev_benign", "benign"]
    every = SyntheticDataModule(**SMALL, data_dir=folder, eval_part="dev")
    assert [e.name for e in every.eval_sets] == [n for n in SYNTHETIC_EVAL_SETS if n.startswith("dev_")]
    records = json.loads((tmp_path / "syn" / "dev_harmful_text.json").read_text())
    assert len(records) == SMALL["n_eval"] and {r["kind"] for r in records} == {"harmful_text"}
    sized = SyntheticDataModule(**SMALL, data_dir=str(tmp_path / "syn2"), n_dev=4, eval_part="dev")
    assert len(json.loads((sized.data_dir / "dev_utility.json").read_text())) == 4
    with pytest.raises(ValueError, match="eval_part='val' is unknown"):
        SyntheticDataModule(**SMALL, data_dir=folder, eval_part="val")


def test_export_writes_safetensors_atomically_with_exact_zeros(tmp_path, tiny_llava):
    model, processor = tiny_llava
    with torch.no_grad():
        model.model.language_model.layers[0].self_attn.q_proj.weight[:, ::2] = 0.0
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with pytest.raises(ExportError, match="is not empty and was not written by hsr-pl"):
        save_pretrained_atomic(model, processor, target, {"k": 1})
    assert (target / "stale.txt").read_text() == "old"
    save_pretrained_atomic(model, processor, target, {"k": 1}, overwrite=True)
    names = sorted(p.name for p in target.iterdir())
    assert "stale.txt" not in names and "model.safetensors" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    weights = load_file(target / "model.safetensors")
    q = next(v for k, v in weights.items() if "language_model" in k and k.endswith("layers.0.self_attn.q_proj.weight"))
    assert (q[:, ::2] == 0).all()
    assert json.loads((target / "hsr_summary.json").read_text()) == {"k": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp left behind
    reloaded = LVLMModule(model=str(target))
    reloaded.configure_model()
    ids = torch.tensor([[2, 5, 8, 9, 6, 8]])
    torch.testing.assert_close(reloaded.model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_export_failure_keeps_the_old_checkpoint(tmp_path, tiny_llava):
    model, processor = tiny_llava
    target = save_pretrained_atomic(model, processor, tmp_path / "out")
    before = sorted(p.name for p in target.iterdir())

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(model, Broken(), target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_export_callback_at_fit_end(tmp_path, tiny_llava):
    from hsr_pl.data import VLGuardDataModule

    from vlguard_fixture import make_vlguard_fixture

    with pytest.raises(ValueError, match="when="):
        ExportPretrained(str(tmp_path / "x"), when="test_end")
    module = LVLMModule(model="tiny:llava")
    get_state(module).method = "wanda"
    data = VLGuardDataModule(train_path=str(make_vlguard_fixture(tmp_path / "d", n=6)), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[ExportPretrained(str(tmp_path / "export"))])
    trainer.fit(module, datamodule=data)
    summary = json.loads((tmp_path / "export" / "hsr_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["pruning_method"] == "wanda"
    exported = load_file(tmp_path / "export" / "model.safetensors")
    # transformers writes LLaVA in its original key layout (language_model.model.layers…).
    (key,) = [k for k in exported if "language_model" in k and k.endswith("layers.0.self_attn.q_proj.weight")]
    trained = module.model.model.language_model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(exported[key], trained)


def test_export_uses_umask_modes_not_private_temp_modes(tmp_path, tiny_llava):
    import os
    import stat

    model, processor = tiny_llava
    old = os.umask(0o022)
    try:
        target = save_pretrained_atomic(model, processor, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()} == {0o644}


def checksums(folder):
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_never_replaces_its_inputs(tmp_path, tiny_llava):
    model, processor = tiny_llava
    source = save_pretrained_atomic(model, processor, tmp_path / "model")
    before = checksums(source)
    link = tmp_path / "link"
    link.symlink_to(source, target_is_directory=True)
    for target, protected in ((source, [source]), (link, [source]), (source / "sub", [source]),
                              (tmp_path, [source])):
        with pytest.raises(ExportError, match="overlaps the input"):
            save_pretrained_atomic(model, processor, target, overwrite=True, protected=protected)
    assert checksums(source) == before
    # An earlier export (its hsr_summary.json proves it) is replaced without overwrite.
    again = save_pretrained_atomic(model, processor, tmp_path / "export", {"n": 1})
    save_pretrained_atomic(model, processor, again, {"n": 2})
    assert json.loads((again / "hsr_summary.json").read_text()) == {"n": 2}
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        save_pretrained_atomic(model, processor, tmp_path / "afile" / "out")


def test_export_callback_refuses_in_setup_before_any_work(tmp_path, monkeypatch):
    import hsr_pl.callbacks.pruning as pruning_module
    from hsr_pl.callbacks import Pruning
    from hsr_pl.data import VLGuardDataModule

    from vlguard_fixture import make_vlguard_fixture

    monkeypatch.setattr(pruning_module, "prune_model", lambda *a, **k: pytest.fail("pruned before the export check"))
    module = LVLMModule(model="tiny:llava")
    source = save_pretrained_atomic(module.model, module.processor, tmp_path / "dense")
    before = checksums(source)
    module = LVLMModule(model=str(source))
    data = VLGuardDataModule(train_path=str(make_vlguard_fixture(tmp_path / "d", n=6)), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False,
                         callbacks=[Pruning(num_samples=2, when="fit_start"), ExportPretrained(str(source), overwrite=True)])
    with pytest.raises(ExportError, match="overlaps the input"):
        trainer.fit(module, datamodule=data)
    assert checksums(source) == before
