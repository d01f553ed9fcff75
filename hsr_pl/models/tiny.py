"""Tiny random-init models, tokenizers and processors built locally from config classes.

Nothing here touches a model hub: tests, the demo and the benchmarks build every model from its
transformers config class, with a word-level tokenizer made by the ``tokenizers`` library and an
image processor constructed from defaults (PIL backend: no torchvision). ``save_tiny`` writes a
folder that ``from_pretrained`` reloads, so the same loading path serves tiny and real checkpoints.

Every family is one row of :data:`TINY_SPECS` (its transformers classes and what differs from
the shared recipe) and is built by one builder; ``TINY_BUILDERS[family]`` / ``build_tiny_<family>``
/ :func:`build_tiny` call it as ``builder(gqa=False, *, words=..., hidden=64, layers=2, heads=4,
seed=0, **family options) -> (model, processor)``: ``gqa=True`` halves the key/value heads.
Text-only families return their tokenizer as the processor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import processors
from .processors import InternVLImageOnlyProcessor, SmolVLMImageOnlyProcessor

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_WORDS",
    "SPECIAL_TOKENS",
    "TEXT_ONLY_FAMILIES",
    "TINY_BUILDERS",
    "TINY_SPECS",
    "TinySpec",
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


# ------------------------------------------------------------------------------- processors
# One function per processor family: the processors genuinely differ. Each gets the tokenizer,
# its chat template and the family's options (image_size, patch_size, ...).
def _llava_processor(tokenizer, template: str, o: Mapping):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=_clip_image_processor(o["image_size"]),
        tokenizer=tokenizer,
        patch_size=o["patch_size"],
        vision_feature_select_strategy="full",
        chat_template=template,
        num_additional_image_tokens=1,
    )


def _pinpoints(o: Mapping) -> list[list[int]]:
    size = o["image_size"]
    return [[size, size], [size, 2 * size], [2 * size, size]]


def _llava_next_processor(tokenizer, template: str, o: Mapping):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    size = o["image_size"]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_grid_pinpoints=_pinpoints(o)
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=o["patch_size"],
        vision_feature_select_strategy="default",
        chat_template=template,
        num_additional_image_tokens=1,
    )


def _qwen_vl_processor(processor_name: str):
    def build(tokenizer, template: str, o: Mapping):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        # 32x32 images -> a 4x4 patch grid -> 2x2 = 4 merged image tokens.
        side = (4 * o["patch_size"]) ** 2
        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": side, "longest_edge": side}, patch_size=o["patch_size"], merge_size=2,
            temporal_patch_size=2,
        )
        cls = getattr(processors, processor_name)
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)

    return build


def _gemma3_processor(tokenizer, template: str, o: Mapping):
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_processor = Gemma3ImageProcessorPil(size={"height": o["image_size"], "width": o["image_size"]})
    return Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
        image_seq_length=o["mm_tokens_per_image"],
    )


def _idefics_processor(smolvlm: bool):
    def build(tokenizer, template: str, o: Mapping):
        if smolvlm:
            from transformers.models.smolvlm.image_processing_pil_smolvlm import (
                SmolVLMImageProcessorPil as Images,
            )

            Processor = SmolVLMImageOnlyProcessor
        else:
            from transformers import Idefics3Processor as Processor
            from transformers.models.idefics3.image_processing_pil_idefics3 import (
                Idefics3ImageProcessorPil as Images,
            )
        size = o["image_size"]
        images = Images(do_image_splitting=False, size={"longest_edge": size}, max_image_size={"longest_edge": size})
        image_seq_len = (size // o["patch_size"]) ** 2 // o["scale_factor"] ** 2
        return Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=image_seq_len, chat_template=template)

    return build


def _mllama_processor(tokenizer, template: str, o: Mapping):
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    images = MllamaImageProcessorPil(size={"height": o["image_size"], "width": o["image_size"]}, max_image_tiles=1)
    return MllamaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template)


def _internvl_seq_length(o: Mapping) -> int:
    return (o["image_size"] // o["patch_size"]) ** 2 // 4  # downsample_ratio 0.5 in each direction


def _internvl_processor(tokenizer, template: str, o: Mapping):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    images = GotOcr2ImageProcessorPil(size={"height": o["image_size"], "width": o["image_size"]}, max_patches=1)
    return InternVLImageOnlyProcessor(
        image_processor=images, tokenizer=tokenizer, image_seq_length=_internvl_seq_length(o), chat_template=template
    )


# ---------------------------------------------------------------------- text and vision parts
def _mrope(text: dict, o: Mapping) -> None:
    """M-RoPE splits the head_dim/2 rotary frequencies over (time, height, width)."""
    head_dim = o["hidden"] // o["heads"]
    third = head_dim // 2 // 3
    text["rope_parameters"] = {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [head_dim // 2 - 2 * third, third, third],
    }


def _gemma3_text(text: dict, o: Mapping) -> None:
    head_dim = o["hidden"] // o["heads"]
    layers = text["num_hidden_layers"]
    text.update(
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=8,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
    )


def _qwen2_vl_vision(o: Mapping) -> dict:
    return dict(depth=1, embed_dim=32, hidden_size=o["hidden"], mlp_ratio=2, num_heads=2, patch_size=o["patch_size"],
                spatial_merge_size=2, temporal_patch_size=2)


def _qwen2_5_vl_vision(o: Mapping) -> dict:
    return dict(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=o["hidden"], num_heads=2,
                patch_size=o["patch_size"], spatial_merge_size=2, temporal_patch_size=2,
                window_size=4 * o["patch_size"], fullatt_block_indexes=[0])


def _mllama_vision(o: Mapping) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1, attention_heads=2,
                image_size=o["image_size"], patch_size=o["patch_size"], max_num_tiles=1,
                supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0], vision_output_dim=64)


def _siglip(o: Mapping):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**_small_vision(image_size=o["image_size"], patch_size=o["patch_size"]))


def _ids(tok, **names: str) -> dict[str, int]:
    """``{config key: id of token}`` for the config's special-token ids."""
    return {key: tok.convert_tokens_to_ids(token) for key, token in names.items()}


_QWEN_VISION_TOKENS = {
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "video_token": "<|video_pad|>",
}
_QWEN_IDS = dict(image_token_id="<image>", video_token_id="<|video_pad|>", vision_start_token_id="<|vision_start|>",
                 vision_end_token_id="<|vision_end|>")
_GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image>"}
_IDEFICS_TOKENS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
_INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


# ------------------------------------------------------------------------------- spec table
@dataclass(frozen=True)
class TinySpec:
    """One tiny family: the transformers classes and what differs from the shared recipe.

    The shared recipe: a word-level tokenizer over ``words`` (:func:`word_tokenizer`), the text
    config of :func:`_text_kwargs` (MLP 2 x hidden, ``gqa`` halves the key/value heads), the
    model initialised under ``torch.manual_seed(seed)``. Callables receive ``o``, the family's
    options merged with ``hidden`` and ``heads``.
    """

    model: str  # transformers model class
    config: str  # transformers (top-level) config class
    text_config: str | None = None  # text config class; None: passed to ``config`` as a dict
    layers: int = 2  # default depth
    options: Mapping[str, Any] = field(default_factory=dict)  # family keyword arguments -> defaults
    image_placeholder: str = "<image>"  # what the chat template writes per image
    named_special: Mapping[str, str] | None = None  # word_tokenizer(named_special=...)
    extra_special: tuple[str, ...] = ()  # word_tokenizer(extra_special=...)
    bpe: bool = False  # a byte-level BPE Qwen2Tokenizer instead (see bpe_tokenizer)
    text: Callable[[dict, Mapping], None] | None = None  # edits the text kwargs in place
    vision: Callable[[Mapping], Any] | None = None  # vision config (kwargs or object); None: text-only
    extra: Callable[[Any, Mapping], dict] = lambda tok, o: {}  # more config kwargs (token ids, ...)
    untied: bool = True  # pass tie_word_embeddings=False to the top-level config
    processor: Callable[[Any, str, Mapping], Any] | None = None  # (tokenizer, template, o) -> processor

    @property
    def text_only(self) -> bool:
        return self.vision is None


_IMAGE16 = {"image_size": 16, "patch_size": 8}
def _idefics_spec(prefix: str, smolvlm: bool) -> TinySpec:
    """Idefics3 and SmolVLM share their layout: a Llama text model, pixel-shuffled patches."""
    return TinySpec(
        f"{prefix}ForConditionalGeneration", f"{prefix}Config", "LlamaConfig",
        options={"image_size": 32, "patch_size": 8, "scale_factor": 2}, extra_special=_IDEFICS_TOKENS,
        vision=lambda o: _small_vision(image_size=o["image_size"], patch_size=o["patch_size"]),
        extra=lambda tok, o: dict(scale_factor=o["scale_factor"], image_token_id=tok.convert_tokens_to_ids("<image>")),
        processor=_idefics_processor(smolvlm=smolvlm),
    )


TINY_SPECS: dict[str, TinySpec] = {
    "llava": TinySpec(
        "LlavaForConditionalGeneration", "LlavaConfig", "LlamaConfig", options=_IMAGE16,
        vision=lambda o: _clip_vision(o["image_size"], o["patch_size"]),
        extra=lambda tok, o: dict(image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full"),
        processor=_llava_processor,
    ),
    "llava_next": TinySpec(
        "LlavaNextForConditionalGeneration", "LlavaNextConfig", "LlamaConfig", options=_IMAGE16,
        vision=lambda o: _clip_vision(o["image_size"], o["patch_size"]),
        # any-res packing reshapes each tile's features into its patch grid, so the CLS token
        # must be dropped ("default"), as in real LLaVA-NeXT checkpoints.
        extra=lambda tok, o: dict(image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy="default", image_grid_pinpoints=_pinpoints(o)),
        processor=_llava_next_processor,
    ),
    "qwen2_vl": TinySpec(
        "Qwen2VLForConditionalGeneration", "Qwen2VLConfig", options={"patch_size": 8},
        image_placeholder="<|vision_start|><image><|vision_end|>", named_special=_QWEN_VISION_TOKENS,
        text=_mrope, vision=_qwen2_vl_vision, extra=lambda tok, o: _ids(tok, **_QWEN_IDS),
        processor=_qwen_vl_processor("Qwen2VLImageOnlyProcessor"),
    ),
    "qwen2_5_vl": TinySpec(
        "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", options={"patch_size": 8},
        image_placeholder="<|vision_start|><image><|vision_end|>", named_special=_QWEN_VISION_TOKENS,
        text=_mrope, vision=_qwen2_5_vl_vision, extra=lambda tok, o: _ids(tok, **_QWEN_IDS),
        processor=_qwen_vl_processor("Qwen2_5_VLImageOnlyProcessor"),
    ),
    "gemma3": TinySpec(
        "Gemma3ForConditionalGeneration", "Gemma3Config",
        options={"image_size": 32, "patch_size": 8, "mm_tokens_per_image": 4},
        image_placeholder="<start_of_image>", named_special=_GEMMA3_TOKENS, text=_gemma3_text, vision=_siglip,
        extra=lambda tok, o: dict(
            mm_tokens_per_image=o["mm_tokens_per_image"],
            **_ids(tok, boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
                   image_token_index="<image>"),
        ),
        processor=_gemma3_processor,
    ),
    "idefics3": _idefics_spec("Idefics3", smolvlm=False),
    "smolvlm": _idefics_spec("SmolVLM", smolvlm=True),
    # self-attention layers 0 and 2, cross-attention layer 1
    "mllama": TinySpec(
        "MllamaForConditionalGeneration", "MllamaConfig", layers=3,
        options={"cross_attention_layers": (1,), **_IMAGE16},
        image_placeholder="<|image|>", named_special={"image_token": "<|image|>"}, extra_special=("<|python_tag|>",),
        text=lambda text, o: text.update(cross_attention_layers=list(o["cross_attention_layers"])),
        vision=_mllama_vision, extra=lambda tok, o: _ids(tok, image_token_index="<|image|>"), untied=False,
        processor=_mllama_processor,
    ),
    "internvl": TinySpec(
        "InternVLForConditionalGeneration", "InternVLConfig", "Qwen2Config", options={"image_size": 32, "patch_size": 8},
        image_placeholder="<IMG_CONTEXT>", named_special=_INTERNVL_TOKENS,
        vision=lambda o: _small_vision(
            image_size=[o["image_size"], o["image_size"]], patch_size=[o["patch_size"], o["patch_size"]]
        ),
        extra=lambda tok, o: dict(downsample_ratio=0.5, image_seq_length=_internvl_seq_length(o),
                                  **_ids(tok, image_token_id="<IMG_CONTEXT>")),
        processor=_internvl_processor,
    ),
    "llama": TinySpec("LlamaForCausalLM", "LlamaConfig"),
    "mistral": TinySpec("MistralForCausalLM", "MistralConfig"),
    "qwen2": TinySpec("Qwen2ForCausalLM", "Qwen2Config", bpe=True),  # q/k/v biases
}


def _build(
    family: str,
    gqa: bool = False,
    *,
    words: Iterable[str] = DEFAULT_WORDS,
    hidden: int = 64,
    layers: int | None = None,
    heads: int = 4,
    seed: int = 0,
    **options: Any,
) -> tuple[nn.Module, Any]:
    """The one builder behind every ``build_tiny_<family>``: ``(model, processor)``."""
    import transformers

    spec = TINY_SPECS[family]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TypeError(
            f"build_tiny_{family}() got unexpected keyword arguments {unknown}; it takes words, hidden, layers, "
            f"heads, seed{''.join(', ' + k for k in spec.options)}"
        )
    o = {**spec.options, **options, "hidden": hidden, "heads": heads}
    template = chat_template(spec.image_placeholder)
    if spec.bpe:
        tokenizer = bpe_tokenizer(words)
    elif spec.text_only:
        tokenizer = word_tokenizer(words)
    else:
        tokenizer = word_tokenizer(
            words, extra_special=spec.extra_special, named_special=spec.named_special, template=template
        )
    text = _text_kwargs(len(tokenizer), gqa, hidden, spec.layers if layers is None else layers, heads, tokenizer)
    if spec.text is not None:
        spec.text(text, o)
    config_cls, model_cls = getattr(transformers, spec.config), getattr(transformers, spec.model)
    if spec.text_only:
        return _seeded(model_cls, config_cls(**text), seed), tokenizer
    text_config = getattr(transformers, spec.text_config)(**text) if spec.text_config else text
    config = config_cls(
        text_config=text_config,
        vision_config=spec.vision(o),
        **spec.extra(tokenizer, o),
        **({"tie_word_embeddings": False} if spec.untied else {}),
    )
    model = _seeded(model_cls, config, seed)
    return model, spec.processor(tokenizer, template, o)


def _named_builder(family: str) -> Callable[..., tuple[nn.Module, Any]]:
    spec = TINY_SPECS[family]

    def build(gqa: bool = False, **kwargs: Any) -> tuple[nn.Module, Any]:
        return _build(family, gqa, **kwargs)

    build.__name__ = build.__qualname__ = f"build_tiny_{family}"
    extra = "".join(f", {k}={v!r}" for k, v in spec.options.items())
    build.__doc__ = (
        f"A tiny ``{spec.model}`` and its {'tokenizer' if spec.text_only else 'processor'}: ``build_tiny_{family}("
        f"gqa=False, *, words=DEFAULT_WORDS, hidden=64, layers={spec.layers}, heads=4, seed=0{extra})``."
    )
    return build


TINY_BUILDERS: dict[str, Callable[..., tuple[nn.Module, Any]]] = {family: _named_builder(family) for family in TINY_SPECS}
build_tiny_llava = TINY_BUILDERS["llava"]
build_tiny_llava_next = TINY_BUILDERS["llava_next"]
build_tiny_qwen2_vl = TINY_BUILDERS["qwen2_vl"]
build_tiny_qwen2_5_vl = TINY_BUILDERS["qwen2_5_vl"]
build_tiny_gemma3 = TINY_BUILDERS["gemma3"]
build_tiny_idefics3 = TINY_BUILDERS["idefics3"]
build_tiny_smolvlm = TINY_BUILDERS["smolvlm"]
build_tiny_mllama = TINY_BUILDERS["mllama"]
build_tiny_internvl = TINY_BUILDERS["internvl"]
build_tiny_llama = TINY_BUILDERS["llama"]
build_tiny_mistral = TINY_BUILDERS["mistral"]
build_tiny_qwen2 = TINY_BUILDERS["qwen2"]


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
