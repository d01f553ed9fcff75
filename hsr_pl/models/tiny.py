"""Tiny random-init models, tokenizers and processors built locally from config classes.

Nothing here touches a model hub: tests, the demo and the benchmarks build every model from its
transformers config class, with a word-level tokenizer made by the ``tokenizers`` library and an
image processor constructed from defaults (PIL backend: no torchvision). ``save_tiny`` writes a
folder that ``from_pretrained`` reloads, so the same loading path serves tiny and real checkpoints.

Every builder has the signature ``builder(gqa=False, *, words=..., hidden=64, layers=2, heads=4,
seed=0) -> (model, processor)``: ``gqa=True`` halves the key/value heads. Text-only families
return their tokenizer as the processor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_WORDS",
    "SPECIAL_TOKENS",
    "TEXT_ONLY_FAMILIES",
    "TINY_BUILDERS",
    "bpe_tokenizer",
    "build_tiny",
    "chat_template",
    "example_batch",
    "example_image",
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


def chat_template(image: str = "<image>", *, space_before: bool = False) -> str:
    """A role-generic chat template that writes ``image`` for every image item.

    In the style of real chat templates: one image placeholder per image item, then text; the
    assistant turn ends with eos. Word-level tokenisation keeps the prompt a strict prefix of
    prompt + response, which the collator relies on to mask prompt labels. Families whose
    processor expands a different placeholder (Qwen2-VL's vision_start/pad/end, Gemma3's
    start_of_image, InternVL's IMG_CONTEXT, Mllama's <|image|>) pass their own.
    ``space_before`` puts the separating space before each piece instead of after it, which
    keeps the prefix property for byte-level BPE tokenizers (they glue a space to the next word).
    """

    def piece(expr: str) -> str:
        return f" {expr}" if space_before else f"{expr} "

    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ message['role'] }}"
        + (" :" if space_before else " : ")
        + "{% if message['content'] is string %}"
        + piece("{{ message['content'] }}")
        + "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}"
        + piece(image)
        + "{% else %}"
        + piece("{{ item['text'] }}")
        + "{% endif %}{% endfor %}{% endif %}"
        "{% if message['role'] == 'assistant' %}"
        + piece("{{ eos_token }}")
        + "{% endif %}"
        + ("{% if not loop.last %} {% endif %}" if space_before else "")
        + "{% endfor %}"
        "{% if add_generation_prompt %}"
        + (" assistant :" if space_before else "assistant : ")
        + "{% endif %}"
    )


CHAT_TEMPLATE = chat_template("<image>")

# Families whose builder returns (CausalLM, tokenizer): reload with AutoModelForCausalLM/AutoTokenizer.
TEXT_ONLY_FAMILIES = frozenset({"llama", "mistral", "qwen2"})


def word_tokenizer(
    words: Iterable[str] = DEFAULT_WORDS,
    extra_special: Iterable[str] = (),
    *,
    named_special: Mapping[str, str] | None = None,
    template: str = CHAT_TEMPLATE,
):
    """A word-level fast tokenizer (whitespace split) with bos/eos/pad/unk and an image token.

    ``extra_special`` adds special tokens; ``named_special`` ({attribute: token}) also exposes
    them as tokenizer attributes (``tokenizer.boi_token``, ``tokenizer.boi_token_id``), which is
    how several processors find their placeholders. Both survive ``save_pretrained``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    named = {"image_token": "<image>", **(named_special or {})}
    extra = list(dict.fromkeys([*extra_special, *named.values()]))
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *extra, *words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=named,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(dict.fromkeys(["<image>", *extra]))})
    tokenizer.chat_template = template
    return tokenizer


# ----------------------------------------------------------------------------- text configs
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


def _seeded(model_cls, config, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return model_cls(config).eval()


def _clip_vision(image_size: int, patch_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )


def _small_vision(**overrides) -> dict:
    """Shared kwargs of the SigLIP-like vision towers: 1 layer, 2 heads, width 32."""
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, **overrides)


def _clip_image_processor(image_size: int):
    # The PIL backend needs no torchvision (PyPI's torchvision does not import beside CPU torch).
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )


# ----------------------------------------------------------------------------------- LLaVA
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
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = word_tokenizer(words)
    text = LlamaConfig(**_text_kwargs(len(tokenizer), gqa, hidden, layers, heads, tokenizer))
    config = LlavaConfig(
        text_config=text,
        vision_config=_clip_vision(image_size, patch_size),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )
    model = _seeded(LlavaForConditionalGeneration, config, seed)
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


def build_tiny_llava_next(
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
    """A tiny ``LlavaNextForConditionalGeneration`` (any-res tiling over a 1x1 / 1x2 / 2x1 grid)."""
    from transformers import (
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    tokenizer = word_tokenizer(words)
    text = LlamaConfig(**_text_kwargs(len(tokenizer), gqa, hidden, layers, heads, tokenizer))
    config = LlavaNextConfig(
        text_config=text,
        vision_config=_clip_vision(image_size, patch_size),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        # any-res packing reshapes each tile's features into its patch grid, so the CLS token
        # must be dropped ("default"), as in real LLaVA-NeXT checkpoints.
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=False,
    )
    model = _seeded(LlavaNextForConditionalGeneration, config, seed)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


# ---------------------------------------------------------------------------------- Qwen-VL
_QWEN_VISION_TOKENS = {
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "video_token": "<|video_pad|>",
}


def _build_tiny_qwen_vl(version: str, gqa: bool, words, hidden, layers, heads, seed, patch_size=8):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .processors import Qwen2_5_VLImageOnlyProcessor, Qwen2VLImageOnlyProcessor

    template = chat_template("<|vision_start|><image><|vision_end|>")
    tokenizer = word_tokenizer(words, named_special=_QWEN_VISION_TOKENS, template=template)
    text = _text_kwargs(len(tokenizer), gqa, hidden, layers, heads, tokenizer)
    head_dim = hidden // heads
    # M-RoPE splits the head_dim/2 rotary frequencies over (time, height, width).
    third = head_dim // 2 // 3
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [head_dim // 2 - 2 * third, third, third],
    }
    ids = dict(
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    if version == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(
            depth=1,
            embed_dim=32,
            hidden_size=hidden,
            mlp_ratio=2,
            num_heads=2,
            patch_size=patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        processor_cls = Qwen2VLImageOnlyProcessor
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=hidden,
            num_heads=2,
            patch_size=patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=4 * patch_size,
            fullatt_block_indexes=[0],
        )
        processor_cls = Qwen2_5_VLImageOnlyProcessor
    config = Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    model = _seeded(Model, config, seed)
    # 32x32 images -> a 4x4 patch grid -> 2x2 = 4 merged image tokens.
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": (4 * patch_size) ** 2, "longest_edge": (4 * patch_size) ** 2},
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
    )
    return model, processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def build_tiny_qwen2_vl(
    gqa: bool = False,
    *,
    words: Iterable[str] = DEFAULT_WORDS,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
):
    """A tiny ``Qwen2VLForConditionalGeneration`` (M-RoPE text, 1-layer ViT) and an image-only processor."""
    return _build_tiny_qwen_vl("qwen2_vl", gqa, words, hidden, layers, heads, seed)


def build_tiny_qwen2_5_vl(
    gqa: bool = False,
    *,
    words: Iterable[str] = DEFAULT_WORDS,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
):
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` and an image-only processor."""
    return _build_tiny_qwen_vl("qwen2_5_vl", gqa, words, hidden, layers, heads, seed)


# ----------------------------------------------------------------------------------- Gemma3
def build_tiny_gemma3(
    gqa: bool = False,
    *,
    words: Iterable[str] = DEFAULT_WORDS,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    image_size: int = 32,
    patch_size: int = 8,
    mm_tokens_per_image: int = 4,
    seed: int = 0,
):
    """A tiny ``Gemma3ForConditionalGeneration`` (q_norm/k_norm, sliding + full layers, SigLIP)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image>"}
    template = chat_template("<start_of_image>")
    tokenizer = word_tokenizer(words, named_special=named, template=template)
    text = _text_kwargs(len(tokenizer), gqa, hidden, layers, heads, tokenizer)
    head_dim = hidden // heads
    text.update(
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=8,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=SiglipVisionConfig(**_small_vision(image_size=image_size, patch_size=patch_size)),
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    model = _seeded(Gemma3ForConditionalGeneration, config, seed)
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        image_seq_length=mm_tokens_per_image,
    )
    return model, processor


# ------------------------------------------------------------------------- Idefics3 / SmolVLM
_IDEFICS_TOKENS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")


def _build_tiny_idefics(
    kind: str,
    gqa: bool,
    words,
    hidden,
    layers,
    heads,
    seed,
    image_size: int = 32,
    patch_size: int = 8,
    scale_factor: int = 2,
):
    from transformers import LlamaConfig

    tokenizer = word_tokenizer(words, extra_special=_IDEFICS_TOKENS)
    text = LlamaConfig(**_text_kwargs(len(tokenizer), gqa, hidden, layers, heads, tokenizer))
    vision = _small_vision(image_size=image_size, patch_size=patch_size)
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    image_kwargs = dict(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    if kind == "idefics3":
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
        from transformers import Idefics3Processor as Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil as Images,
        )
    else:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil as Images,
        )

        from .processors import SmolVLMImageOnlyProcessor as Processor
    config = Config(
        text_config=text,
        vision_config=vision,
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    model = _seeded(Model, config, seed)
    processor = Processor(
        image_processor=Images(**image_kwargs),
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def build_tiny_idefics3(
    gqa: bool = False,
    *,
    words: Iterable[str] = DEFAULT_WORDS,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
):
    """A tiny ``Idefics3ForConditionalGeneration`` (LLaMA text, pixel-shuffle connector)."""
    return _build_tiny_idefics("idefics3", gqa, words, hidden, layers, heads, seed)


def build_tiny_smolvlm(
    gqa: bool = False,
    *,
    words: Iterable[str] = DEFAULT_WORDS,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
):
    """A tiny ``SmolVLMForConditionalGeneration`` and an image-only processor."""
    return _build_tiny_idefics("smolvlm", gqa, words, hidden, layers, heads, seed)


# ----------------------------------------------------------------------------------- Mllama
def build_tiny_mllama(
    gqa: bool = False,
    *,
    words: Iterable[str] = DEFAULT_WORDS,
    hidden: int = 64,
    layers: int = 3,
    heads: int = 4,
    cross_attention_layers: Iterable[int] = (1,),
    image_size: int = 16,
    patch_size: int = 8,
    seed: int = 0,
):
    """A tiny ``MllamaForConditionalGeneration``: self-attention layers 0 and 2, cross-attention 1."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    template = chat_template("<|image|>")
    tokenizer = word_tokenizer(
        words,
        named_special={"image_token": "<|image|>"},
        extra_special=("<|python_tag|>",),
        template=template,
    )
    text = _text_kwargs(len(tokenizer), gqa, hidden, layers, heads, tokenizer)
    text["cross_attention_layers"] = list(cross_attention_layers)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_global_layers=1,
        attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        max_num_tiles=1,
        supported_aspect_ratios=[[1, 1]],
        intermediate_layers_indices=[0],
        vision_output_dim=64,
    )
    config = MllamaConfig(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("<|image|>")
    )
    model = _seeded(MllamaForConditionalGeneration, config, seed)
    image_processor = MllamaImageProcessorPil(
        size={"height": image_size, "width": image_size}, max_image_tiles=1
    )
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    return model, processor


# ---------------------------------------------------------------------------------- InternVL
_INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def build_tiny_internvl(
    gqa: bool = False,
    *,
    words: Iterable[str] = DEFAULT_WORDS,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
):
    """A tiny ``InternVLForConditionalGeneration`` (Qwen2 text, InternViT) and an image-only processor."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from .processors import InternVLImageOnlyProcessor

    template = chat_template("<IMG_CONTEXT>")
    tokenizer = word_tokenizer(words, named_special=_INTERNVL_TOKENS, template=template)
    text = Qwen2Config(**_text_kwargs(len(tokenizer), gqa, hidden, layers, heads, tokenizer))
    vision = _small_vision(image_size=[image_size, image_size], patch_size=[patch_size, patch_size])
    image_seq_length = (image_size // patch_size) ** 2 // 4  # downsample_ratio 0.5 in each direction
    config = InternVLConfig(
        text_config=text,
        vision_config=vision,
        downsample_ratio=0.5,
        image_seq_length=image_seq_length,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        tie_word_embeddings=False,
    )
    model = _seeded(InternVLForConditionalGeneration, config, seed)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, max_patches=1
    )
    processor = InternVLImageOnlyProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=image_seq_length,
        chat_template=template,
    )
    return model, processor


# ---------------------------------------------------------------------------------- text-only
def bpe_tokenizer(words: Iterable[str] = DEFAULT_WORDS):
    """A ``Qwen2Tokenizer`` (byte-level BPE) whose merges spell every word of ``words`` whole.

    ``AutoTokenizer`` loads checkpoints whose ``model_type`` is ``qwen2`` as ``Qwen2Tokenizer``
    whatever ``tokenizer_config.json`` names, and that class rebuilds a byte-level BPE
    pre-tokenizer over the saved vocabulary, so a word-level tokenizer would not survive the round
    trip. The tiny text-only Qwen2 therefore gets a real Qwen2Tokenizer: BPE trained on the word
    list (with and without a leading space), so each word is one token either way.
    """
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    words = list(words)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,
        special_tokens=list(SPECIAL_TOKENS),
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*words, *(f" {w}" for w in words)], trainer)
    merges = [tuple(m) for m in json.loads(backend.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=backend.get_vocab(),
        merges=merges,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.chat_template = chat_template(space_before=True)
    return tokenizer


def _build_tiny_causal(kind: str, gqa: bool, words, hidden, layers, heads, seed):
    import transformers

    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    }[kind]
    tokenizer = bpe_tokenizer(words) if kind == "qwen2" else word_tokenizer(words)
    config = getattr(transformers, config_cls)(
        **_text_kwargs(len(tokenizer), gqa, hidden, layers, heads, tokenizer)
    )
    return _seeded(getattr(transformers, model_cls), config, seed), tokenizer


def build_tiny_llama(
    gqa: bool = False,
    *,
    words: Iterable[str] = DEFAULT_WORDS,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
):
    """A tiny text-only ``LlamaForCausalLM`` and its tokenizer (used as the processor)."""
    return _build_tiny_causal("llama", gqa, words, hidden, layers, heads, seed)


def build_tiny_mistral(
    gqa: bool = False,
    *,
    words: Iterable[str] = DEFAULT_WORDS,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
):
    """A tiny text-only ``MistralForCausalLM`` and its tokenizer."""
    return _build_tiny_causal("mistral", gqa, words, hidden, layers, heads, seed)


def build_tiny_qwen2(
    gqa: bool = False,
    *,
    words: Iterable[str] = DEFAULT_WORDS,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
):
    """A tiny text-only ``Qwen2ForCausalLM`` (q/k/v biases) and its tokenizer."""
    return _build_tiny_causal("qwen2", gqa, words, hidden, layers, heads, seed)


TINY_BUILDERS: dict[str, Callable[..., tuple[nn.Module, object]]] = {
    "llava": build_tiny_llava,
    "llava_next": build_tiny_llava_next,
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "gemma3": build_tiny_gemma3,
    "idefics3": build_tiny_idefics3,
    "smolvlm": build_tiny_smolvlm,
    "mllama": build_tiny_mllama,
    "internvl": build_tiny_internvl,
    "llama": build_tiny_llama,
    "mistral": build_tiny_mistral,
    "qwen2": build_tiny_qwen2,
}


def build_tiny(family: str, gqa: bool = False, **kwargs):
    """``(model, processor)`` of a tiny random-init model of ``family`` (a ``model_type``)."""
    try:
        builder = TINY_BUILDERS[family]
    except KeyError:
        raise ValueError(f"no tiny builder for {family!r}; known: {sorted(TINY_BUILDERS)}") from None
    return builder(gqa=gqa, **kwargs)


def example_image(width: int = 40, height: int = 24, seed: int = 0):
    """A small random RGB ``PIL.Image`` (deliberately not square, to exercise resizing)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def example_batch(family: str, processor, text: str = "what colour is the shape ?", image=None) -> dict:
    """One prompt (image + ``text`` + generation prompt) processed for ``model(**batch)``.

    Text-only families get the text alone through their tokenizer's chat template.
    """
    if family in TEXT_ONLY_FAMILIES:
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return dict(processor([prompt], return_tensors="pt"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(
        processor(
            images=[image if image is not None else example_image()], text=[prompt], return_tensors="pt"
        )
    )


def save_tiny(model: nn.Module, processor, path: str | Path) -> Path:
    """Write model (safetensors) and processor to ``path`` so ``from_pretrained`` reloads them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
