"""The Pruning callback: argument validation, targeting, Trainer integration (validate, fit with
re-masking, checkpoint resume), errors before weight changes, the sparsity table, the CLI config,
and every tiny family × {wanda, sparsegpt} × {unstructured, 2:4}."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

import hsr_pl.callbacks._calibration as calibration_module
import hsr_pl.callbacks.pruning as pruning_module
from hsr_pl.callbacks import Pruning
from hsr_pl.callbacks.base import ResumeMismatchError
from hsr_pl.data import VLGuardDataModule
from hsr_pl.models import get_adapter
from hsr_pl.models.tiny import TINY_BUILDERS, build_tiny, example_batch, example_image
from hsr_pl.module import LVLMModule
from hsr_pl.pruning import (
    CalibrationError,
    PartialPruningError,
    PruningConfig,
    PruningConfigError,
    prune_model,
)
from hsr_pl.report.sparsity import sparsity_rows, sparsity_table
from hsr_pl.state import HSRState, get_state

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "tiny_vlguard" / "train.json"


# ------------------------------------------------------------------------------------ helpers
def make_module(lr: float = 1e-3) -> LVLMModule:
    return LVLMModule("tiny:llava", learning_rate=lr, max_new_tokens=2)


def make_data(**kwargs) -> VLGuardDataModule:
    eval_sets = [{"name": "utility", "path": str(TRAIN), "split": "utility", "kind": "utility", "num_samples": 1}]
    defaults = dict(train_path=str(TRAIN), batch_size=4, eval_batch_size=1, num_samples=8, eval_sets=eval_sets)
    return VLGuardDataModule(**{**defaults, **kwargs})


def make_trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path,
        max_steps=2, limit_train_batches=2,
    )
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"weights changed before the error: {changed[:3]}"


class CountPrunes:
    """Wraps prune_model inside the callback module to count how often it really prunes."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        real = pruning_module.prune_model

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(pruning_module, "prune_model", counting)


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="obs"), "method='obs' is unknown"),
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=0.0), "sparsity"),
        (dict(mask_structure="4:2"), "4:2"),
        (dict(mask_structure="1:4", sparsity=0.5), "conflicts"),
        (dict(method="magnitude", mode="sequential"), "no sequential mode"),
        (dict(tokens="prompt"), "tokens='prompt'"),
        (dict(method="sparsegpt", granularity="matrix"), "magnitude and wanda only"),
        (dict(granularity="matrix", mask_structure="2:4"), "ranks within groups"),
        (dict(when="test_start"), "when='test_start'"),
        (dict(when=[]), "choose one or both"),
        (dict(targets=["q_proj("]), "does not compile"),
        (dict(ignore=[3]), "list of regex strings"),
        (dict(num_samples=0), "num_samples=0"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(calibration=""), "Pruning.calibration='' is not a calibration split"),
        (dict(calibration="nope"), "Pruning.calibration='nope' is not a calibration split"),
        (dict(calibration="utility+harmful"), "is not a calibration split"),
    ],
)
def test_bad_arguments_fail_in_init_with_a_hint(kwargs, message):
    with pytest.raises(PruningConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Pruning(**kwargs)


def test_sparsity_defaults_follow_the_structure():
    assert Pruning().target_sparsity == 0.5
    assert Pruning(mask_structure="2:4").target_sparsity == 0.5
    assert Pruning(mask_structure="1:4").target_sparsity == 0.25
    assert Pruning(sparsity=0.3).config.sparsity == 0.3
    assert Pruning(method="wanda").config.mode == "sequential"
    assert Pruning(method="snip").config.mode == "oneshot"


# -------------------------------------------------------------------------------- targeting
def test_default_targets_are_the_decoder_linears_and_originals_the_projections(tiny_llava):
    model, _ = tiny_llava
    adapter = get_adapter(model)
    targets, keep = Pruning().resolve_targets(model)
    assert targets == list(adapter.target_linears())
    expected_keep = [adapter.name_of(p) for i in adapter.layer_indices() for p in adapter.projections(i).values()]
    assert sorted(keep) == sorted(expected_keep)
    assert all(n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) for n in keep) and len(keep) == 8


def test_target_regexes_select_ignore_and_fail_clearly(tiny_llava):
    model, _ = tiny_llava
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert any("vision_tower" in n and "q_proj" in n for n in linears)  # the trap the next check guards
    with pytest.raises(PruningConfigError, match=r"'q_proj' also matches .* outside the language model"):
        Pruning(targets=["q_proj"]).resolve_targets(model)
    targets, keep = Pruning(targets=["q_proj", "down_proj"], ignore=["vision_tower", r"layers\.1\."]).resolve_targets(model)
    assert targets == ["model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.0.mlp.down_proj"]
    assert keep == ["model.language_model.layers.0.self_attn.q_proj"]
    with pytest.raises(PruningConfigError, match="'no_such_proj' matches no nn.Linear"):
        Pruning(targets=["language_model", "no_such_proj"]).resolve_targets(model)
    with pytest.raises(PruningConfigError, match="leave no linear"):
        Pruning(ignore=["language_model"]).resolve_targets(model)
    with pytest.raises(PruningConfigError, match="keep_originals regex 'gate'"):
        Pruning(targets=["language_model.*q_proj"], keep_originals=["gate"]).resolve_targets(model)
    _, keep = Pruning(keep_originals=["v_proj$"]).resolve_targets(model)
    assert len(keep) == 2 and all(n.endswith("v_proj") for n in keep)


# ------------------------------------------------------------------------- validate / state
def test_validate_prunes_once_fills_the_state_and_matches_prune_model(tmp_path, monkeypatch, capsys):
    counter = CountPrunes(monkeypatch)
    module, data = make_module(), make_data()
    dense = copy.deepcopy(module.model)
    callback = Pruning(method="wanda", sparsity=0.5, num_samples=8, when="validation_start")
    trainer = make_trainer(tmp_path, [callback])
    trainer.validate(module, datamodule=data, verbose=False)
    assert counter.calls == 1 and callback.done

    # The same masks as the pure entry point on the data module's own calibration batches.
    batches = list(data.calibration_dataloader("utility", 8, with_response=True, batch_size=1))
    reference = prune_model(dense, batches, PruningConfig("wanda", 0.5))
    state = get_state(module)
    assert state.method == "wanda" and state.sparsity == 0.5
    assert sorted(state.pruned) == sorted(reference.masks)
    linears = dict(module.model.named_modules())
    for name, mask in state.pruned.items():
        assert torch.equal(mask, reference.masks[name]), name
        weight = linears[name].weight.detach()
        assert torch.equal(weight, dict(dense.named_modules())[name].weight.detach())
        assert (mask.sum(1) == math.floor(weight.shape[1] * 0.5)).all()  # exact per row
        assert bool((weight[mask] == 0).all()) and bool((weight[~mask] != 0).all())
    # Originals: only q/k/v/o, the dense values at the pruned positions.
    fresh = make_module().model
    assert sorted(state.originals) == sorted(n for n in state.pruned if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")))
    for name, values in state.originals.items():
        assert torch.equal(values, dict(fresh.named_modules())[name].weight.detach()[state.pruned[name]])
    out = capsys.readouterr().out
    assert "hsr-pl pruning sparsity" in out and "50.00 %" in out

    # A second validate does not prune again (and the masks stay where they are).
    before = weights(module.model)
    trainer.validate(module, datamodule=data, verbose=False)
    assert counter.calls == 1
    assert_unchanged(module.model, before)


@pytest.mark.parametrize("mode", ["sequential", "oneshot"])
def test_whole_matrix_wanda_through_the_callback(tmp_path, mode):
    """Pruning(method='wanda', granularity='matrix'): the masks of prune_model with the same config on
    the same calibration batches, exactly floor(numel*s) per matrix, recorded in the settings."""
    module, data = make_module(), make_data()
    dense = copy.deepcopy(module.model)
    callback = Pruning(method="wanda", sparsity=0.6, granularity="matrix", mode=mode, num_samples=8,
                       when="validation_start")
    make_trainer(tmp_path, [callback]).validate(module, datamodule=data, verbose=False)
    batches = list(data.calibration_dataloader("utility", 8, with_response=True, batch_size=1))
    reference = prune_model(dense, batches, PruningConfig("wanda", 0.6, mode=mode, granularity="matrix"))
    state = get_state(module)
    assert sorted(state.pruned) == sorted(reference.masks)
    for name, mask in state.pruned.items():
        assert torch.equal(mask, reference.masks[name]), name
        assert int(mask.sum()) == int(mask.numel() * 0.6), name
    assert any(len(set(m.sum(1).tolist())) > 1 for m in state.pruned.values())
    assert callback.settings()["granularity"] == "matrix"


class MarkRestored(Callback):
    """Plays realignment: after pruning, put a few pruned q_proj weights back and mark them restored."""

    def __init__(self, count: int = 5) -> None:
        self.count = count
        self.name: str | None = None
        self.positions: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        state = get_state(pl_module)
        self.name = next(n for n in state.pruned if n.endswith("q_proj"))
        mask = state.pruned[self.name]
        self.positions = mask.nonzero()[: self.count]
        restored = torch.zeros_like(mask)
        restored[self.positions[:, 0], self.positions[:, 1]] = True
        dense = state.original_weight(self.name, dict(pl_module.model.named_modules())[self.name].weight)
        weight = dict(pl_module.model.named_modules())[self.name].weight
        with torch.no_grad():
            weight[restored] = dense[restored]
        self.values = dense[restored].clone()
        state.restored[self.name] = restored


def test_fit_keeps_pruned_entries_zero_except_restored(tmp_path):
    module, data = make_module(lr=0.05), make_data()
    restore = MarkRestored()
    trainer = make_trainer(tmp_path, [Pruning(num_samples=4, when="fit_start"), restore], max_steps=3)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3
    state = get_state(module)
    pruned_pos = moved = kept = 0
    start = dict(make_module().model.named_modules())
    for name, mask in state.pruned.items():
        weight = dict(module.model.named_modules())[name].weight.detach()
        keep = state.keep_mask(name)
        assert bool((weight[~keep] == 0).all()), f"{name}: a pruned entry was revived by the optimizer"
        pruned_pos += int((~keep).sum())
        moved += int((weight[~mask] != start[name].weight.detach()[~mask]).sum())
        kept += int((~mask).sum())
    assert pruned_pos > 0 and moved / kept > 0.9, "fine-tuning did not move the unpruned weights"
    weight = dict(module.model.named_modules())[restore.name].weight.detach()
    now = weight[restore.positions[:, 0], restore.positions[:, 1]]
    assert bool((now != 0).all()) and bool((now != restore.values).all()), "restored weights must be free to train"


def test_checkpoint_resume_restores_state_and_does_not_prune_again(tmp_path, monkeypatch):
    counter = CountPrunes(monkeypatch)
    module, data = make_module(lr=0.05), make_data()
    first = Pruning(num_samples=4, when="fit_start")
    restore = MarkRestored()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = make_trainer(tmp_path, [first, restore, ckpt], enable_checkpointing=True, max_steps=2)
    trainer.fit(module, datamodule=data)
    assert counter.calls == 1
    saved = get_state(module).state_dict()
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_file()

    # A fresh dense model and a fresh callback: the checkpoint brings weights, masks and restorations.
    resumed_module, second = make_module(lr=0.05), Pruning(num_samples=4, when="fit_start")
    trainer = make_trainer(tmp_path, [second], max_steps=4, limit_train_batches=4)
    trainer.fit(resumed_module, datamodule=make_data(), ckpt_path=last)
    assert trainer.global_step == 4 and counter.calls == 1 and second.done
    state = get_state(resumed_module)
    assert sorted(state.pruned) == sorted(saved["pruned"]) and restore.name in state.restored
    for key in ("pruned", "originals", "restored"):
        for name, tensor in saved[key].items():
            assert torch.equal(getattr(state, key)[name], tensor), (key, name)
    for name in state.pruned:
        weight = dict(resumed_module.model.named_modules())[name].weight.detach()
        assert bool((weight[~state.keep_mask(name)] == 0).all()), name
    weight = dict(resumed_module.model.named_modules())[restore.name].weight.detach()
    assert bool((weight[restore.positions[:, 0], restore.positions[:, 1]] != 0).all())
    # validate(ckpt_path=...) with a fresh callback: state restored, nothing pruned again.
    validated, third = make_module(), Pruning(num_samples=4)
    make_trainer(tmp_path, [third]).validate(validated, datamodule=make_data(), ckpt_path=last, verbose=False)
    assert counter.calls == 1 and third.done
    assert all(torch.equal(get_state(validated).pruned[n], m) for n, m in saved["pruned"].items())
    # The callback's own state round-trips through a checkpoint dict.
    again = Pruning(num_samples=4)
    again.load_state_dict(second.state_dict())
    assert again.done and again.state_dict()["hsr_state"]["method"] == "wanda"


class ChangeRestoredAt(Callback):
    """Marks one more pruned q_proj weight restored after training step ``step`` (a state change
    between checkpoints)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            state = get_state(pl_module)
            name = next(n for n in state.pruned if n.endswith("q_proj"))
            restored = state.restored.get(name, torch.zeros_like(state.pruned[name])).clone()
            restored[tuple(state.pruned[name].nonzero()[-1].tolist())] = True
            state.restored[name] = restored


def _tensors_in(obj) -> list[str]:
    if isinstance(obj, torch.Tensor):
        return [f"{obj.dtype}{tuple(obj.shape)}"]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors_in(v)]
    return []


def test_checkpoints_reference_one_side_file_per_distinct_state(tmp_path):
    """Masks and originals leave the checkpoints: each holds a reference (path, SHA-256) to a
    safetensors file next to it, written once while the state stays the same, anew when it changes."""
    module, data = make_module(lr=0.05), make_data()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=1)
    callbacks = [Pruning(num_samples=4, when="fit_start"), MarkRestored(), ChangeRestoredAt(2), ckpt]
    make_trainer(tmp_path, callbacks, enable_checkpointing=True, max_steps=3, limit_train_batches=3).fit(
        module, datamodule=data
    )
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    side = sorted((tmp_path / "ckpt").glob("hsr_state-*.safetensors"))
    assert len(saved) == 3 and len(side) == 2  # the state changes before the step-2 checkpoint only
    refs = []
    for path in saved:
        checkpoint = torch.load(path, weights_only=False)
        (pruning_state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("Pruning")]
        hsr = pruning_state["hsr_state"]
        assert _tensors_in(hsr) == [] and hsr["method"] == "wanda" and hsr["sparsity"] == 0.5
        refs.append(hsr["side_file"])
        assert Path(hsr["side_file"]["path"]).parent == tmp_path / "ckpt"
    assert refs[0] != refs[1] == refs[2] and {Path(r["path"]) for r in refs} == set(side)


def test_resume_finds_the_side_file_next_to_a_moved_checkpoint_or_names_the_missing_file(tmp_path):
    from hsr_pl.state_file import StateFileError

    module, data = make_module(lr=0.05), make_data()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "run" / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = make_trainer(tmp_path / "run", [Pruning(num_samples=4, when="fit_start"), ckpt], enable_checkpointing=True)
    trainer.fit(module, datamodule=data)
    saved = get_state(module).state_dict()
    (tmp_path / "run").rename(tmp_path / "moved")
    last = tmp_path / "moved" / "ckpt" / "last.ckpt"
    resumed, second = make_module(lr=0.05), Pruning(num_samples=4, when="fit_start")
    make_trainer(tmp_path / "fresh", [second], max_steps=3).fit(resumed, datamodule=make_data(), ckpt_path=last)
    for name, mask in saved["pruned"].items():
        assert torch.equal(get_state(resumed).pruned[name], mask), name
    for name, values in saved["originals"].items():
        assert torch.equal(get_state(resumed).originals[name], values), name
    for side in (tmp_path / "moved" / "ckpt").glob("hsr_state-*.safetensors"):
        side.unlink()
    with pytest.raises(StateFileError, match=r"side file 'hsr_state-[0-9a-f]{16}\.safetensors'.*Copy that file"):
        make_trainer(tmp_path / "fresh", [Pruning(num_samples=4, when="fit_start")], max_steps=3).fit(
            make_module(), datamodule=make_data(), ckpt_path=last
        )


def test_a_checkpoint_with_the_tensors_inline_still_loads(tiny_llava):
    """Checkpoints written before the side file held the whole state dict inline."""
    model, _ = tiny_llava
    first = Pruning(method="magnitude", when="fit_start")
    first.prune(model, None)
    inline = {"done": True, "settings": first.settings(), "hsr_state": get_state(model).state_dict()}
    second = Pruning(method="magnitude", when="fit_start")
    second.load_state_dict(inline)
    fresh, _ = build_tiny("llava")
    second.on_restored(None, fresh)
    for name, mask in get_state(model).pruned.items():
        assert torch.equal(get_state(fresh).pruned[name], mask)
        assert bool((dict(fresh.named_modules())[name].weight[mask] == 0).all())


def test_resume_under_changed_settings_is_refused_with_the_difference(tmp_path):
    module, data = make_module(lr=0.05), make_data()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = make_trainer(tmp_path, [Pruning(num_samples=4, when="fit_start"), ckpt], enable_checkpointing=True)
    trainer.fit(module, datamodule=data)
    last = tmp_path / "ckpt" / "last.ckpt"
    changed = Pruning(method="magnitude", sparsity=0.9, num_samples=4, when="fit_start")
    trainer = make_trainer(tmp_path, [changed], max_steps=4, limit_train_batches=4)
    with pytest.raises(ResumeMismatchError, match=r"method: 'wanda' there -> 'magnitude' now; .*sparsity: 0.5 there -> 0.9"):
        trainer.fit(make_module(lr=0.05), datamodule=make_data(), ckpt_path=last)
    assert not changed.done


# ---------------------------------------------------------------------- errors, no changes
class NoResponseData(VLGuardDataModule):
    def calibration_dataloader(self, *args, **kwargs):
        rows = []
        for batch in super().calibration_dataloader(*args, **kwargs):
            batch["labels"] = torch.full_like(batch["labels"], -100)
            rows.append(batch)
        return rows


class CorruptImageData(VLGuardDataModule):
    def calibration_dataloader(self, *args, **kwargs):
        rows = []
        for batch in super().calibration_dataloader(*args, **kwargs):
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
            rows.append(batch)
        return rows


@pytest.mark.parametrize(
    ("callback", "data", "error", "message"),
    [
        (dict(), NoResponseData, CalibrationError, "zero calibration tokens"),
        (dict(), CorruptImageData, CalibrationError, "NaN/inf"),
        (dict(method="sparsegpt"), CorruptImageData, CalibrationError, "NaN/inf"),
        (dict(targets=["language_model", "qkv_proj"]), make_data, PruningConfigError, "'qkv_proj' matches no"),
        (dict(method="snip"), NoResponseData, CalibrationError, "zero calibration tokens"),
    ],
)
def test_bad_input_is_reported_before_any_weight_changes(tmp_path, callback, data, error, message):
    module = make_module()
    before = weights(module.model)
    datamodule = data(**dict(train_path=str(TRAIN), num_samples=4, eval_sets=make_data().eval_sets))
    trainer = make_trainer(tmp_path, [Pruning(num_samples=4, when="validation_start", **callback)])
    with pytest.raises(error, match=message):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    assert_unchanged(module.model, before)
    assert not get_state(module).pruned


def test_missing_datamodule_is_reported_before_any_weight_changes(tmp_path):
    module = make_module()
    before = weights(module.model)
    trainer = make_trainer(tmp_path, [Pruning(when="validation_start")])
    with pytest.raises(CalibrationError, match="needs calibration data"):
        trainer.validate(module, dataloaders=DataLoader([0]), verbose=False)
    assert_unchanged(module.model, before)


def test_failure_after_a_pruned_layer_says_which_and_to_reload(tmp_path):
    module = make_module()
    norm = module.model.model.language_model.layers[1].input_layernorm.weight
    with torch.no_grad():
        norm[0] = 3e38  # finite, but layer 1's statistics overflow; layer 0 is pruned first
    callback = Pruning(num_samples=4, when="validation_start")
    trainer = make_trainer(tmp_path, [callback])
    with pytest.raises(PartialPruningError, match=r"failed part-way.*NaN/inf.*already pruned in place: \[0\].*reload") as info:
        trainer.validate(module, datamodule=make_data(), verbose=False)
    assert info.value.pruned_layers == [0]
    assert not callback.done and not get_state(module).pruned


# ------------------------------------------------------------------------------- magnitude
class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[dict, int | None]] = []

    name = "recording"
    version = 0

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((dict(metrics), step))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_magnitude_needs_no_datamodule_and_logs_the_sparsity(tmp_path):
    module = make_module()
    callback = Pruning(method="magnitude", sparsity=0.25, when="validation_start")
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, [callback], logger=logger)
    loader = make_data(processor=module.processor).val_dataloader()[0]  # plain loaders, no data module
    trainer.validate(module, dataloaders=loader, verbose=False)
    for name, mask in get_state(module).pruned.items():
        assert (mask.sum(1) == math.floor(mask.shape[1] * 0.25)).all(), name
    assert ({"pruning/sparsity": 0.25}, 0) in logger.metrics


def test_fit_without_fit_start_warns_and_trains_dense(tmp_path):
    module = make_module()
    callback = Pruning(num_samples=4, when="validation_start")
    with pytest.warns(UserWarning, match="acts at the start of trainer.validate only"):
        make_trainer(tmp_path, [callback], max_steps=1, limit_val_batches=0).fit(module, datamodule=make_data())
    assert not callback.done and not get_state(module).pruned


def test_shards_split_the_selected_samples_over_ranks():
    loader = DataLoader(list(range(7)), batch_size=2, collate_fn=lambda rows: torch.tensor(rows))
    shards = [[t.tolist() for t in calibration_module.shard(loader, rank, 2)] for rank in range(2)]
    assert shards == [[[0, 2], [4, 6]], [[1, 3], [5]]]
    assert [t.tolist() for t in calibration_module.shard(loader, 0, 1)] == [[0, 1], [2, 3], [4, 5], [6]]
    with pytest.raises(CalibrationError, match="cannot be split over 8 ranks; raise num_samples to at least 8"):
        calibration_module.shard(loader, 0, 8)


# ---------------------------------------------------------------------------- the table
def test_sparsity_table_counts_the_weights(tiny_llava):
    model, _ = tiny_llava
    state = HSRState(method="wanda", sparsity=0.5)
    lin = dict(model.named_modules())
    names = ["model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        for name in names:
            mask = torch.zeros_like(lin[name].weight, dtype=torch.bool)
            mask[:, :16] = True
            state.record_pruning(name, mask, lin[name].weight)
            lin[name].weight[mask] = 0
        restored = torch.zeros_like(mask)
        restored[0, :3] = True
        state.restored[names[0]] = restored
        lin[names[0]].weight[restored] = 1.0
    rows = sparsity_rows(model, state)
    assert [(r.total, r.pruned, r.restored, r.zeros) for r in rows] == [(4096, 1024, 3, 1021), (4096, 1024, 0, 1024)]
    console = Console(width=200, record=True)
    console.print(sparsity_table(model, state))
    text = console.export_text()
    assert "0.self_attn.q_proj" in text and "24.93 %" in text and "total" in text and "24.96 %" in text
    console = Console(width=200, record=True)
    console.print(sparsity_table(model, state, group=True))
    text = console.export_text()
    assert "*.self_attn.q_proj" in text and "2,048" in text and "2,045" in text
    state.pruned["nope"] = mask
    with pytest.raises(KeyError, match="not in the model"):
        sparsity_rows(model, state)


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_cli_validate_with_the_pruned_config(tmp_path, capsys, in_repo):
    from hsr_pl.cli import run_cli

    cli = run_cli(["validate", "--config", "configs/tiny_llava_pruned.yaml",
                   f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])
    model = cli.model.model
    targets = get_adapter(model).target_linears()
    for name, lin in targets.items():
        zeros = (lin.weight == 0).sum(1)
        assert (zeros == lin.in_features // 2).all(), name
    assert sorted(get_state(cli.model).pruned) == sorted(targets)
    out = capsys.readouterr().out
    assert "hsr-pl pruning sparsity" in out and "hsr-pl evaluation" in out


def test_cli_fit_keeps_the_sparsity(tmp_path, in_repo):
    from hsr_pl.cli import run_cli

    cli = run_cli(["fit", "--config", "configs/tiny_llava_pruned.yaml", "--trainer.callbacks.init_args.when=fit_start",
                   f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.limit_val_batches=0"])
    assert cli.trainer.global_step == 4
    state = get_state(cli.model)
    fresh = dict(build_tiny("llava")[0].named_modules())
    for name, lin in get_adapter(cli.model.model).target_linears().items():
        mask = state.pruned[name]
        assert bool((lin.weight[mask] == 0).all()) and (mask.sum(1) == lin.in_features // 2).all(), name
        assert not torch.equal(lin.weight.detach()[~mask], fresh[name].weight.detach()[~mask]), name


# -------------------------------------------------------------------- every tiny family
_BUILT: dict[str, tuple[nn.Module, object]] = {}


def _built(family: str):
    if family not in _BUILT:
        _BUILT[family] = build_tiny(family)
    return _BUILT[family]


def family_batches(family: str, processor) -> list[dict]:
    """Two prompts; the last three positions of each play the response (labels != -100)."""
    out = []
    for seed, text in enumerate(("what colour is the shape ?", "describe this image .")):
        batch = example_batch(family, processor, text=text, image=example_image(seed=seed))
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, -3:] = batch["input_ids"][:, -3:]
        batch["labels"] = labels
        out.append(batch)
    return out


@pytest.mark.parametrize("structure", ["0:0", "2:4"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("family", sorted(TINY_BUILDERS))
def test_every_family_prunes_its_targets_and_nothing_else(family, method, structure):
    dense, processor = _built(family)
    model = copy.deepcopy(dense)
    mode = "oneshot" if family == "mllama" else None  # Mllama's decoder interleaves cross-attention
    callback = Pruning(method=method, mask_structure=structure, mode=mode)
    result = callback.prune(model, family_batches(family, processor))
    targets = get_adapter(model).target_linears()
    assert sorted(result.masks) == sorted(targets) and sorted(get_state(model).pruned) == sorted(targets)
    before = dict(dense.named_parameters())
    for name, param in model.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        if module_name in targets and name.endswith("weight"):
            continue
        assert torch.equal(param, before[name]), f"{name} is outside the targets but changed"
    for name, lin in targets.items():
        mask, weight = result.masks[name], lin.weight.detach()
        assert bool((weight[mask] == 0).all()), name
        rows, cols = mask.shape
        if structure == "2:4":
            assert (mask.view(rows, cols // 4, 4).sum(-1) == 2).all(), name
        elif method == "wanda":
            assert (mask.sum(1) == cols // 2).all(), name
        else:  # SparseGPT: one threshold per 128-column block over all rows (prunes floor(numel/2) + 1)
            for start in range(0, cols, 128):
                block = mask[:, start:start + 128]
                assert int(block.sum()) == block.numel() // 2 + 1, (name, start)
        dense_weight = dict(dense.named_modules())[name].weight.detach()
        if method == "wanda":
            assert torch.equal(weight[~mask], dense_weight[~mask]), name
        else:
            assert not torch.equal(weight[~mask], dense_weight[~mask]), f"{name}: SparseGPT updates kept weights"


def test_mllama_sequential_is_refused_before_weight_changes():
    dense, processor = _built("mllama")
    model = copy.deepcopy(dense)
    with pytest.raises(NotImplementedError, match="use mode='oneshot'"):
        Pruning(method="wanda").prune(model, family_batches("mllama", processor))
    assert_unchanged(model, dict(dense.state_dict()))
