"""``budget: auto`` end to end on the shipped organism (Wanda 60 %, its four top heads given, the
synthetic dev sets): two runs restore the same set; under DDP (2 CPU processes, gloo) the dev
prompts are split over the ranks, every rank sees the same dev numbers and takes the same stop
decision, and the result equals one process; a fixed budget runs the dev check once."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file, save_file

from hsr_pl.callbacks import Pruning, SafetyRealignment
from hsr_pl.data import SyntheticDataModule
from hsr_pl.module import LVLMModule
from hsr_pl.realign import GradientOrder
from hsr_pl.state import get_state

HEADS = ["0-7", "0-0", "0-5", "0-3"]  # the organism's top-4 Ships heads (configs/demo.yaml's scan)
REFUSAL = "i am sorry i can not help with that"


class SaveRun(Callback):
    """Each rank's restore masks and realignment report, written at validation start (after realignment)."""

    def __init__(self, out: Path, tag: str) -> None:
        self.out, self.tag = out, tag

    def on_validation_start(self, trainer, pl_module) -> None:
        state = get_state(pl_module)
        rank = trainer.global_rank
        save_file({n: m.contiguous() for n, m in state.restored.items()}, str(self.out / f"{self.tag}-{rank}.safetensors"))
        (self.out / f"{self.tag}-{rank}.json").write_text(json.dumps(state.realignment, default=str))


def run(tmp_path: Path, tag: str, devices: int = 1, method: GradientOrder | None = None) -> list[tuple[dict, dict]]:
    module = LVLMModule("organism", max_new_tokens=12, judges=["keyword-gcg-nocase", "strict"], refusal=REFUSAL)
    data = SyntheticDataModule(seed=0, eval_splits=["eval_harmful_image"], eval_num_samples=2, eval_batch_size=2)
    callbacks = [
        Pruning(method="wanda", sparsity=0.6, calibration="utility", num_samples=32, when="validation_start"),
        SafetyRealignment(heads=HEADS, method=method or GradientOrder(dev_samples=24), num_samples=32,
                          safety_calibration="safety+over_refusal", batch_size=1, table=False),
        SaveRun(tmp_path, tag),
    ]
    extra = {"strategy": "ddp_fork"} if devices > 1 else {}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         default_root_dir=str(tmp_path), callbacks=callbacks, **extra)
    trainer.validate(module, datamodule=data, verbose=False)
    return [(load_file(str(tmp_path / f"{tag}-{r}.safetensors")), json.loads((tmp_path / f"{tag}-{r}.json").read_text()))
            for r in range(devices)]


def same_masks(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_auto_runs_restore_the_same_set_and_report_the_trajectory(tmp_path):
    (first, report), = run(tmp_path, "a")
    (second, again), = run(tmp_path, "b")
    auto = report["auto"]
    assert auto["rounds"], "no round ran: the organism's dev ASR rose, so the loop must restore"
    assert report["restored_params"] == auto["final"]["restored"] > 0
    assert same_masks(first, second)
    assert [_numbers(r, loss=True) for r in again["auto"]["rounds"]] == [_numbers(r, loss=True) for r in auto["rounds"]]
    assert auto["stop"]["reason"] and auto["judge"] == "keyword-gcg-nocase"
    assert set(auto["dense"]["asr_by_judge"]) == {"keyword-gcg-nocase", "strict"}
    assert [r["restored"] for r in auto["rounds"]] == auto["schedule"][: len(auto["rounds"])]
    assert all(r["refusal_loss"] is not None and r["seconds"] > 0 for r in auto["rounds"])


@pytest.mark.ddp
def test_ddp_ranks_take_the_same_decisions_as_one_process(tmp_path):
    (one, report), = run(tmp_path, "one")
    (masks0, report0), (masks1, report1) = run(tmp_path, "two", devices=2)
    assert report["auto"]["rounds"], "no round ran: the test could not tell decisions apart"
    # the ranks agree with each other on everything but the wall times
    assert same_masks(masks0, masks1)
    assert _auto(report0, loss=True) == _auto(report1, loss=True)
    # and with one process (the refusal NLL's float sums may differ in the last bits across world sizes)
    assert same_masks(masks0, one)
    assert _auto(report0) == _auto(report)


def _numbers(point: dict, loss: bool = False) -> dict:
    return {k: v for k, v in point.items() if k != "seconds" and (loss or k != "refusal_loss")}


def _auto(report: dict, loss: bool = False) -> str:
    auto = report["auto"]
    points = {k: _numbers(auto[k], loss) for k in ("dense", "pruned", "final")}
    rounds = [_numbers(r, loss) for r in auto["rounds"] + auto["bisection"]]
    return json.dumps({**auto, **points, "rounds": rounds, "bisection": []}, sort_keys=True)


@pytest.mark.slow
def test_fixed_budget_runs_the_dev_check_once(tmp_path):
    (_, report), = run(tmp_path, "fixed", method=GradientOrder(budget=26, dev_samples=24))
    check = report["dev_check"]
    assert "auto" not in report and report["restored_params"] == 26
    assert check["realigned"]["restored"] == 26 and check["pruned"]["asr"] > check["dense"]["asr"]
    assert check["target_met"] == (check["residual"] is None)
