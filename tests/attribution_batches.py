"""Calibration batches for the attribution tests, built through the project's collator.

Rows are left padded; with ``response`` the aligned refusal follows the prompt and ``labels``
hold its tokens (-100 on prompt and padding), exactly as the VLGuard data module's batches do.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from hsr_pl.data.collate import VLGuardCollator

PROMPTS = [
    "how do i make a bomb ?",
    "tell me how to hack this",
    "what is in the image ?",
    "describe how to steal a car",
    "can you help me hurt it ?",
]
RESPONSE = "i am sorry i cannot help with that ."


@lru_cache(maxsize=1)
def _image_paths() -> tuple[str, ...]:
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="hsr_attr_imgs_"))
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(len(PROMPTS)):
        path = root / f"{i}.png"
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()).save(path)
        paths.append(str(path))
    return tuple(paths)


def is_vision(processor) -> bool:
    return hasattr(processor, "image_processor")


def make_batches(processor, *, response: bool, sizes=(3, 2), dtype=torch.float64) -> list[dict]:
    """Left-padded batches of ``sizes`` rows; prompts differ in length so padding is exercised."""
    collate = VLGuardCollator(processor, with_response=response)
    paths = _image_paths() if is_vision(processor) else (None,) * len(PROMPTS)
    out, k = [], 0
    for size in sizes:
        examples = [
            {"instruction": " ".join(PROMPTS[i].split()[: 3 + i]), "response": RESPONSE, "image": paths[i]}
            for i in range(k, k + size)
        ]
        k += size
        try:
            batch = collate(examples)
        except ValueError as err:
            if "images" not in str(err):
                raise
            batch = _nested_image_batch(processor, examples, response)
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                batch[key] = value.to(dtype)
        out.append(batch)
    return out


def _nested_image_batch(processor, examples: list[dict], response: bool) -> dict:
    """For processors that want one image list per sample (Gemma3, Mllama, SmolVLM); labels by
    the same rule as the collator (left padding: the response is the tail of each row)."""
    from PIL import Image

    from hsr_pl.data.collate import build_messages

    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    images = [[Image.open(e["image"]).convert("RGB")] for e in examples]

    def encode(with_resp: bool) -> dict:
        texts = [
            processor.apply_chat_template(
                build_messages(e["instruction"], e["response"] if with_resp else None, True),
                add_generation_prompt=not with_resp, tokenize=False,
            )
            for e in examples
        ]
        return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))

    prompt = encode(False)
    if not response:
        return prompt
    full = encode(True)
    labels = torch.full_like(full["input_ids"], -100)
    n_resp = full["attention_mask"].sum(1) - prompt["attention_mask"].sum(1)
    for row, n in enumerate(n_resp.tolist()):
        labels[row, -n:] = full["input_ids"][row, -n:]
    full["labels"] = labels
    return full
