"""The hsr-pl LightningCLI: fit and validate from the YAML in configs/, as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hsr_pl.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_llava.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    # The example config names paths relative to the repository root, as the README runs it.
    monkeypatch.chdir(ROOT)


def test_fit_runs_sft_steps_and_changes_weights(tmp_path):
    cli = run_cli(["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}",
                "--trainer.limit_val_batches=0", "--trainer.logger=false"])
    assert cli.trainer.global_step == 4
    loss = cli.trainer.callback_metrics["train/loss"]
    assert loss.isfinite()
    from hsr_pl.models.tiny import build_tiny

    fresh, _ = build_tiny("llava")  # the same seed: the weights before training
    moved = [
        name for name, p in cli.model.model.named_parameters()
        if not p.detach().equal(dict(fresh.named_parameters())[name].detach())
    ]
    assert moved, "fit changed no weight"


def test_validate_prints_a_table_with_the_judge_name(tmp_path, capsys):
    cli = run_cli(["validate", "--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}",
                "--trainer.logger=false"])
    metrics = cli.trainer.callback_metrics
    assert any(key.startswith("val/harmful/asr/keyword-gcg") for key in metrics), sorted(metrics)
    assert any(key.startswith("val/utility/") for key in metrics), sorted(metrics)
    out = capsys.readouterr().out
    assert "hsr-pl evaluation" in out and "keyword-gcg" in out


@pytest.mark.slow
def test_only_fit_and_validate_are_offered():
    result = subprocess.run([sys.executable, "-m", "hsr_pl", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "{fit,validate}" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "hsr_pl", "predict"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0


@pytest.mark.slow
def test_print_config_round_trips(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hsr_pl", "validate", "--config", str(CONFIG), "--print_config"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "tiny:llava" in result.stdout and "hsr_pl.data.VLGuardDataModule" in result.stdout


def test_eval_table_keeps_counts_in_a_narrow_console():
    from rich.console import Console

    from hsr_pl.report.evaluation import print_eval_table

    console = Console(width=80, record=True, force_terminal=False)
    rows = [("utility_paraphrase", "utility", 300, {"utility[contains]": 0.68}),
            ("harmful_image", "harmful", 300, {"asr[keyword-gcg-nocase]": 0.75, "asr[coherent-compliance]": 0.747}),
            ("benign", "benign", 300, {"over_refusal[keyword-gcg-nocase]": 0.0})]
    print_eval_table([(name, kind, values, n) for name, kind, n, values in rows], console=console)
    text = console.export_text()
    assert text.count("300") == 3
    assert "asr[keyword-gcg-nocase]" in text and "75.0 %" in text and "74.7 %" in text


def test_optimizer_is_overridable_from_the_cli(tmp_path):
    import torch

    cli = run_cli(["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}",
                   "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.max_steps=1",
                   "--optimizer=torch.optim.SGD", "--optimizer.lr=0.05"])
    (optimizer,) = cli.trainer.optimizers
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == 0.05
