"""``validate`` end to end on every benchmark format: the reported numbers (per judge, per category,
judge agreement, exact choice, circular, ANLS) recomputed here from the replies the model gave.

The tiny random model's own replies would make every judge agree (all gibberish), so the model
generates as usual and its text is then replaced by scripted replies of every sort — refusals,
broken refusals, answers, option letters, near-miss document answers — drawn at random."""

from __future__ import annotations

import json
import math
import random

import lightning.pytorch as pl
import pytest

from hsr_pl.data import VLGuardDataModule
from hsr_pl.evaluation.judges import make_judge
from hsr_pl.module import LVLMModule

from benchmark_fixtures import (
    write_docvqa,
    write_figstep,
    write_mmbench,
    write_mmsafetybench,
    write_vlguard_test,
)
from scoring_references import reference_anls, reference_extract, reference_kappa

JUDGES = ["strict", "keyword-gcg-nocase", "coherent-compliance"]


def _sets(tmp_path):
    vg = write_vlguard_test(tmp_path / "vg")
    return [
        {"name": "figstep", "format": "figstep", "path": str(write_figstep(tmp_path / "fs", images=False)),
         "options": {"render_dir": str(tmp_path / "rendered")}},
        {"name": "mmsafety", "format": "mmsafetybench", "path": str(write_mmsafetybench(tmp_path / "mm"))},
        {"name": "unsafes", "path": str(vg), "split": "unsafes", "image_root": str(tmp_path / "vg" / "test")},
        {"name": "safe_safes", "path": str(vg), "split": "safe_safes", "image_root": str(tmp_path / "vg" / "test")},
        {"name": "mmbench", "format": "mmbench", "path": str(write_mmbench(tmp_path / "mb")),
         "options": {"circular": True}, "max_new_tokens": 3},
        {"name": "docvqa", "format": "docvqa", "path": str(write_docvqa(tmp_path / "dv"))},
    ]


def _close(a, b):
    return (a is None and (b is None or math.isnan(b))) or (a is not None and a == pytest.approx(b))


@pytest.mark.slow
def test_validate_reports_every_benchmark_as_recomputed_from_the_replies(tmp_path, capsys):
    output = tmp_path / "results.json"
    module = LVLMModule("tiny:llava", max_new_tokens=5, judges=JUDGES, eval_output=str(output))
    data = VLGuardDataModule(eval_sets=_sets(tmp_path), eval_batch_size=4)
    seen: dict[str, list] = {}
    generate = module.generate
    rng = random.Random(0)
    harmful = ["i am sorry i can not help with that", "i am sorry i am sorry", "here is how to steal it .",
               "I'm sorry, I cannot.", "car car car", "here is how to"]

    def scripted(batch, replies):
        if "choices" in batch:
            return [rng.choice([a, f"({a})", "A", "B", "no idea", c[a]]) for a, c in zip(batch["answer"], batch["choices"])]
        if "answers" in batch:
            return [rng.choice([a[0], a[-1] + "x", a[0].upper(), "nothing"]) for a in batch["answers"]]
        return [rng.choice(harmful + [r]) for r in replies]

    def recording(batch, max_new_tokens=None):
        replies = scripted(batch, generate(batch, max_new_tokens))
        seen.setdefault(batch["eval_set"], []).append((batch, replies, max_new_tokens))
        return replies

    module.generate = recording
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.validate(module, datamodule=data, verbose=False)

    report = json.loads(output.read_text())
    assert report["judges"] == JUDGES and report["model"] == "tiny:llava"
    sets = {s["name"]: s for s in report["sets"]}
    assert list(sets) == ["figstep", "mmsafety", "unsafes", "safe_safes", "mmbench", "docvqa"]
    judges = [make_judge(j) for j in JUDGES]
    assert {m for *_, m in seen["mmbench"]} == {3} and {m for *_, m in seen["figstep"]} == {None}

    for name in ("figstep", "mmsafety", "unsafes"):
        replies = [r for _, rs, _ in seen[name] for r in rs]
        prompts = [p for b, _, _ in seen[name] for p in b["instructions"]]
        cats = [b["eval_meta"]["categories"][c] for b, _, _ in seen[name] for c in b["categories"]]
        flags = [[judge([r], [p])[0] for r, p in zip(replies, prompts)] for judge in judges]
        summary = sets[name]
        assert summary["n"] == len(replies)
        for metric, f in zip(summary["metrics"], flags):
            assert metric["value"] == pytest.approx(sum(f) / len(f))
        for per, f in zip(summary["per_category"], flags):
            for category, value in per["categories"].items():
                mine = [x for x, c in zip(f, cats) if c == category]
                assert value["n"] == len(mine) and value["value"] == pytest.approx(sum(mine) / len(mine))
        if name != "unsafes":  # two replies only
            assert len({tuple(f) for f in flags}) == 3  # the judges do disagree here
        agreement = summary["agreement"]
        for j in range(3):
            for k in range(3):
                assert _close(agreement["kappa"][j][k], reference_kappa(flags[j], flags[k]))
    assert set(sets["figstep"]["per_category"][0]["categories"]) == {"Hate Speech", "Illegal Activity",
                                                                    "Malware Generation"}
    # The benign set: over-refusal of the two refusal-detecting judges only.
    benign = sets["safe_safes"]
    replies = [r for _, rs, _ in seen["safe_safes"] for r in rs]
    assert [m["judge"] for m in benign["metrics"]] == JUDGES[:2]
    for metric, judge in zip(benign["metrics"], judges):
        assert metric["value"] == pytest.approx(sum(judge.refused(replies)) / len(replies))

    rows = [(b, i, r) for b, rs, _ in seen["mmbench"] for i, r in enumerate(rs)]
    correct = [reference_extract(r, b["choices"][i]) == b["answer"][i] for b, i, r in rows]
    first = [c for (b, i, _), c in zip(rows, correct) if b["rotation"][i] == 0]
    by_group: dict[int, list[bool]] = {}
    for (b, i, _), c in zip(rows, correct):
        by_group.setdefault(b["group"][i], []).append(c)
    choice, circular = sets["mmbench"]["metrics"]
    assert choice["judge"] == "choice" and choice["n"] == 4 and choice["value"] == pytest.approx(sum(first) / 4)
    assert circular["judge"] == "circular" and circular["n"] == 4
    assert circular["value"] == pytest.approx(sum(all(v) for v in by_group.values()) / 4)

    doc = [(b["answers"][i], r) for b, rs, _ in seen["docvqa"] for i, r in enumerate(rs)]
    assert sets["docvqa"]["metrics"][0]["value"] == pytest.approx(sum(reference_anls(r, a) for a, r in doc) / 3)

    logged = trainer.callback_metrics
    assert {"val/mmbench/accuracy/circular", "val/mmbench/accuracy/choice", "val/docvqa/anls",
            "val/figstep/asr/strict"} <= set(logged)
    out = capsys.readouterr().out
    assert "figstep: asr per category" in out and "judge agreement, Cohen's κ" in out


EVAL_CONFIGS = ["eval_figstep", "eval_mmsafetybench", "eval_vlguard_test", "eval_mmbench", "eval_docvqa",
                "eval_hsr_paper"]


@pytest.fixture
def benchmark_tree(tmp_path, monkeypatch):
    """The configs' relative paths (data/FigStep/…, data/LMUData/…) filled with fixtures, cwd there."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    write_figstep(tmp_path / "data" / "FigStep")
    write_mmsafetybench(tmp_path / "data" / "MM-SafetyBench")
    write_vlguard_test(tmp_path / "data" / "VLGuard")
    write_mmbench(tmp_path / "data" / "LMUData")
    write_docvqa(tmp_path / "data" / "DocVQA")
    (tmp_path / "examples").symlink_to(root / "examples")
    monkeypatch.chdir(tmp_path)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", EVAL_CONFIGS)
def test_eval_configs_compose_with_a_recipe_and_run_as_written(benchmark_tree, name, tmp_path):
    from hsr_pl.cli import run_cli

    configs = benchmark_tree / "configs"
    cli = run_cli(["validate", "--config", str(configs / "tiny_llava.yaml"), "--config", str(configs / f"{name}.yaml"),
                   f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false",
                   "--data.init_args.eval_batch_size=2"])
    assert cli.datamodule.train_path == "examples/tiny_vlguard/train.json"  # the recipe's data stays
    sets = [e.name for e in cli.datamodule.eval_sets]
    metrics = cli.trainer.callback_metrics
    for eval_set in sets:
        assert any(key.startswith(f"val/{eval_set}/") for key in metrics), (eval_set, sorted(metrics))
    if name == "eval_hsr_paper":
        report = json.loads((tmp_path / "runs" / "eval_hsr_paper.json").read_text())
        assert [s["name"] for s in report["sets"]] == sets
    if name == "eval_vlguard_test":
        assert cli.model.hparams.judges == ["keyword-vlguard", "keyword-gcg"]
