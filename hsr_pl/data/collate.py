"""Collation through the model's own processor and chat template.

The processor does the family-specific work (image token expansion, ``pixel_values``,
``image_sizes``, ``image_grid_thw`` …) on the whole batch; labels are derived afterwards from the
length of each prompt, so every family gets the same masking rule: prompt and padding are -100,
response tokens keep their ids. Padding is on the left, so position -1 of a prompt-only batch is
the last prompt token of every row (what head scoring and generation need).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from .errors import DataFormatError

__all__ = ["VLGuardCollator", "build_messages"]

IGNORE_INDEX = -100


def build_messages(instruction: str, response: str | None, with_image: bool) -> list[dict]:
    """One user turn (the image first, then the text) and optionally the assistant's answer."""
    content: list[dict] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": instruction})
    messages = [{"role": "user", "content": content}]
    if response is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return messages


@lru_cache(maxsize=4096)
def _open_image(path: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        # Loading verified the file; this is a file that changed since, or damage verify cannot see.
        raise DataFormatError(f"image {path} cannot be decoded ({exc}); replace it or drop its record") from None


def _load_image(image):
    """An RGB image from a path, or from an image already in memory (e.g. MMBench's base64 cells)."""
    return image.convert("RGB") if hasattr(image, "convert") else _open_image(image)


def _tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


class VLGuardCollator:
    """Turns examples from :func:`hsr_pl.data.vlguard.load_vlguard` into model inputs.

    Args:
        processor: the model's processor (or a tokenizer for text-only models).
        with_response: append the response and emit ``labels`` (training, importance scores,
            response-position head scores); otherwise emit the prompt with the generation prompt.
        max_length: optional cap; rows longer than it are an error (silently cutting a response
            would train on a truncated refusal).
        max_positions: the model's ``max_position_embeddings``; a longer row is an error too
            (the data module checks every row when the data is loaded; this is the backstop).
    """

    def __init__(
        self, processor, with_response: bool = True, max_length: int | None = None, max_positions: int | None = None
    ) -> None:
        if getattr(processor, "chat_template", None) is None and getattr(
            _tokenizer_of(processor), "chat_template", None
        ) is None:
            raise ValueError(
                "the processor has no chat template; hsr-pl builds prompts with the model's own "
                "chat template (set processor.chat_template or use the model's original processor)"
            )
        self.processor = processor
        self.with_response = with_response
        self.max_length = max_length
        self.max_positions = max_positions

    def _template(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False
        )

    def _encode(self, texts: list[str], images: list) -> dict:
        tokenizer = _tokenizer_of(self.processor)
        old_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            kwargs = dict(text=texts, return_tensors="pt", padding=True)
            if images:
                kwargs["images"] = images
            if tokenizer is self.processor:
                kwargs.pop("images", None)
                # The chat template already wrote the bos token.
                kwargs["add_special_tokens"] = False
                return dict(self.processor(**kwargs))
            return dict(self.processor(**kwargs))
        finally:
            tokenizer.padding_side = old_side

    def __call__(self, examples: Sequence[dict]) -> dict:
        has_image = [e.get("image") is not None for e in examples]
        if any(has_image) and not all(has_image):
            raise ValueError("a batch mixes examples with and without images; batch them apart")
        # One image list per sample: every family's processor accepts the nested form, and
        # Gemma3 / Mllama / SmolVLM reject a flat list for batches of more than one row.
        images = [[_load_image(e["image"])] for e in examples] if all(has_image) else []
        prompts = [self._template(build_messages(e["instruction"], None, bool(images)), True) for e in examples]
        if not self.with_response:
            batch = self._encode(prompts, images)
            self._check_length(batch, examples)
            return batch
        fulls = [
            self._template(build_messages(e["instruction"], e["response"], bool(images)), False)
            for e in examples
        ]
        batch = self._encode(fulls, images)
        prompt_batch = self._encode(prompts, images)
        self._check_length(batch, examples)
        prompt_lengths = prompt_batch["attention_mask"].sum(dim=1)
        lengths = batch["attention_mask"].sum(dim=1)
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        width = batch["input_ids"].shape[1]
        pwidth = prompt_batch["input_ids"].shape[1]
        for row in range(len(examples)):
            n, p = int(lengths[row]), int(prompt_lengths[row])
            if p >= n:
                raise ValueError(
                    f"example {examples[row].get('record')} has an empty response after templating"
                )
            full_ids = batch["input_ids"][row, width - n :]
            prompt_ids = prompt_batch["input_ids"][row, pwidth - p :]
            if not torch.equal(full_ids[:p], prompt_ids):
                # Labelling by length would then mark the wrong tokens as the response.
                raise ValueError(
                    f"example {examples[row].get('record')}: the tokenised prompt (chat template with "
                    "add_generation_prompt=True) is not a prefix of the tokenised prompt + response; "
                    "the chat template or the tokenizer merges tokens across the boundary. Use the "
                    "model's own chat template, or end the generation prompt with a separator token."
                )
            labels[row, width - n + p :] = batch["input_ids"][row, width - n + p :]
        batch["labels"] = labels
        return batch

    def _check_length(self, batch: dict, examples: Sequence[dict] = ()) -> None:
        width = batch["input_ids"].shape[1]
        if self.max_length is not None and width > self.max_length:
            raise ValueError(
                f"a batch row has {width} tokens > max_length={self.max_length}; "
                "raise max_length or shorten the data"
            )
        if self.max_positions is not None and width > self.max_positions:
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            row = max(range(len(lengths)), key=lambda i: lengths[i])
            record = examples[row].get("record") if examples else None
            raise ValueError(
                f"record {record} has {int(lengths[row])} tokens, more than the model's max_position_embeddings="
                f"{self.max_positions}; shorten or drop the record"
            )

    # --------------------------------------------------------------------------- lengths
    def _text(self, example: dict, with_image: bool) -> str:
        response = example["response"] if self.with_response else None
        return self._template(build_messages(example["instruction"], response, with_image), not self.with_response)

    def text_lengths(self, examples: Sequence[dict]) -> list[int]:
        """Tokens of each example's templated text, image placeholders not expanded: a cheap lower
        bound of its length (no image is read)."""
        texts = [
            self._text(e, e.get("image") is not None or e.get("image_b64") is not None) for e in examples
        ]
        tokenizer = _tokenizer_of(self.processor)
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def row_length(self, example: dict) -> int:
        """The exact length of ``example`` as a batch of one (image tokens included)."""
        images = [[_load_image(example["image"])]] if example.get("image") is not None else []
        return int(self._encode([self._text(example, bool(images))], images)["attention_mask"].sum())
