"""Tiny builders: every family x MHA/GQA builds, runs a chat-templated image prompt, and
survives save_tiny -> Auto*.from_pretrained with identical processing and logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import hsr_pl.models  # noqa: F401  (registers the image-only processors with AutoProcessor)
from hsr_pl.models.processors import IMAGE_ONLY_PROCESSORS
from hsr_pl.models.tiny import (
    CHAT_TEMPLATE,
    TEXT_ONLY_FAMILIES,
    TINY_BUILDERS,
    build_tiny,
    example_batch,
    save_tiny,
)

CASES = [
    pytest.param(f, gqa, id=f"{f}-{'gqa' if gqa else 'mha'}") for f in TINY_BUILDERS for gqa in (False, True)
]


@pytest.mark.parametrize("family,gqa", CASES)
def test_builds_tiny_and_runs_a_chat_prompt(family: str, gqa: bool):
    model, processor = build_tiny(family, gqa=gqa)
    assert model.config.model_type == family
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_attention_heads) == (64, 4)
    assert text.num_key_value_heads == (2 if gqa else 4)
    assert text.num_hidden_layers == (3 if family == "mllama" else 2)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    batch = example_batch(family, processor)
    if family not in TEXT_ONLY_FAMILIES:
        assert "pixel_values" in batch
        image_id = model.config.image_token_id if hasattr(model.config, "image_token_id") else None
        if image_id is not None:
            assert (batch["input_ids"] == image_id).sum() > 0  # placeholders were expanded
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family,gqa", CASES)
def test_save_reload_round_trip(family: str, gqa: bool, tmp_path):
    model, processor = build_tiny(family, gqa=gqa)
    batch = example_batch(family, processor)
    with torch.no_grad():
        logits = model(**batch).logits
    save_tiny(model, processor, tmp_path)
    if family in TEXT_ONLY_FAMILIES:
        reloaded, reprocessor = (
            AutoModelForCausalLM.from_pretrained(tmp_path),
            AutoTokenizer.from_pretrained(tmp_path),
        )
    else:
        reloaded, reprocessor = (
            AutoModelForImageTextToText.from_pretrained(tmp_path),
            AutoProcessor.from_pretrained(tmp_path),
        )
    assert type(reloaded) is type(model) and type(reprocessor) is type(processor)
    rebatch = example_batch(family, reprocessor)
    assert rebatch.keys() == batch.keys()
    for key in batch:
        assert torch.equal(rebatch[key], batch[key]), key
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**rebatch).logits, logits)


@pytest.mark.parametrize("family", sorted(TINY_BUILDERS))
def test_prompt_is_a_token_prefix_of_prompt_plus_response(family: str):
    _, processor = build_tiny(family)
    tokenizer = getattr(processor, "tokenizer", processor)
    user = [{"type": "text", "text": "what colour is the shape ?"}]
    if family not in TEXT_ONLY_FAMILIES:
        user = [{"type": "image"}, *user]
    conv = [{"role": "user", "content": user}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(
        [*conv, {"role": "assistant", "content": "sorry i cannot help"}], tokenize=False
    )
    p_ids, f_ids = tokenizer(prompt).input_ids, tokenizer(full).input_ids
    assert f_ids[: len(p_ids)] == p_ids and len(f_ids) > len(p_ids)
    assert "<unk>" not in tokenizer.convert_ids_to_tokens(f_ids)


@pytest.mark.parametrize("family", sorted(IMAGE_ONLY_PROCESSORS))
def test_image_only_processors_have_no_video_part(family: str):
    _, processor = build_tiny(family)
    assert type(processor) is IMAGE_ONLY_PROCESSORS[family]
    assert type(processor).get_attributes() == ["image_processor", "tokenizer"]
    assert not hasattr(processor, "video_processor")


def test_default_chat_template_is_stable():
    assert CHAT_TEMPLATE.startswith("{{ bos_token }}") and "<image> " in CHAT_TEMPLATE


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(ValueError, match="llava") as err:
        build_tiny("gpt2")
    assert "gpt2" in str(err.value)


def test_one_spec_per_builder_and_family_options_are_checked():
    """Every builder is the one spec-driven builder; family options reach the config, and an
    option a family does not have is refused by name."""
    from hsr_pl.models import tiny

    assert set(tiny.TINY_SPECS) == set(TINY_BUILDERS)
    assert tiny.build_tiny_gemma3 is TINY_BUILDERS["gemma3"] and tiny.build_tiny_gemma3.__name__ == "build_tiny_gemma3"
    model, processor = build_tiny("gemma3", image_size=16, mm_tokens_per_image=1, layers=3)
    assert model.config.mm_tokens_per_image == 1 and model.config.vision_config.image_size == 16
    assert model.config.get_text_config().layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert processor.image_seq_length == 1
    model, _ = build_tiny("mllama", cross_attention_layers=(0,), layers=2)
    assert model.config.get_text_config().cross_attention_layers == [0]
    with pytest.raises(TypeError, match=r"build_tiny_llama\(\) got unexpected keyword arguments \['image_size'\]"):
        build_tiny("llama", image_size=16)
