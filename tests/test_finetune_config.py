"""configs/organism_finetune.yaml as written: HSR at fit_start, then SFT steps on benign data only;
the masks hold after every step and the restored weights stay free to train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hsr_pl.cli import run_cli
from hsr_pl.data.synthetic import REFUSAL
from hsr_pl.state import get_state

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_finetune_config_keeps_masks_and_trains_restored_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's runs/ paths land here
    cli = run_cli(["fit", "--config", str(ROOT / "configs" / "organism_finetune.yaml"), "--trainer.max_steps=3",
                   "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
                   "--data.init_args.batch_size=8"])
    module, trainer = cli.model, cli.trainer
    assert trainer.global_step == 3
    state = get_state(module)
    assert state.method == "wanda" and state.realignment["restored_params"] == 107  # 1‱ of 1,071,488
    modules = dict(module.model.named_modules())
    moved = 0
    for name in state.pruned:
        weight = modules[name].weight.detach()
        assert bool((weight[~state.keep_mask(name)] == 0).all()), name
        if name in state.restored:
            assert bool((weight[state.restored[name]] != 0).all()), name
    # the restored entries were trained: they moved away from their original values
    for name, restored in state.restored.items():
        original = state.original_weight(name, torch.zeros_like(modules[name].weight.detach()))
        moved += int((modules[name].weight.detach()[restored] != original[restored]).sum())
    assert moved > 0
    # benign data only: no training example answers with the refusal
    batch = next(iter(trainer.datamodule.train_dataloader()))
    texts = module.tokenizer.batch_decode(torch.where(batch["labels"] == -100, module.tokenizer.pad_token_id, batch["labels"]),
                                          skip_special_tokens=True)
    assert not any(REFUSAL in t for t in texts)
    assert (tmp_path / "runs" / "organism_finetune" / "realignment.json").is_file()
