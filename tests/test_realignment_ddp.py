"""SafetyRealignment under DDP (2 CPU processes, gloo): importance statistics and refusal-loss
gradients are reduced across ranks before any selection, so every rank restores the very same
weights, equal to one process over the union of the calibration shards."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file, save_file

from hsr_pl.callbacks import Pruning, SafetyRealignment
from hsr_pl.data import VLGuardDataModule
from hsr_pl.models.tiny import build_tiny_llava
from hsr_pl.module import LVLMModule
from hsr_pl.state import get_state

pytestmark = pytest.mark.ddp

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "tiny_vlguard" / "train.json"
HEADS = ["0-1", "1-2"]
SAMPLES = 7  # unequal shards: 4 + 3


def make_module() -> LVLMModule:
    model, processor = build_tiny_llava(False, layers=2, heads=4)
    return LVLMModule(model, processor=processor, max_new_tokens=1)


def make_data() -> VLGuardDataModule:
    eval_sets = [{"name": "utility", "path": str(TRAIN), "split": "utility", "kind": "utility", "num_samples": 2}]
    return VLGuardDataModule(train_path=str(TRAIN), eval_batch_size=1, eval_sets=eval_sets)


def callbacks(order: str) -> list:
    """``order``: the realignment order; ``snip`` is the margin order on SNIP's importance (sums, not means)."""
    extra = dict(budget=20, order="gradient") if order == "gradient" else {}
    return [
        Pruning(method="snip" if order == "snip" else "wanda", num_samples=SAMPLES, when="validation_start"),
        SafetyRealignment(heads=HEADS, num_samples=SAMPLES, when="validation_start", table=False, **extra),
    ]


class SaveRestored(Callback):
    def __init__(self, out: Path, tag: str) -> None:
        self.out, self.tag = out, tag

    def on_validation_start(self, trainer, pl_module) -> None:
        state = get_state(pl_module)
        tensors = {f"restored/{n}": m.contiguous() for n, m in state.restored.items()}
        tensors.update({f"weight/{n}": lin.weight.detach().cpu().contiguous()
                        for n, lin in pl_module.model.named_modules() if n in state.restored})
        tmp = self.out / f".{self.tag}-rank{trainer.global_rank}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(self.out / f"{self.tag}-rank{trainer.global_rank}.safetensors")


def one_process(order: str) -> dict[str, torch.Tensor]:
    module = make_module()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         callbacks=callbacks(order))
    trainer.validate(module, datamodule=make_data(), verbose=False)
    return dict(get_state(module).restored)


@pytest.mark.parametrize("order", ["margin", "gradient", "snip"])
def test_every_rank_restores_the_same_weights_as_one_process(tmp_path, order):
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path,
        callbacks=[*callbacks(order), SaveRestored(tmp_path, order)],
    )
    trainer.validate(make_module(), datamodule=make_data(), verbose=False)
    ranks = [load_file(str(tmp_path / f"{order}-rank{r}.safetensors")) for r in range(2)]
    reference = one_process(order)
    assert sum(int(m.sum()) for m in reference.values()) > 0
    for name, mask in reference.items():
        for r, saved in enumerate(ranks):
            assert torch.equal(saved[f"restored/{name}"], mask), f"{order} rank {r}: {name} restore set differs"
        assert torch.equal(ranks[0][f"weight/{name}"], ranks[1][f"weight/{name}"]), name
    if order == "gradient":
        assert sum(int(m.sum()) for m in reference.values()) == 20
