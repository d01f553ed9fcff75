"""SafetyHeadAttribution under DDP (2 CPU processes, gloo): the heads are split across ranks, each
rank scores its share on the *whole* calibration set, the scores are all-gathered, and every rank
ends with the scores and top-h of a 1-process scan.

Exactness: a head's score is a mean over the full calibration set computed on one rank, so with
whole layers per rank (3 layers: rank 0 gets layer 0, rank 1 layers 1-2) the float32 scores equal
the 1-process scan bit for bit. A 1-layer model forces the split of a layer's heads across the two
ranks (smaller batched forwards): equal to float rounding. A 1-process scan killed after layer 0
is resumed under 2 processes (rank 0 reads and broadcasts the partial file): the remaining layers
are split and the final scores equal the uninterrupted scan exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from hsr_pl.attribution import ScoreConfig, head_scores
from hsr_pl.callbacks import SafetyHeadAttribution
from hsr_pl.data import VLGuardDataModule
from hsr_pl.models.tiny import build_tiny_llava
from hsr_pl.module import LVLMModule
from hsr_pl.state import get_state

pytestmark = pytest.mark.ddp

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "tiny_vlguard" / "train.json"
SETTINGS = dict(positions="response", num_samples=4, batch_size=2, top_h=5)


def make_module(layers: int = 3) -> LVLMModule:
    model, processor = build_tiny_llava(layers=layers, heads=4)
    return LVLMModule(model, processor=processor, max_new_tokens=1)


def make_data(processor=None) -> VLGuardDataModule:
    eval_sets = [{"name": "harmful", "path": str(TRAIN), "split": "safety", "kind": "harmful", "num_samples": 2}]
    return VLGuardDataModule(train_path=str(TRAIN), eval_batch_size=1, eval_sets=eval_sets, processor=processor)


class Tracking(SafetyHeadAttribution):
    """Remembers which heads this rank scored itself."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scored: list[str] = []

    def on_layer_scored(self, layer, scores) -> None:
        self.scored.extend(sorted(scores))
        super().on_layer_scored(layer, scores)


class ScanKilled(RuntimeError):
    pass


class KilledAfterFirstLayer(SafetyHeadAttribution):
    def on_layer_scored(self, layer, scores) -> None:
        super().on_layer_scored(layer, scores)
        raise ScanKilled("killed after layer 0")


class RecordOnEveryRank(Callback):
    """After SafetyHeadAttribution: save what this rank holds; then, through the same callback code
    path (same process group), score a 1-layer model whose 4 heads must be split over 2 ranks, and
    resume a 1-process scan that was killed after layer 0."""

    def __init__(self, out: Path, killed: Path) -> None:
        self.out = out
        self.killed = killed

    def on_validation_start(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        shallow = make_module(layers=1)
        callback = Tracking(**{**SETTINGS, "top_h": 2}, when="validation_start", heatmap=False)
        callback.run(trainer, shallow)
        resumed = Tracking(**SETTINGS, output=str(self.killed), resume=True, when="validation_start", heatmap=False)
        resumed_module = make_module()
        resumed.run(trainer, resumed_module)
        main = next(c for c in trainer.callbacks if isinstance(c, Tracking))
        record = {
            "world": trainer.world_size,
            "deep": {"scores": get_state(pl_module).head_scores, "top": get_state(pl_module).top_heads,
                     "scored": main.scored},
            "shallow": {"scores": get_state(shallow).head_scores, "top": get_state(shallow).top_heads,
                        "scored": callback.scored},
            "resumed": {"scores": get_state(resumed_module).head_scores, "scored": resumed.scored},
        }
        (self.out / f"rank{rank}.json").write_text(json.dumps(record))


def single_process(layers: int) -> dict[str, float]:
    module = make_module(layers)
    batches = [
        {k: v for k, v in b.items() if isinstance(v, torch.Tensor)}
        for b in make_data(module.processor).calibration_dataloader("safety", 4, with_response=True, batch_size=2)
    ]
    return head_scores(module.model.eval(), batches, ScoreConfig(positions="response"), engine="exact")


def test_ddp_scores_equal_one_process(tmp_path):
    killed = tmp_path / "killed" / "heads.json"
    module = make_module()
    one = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, limit_val_batches=1,
                     enable_model_summary=False, default_root_dir=tmp_path,
                     callbacks=[KilledAfterFirstLayer(**SETTINGS, output=str(killed), when="validation_start")])
    with pytest.raises(ScanKilled):
        one.validate(module, datamodule=make_data(), verbose=False)
    assert (killed.parent / "heads.partial.json").is_file()

    output = tmp_path / "heads.json"
    callbacks = [
        Tracking(**SETTINGS, output=str(output), when="validation_start", progress_bar=False),
        RecordOnEveryRank(tmp_path, killed),
    ]
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer.validate(make_module(), datamodule=make_data(), verbose=False)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    deep, shallow = single_process(3), single_process(1)
    for r, record in enumerate(ranks):
        assert record["deep"]["scores"] == deep, f"rank {r}: scores differ from one process"
        ranked = sorted(deep, key=lambda k: (-deep[k], tuple(map(int, k.split("-")))))[:5]
        assert record["deep"]["top"] == [list(map(int, k.split("-"))) for k in ranked], f"rank {r}"
        assert set(record["shallow"]["scores"]) == set(shallow)
        for key, value in shallow.items():
            assert math.isclose(record["shallow"]["scores"][key], value, rel_tol=1e-5, abs_tol=1e-8), (r, key)
    # The split: whole layers per rank when there are enough (layer 0 re-runs 3 layers, 1 and 2 together 3),
    # the heads of the single layer halved otherwise.
    assert ranks[0]["deep"]["scored"] == [f"0-{h}" for h in range(4)]
    assert ranks[1]["deep"]["scored"] == [f"{layer}-{h}" for layer in (1, 2) for h in range(4)]
    assert [r["shallow"]["scored"] for r in ranks] == [["0-0", "0-1"], ["0-2", "0-3"]]
    assert ranks[0]["shallow"] == {**ranks[1]["shallow"], "scored": ranks[0]["shallow"]["scored"]}  # all-gathered: the very same numbers on both ranks
    # Resume of the 1-process partial under 2 processes: only layers 1 and 2 scanned, one each.
    assert [r["resumed"]["scores"] for r in ranks] == [deep, deep]
    assert sorted(k for r in ranks for k in r["resumed"]["scored"]) == [f"{la}-{h}" for la in (1, 2) for h in range(4)]
    assert all({k.split("-")[0] for k in r["resumed"]["scored"]} in ({"1"}, {"2"}) for r in ranks)
    assert json.loads(killed.read_text()) == deep and not list(killed.parent.glob("*partial*"))
    assert json.loads(output.read_text()) == deep  # written once, by rank 0, in the released format
    assert not list(tmp_path.glob("heads.partial*"))  # per-rank partial files cleaned up
