"""Tiny random-init models, tokenizers and processors built locally from config classes.

Nothing here touches a model hub: tests, the demo and the benchmarks build every model from its
transformers config class, with a word-level tokenizer made by the ``tokenizers`` library and an
image processor constructed from defaults. ``save_tiny`` writes a folder that
``from_pretrained`` reloads, so the same loading path serves tiny and real checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_WORDS",
    "SPECIAL_TOKENS",
    "TINY_BUILDERS",
    "build_tiny",
    "save_tiny",
    "word_tokenizer",
]

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")

# Small default vocabulary: enough for the tests' VLGuard-format fixture.
DEFAULT_WORDS = tuple(
    """user assistant system : ? . , ! ' a an the is are what which how do does i you it this that
    of in on to for with and or not no yes can help me make tell describe image picture photo
    colour color shape red green blue yellow white black circle square triangle cross
    sorry am cannot can't will won't here step first then build weapon bomb poison hack steal
    kill hurt safe harmful there one two three four left right top bottom middle""".split()
)

# A role-generic template in the style of real chat templates: one image placeholder per image
# item, then text; the assistant turn ends with eos. Word-level tokenisation keeps the prompt a
# strict prefix of prompt + response, which the collator relies on to mask prompt labels.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }} : "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% else %}{{ item['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def word_tokenizer(words: Iterable[str] = DEFAULT_WORDS, extra_special: Iterable[str] = ()):
    """A word-level fast tokenizer (whitespace split) with bos/eos/pad/unk and an image token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *extra_special, *words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *extra_special]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _clip_image_processor(image_size: int):
    # The PIL backend needs no torchvision (PyPI's torchvision does not import beside CPU torch).
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )


def _text_kwargs(vocab_size: int, gqa: bool, hidden: int, layers: int, heads: int, tokenizer) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 if gqa else heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_llava(
    gqa: bool = False,
    *,
    words: Iterable[str] = DEFAULT_WORDS,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    image_size: int = 16,
    patch_size: int = 8,
    seed: int = 0,
):
    """A tiny ``LlavaForConditionalGeneration`` (LLaMA text, CLIP vision) and its processor."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = word_tokenizer(words)
    text = LlamaConfig(**_text_kwargs(len(tokenizer), gqa, hidden, layers, heads, tokenizer))
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


def build_tiny_llama(gqa: bool = False, *, words: Iterable[str] = DEFAULT_WORDS, hidden: int = 64,
                     layers: int = 2, heads: int = 4, seed: int = 0):
    """A tiny text-only ``LlamaForCausalLM`` and its tokenizer (used as the processor)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(words)
    config = LlamaConfig(**_text_kwargs(len(tokenizer), gqa, hidden, layers, heads, tokenizer))
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer


TINY_BUILDERS: dict[str, Callable[..., tuple[nn.Module, object]]] = {
    "llava": build_tiny_llava,
    "llama": build_tiny_llama,
}


def build_tiny(family: str, gqa: bool = False, **kwargs):
    """``(model, processor)`` of a tiny random-init model of ``family``."""
    try:
        builder = TINY_BUILDERS[family]
    except KeyError:
        raise ValueError(f"no tiny builder for {family!r}; known: {sorted(TINY_BUILDERS)}") from None
    return builder(gqa=gqa, **kwargs)


def save_tiny(model: nn.Module, processor, path: str | Path) -> Path:
    """Write model (safetensors) and processor to ``path`` so ``from_pretrained`` reloads them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
