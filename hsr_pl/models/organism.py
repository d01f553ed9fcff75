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
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..data.synthetic import IMAGE_SIZE, VOCABULARY
from .tiny import CHAT_TEMPLATE, _clip_image_processor, word_tokenizer

__all__ = [
    "ORGANISM_PACKAGE_PATH",
    "OrganismNotTrainedError",
    "build_organism",
    "load_organism",
    "organism_config",
    "ship_organism",
]

ORGANISM_PACKAGE_PATH = Path(__file__).resolve().parent.parent / "assets" / "organism"
"""Where the trained organism checkpoint ships inside the package (``hsr_pl/assets/organism``)."""

PATCH_SIZE = 8
TRAIN_HINT = (
    "train it with `hsr-pl fit --config configs/organism.yaml` (it exports to runs/organism/export) and "
    "ship that folder with `bash scripts/ship_organism.sh runs/organism/export`, or pass the folder of a "
    "checkpoint you trained"
)


class OrganismNotTrainedError(FileNotFoundError):
    """The organism checkpoint is not where it was looked for."""


def organism_config(tokenizer, gqa: bool = False):
    """The ``LlavaConfig`` of the organism for ``tokenizer`` (GQA: 8 query heads share 4 KV heads)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4 if gqa else 8,
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


def build_organism(seed: int = 0, gqa: bool = False):
    """``(model, processor)``: the untrained organism, initialised from ``seed`` (deterministic)."""
    from transformers import LlavaForConditionalGeneration

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    tokenizer = word_tokenizer(VOCABULARY)
    config = organism_config(tokenizer, gqa=gqa)
    # A local generator state: building the organism must not disturb the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), _processor(tokenizer)


def load_organism(path: str | os.PathLike[str] | None = None, *, dtype: torch.dtype = torch.float32):
    """``(model, processor)`` of the trained organism (default: the copy shipped in the package).

    Raises :class:`OrganismNotTrainedError` with the command that trains it when the folder holds
    no checkpoint.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = Path(path) if path is not None else ORGANISM_PACKAGE_PATH
    missing = [name for name in ("config.json", "model.safetensors") if not (folder / name).is_file()]
    if missing:
        raise OrganismNotTrainedError(
            f"no trained organism in {folder} (missing {', '.join(missing)}); {TRAIN_HINT}"
        )
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    processor = AutoProcessor.from_pretrained(folder)
    return model.eval(), processor


def ship_organism(folder: str | os.PathLike[str], target: str | os.PathLike[str] | None = None) -> Path:
    """Replace the shipped organism with a trained export — the one, explicit way to change it.

    ``folder`` must be an hsr-pl export (``hsr_summary.json``) of the organism's architecture; its
    model, processor and summary are copied into ``target`` (default: the package's assets) through
    a temporary sibling folder and one rename, so a failure leaves the old organism in place.
    """
    import json
    import shutil
    import tempfile

    source = Path(folder)
    target = Path(target) if target is not None else ORGANISM_PACKAGE_PATH
    needed = ("config.json", "model.safetensors", "hsr_summary.json")
    missing = [n for n in needed if not (source / n).is_file()]
    if missing:
        raise OrganismNotTrainedError(f"{source} is not an organism export (missing {', '.join(missing)}); {TRAIN_HINT}")
    config = json.loads((source / "config.json").read_text())
    text = config.get("text_config", {})
    shape = (config.get("model_type"), text.get("hidden_size"), text.get("num_hidden_layers"), text.get("num_attention_heads"))
    if shape != ("llava", 128, 4, 8):
        raise ValueError(f"{source} holds a {shape} model, not the organism (llava, hidden 128, 4 layers, 8 heads)")
    if source.resolve() == target.resolve():
        raise ValueError(f"{source} is already the shipped organism")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.ship-", dir=target.parent))
    try:
        for item in source.iterdir():
            if item.is_file() and item.suffix in (".json", ".safetensors", ".jinja", ".txt"):
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
