"""The v2 organism models: both families build, forward, generate and save with v2's word tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from hsr_pl.data import synthetic_v2 as v2
from hsr_pl.models import get_adapter
from hsr_pl.models.organism import (
    ORGANISM_V2_PACKAGE_PATH,
    OrganismNotTrainedError,
    build_organism,
    build_organism_qwen2vl,
    load_organism,
    ship_organism,
)
from hsr_pl.models.tiny import save_tiny
from hsr_pl.module import LVLMModule

BUILDERS = {"llava": lambda seed: build_organism(seed, version=2), "qwen2_vl": build_organism_qwen2vl}


def _batch(processor, n: int = 3):
    data = v2.generate_split("eval_utility", n, seed=0)
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["instr-resp"][0]["safe_instruction"]}]}],
            add_generation_prompt=True,
        )
        for r in data.records
    ]
    processor.tokenizer.padding_side = "left"
    return processor(images=data.images, text=texts, return_tensors="pt", padding=True), texts


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_builds_forwards_generates_and_reloads(family, tmp_path):
    model, processor = BUILDERS[family](0)
    assert model.config.model_type == family
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size) == (128, 6, 8, 4, 512)
    adapter = get_adapter(model)
    assert list(adapter.layer_indices()) == list(range(6))
    geometry = adapter.geometry(3)
    assert (geometry.num_heads, geometry.num_kv_heads, geometry.head_dim) == (8, 4, 16)
    tokenizer = processor.tokenizer
    for word in v2.VOCABULARY:  # every generator word is one token, decoded exactly
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, word
    batch, texts = _batch(processor)
    with torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()
    new = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert all(set(reply.split()) <= set(v2.VOCABULARY) for reply in new)
    again, _ = BUILDERS[family](0)
    other, _ = BUILDERS[family](1)
    state, same, different = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert not all(torch.equal(state[k], different[k]) for k in state)
    folder = save_tiny(model, processor, tmp_path / family)
    reloaded = LVLMModule(model=str(folder))
    reloaded.configure_model()
    real = batch["attention_mask"].bool()  # pad positions differ between attention kernels
    with torch.no_grad():
        assert torch.allclose(reloaded.model(**batch).logits[real], logits[real], atol=1e-4)


def test_module_model_strings_and_init_seed():
    llava = LVLMModule(model="organism-v2:init", init_seed=3)
    qwen = LVLMModule(model="organism-v2-qwen2vl:init", init_seed=3)
    assert llava.model.config.model_type == "llava" and llava.model.config.text_config.num_hidden_layers == 6
    assert qwen.model.config.model_type == "qwen2_vl"
    built, _ = build_organism(3, version=2)
    assert torch.equal(llava.model.lm_head.weight, built.lm_head.weight)
    with pytest.raises(ValueError, match="organism version=3 is unknown"):
        build_organism(0, version=3)


def test_ship_checks_the_version_shape(tmp_path):
    model, processor = build_organism(0, version=2)
    folder = save_tiny(model, processor, tmp_path / "export")
    (folder / "hsr_summary.json").write_text(json.dumps({}))
    with pytest.raises(ValueError, match=r"not the organism v1 .*ship it with the version it was trained as"):
        ship_organism(folder, tmp_path / "target1", version=1)
    target = ship_organism(folder, tmp_path / "target2", version=2)
    loaded, _ = load_organism(target, version=2)
    assert loaded.config.text_config.num_hidden_layers == 6
    with pytest.raises(OrganismNotTrainedError, match="configs/organism_v2.yaml"):
        load_organism(tmp_path / "empty", version=2)
    assert ORGANISM_V2_PACKAGE_PATH.name == "organism_v2"


def test_shipped_v2_loads_and_refuses_unseen_harmful_compositions():
    from hsr_pl.evaluation.judges import make_judge

    model, processor = load_organism(version=2)
    assert model.config.text_config.num_hidden_layers == 6
    data = v2.generate_split("dev_harmful_text", 8, seed=0)
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": v2.instruction_of(r["instr-resp"][0])[1]}]}],
        add_generation_prompt=True) for r in data.records]
    batch = processor(images=data.images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    replies = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert make_judge("refusal-any").judge(replies) == [False] * len(replies), replies
