"""The organism model: architecture, tokenizer/prompt format, determinism, save/load."""

from __future__ import annotations

import pytest
import torch

from hsr_pl.data.synthetic import REFUSAL, VOCABULARY, generate_split
from hsr_pl.models import get_adapter
from hsr_pl.models.organism import (
    ORGANISM_PACKAGE_PATH,
    OrganismNotTrainedError,
    build_organism,
    load_organism,
)
from hsr_pl.models.tiny import save_tiny


@pytest.fixture(scope="module")
def organism():
    return build_organism(seed=0)


def _prompt_batch(processor, n: int = 3):
    data = generate_split("eval_utility", n, seed=0)
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["instr-resp"][0]["safe_instruction"]}]}],
            add_generation_prompt=True,
        )
        for r in data.records
    ]
    processor.tokenizer.padding_side = "left"
    return processor(images=data.images, text=texts, return_tensors="pt", padding=True), texts, data


def test_architecture_matches_the_design(organism):
    model, _ = organism
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size) == (128, 4, 8, 8, 512)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.image_size,
            vision.patch_size) == (128, 1, 4, 32, 8)
    assert model.config.vision_feature_layer == -1 and model.config.vision_feature_select_strategy == "default"
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()  # untied
    adapter = get_adapter(model)
    assert list(adapter.layer_indices()) == [0, 1, 2, 3]
    pruned = sum(linear.weight.numel() for linear in adapter.target_linears().values())
    assert len(adapter.target_linears()) == 28 and pruned == 4 * (4 * 128 * 128 + 3 * 128 * 512)
    geometry = adapter.geometry(0)
    assert (geometry.num_heads, geometry.num_kv_heads, geometry.head_dim) == (8, 8, 16)


def test_gqa_variant():
    model, _ = build_organism(seed=0, gqa=True)
    geometry = get_adapter(model).geometry(2)
    assert (geometry.num_heads, geometry.num_kv_heads, geometry.group_size) == (8, 4, 2)


def test_tokenizer_covers_the_vocabulary_and_the_prompt_format(organism):
    _, processor = organism
    tok = processor.tokenizer
    for word in VOCABULARY:
        assert tok.convert_tokens_to_ids(word) != tok.unk_token_id, word
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it ?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "it is red ."}]}],
    )
    assert text.split() == ["<s>user", ":", "<image>", "what", "colour", "is", "it", "?", "assistant", ":",
                            "it", "is", "red", ".", "</s>"]
    batch, _, _ = _prompt_batch(processor, n=1)
    tokens = tok.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens[:3] == ["<s>", "user", ":"] and tokens[3:19] == ["<image>"] * 16 and tokens[19] != "<image>"
    assert tokens[-2:] == ["assistant", ":"]
    assert tok.decode(tok(REFUSAL, add_special_tokens=False)["input_ids"]) == REFUSAL


def test_forward_generate_and_seeding(organism):
    model, processor = organism
    batch, _, _ = _prompt_batch(processor)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[-1] == len(processor.tokenizer)
    assert torch.isfinite(logits).all()
    again, _ = build_organism(seed=0)
    other, _ = build_organism(seed=1)
    first = dict(model.named_parameters())
    assert all(torch.equal(p, first[n]) for n, p in again.named_parameters())
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
    state = torch.random.get_rng_state()
    build_organism(seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG stream is untouched
    with pytest.raises(TypeError, match="seed"):
        build_organism(seed="0")


def test_save_and_load_round_trip(organism, tmp_path):
    model, processor = organism
    save_tiny(model, processor, tmp_path)
    loaded, loaded_processor = load_organism(tmp_path)
    batch, texts, data = _prompt_batch(processor)
    batch2 = loaded_processor(images=data.images, text=texts, return_tensors="pt", padding=True)
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    assert torch.equal(batch["pixel_values"], batch2["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch2).logits)


def test_load_without_checkpoint_says_how_to_train(tmp_path):
    with pytest.raises(OrganismNotTrainedError, match=r"hsr-pl fit --config configs/organism.yaml"):
        load_organism(tmp_path)
    assert ORGANISM_PACKAGE_PATH.parts[-3:] == ("hsr_pl", "assets", "organism")


def test_ship_organism_replaces_only_through_its_explicit_step(tmp_path):
    import json

    from hsr_pl.export import save_pretrained_atomic
    from hsr_pl.models.organism import build_organism, ship_organism

    model, processor = build_organism(seed=3)
    export = save_pretrained_atomic(model, processor, tmp_path / "export", {"global_step": 1})
    target = tmp_path / "assets" / "organism"
    with pytest.raises(OrganismNotTrainedError, match="not an organism export"):
        ship_organism(tmp_path / "nothing", target)
    config = json.loads((export / "config.json").read_text())
    shipped = ship_organism(export, target)
    assert sorted(p.name for p in shipped.iterdir()) == sorted(
        p.name for p in export.iterdir()
        if p.suffix in (".json", ".safetensors", ".jinja", ".txt") and not p.name.startswith("."))
    again, _ = load_organism(shipped)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    config["text_config"]["num_hidden_layers"] = 2
    (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not the organism"):
        ship_organism(export, target)
