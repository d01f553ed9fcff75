"""The SafetyHeadAttribution callback: argument validation, Trainer integration (validate, fit,
checkpoint resume without rescan), the released JSON format, resume of a killed scan (identical
scores), precomputed scores, the pruned-model warning, the DDP head split, the heatmaps and the
CLI config. The scores themselves are the pure engines' (tested in test_attribution_*.py); here
the callback is checked to hand them the right data and to report them faithfully."""

from __future__ import annotations

import json
import math
import random
import warnings
from itertools import product
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from rich.console import Console

from hsr_pl.attribution import ScoreConfig, head_scores
from hsr_pl.callbacks import SafetyHeadAttribution
from hsr_pl.callbacks.base import ResumeMismatchError
from hsr_pl.callbacks.head_attribution import assign_heads
from hsr_pl.data import VLGuardDataModule
from hsr_pl.models import get_adapter
from hsr_pl.models.tiny import build_tiny_llava
from hsr_pl.module import LVLMModule
from hsr_pl.report.heads import (
    color_scale,
    heatmap,
    read_partial,
    read_scores,
    save_heatmap_png,
    score_grid,
    write_scores,
)
from hsr_pl.state import get_state, head_key

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "tiny_vlguard" / "train.json"
LAYERS, HEADS = 3, 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ helpers
def make_module(layers: int = LAYERS, gqa: bool = False) -> LVLMModule:
    model, processor = build_tiny_llava(gqa, layers=layers, heads=HEADS)
    return LVLMModule(model, processor=processor, max_new_tokens=1)


def make_data(module: LVLMModule) -> VLGuardDataModule:
    eval_sets = [{"name": "harmful", "path": str(TRAIN), "split": "safety", "kind": "harmful", "num_samples": 1}]
    return VLGuardDataModule(
        train_path=str(TRAIN), eval_sets=eval_sets, eval_batch_size=1, batch_size=2, processor=module.processor
    )


def make_trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def validate(tmp_path, callback, module=None):
    module = module or make_module()
    trainer = make_trainer(tmp_path, [callback])
    trainer.validate(module, datamodule=make_data(module), verbose=False)
    return module, trainer


def direct_batches(module, split="safety", n=4, with_response=False, batch_size=1):
    loader = make_data(module).calibration_dataloader(split, n, with_response=with_response, batch_size=batch_size)
    return [{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in loader]


def ranked(scores: dict[str, float], h: int) -> list[tuple[int, int]]:
    """Reference top-h: a plain sort by (−score, layer, head)."""
    pairs = [(tuple(int(x) for x in k.split("-")), v) for k, v in scores.items()]
    pairs.sort(key=lambda p: (-p[1], p[0]))
    return [p[0] for p in pairs[:h]]


def all_keys(layers: int = LAYERS) -> set[str]:
    return {head_key(layer, h) for layer in range(layers) for h in range(HEADS)}


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"score": "cosine"}, "score='cosine' is not one of"),
        ({"positions": "all"}, "positions='all'"),
        ({"ablation": "drop"}, "ablation='drop'"),
        ({"epsilon": 1.5}, r"epsilon=1.5 must lie in \[0, 1\)"),
        ({"epsilon": "small"}, "epsilon='small' must be a number"),
        ({"engine": "fast"}, "engine='fast' is not one of"),
        ({"engine": "gradient", "score": "subspace"}, "engine='gradient' estimates KL scores only"),
        ({"score": "subspace", "positions": "response"}, "positions='response' averages the KL"),
        ({"engine_kwargs": {"max_batch_head": 2}}, "engine_kwargs has 'max_batch_head'"),
        ({"engine": "naive", "engine_kwargs": {"max_batch_heads": 2}}, "engine='naive' does not take"),
        ({"calibration": "harmful"}, "calibration='harmful' is not a calibration split"),
        ({"num_samples": 0}, "num_samples=0 must be a positive integer"),
        ({"batch_size": 1.5}, "batch_size=1.5 must be a positive integer"),
        ({"top_h": -1}, "top_h=-1 must be an integer"),
        ({"r_max": 0}, "r_max=0 must be a positive integer"),
        ({"output": "runs/heads.txt"}, "must be a .json file path"),
        ({"scores_path": "/nonexistent/heads.json"}, "does not exist"),
        ({"resume": True}, "resume=True needs output"),
        ({"when": "train_start"}, "SafetyHeadAttribution\\(when='train_start'\\): choose one or both"),
    ],
)
def test_bad_arguments_fail_in_init_with_the_fix(kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        SafetyHeadAttribution(**kwargs)


def test_bad_scores_file_and_resume_conflict(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"0_1": 0.5}))
    with pytest.raises(ValueError, match="key '0_1' is not '<layer>-<head>'"):
        SafetyHeadAttribution(scores_path=str(bad))
    bad.write_text(json.dumps({"0-1": "high"}))
    with pytest.raises(ValueError, match="must be finite numbers"):
        SafetyHeadAttribution(scores_path=str(bad))
    good = tmp_path / "good.json"
    write_scores(good, {"0-0": 1.0})
    with pytest.raises(ValueError, match="nothing to resume"):
        SafetyHeadAttribution(scores_path=str(good), resume=True, output=str(tmp_path / "o.json"))


# --------------------------------------------------------------------------- the scan itself
CASES = [
    # (score, positions, engine, batch_size, ablation, gqa)
    ("kl", "last", "exact", 1, "head", False),
    ("kl", "response", "exact", 2, "head", False),
    ("subspace", "last", "exact", 1, "head", False),
    ("kl", "response", "gradient", 1, "head", False),
    ("kl", "last", "exact", 2, "qkv", True),
]


@pytest.mark.parametrize(("score", "positions", "engine", "batch_size", "ablation", "gqa"), CASES)
def test_validate_scores_equal_the_engine_on_the_requested_data(
    tmp_path, monkeypatch, capsys, score, positions, engine, batch_size, ablation, gqa
):
    requests = []
    original = VLGuardDataModule.calibration_dataloader

    def spy(self, split, num_samples=None, **kwargs):
        requests.append((split, num_samples, kwargs))
        return original(self, split, num_samples, **kwargs)

    monkeypatch.setattr(VLGuardDataModule, "calibration_dataloader", spy)
    out = tmp_path / "heads" / "scores.json"
    callback = SafetyHeadAttribution(
        score=score, positions=positions, engine=engine, ablation=ablation, num_samples=3, batch_size=batch_size, top_h=5,
        output=str(out), when="validation_start",
    )
    module, _ = validate(tmp_path, callback, module=make_module(gqa=gqa))

    with_response = positions == "response"
    assert requests == [("safety", 3, {"with_response": with_response, "batch_size": batch_size})]
    # The same batches through the engine directly, on an identical fresh model in eval mode.
    reference_model = make_module(gqa=gqa).model.eval()
    batches = direct_batches(module, n=3, with_response=with_response, batch_size=batch_size)
    cfg = ScoreConfig(score=score, positions=positions, ablation=ablation)
    want = head_scores(reference_model, batches, cfg, engine=engine)
    state = get_state(module)
    assert set(state.head_scores) == all_keys()
    assert state.head_scores == want  # bit for bit: same data, same engine
    if engine == "exact":  # and close to the obviously-correct loop
        naive = head_scores(reference_model, batches, cfg, engine="naive")
        for key in naive:
            assert math.isclose(state.head_scores[key], naive[key], rel_tol=1e-4, abs_tol=1e-7), key
    assert state.top_heads == ranked(want, 5)
    if ablation == "qkv" and gqa:  # the scripts' group-wide ablation: a KV group's heads share a score
        group = HEADS // get_adapter(module.model).geometry(0).num_kv_heads
        assert group > 1
        for layer in range(LAYERS):
            values = [state.head_scores[head_key(layer, h)] for h in range(HEADS)]
            for g in range(HEADS // group):  # equal up to the O(ε) effect of each head's own query scaling
                for j in range(group):
                    assert math.isclose(values[g * group], values[g * group + j], rel_tol=1e-3), (layer, g, j, values)
    assert module.model.training is False  # validate's own mode, restored after scoring

    # The released format: one flat {"l-h": score} object, nothing else.
    released = json.loads(out.read_text())
    assert released == want and list(released) == sorted(released, key=lambda k: tuple(map(int, k.split("-"))))
    top = json.loads((out.parent / "scores.top.json").read_text())
    assert top["heads"] == [list(p) for p in ranked(want, 5)] and top["keys"] == [head_key(*p) for p in ranked(want, 5)]
    assert top["settings"]["score"] == score and top["settings"]["num_samples"] == 3
    png = out.parent / "scores.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    with Image.open(png) as image:
        image.verify()
    assert not list(out.parent.glob("*partial*")) and not list(out.parent.glob(".*tmp"))
    printed = capsys.readouterr().out
    assert "safety-head scores" in printed and "top: 1. " + head_key(*ranked(want, 5)[0]) in printed


def test_top_h_larger_than_the_model_fails_before_reading_data(tmp_path, monkeypatch):
    monkeypatch.setattr(VLGuardDataModule, "calibration_dataloader", lambda *a, **k: pytest.fail("data was read"))
    with pytest.raises(ValueError, match=f"top_h=13 exceeds the model's {LAYERS * HEADS} attention heads"):
        validate(tmp_path, SafetyHeadAttribution(top_h=13, when="validation_start"))


def test_fit_without_fit_start_warns_that_nothing_is_scored():
    callback = SafetyHeadAttribution(when="validation_start")
    module = make_module()
    with pytest.warns(UserWarning, match=r"acts at the start of trainer.validate only.*add 'fit_start' to `when`"):
        callback._step(None, module, "fit_start")
    assert not callback.done and get_state(module).head_scores == {}


# ---------------------------------------------------------------------------------- resume
class ScanKilled(RuntimeError):
    pass


class KilledAfterFirstLayer(SafetyHeadAttribution):
    """Dies right after layer 0's partial file is written, like a scan killed part-way."""

    def on_layer_scored(self, layer, scores):
        super().on_layer_scored(layer, scores)
        raise ScanKilled("killed after layer 0")


class Recording(SafetyHeadAttribution):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layers_scored = []

    def on_layer_scored(self, layer, scores):
        self.layers_scored.append((layer, sorted(scores)))
        super().on_layer_scored(layer, scores)


def test_resume_after_a_kill_gives_identical_scores(tmp_path):
    settings = dict(positions="response", num_samples=3, batch_size=2, top_h=4, when="validation_start")
    full, _ = validate(tmp_path, SafetyHeadAttribution(output=str(tmp_path / "full.json"), **settings))
    uninterrupted = get_state(full).head_scores

    out = tmp_path / "resumed" / "heads.json"
    with pytest.raises(ScanKilled):
        validate(tmp_path, KilledAfterFirstLayer(output=str(out), **settings))
    partial = out.parent / "heads.partial.json"
    assert not out.exists()
    header, done = read_partial(partial)
    assert sorted(done) == sorted(head_key(0, h) for h in range(HEADS))
    assert header["ablation"] == "head" and header["positions"] == "response" and header["num_samples"] == 3
    assert all(done[k] == uninterrupted[k] for k in done)

    # Different settings: refused, naming the difference; the partial file is kept.
    with pytest.raises(ValueError, match=r"resume refused: .*ablation: 'head' there vs 'zero' now"):
        validate(tmp_path, SafetyHeadAttribution(output=str(out), resume=True, ablation="zero", **settings))
    assert partial.exists()

    resumed = Recording(output=str(out), resume=True, **settings)
    module, _ = validate(tmp_path, resumed)
    assert [layer for layer, _ in resumed.layers_scored] == [1, 2]  # layer 0 came from the file
    assert get_state(module).head_scores == uninterrupted  # exactly
    assert json.loads(out.read_text()) == uninterrupted
    assert get_state(module).top_heads == ranked(uninterrupted, 4)
    assert not partial.exists()


def test_resume_refuses_partial_results_of_other_weights(tmp_path):
    out = tmp_path / "heads.json"
    settings = dict(num_samples=2, when="validation_start", output=str(out), heatmap=False)
    with pytest.raises(ScanKilled):
        validate(tmp_path, KilledAfterFirstLayer(**settings))
    other = make_module()
    with torch.no_grad():
        get_adapter(other.model).projections(LAYERS - 1)["o"].weight.mul_(1.5)
    with pytest.raises(ValueError, match="resume refused: .*weights_sha256"):
        validate(tmp_path, SafetyHeadAttribution(resume=True, **settings), module=other)


def test_checkpoint_restores_scores_without_rescanning(tmp_path, monkeypatch):
    module = make_module()
    dense = make_module().model.eval()  # identical weights: what fit_start must have scored
    callback = SafetyHeadAttribution(num_samples=2, top_h=3, when="fit_start", heatmap=False)
    trainer = make_trainer(tmp_path, [callback], max_steps=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, datamodule=make_data(module))
    want = head_scores(dense, direct_batches(module, n=2), ScoreConfig(), engine="exact")
    assert get_state(module).head_scores == want and callback.done
    ckpt = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(ckpt)

    monkeypatch.setattr(SafetyHeadAttribution, "scan", lambda *a, **k: pytest.fail("rescanned after resume"))
    module2 = make_module()
    restored = SafetyHeadAttribution(num_samples=2, top_h=3, when="fit_start", heatmap=False)
    trainer2 = make_trainer(tmp_path, [restored], max_steps=2, limit_train_batches=2, limit_val_batches=0)
    trainer2.fit(module2, datamodule=make_data(module2), ckpt_path=ckpt)
    assert trainer2.global_step == 2
    assert get_state(module2).head_scores == want
    assert get_state(module2).top_heads == ranked(want, 3)
    # Another top_h or engine would silently keep the old top heads: refused, naming the difference.
    for changed, diff in ((dict(top_h=2), "top_h: 3 there -> 2 now"), (dict(engine="naive"), "engine: 'exact' there -> 'naive'")):
        other = SafetyHeadAttribution(**{**dict(num_samples=2, top_h=3, when="fit_start", heatmap=False), **changed})
        trainer3 = make_trainer(tmp_path, [other], max_steps=2, limit_train_batches=2, limit_val_batches=0)
        with pytest.raises(ResumeMismatchError, match=diff):
            trainer3.fit(make_module(), datamodule=make_data(module2), ckpt_path=ckpt)


# ------------------------------------------------------------------- precomputed / pruned
def test_scores_path_skips_the_scan_and_checks_the_shape(tmp_path, monkeypatch):
    rng = random.Random(0)
    scores = {k: rng.random() for k in all_keys()}
    path = tmp_path / "released.json"
    path.write_text(json.dumps(scores))  # as the released scripts write it
    monkeypatch.setattr(SafetyHeadAttribution, "scan", lambda *a, **k: pytest.fail("scanned"))
    monkeypatch.setattr(VLGuardDataModule, "calibration_dataloader", lambda *a, **k: pytest.fail("data was read"))
    module, _ = validate(tmp_path, SafetyHeadAttribution(scores_path=str(path), top_h=4, when="validation_start", heatmap=False))
    assert get_state(module).head_scores == scores
    assert get_state(module).top_heads == ranked(scores, 4)

    small = tmp_path / "small.json"
    small.write_text(json.dumps({k: v for k, v in scores.items() if not k.startswith(f"{LAYERS - 1}-")}))
    with pytest.raises(ValueError, match=rf"holds 8 scores \(2 layers × 4 heads\) but the model has {LAYERS} self-attention"):
        validate(tmp_path, SafetyHeadAttribution(scores_path=str(small), top_h=4, when="validation_start"))


def test_warns_when_the_model_looks_pruned(tmp_path):
    callback = SafetyHeadAttribution(num_samples=1, top_h=2, when="validation_start", heatmap=False)
    module = make_module()
    adapter = get_adapter(module.model)
    with warnings.catch_warnings(record=True) as record:  # dense: no warning
        warnings.simplefilter("always")
        callback._warn_if_pruned(module, adapter)
    assert not [w for w in record if "looks pruned" in str(w.message)]

    get_state(module).pruned["x"] = torch.zeros(1, dtype=torch.bool)  # Pruning ran first
    with pytest.warns(UserWarning, match=r"looks pruned \(Pruning already ran\).*before Pruning"):
        callback._warn_if_pruned(module, adapter)

    pruned = make_module()
    with torch.no_grad():
        for layer in get_adapter(pruned.model).layer_indices():
            for proj in get_adapter(pruned.model).projections(layer).values():
                proj.weight[:, : proj.weight.shape[1] // 4] = 0  # 25 % zeros
    with pytest.warns(UserWarning, match=r"looks pruned \(25 % of the attention weights are 0\)"):
        validate(tmp_path, callback, module=pruned)
    assert len(get_state(pruned).head_scores) == LAYERS * HEADS  # still scores it


# ------------------------------------------------------------------------------ DDP split
def _lpt_bound_ok(targets, world, shares, depth):
    """Check the split against brute force: the LPT load is within 4/3 of the optimum."""
    cost = {layer: len(heads) * (depth - layer) for layer, heads in targets.items()}
    loads = [sum(cost[layer] // len(targets[layer]) for layer, _ in share) for share in shares]
    best = min(
        max(sum(cost[layer] for layer, r in zip(cost, choice) if r == rank) for rank in range(world))
        for choice in product(range(world), repeat=len(cost))
    )
    return max(loads) <= 4 / 3 * best + 1e-9


@pytest.mark.parametrize(
    ("layers", "heads", "world"),
    [(2, 4, 1), (2, 4, 2), (3, 4, 2), (5, 3, 2), (6, 2, 3), (1, 4, 2), (1, 3, 4), (2, 1, 4), (4, 8, 3)],
)
def test_assign_heads_covers_every_head_once_and_keeps_layers_together(layers, heads, world):
    targets = {layer: list(range(heads)) for layer in range(layers)}
    shares = assign_heads(targets, world, layers)
    assert len(shares) == world and shares == assign_heads(targets, world, layers)  # deterministic
    flat = [pair for share in shares for pair in share]
    assert sorted(flat) == [(layer, h) for layer in range(layers) for h in range(heads)]
    owners = {layer: {r for r, share in enumerate(shares) for pair in share if pair[0] == layer} for layer in targets}
    if layers >= world:
        assert all(len(o) == 1 for o in owners.values()), owners  # a layer is never split
        assert _lpt_bound_ok(targets, world, shares, layers)
    else:
        busy = sum(1 for share in shares if share)
        assert busy == min(world, layers * heads)  # split only as far as needed to feed every rank


def test_assign_heads_with_gaps_after_resume():
    targets = {0: [], 1: [2, 3], 2: [0, 1, 2, 3]}
    shares = assign_heads(targets, 2, 3)
    assert sorted(p for s in shares for p in s) == [(1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]


# -------------------------------------------------------------------------------- report
def test_score_grid_and_files_round_trip(tmp_path):
    rng = random.Random(1)
    scores = {head_key(layer, h): rng.uniform(-1, 1) for layer in (0, 1, 3) for h in range(5)}
    del scores["3-4"]
    layers, num_heads, grid = score_grid(scores)
    assert layers == [0, 1, 3] and num_heads == 5
    for i, layer in enumerate(layers):
        for h in range(5):
            key = head_key(layer, h)
            assert (grid[i][h] == scores[key]) if key in scores else math.isnan(grid[i][h])
    write_scores(tmp_path / "s.json", scores)
    assert read_scores(tmp_path / "s.json") == scores  # floats survive JSON exactly
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temp file left
    assert color_scale([1.0, 2.0, 50.0]) == "linear" and color_scale([0.01, 2.0]) == "log"
    assert color_scale([-1.0, 500.0]) == "linear"


@pytest.mark.parametrize(("num_heads", "width"), [(4, 100), (32, 100), (32, 80), (64, 80)])
def test_terminal_heatmap_marks_the_top_heads_in_their_cells(num_heads, width):
    rng = random.Random(num_heads)
    scores = {head_key(layer, h): rng.random() for layer in range(12) for h in range(num_heads)}
    top = ranked(scores, 10)
    console = Console(width=width, record=True, color_system=None)
    console.print(heatmap(scores, top, "title", max_width=width))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= width
    rows = {line.split()[0]: line for line in lines if line.strip().startswith("L") and line.split()[0][1:].isdigit()}
    cell = 3 if 4 + 3 * num_heads <= width else (2 if 4 + 2 * num_heads <= width else 1)
    for layer in range(12):
        row = rows[f"L{layer}"][4:]
        marks = {h: row[h * cell : (h + 1) * cell].strip() for h in range(num_heads)}
        for h in range(num_heads):
            if (layer, h) in top:
                rank = top.index((layer, h)) + 1
                assert marks[h] == (str(rank) if len(str(rank)) <= cell else "•"), (layer, h, marks[h])
            else:
                assert marks[h] == "", (layer, h, marks[h])


def test_png_heatmap_is_a_valid_image(tmp_path):
    scores = {head_key(layer, h): float(layer * 4 + h + 1) for layer in range(3) for h in range(4)}
    path = save_heatmap_png(tmp_path / "sub" / "h.png", scores, ranked(scores, 3), "kl scores")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 150


# ----------------------------------------------------------------------------------- CLI
def test_cli_validate_with_the_heads_config(tmp_path, capsys, monkeypatch):
    from hsr_pl.cli import run_cli

    monkeypatch.chdir(ROOT)
    out = tmp_path / "head_scores.json"
    cli = run_cli(["validate", "--config", "configs/tiny_llava_heads.yaml", f"--trainer.default_root_dir={tmp_path}",
                   "--trainer.logger=false", f"--trainer.callbacks.init_args.output={out}"])
    adapter = get_adapter(cli.model.model)
    expected = {head_key(layer, h) for layer in adapter.layer_indices() for h in range(adapter.geometry(layer).num_heads)}
    released = json.loads(out.read_text())
    assert set(released) == expected and all(isinstance(v, float) for v in released.values())
    assert released == get_state(cli.model).head_scores and len(get_state(cli.model).top_heads) > 0
    printed = capsys.readouterr().out
    assert "safety-head scores" in printed and "hsr-pl evaluation" in printed
    n_layers = len(adapter.layer_indices())
    assert "head attribution (kl, exact)" in printed and f"{n_layers}/{n_layers} layers" in printed  # progress bar


def test_heatmap_stays_readable_with_zero_and_rounding_negative_scores(tmp_path):
    from hsr_pl.report.heads import scale_range

    # one dominant head, the rest spread over decades, one exact zero and one -1e-12 from rounding
    scores = {f"0-{h}": 10.0 ** (-h) for h in range(6)}
    scores.update({"0-6": 0.0, "0-7": -1e-12})
    flat = list(scores.values())
    assert color_scale(flat) == "log" and scale_range(flat, "log") == (1e-5, 1.0)
    console = Console(record=True, width=100, color_system="truecolor")
    console.print(heatmap(scores, [(0, 0)], "kl"))
    text = console.export_text()
    assert "1e-05" in text and "log scale" in text
    save_heatmap_png(tmp_path / "h.png", scores, [(0, 0)], "kl")
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_MAGIC


def test_resume_helpers_name_the_partial_files_and_refuse_other_settings(tmp_path):
    from hsr_pl.attribution import assign_heads as exported
    from hsr_pl.attribution.resume import merge_partials, partial_files, partial_path
    from hsr_pl.report.heads import write_partial

    assert exported is assign_heads
    output = tmp_path / "scores.json"
    assert partial_path(output) == tmp_path / "scores.partial.json"
    assert partial_path(output, 1, 2) == tmp_path / "scores.partial.rank1.json"
    settings = {"score": "kl", "data_sha256": "abc"}
    write_partial(partial_path(output, 0, 2), settings, {"0-0": 1.0, "0-1": 2.0})
    write_partial(partial_path(output, 1, 2), settings, {"1-0": 3.0})
    (tmp_path / "other.partial.json").write_text("{}")  # another output's file is not picked up
    assert partial_files(output) == [partial_path(output, 0, 2), partial_path(output, 1, 2)]
    assert merge_partials(partial_files(output), settings) == {"0-0": 1.0, "0-1": 2.0, "1-0": 3.0}
    with pytest.raises(ValueError, match=r"data_sha256: 'abc' there vs 'xyz' now"):
        merge_partials(partial_files(output), {**settings, "data_sha256": "xyz"})


def test_gather_maps_every_ranks_tensor_back_to_its_share():
    """The all-gather through the strategy: rank r's float64 row holds its share's scores in
    order (NaN padding); every rank rebuilds the same dict, exactly."""
    from types import SimpleNamespace

    shares = [[(0, 0), (0, 1), (1, 0)], [(2, 0)]]
    scores = {"0-0": 0.1, "0-1": 1 / 3, "1-0": -2.5, "2-0": 7e-12}
    rows = [torch.tensor([0.1, 1 / 3, -2.5], dtype=torch.float64),
            torch.tensor([7e-12, float("nan"), float("nan")], dtype=torch.float64)]
    for rank in (0, 1):
        def all_gather(local, rank=rank):
            assert torch.equal(local[: len(shares[rank])], rows[rank][: len(shares[rank])])
            return torch.stack([local if r == rank else rows[r] for r in range(2)])

        trainer = SimpleNamespace(world_size=2, global_rank=rank,
                                  strategy=SimpleNamespace(root_device=torch.device("cpu"), all_gather=all_gather))
        mine = {head_key(*pair): scores[head_key(*pair)] for pair in shares[rank]}
        assert SafetyHeadAttribution()._gather(trainer, shares, mine) == scores
    empty = SimpleNamespace(world_size=2, global_rank=0, strategy=None)
    assert SafetyHeadAttribution()._gather(empty, [[], []], {}) == {}
