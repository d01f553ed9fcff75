"""evaluate() outside Lightning's loop gives the numbers LVLMModule.validate logs."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest

from hsr_pl.data import VLGuardDataModule
from hsr_pl.evaluation.runner import evaluate, headline
from hsr_pl.module import LVLMModule

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "tiny_vlguard" / "train.json"


def test_evaluate_equals_the_validation_loop():
    module = LVLMModule("tiny:llava", max_new_tokens=3, judges=["keyword-gcg-nocase", "strict"],
                        refusal="i am sorry i cannot help with that .")
    eval_sets = [
        {"name": "harmful_image", "path": str(TRAIN), "split": "safety", "kind": "harmful"},
        {"name": "utility", "path": str(TRAIN), "split": "utility", "kind": "utility"},
        {"name": "benign", "path": str(TRAIN), "split": "utility", "kind": "benign"},
    ]
    data = VLGuardDataModule(train_path=str(TRAIN), eval_sets=eval_sets, eval_batch_size=3, processor=module.processor)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=data, verbose=False)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    data.setup("validate")
    results = evaluate(module, data.val_dataloader())
    assert set(results) == {"harmful_image", "utility", "benign"}
    for name, row in results.items():
        for key, value in row.items():
            if key in ("kind", "n"):
                continue
            log_key = f"val/{name}/" + key.replace("[", "/").replace("]", "")
            assert value == pytest.approx(logged[log_key]), log_key
    top = headline(results, "strict")
    assert top["asr"] == results["harmful_image"]["asr[strict]"] == top["asr_image"]
    assert top["utility"] == results["utility"]["utility[contains]"]
    assert top["over_refusal"] == results["benign"]["over_refusal[strict]"]
    assert top["n_harmful"] == results["harmful_image"]["n"] > 0
