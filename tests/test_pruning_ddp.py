"""Pruning under DDP (2 CPU processes, gloo): every rank calibrates on its shard, statistics are
all-reduced before masks are chosen, and the masks equal a 1-process run over the union.

Exactness: each rank's Wanda/SparseGPT statistic is a running mean over its own samples; the
callback weights rank r's statistic by n_r / N before the sum all-reduce, which is the union's
mean for unequal shards too (7 samples -> 4 + 3 is tested), up to float rounding.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file, save_file

from hsr_pl.callbacks import Pruning
from hsr_pl.data import VLGuardDataModule
from hsr_pl.models import get_adapter
from hsr_pl.module import LVLMModule
from hsr_pl.state import get_state

pytestmark = pytest.mark.ddp

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "tiny_vlguard" / "train.json"
WANDA_SAMPLES = 7  # unequal shards: 4 + 3
SPARSEGPT_SAMPLES = 8  # equal shards: 4 + 4


def make_data(**kwargs) -> VLGuardDataModule:
    eval_sets = [{"name": "utility", "path": str(TRAIN), "split": "utility", "kind": "utility", "num_samples": 2}]
    return VLGuardDataModule(train_path=str(TRAIN), eval_batch_size=1, eval_sets=eval_sets, **kwargs)


def make_module() -> LVLMModule:
    return LVLMModule("tiny:llava", max_new_tokens=2)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def _dump(prefix: str, pl_module, out: Path, rank: int) -> None:
    state = get_state(pl_module)
    targets = get_adapter(pl_module.model).target_linears()
    tensors = {f"mask/{n}": m for n, m in state.pruned.items()}
    tensors.update({f"weight/{n}": lin.weight.detach().cpu() for n, lin in targets.items()})
    _atomic_save(tensors, out / f"{prefix}-rank{rank}.safetensors")


class SaveFromRanks(Callback):
    """Runs on every rank after Pruning: saves its masks, then prunes a fresh model with SparseGPT
    through the same callback code path (same process group) and saves that too."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_validation_start(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        _dump("wanda", pl_module, self.out, rank)
        fresh = make_module()
        sparsegpt = Pruning(method="sparsegpt", num_samples=SPARSEGPT_SAMPLES, when="validation_start")
        sparsegpt.run(trainer, fresh)
        _dump("sparsegpt", fresh, self.out, rank)


def _single_process(method: str, num_samples: int):
    module = make_module()
    data = make_data(processor=module.processor)
    batches = list(data.calibration_dataloader("utility", num_samples, with_response=True, batch_size=1))
    Pruning(method=method, num_samples=num_samples).prune(module, batches)
    return module


def test_ddp_masks_equal_one_process_over_the_union(tmp_path):
    callbacks = [Pruning(method="wanda", num_samples=WANDA_SAMPLES, when="validation_start"), SaveFromRanks(tmp_path)]
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer.validate(make_module(), datamodule=make_data(), verbose=False)

    for method, samples in (("wanda", WANDA_SAMPLES), ("sparsegpt", SPARSEGPT_SAMPLES)):
        ranks = [load_file(str(tmp_path / f"{method}-rank{r}.safetensors")) for r in range(2)]
        reference = _single_process(method, samples)
        state = get_state(reference)
        linears = dict(reference.model.named_modules())
        assert sorted(k.removeprefix("mask/") for k in ranks[0] if k.startswith("mask/")) == sorted(state.pruned)
        for name, mask in state.pruned.items():
            for r, saved in enumerate(ranks):
                assert torch.equal(saved[f"mask/{name}"], mask), f"{method} rank {r}: {name} mask differs"
            # Every rank holds the same weights; SparseGPT's updated weights match up to float rounding.
            assert torch.equal(ranks[0][f"weight/{name}"], ranks[1][f"weight/{name}"]), name
            torch.testing.assert_close(ranks[0][f"weight/{name}"], linears[name].weight.detach(), rtol=1e-4, atol=1e-5)
