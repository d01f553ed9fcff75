"""The model organism: a tiny LLaVA, trained on the synthetic set, that refuses like a real LVLM.

A real ``transformers.LlavaForConditionalGeneration`` built from config classes (no download):
LLaMA text model (hidden 128, 4 layers, 8 heads of dim 16, MLP 512, untied lm_head) and a
one-layer CLIP vision tower (hidden 128, 4 heads, 32×32 images in 8×8 patches -> 16 patch
tokens, CLS dropped, last layer's features) joined by LLaVA's GELU projector. The sizes follow
a first study in which such a model learned utility, text- and image-borne refusals on 2 CPU
cores in minutes and lost its refusals under 70 % Wanda pruning while keeping its utility.

The tokenizer is word-level over :data:`hsr_pl.data.synthetic.VOCABULARY`, so every word the data
generator emits is one token and decoding is exact. A prompt reads
``<s>user : <image>×16 QUESTION assistant : ANSWER </s>`` (the chat template of
:mod:`hsr_pl.models.tiny`).

``build_organism`` gives the random-init model; the trained checkpoint ships in the package at
:data:`ORGANISM_PACKAGE_PATH` and :func:`load_organism` loads it.

**v2** (``build_organism(version=2)``, trained on :mod:`hsr_pl.data.synthetic_v2`): the same
LLaVA layout with a deeper text model, 6 layers with grouped-query attention (8 query heads share
4 key/value heads), over v2's vocabulary; it ships at :data:`ORGANISM_V2_PACKAGE_PATH`. A second
family trains on the same data, :func:`build_organism_qwen2vl`: a Qwen2-VL (Qwen2 text model with
q/k/v biases and M-RoPE, the same depth, width and heads; a one-block Qwen2-VL vision tower whose
2×2 patch merger turns a 32×32 image into 4 image tokens, one per image quadrant).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..data.synthetic import IMAGE_SIZE, VOCABULARY
from ..data.synthetic_v2 import VOCABULARY as VOCABULARY_V2
from .tiny import (
    _QWEN_IDS,
    _QWEN_VISION_TOKENS,
    CHAT_TEMPLATE,
    _clip_image_processor,
    _ids,
    _mrope,
    _qwen2_vl_vision,
    _qwen_vl_processor,
    chat_template,
    word_tokenizer,
)

__all__ = [
    "ORGANISM_PACKAGE_PATH",
    "ORGANISM_V2_PACKAGE_PATH",
    "ORGANISM_VERSIONS",
    "OrganismNotTrainedError",
    "build_organism",
    "build_organism_qwen2vl",
    "load_organism",
    "organism_config",
    "ship_organism",
]

ORGANISM_PACKAGE_PATH = Path(__file__).resolve().parent.parent / "assets" / "organism"
"""Where the trained organism checkpoint ships inside the package (``hsr_pl/assets/organism``)."""

ORGANISM_V2_PACKAGE_PATH = ORGANISM_PACKAGE_PATH.with_name("organism_v2")
"""Where the trained v2 organism (LLaVA) ships (``hsr_pl/assets/organism_v2``)."""
ORGANISM_VERSIONS = (1, 2)
V2_LAYERS = 6
V2_KV_HEADS = 4
# (model_type, hidden, layers, query heads, key/value heads) that ship_organism accepts per version
_SHIPPED_SHAPE = {1: ("llava", 128, 4, 8, 8), 2: ("llava", 128, V2_LAYERS, 8, V2_KV_HEADS)}

PATCH_SIZE = 8
TRAIN_HINT_V2 = (
    "train it with `hsr-pl fit --config configs/organism_v2.yaml` (it exports to runs/organism_v2/export) and "
    "ship that folder with `bash scripts/ship_organism.sh --version 2 runs/organism_v2/export`, or pass the folder "
    "of a checkpoint you trained"
)
TRAIN_HINT = (
    "train it with `hsr-pl fit --config configs/organism.yaml` (it exports to runs/organism/export) and "
    "ship that folder with `bash scripts/ship_organism.sh runs/organism/export`, or pass the folder of a "
    "checkpoint you trained"
)


class OrganismNotTrainedError(FileNotFoundError):
    """The organism checkpoint is not where it was looked for."""


def _check_version(version: int) -> None:
    if isinstance(version, bool) or version not in ORGANISM_VERSIONS:
        raise ValueError(f"organism version={version!r} is unknown; use 1 or 2")


def organism_config(tokenizer, gqa: bool = False, version: int = 1):
    """The ``LlavaConfig`` of the organism for ``tokenizer`` (GQA: 8 query heads share 4 KV heads).

    ``version=2``: 6 text layers, always GQA.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    _check_version(version)
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4 if version == 1 else V2_LAYERS,
        num_attention_heads=8,
        num_key_value_heads=V2_KV_HEADS if gqa or version == 2 else 8,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        # -1: the last (only) vision layer's output; 0 would be the patch embeddings and crashes
        # in transformers 5.24's feature selection for a one-layer tower.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drop CLS: 16 image tokens, one per grid cell
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def _processor(tokenizer):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=_clip_image_processor(IMAGE_SIZE),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def build_organism(seed: int = 0, gqa: bool = False, version: int = 1):
    """``(model, processor)``: the untrained organism, initialised from ``seed`` (deterministic).

    ``version=2``: the v2 LLaVA (6 GQA layers) over v2's vocabulary.
    """
    from transformers import LlavaForConditionalGeneration

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    _check_version(version)
    tokenizer = word_tokenizer(VOCABULARY if version == 1 else VOCABULARY_V2)
    config = organism_config(tokenizer, gqa=gqa, version=version)
    # A local generator state: building the organism must not disturb the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), _processor(tokenizer)


def build_organism_qwen2vl(seed: int = 0):
    """``(model, processor)``: the untrained v2 organism as a Qwen2-VL, over v2's vocabulary.

    The text model matches the v2 LLaVA (hidden 128, MLP 512, 6 layers, 8 query / 4 key-value
    heads) with Qwen2's q/k/v biases and M-RoPE; the vision tower is one Qwen2-VL block (width
    128, 4 heads, 8×8 patches) whose merger maps each 2×2 patch group (one image quadrant) to one
    of 4 image tokens. Built from config classes under a local RNG state, like :func:`build_organism`.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    template = chat_template("<|vision_start|><image><|vision_end|>")
    tokenizer = word_tokenizer(VOCABULARY_V2, named_special=_QWEN_VISION_TOKENS, template=template)
    options = {"hidden": 128, "heads": 8, "patch_size": PATCH_SIZE}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=V2_LAYERS,
        num_attention_heads=8, num_key_value_heads=V2_KV_HEADS, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    _mrope(text, options)
    vision = {**_qwen2_vl_vision(options), "embed_dim": 128, "num_heads": 4}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                           **_ids(tokenizer, **_QWEN_IDS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), _qwen_vl_processor("Qwen2VLImageOnlyProcessor")(tokenizer, template, options)


def load_organism(path: str | os.PathLike[str] | None = None, *, dtype: torch.dtype = torch.float32,
                  version: int = 1):
    """``(model, processor)`` of the trained organism (default: the copy of ``version`` shipped in the package).

    Raises :class:`OrganismNotTrainedError` with the command that trains it when the folder holds
    no checkpoint.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _check_version(version)
    folder = Path(path) if path is not None else ORGANISM_PACKAGE_PATH if version == 1 else ORGANISM_V2_PACKAGE_PATH
    missing = [name for name in ("config.json", "model.safetensors") if not (folder / name).is_file()]
    if missing:
        raise OrganismNotTrainedError(
            f"no trained organism in {folder} (missing {', '.join(missing)}); {TRAIN_HINT if version == 1 else TRAIN_HINT_V2}"
        )
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    processor = AutoProcessor.from_pretrained(folder)
    return model.eval(), processor


def ship_organism(folder: str | os.PathLike[str], target: str | os.PathLike[str] | None = None, *,
                  version: int = 1) -> Path:
    """Replace a shipped organism with a trained export — the one, explicit way to change it.

    ``folder`` must be an hsr-pl export (``hsr_summary.json``) of organism ``version``'s
    architecture (v1: LLaVA, hidden 128, 4 layers, 8 heads; v2: 6 layers, 8 query / 4 key-value
    heads); its model, processor and summary are copied into ``target`` (default: that version's
    folder in the package's assets) through a temporary sibling folder and one rename, so a
    failure leaves the old organism in place.
    """
    import json
    import shutil
    import tempfile

    _check_version(version)
    hint = TRAIN_HINT if version == 1 else TRAIN_HINT_V2
    source = Path(folder)
    if target is None:
        target = ORGANISM_PACKAGE_PATH if version == 1 else ORGANISM_V2_PACKAGE_PATH
    target = Path(target)
    needed = ("config.json", "model.safetensors", "hsr_summary.json")
    missing = [n for n in needed if not (source / n).is_file()]
    if missing:
        raise OrganismNotTrainedError(f"{source} is not an organism export (missing {', '.join(missing)}); {hint}")
    config = json.loads((source / "config.json").read_text())
    text = config.get("text_config", {})
    shape = (config.get("model_type"), text.get("hidden_size"), text.get("num_hidden_layers"),
             text.get("num_attention_heads"), text.get("num_key_value_heads"))
    want = _SHIPPED_SHAPE[version]
    if shape != want:
        raise ValueError(
            f"{source} holds a {shape} model, not the organism v{version} (model_type, hidden, layers, heads, "
            f"key/value heads = {want}); ship it with the version it was trained as"
        )
    if source.resolve() == target.resolve():
        raise ValueError(f"{source} is already the shipped organism")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.ship-", dir=target.parent))
    try:
        for item in source.iterdir():
            # the export's hidden owner/record markers stay behind: the package folder is no export target
            if item.is_file() and not item.name.startswith(".") and item.suffix in (".json", ".safetensors", ".jinja", ".txt"):
                shutil.copy2(item, tmp / item.name)
        os.chmod(tmp, 0o755)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
