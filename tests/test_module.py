"""LVLMModule: loading and its errors, the SFT loss, batched greedy generation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hsr_pl.data import VLGuardCollator, load_vlguard
from hsr_pl.models.tiny import build_tiny, save_tiny
from hsr_pl.module import LVLMModule, ModelLoadError

from vlguard_fixture import make_vlguard_fixture


@pytest.fixture
def saved_llava(tmp_path):
    model, processor = build_tiny("llava", gqa=True)
    return save_tiny(model, processor, tmp_path / "tiny-llava"), model


def test_loads_a_local_checkpoint_in_configure_model(saved_llava):
    path, reference = saved_llava
    module = LVLMModule(model=str(path))
    assert module.model is None  # nothing heavy before configure_model
    assert module.processor is not None
    module.configure_model()
    ids = torch.tensor([[2, 5, 8, 9, 6, 8]])
    torch.testing.assert_close(module.model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_load_errors_name_the_problem(tmp_path, saved_llava):
    path, _ = saved_llava
    with pytest.raises(ModelLoadError, match="does not exist"):
        LVLMModule(model=str(tmp_path / "missing"))
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        LVLMModule(model=str(tmp_path / "file.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        LVLMModule(model=str(tmp_path / "empty"))
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "made_up_vlm"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="made_up_vlm.*has no hsr-pl adapter"):
        LVLMModule(model=str(path))
    config["model_type"] = "llava"
    (path / "config.json").write_text(json.dumps(config))
    for name in ("processor_config.json", "tokenizer_config.json", "tokenizer.json"):
        (path / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="no processor or tokenizer"):
        LVLMModule(model=str(path))
    with pytest.raises(ModelLoadError, match="dtype"):
        LVLMModule(model="tiny:llava", dtype="fp8")
    with pytest.raises(ModelLoadError, match="no tiny builder"):
        LVLMModule(model="tiny:nonexistent")


def test_training_step_is_the_nll_of_answer_tokens(tmp_path):
    module = LVLMModule(model="tiny:llava")
    examples = load_vlguard(make_vlguard_fixture(tmp_path, n=4))
    batch = VLGuardCollator(module.processor)(examples)
    loss = module.training_step(batch, 0)
    logits = module.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    labels = batch["labels"]
    total, count = 0.0, 0
    for row in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[row, t] != -100:
                total += -F.log_softmax(logits[row, t - 1], dim=-1)[labels[row, t]].item()
                count += 1
    assert count == int((labels != -100).sum())
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def _greedy_reference(model, ids: torch.Tensor, pixel_values, steps: int, eos: int) -> list[int]:
    """One prompt, no padding, no cache: argmax of a full forward at every step."""
    out: list[int] = []
    for _ in range(steps):
        logits = model(input_ids=ids, pixel_values=pixel_values).logits[0, -1]
        token = int(logits.argmax())
        if token == eos:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_batched_generation_matches_unbatched_greedy_loop(tmp_path):
    module = LVLMModule(model="tiny:llava", max_new_tokens=6)
    examples = load_vlguard(make_vlguard_fixture(tmp_path, n=6))[:5]
    collate = VLGuardCollator(module.processor, with_response=False)
    replies = module.generate(collate(examples))
    tokenizer = module.tokenizer
    assert len(replies) == len(examples)
    for example, reply in zip(examples, replies):
        single = collate([example])
        expected = _greedy_reference(module.model, single["input_ids"], single["pixel_values"], 6, tokenizer.eos_token_id)
        assert reply == tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_lr_factor_warmup_then_cosine_to_floor():
    from hsr_pl.module import lr_factor

    f = [lr_factor(s, warmup=4, total=13, schedule="cosine", floor=0.05) for s in range(13)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # monotone decay after warm-up
    # Half way through the decay the cosine sits half way between 1 and the floor.
    assert f[8] == pytest.approx(0.05 + 0.95 * 0.5)
    assert [lr_factor(s, warmup=0, total=5, schedule="constant", floor=0.0) for s in range(5)] == [1.0] * 5
    with pytest.raises(ValueError, match="lr_schedule"):
        LVLMModule(model="tiny:llava", lr_schedule="linear")


def test_organism_init_builds_the_organism_architecture():
    module = LVLMModule(model="organism:init", init_seed=3)
    text = module.model.config.text_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.hidden_size) == (4, 8, 128)
    again = LVLMModule(model="organism:init", init_seed=3)
    for (name, a), (_, b) in zip(module.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b), name
