"""Every top-level config in configs/ parses as written (LightningCLI --print_config: classes,
argument names and types are checked; nothing runs)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from hsr_pl.cli import main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _subcommand(config: Path) -> str:
    """``fit`` for the training configs (they carry an optimiser schedule), else ``validate``."""
    text = config.read_text(encoding="utf-8")
    return "fit" if "hsr-pl fit" in text.split("seed_everything")[0] else "validate"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses_as_written(config):
    # A fragment without a model (the eval_* sets) is composed with a recipe, as its comment says.
    fragment = "model" not in (yaml.safe_load(config.read_text(encoding="utf-8")) or {})
    base = ["--config", str(ROOT / "configs" / "tiny_llava.yaml")] if fragment else []
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main([_subcommand(config), *base, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None), out.getvalue()[-2000:]
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["class_path"] == "hsr_pl.module.LVLMModule"
