"""SafetyRealignment under DDP (2 CPU processes, gloo): importance statistics and refusal-loss
gradients are reduced across ranks before any selection, so every rank restores the very same
weights, equal to one process over the union of the calibration shards — also at calibration batch
size 2 over shards of 4 + 3 refusals of unequal length (the refusal loss is one token-weighted
mean), and for the gradient order run at ``fit_start``."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file, save_file
from unequal_calibration import write_unequal_set

from hsr_pl.callbacks import Pruning, SafetyRealignment
from hsr_pl.data import VLGuardDataModule
from hsr_pl.models.tiny import build_tiny_llava
from hsr_pl.module import LVLMModule
from hsr_pl.state import get_state

pytestmark = pytest.mark.ddp

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "tiny_vlguard" / "train.json"
HEADS = ["0-1", "1-2"]
# The shipped tiny set: 7 of its 8 utility samples -> shards 4 + 3; its safety split holds only 4
# samples -> 2 + 2. The batch-2 test below uses a set with 7 of each (4 + 3 for both splits).
SAMPLES = 7


def make_module() -> LVLMModule:
    model, processor = build_tiny_llava(False, layers=2, heads=4)
    return LVLMModule(model, processor=processor, max_new_tokens=1)


def make_data(path: Path = TRAIN) -> VLGuardDataModule:
    eval_sets = [{"name": "utility", "path": str(path), "split": "utility", "kind": "utility", "num_samples": 2}]
    return VLGuardDataModule(train_path=str(path), eval_batch_size=1, eval_sets=eval_sets, batch_size=1)


def callbacks(order: str, batch_size: int = 1, when: str = "validation_start") -> list:
    """``order``: the realignment order; ``snip`` is the margin order on SNIP's importance (sums, not means)."""
    extra = dict(budget=20, order="gradient") if order == "gradient" else {}
    return [
        Pruning(method="snip" if order == "snip" else "wanda", num_samples=SAMPLES, when=when),
        SafetyRealignment(heads=HEADS, num_samples=SAMPLES, when=when, table=False, batch_size=batch_size, **extra),
    ]


class SaveRestored(Callback):
    def __init__(self, out: Path, tag: str) -> None:
        self.out, self.tag = out, tag

    def on_validation_start(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:  # after fit_start's realignment, before a step
        self.save(trainer, pl_module)

    def save(self, trainer, pl_module) -> None:
        state = get_state(pl_module)
        tensors = {f"restored/{n}": m.contiguous() for n, m in state.restored.items()}
        tensors.update({f"weight/{n}": lin.weight.detach().cpu().contiguous()
                        for n, lin in pl_module.model.named_modules() if n in state.restored})
        tmp = self.out / f".{self.tag}-rank{trainer.global_rank}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(self.out / f"{self.tag}-rank{trainer.global_rank}.safetensors")


def one_process(order: str, path: Path = TRAIN) -> dict[str, torch.Tensor]:
    """The reference: one process, calibration batch size 1, over the whole set."""
    module = make_module()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         callbacks=callbacks(order))
    trainer.validate(module, datamodule=make_data(path), verbose=False)
    return dict(get_state(module).restored)


def check_ranks(tmp_path: Path, tag: str, reference: dict[str, torch.Tensor], budget: int | None = None) -> None:
    ranks = [load_file(str(tmp_path / f"{tag}-rank{r}.safetensors")) for r in range(2)]
    assert sum(int(m.sum()) for m in reference.values()) > 0
    for name, mask in reference.items():
        for r, saved in enumerate(ranks):
            assert torch.equal(saved[f"restored/{name}"], mask), f"{tag} rank {r}: {name} restore set differs"
        assert torch.equal(ranks[0][f"weight/{name}"], ranks[1][f"weight/{name}"]), name
    if budget is not None:
        assert sum(int(m.sum()) for m in reference.values()) == budget


@pytest.mark.parametrize("order", ["margin", "gradient", "snip"])
def test_every_rank_restores_the_same_weights_as_one_process(tmp_path, order):
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path,
        callbacks=[*callbacks(order), SaveRestored(tmp_path, order)],
    )
    trainer.validate(make_module(), datamodule=make_data(), verbose=False)
    check_ranks(tmp_path, order, one_process(order), 20 if order == "gradient" else None)


def test_gradient_order_at_batch_2_over_unequal_shards_equals_one_process_at_batch_1(tmp_path):
    """7 refusals of unequal length: rank 0 gets 4 (batches 2 + 2), rank 1 gets 3 (2 + 1). A mean
    of per-batch means would weight rank 1's lone sample double; the token-weighted mean does not."""
    path = write_unequal_set(tmp_path)
    data = make_data(path)
    safety = data.calibration_dataset("safety", SAMPLES)
    assert len(safety) == SAMPLES and len({len(r["response"].split()) for r in safety}) >= 4
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path,
        callbacks=[*callbacks("gradient", batch_size=2), SaveRestored(tmp_path, "batch2")],
    )
    trainer.validate(make_module(), datamodule=data, verbose=False)
    check_ranks(tmp_path, "batch2", one_process("gradient", path), 20)


@pytest.mark.slow
def test_gradient_order_at_fit_start_restores_the_same_weights_as_one_process(tmp_path):
    fit = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               limit_val_batches=0, max_steps=1, limit_train_batches=1, num_sanity_val_steps=0,
               default_root_dir=tmp_path)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork",
                         callbacks=[*callbacks("gradient", when="fit_start"), SaveRestored(tmp_path, "fit")], **fit)
    trainer.fit(make_module(), datamodule=make_data())
    single = make_module()
    trainer = pl.Trainer(accelerator="cpu", devices=1,
                         callbacks=[*callbacks("gradient", when="fit_start"), SaveRestored(tmp_path, "single")], **fit)
    trainer.fit(single, datamodule=make_data())
    reference = load_file(str(tmp_path / "single-rank0.safetensors"))
    check_ranks(tmp_path, "fit", {k[len("restored/"):]: v for k, v in reference.items() if k.startswith("restored/")}, 20)
