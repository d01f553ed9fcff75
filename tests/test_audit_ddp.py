"""The safety audit under DDP (2 CPU processes, gloo): each rank answers its share of every set's
prompts (unequal shares: 21 prompts -> 11 + 10), the verdicts are gathered in prompt order, and the
audit equals a 1-process run of the same flow, number for number."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from hsr_pl.callbacks import Pruning, SafetyAudit
from hsr_pl.data import SyntheticDataModule
from hsr_pl.module import LVLMModule

pytestmark = pytest.mark.ddp

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "audit.yaml"


def _run(tmp_path, devices: int) -> dict:
    config = yaml.safe_load(CONFIG.read_text())
    module = LVLMModule(**config["model"]["init_args"])
    data = SyntheticDataModule(**{**config["data"]["init_args"], "eval_num_samples": 21, "eval_batch_size": 4})
    folder = tmp_path / f"devices{devices}"
    callbacks = [SafetyAudit(resamples=200, output_dir=str(folder)),
                 Pruning(**config["trainer"]["callbacks"][1]["init_args"])]
    extra = {"strategy": "ddp_fork"} if devices > 1 else {}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         default_root_dir=str(tmp_path), **extra)
    trainer.validate(module, datamodule=data, verbose=False)
    return json.loads((folder / "audit.json").read_text())


def test_ddp_audit_equals_one_process(tmp_path):
    one, two = _run(tmp_path, 1), _run(tmp_path, 2)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["n"] == two["n"] and set(one["n"].values()) == {21}
    # the prompts were split over the ranks, not answered twice
    assert set(map(tuple, two["prompts_per_rank"].values())) == {(11, 10)}
    assert set(map(tuple, one["prompts_per_rank"].values())) == {(21,)}
    for key in ("results", "asr", "over_refusal", "utility", "agreement", "verdicts"):
        assert one[key] == two[key], key
