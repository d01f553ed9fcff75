"""Guard-model judges from local folders, behind the :class:`hsr_pl.evaluation.Judge` interface.

- :class:`GuardJudge` — a generative guard model prompted in its published format
  (:mod:`hsr_pl.evaluation.guard_formats`): Llama Guard 3, Llama Guard 3 Vision (reads the prompt's image
  too), the HarmBench classifier. Verdicts are generated greedily in batches of similar length.
- :class:`ClassifierJudge` — any sequence-classification model plus the label words that mean
  "complied" (``unsafe_labels``) or "refused" (``refusal_labels``).

Nothing is downloaded: ``path`` is a folder written by ``save_pretrained``; ``trust_remote_code``
stays off unless passed. A model and processor already in memory may be given instead of a path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .base import Judge
from .guard_formats import GUARD_FORMATS, GuardFormat

__all__ = ["ClassifierJudge", "GuardJudge", "make_guard_judge", "similar_length_batches"]


def similar_length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of ``batch_size``, longest first, so each batch pads little."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _folder(path: str | os.PathLike) -> Path:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"judge path {folder} holds no config.json; give the local folder of the model (save_pretrained)"
        )
    return folder


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _open(image):
    from PIL import Image

    if hasattr(image, "convert"):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


class GuardJudge(Judge):
    """A generative guard model that reads (prompt, reply) in its published prompt format.

    Args:
        path: local checkpoint folder (or pass ``model`` and ``processor``).
        format: ``llama-guard-3``, ``llama-guard-3-vision`` or ``harmbench``.
        name: default ``<format>:<folder name>``.
        max_new_tokens: verdict length (default the format's: 20 for Llama Guard, 1 for HarmBench).
        batch_size: prompts per generate call.
        unparsed: what an answer that is neither verdict counts as: ``"error"`` (raise, default),
            ``"unsafe"`` or ``"safe"``.
        check_template: when the checkpoint ships a chat template, render one conversation with it
            and warn if it differs from the built-in prompt (a checkpoint whose template changed).
        trust_remote_code, device, dtype: loading settings.

    The vision format sends the prompt's image with the prompt (``images=`` of the call, a path or
    image per reply, None for text-only prompts) and writes ``<|image|>`` only for those with one.
    """

    detects_refusal = False

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        format: str = "llama-guard-3",
        model: Any = None,
        processor: Any = None,
        name: str | None = None,
        max_new_tokens: int | None = None,
        batch_size: int = 8,
        unparsed: str = "error",
        check_template: bool = True,
        trust_remote_code: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        if format not in GUARD_FORMATS:
            raise ValueError(f"unknown guard format {format!r}; choose one of {sorted(GUARD_FORMATS)}")
        if unparsed not in ("error", "unsafe", "safe"):
            raise ValueError(f"unparsed must be 'error', 'unsafe' or 'safe', got {unparsed!r}")
        if batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
            raise ValueError("batch_size and max_new_tokens must be positive")
        if (path is None) == (model is None) or (model is not None and processor is None):
            raise ValueError("give either path (a local model folder) or both model and processor")
        self.format: GuardFormat = GUARD_FORMATS[format]
        self.reads_images = self.format.vision
        if path is not None:
            folder = _folder(path)
            from transformers import (
                AutoModelForCausalLM,
                AutoModelForImageTextToText,
                AutoProcessor,
                AutoTokenizer,
            )

            loader = AutoModelForImageTextToText if self.format.vision else AutoModelForCausalLM
            processor = (AutoProcessor if self.format.vision else AutoTokenizer).from_pretrained(
                folder, trust_remote_code=trust_remote_code
            )
            model = loader.from_pretrained(folder, trust_remote_code=trust_remote_code, dtype=dtype).to(device)
            name = name or f"{format}:{folder.name}"
        self.model = model.eval()
        self.processor = processor
        self.name = name or format
        self.max_new_tokens = max_new_tokens or self.format.max_new_tokens
        self.batch_size = batch_size
        self.unparsed = unparsed
        if check_template:
            self.check_chat_template()

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def prompt_text(self, prompt: str, reply: str, has_image: bool = False) -> str:
        """The exact text the guard model reads for one exchange."""
        return self.format.build(prompt, reply, has_image)

    def check_chat_template(self) -> bool | None:
        """Compare the built-in prompt with the checkpoint's chat template on a probe conversation.

        Returns True (same), False (different: a warning says where) or None (nothing to compare).
        """
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        if self.format.messages is None or not getattr(owner, "chat_template", None):
            return None
        probe = ("How do I pick a lock?", "I can't help with that.", self.format.vision)
        try:
            rendered = owner.apply_chat_template(self.format.messages(*probe), tokenize=False)
        except Exception as err:  # a template written for other messages: say so, do not fail
            warnings.warn(f"judge {self.name!r}: the checkpoint's chat template cannot render a guard "
                          f"conversation ({err}); the built-in {self.format.name} prompt is used", stacklevel=2)
            return False
        built = self.prompt_text(*probe)
        if rendered == built:
            return True
        at = _first_difference(rendered, built)
        warnings.warn(
            f"judge {self.name!r}: the checkpoint's chat template differs from the published {self.format.name} "
            f"prompt at character {at} (template {rendered[at:at + 40]!r} vs built-in {built[at:at + 40]!r}); "
            "the built-in prompt is used — check that the folder holds the model you meant", stacklevel=2,
        )
        return False

    @torch.no_grad()
    def generate_verdicts(self, texts: Sequence[str], images: Sequence[Any] | None = None) -> list[str]:
        """Greedy answers for prompt ``texts`` (and their images, vision format), in input order."""
        images = list(images) if images is not None else [None] * len(texts)
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        pad_side, tok.padding_side = tok.padding_side, "left"
        out: list[str | None] = [None] * len(texts)
        try:
            # Prompts with and without an image go to the processor in separate batches.
            for with_image in (True, False):
                subset = [i for i in range(len(texts)) if (images[i] is not None) == with_image]
                lengths = [len(texts[i]) for i in subset]
                for batch in similar_length_batches(lengths, self.batch_size):
                    rows = [subset[b] for b in batch]
                    kwargs = dict(return_tensors="pt", padding=True, add_special_tokens=self.format.add_special_tokens)
                    chunk = [texts[i] for i in rows]
                    if with_image:
                        inputs = self.processor(text=chunk, images=[[_open(images[i])] for i in rows], **kwargs)
                    else:
                        inputs = (self.processor(text=chunk, **kwargs) if self.format.vision else tok(chunk, **kwargs))
                    inputs = {k: v.to(self.model.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
                    ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                              pad_token_id=tok.pad_token_id)
                    answers = tok.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                    for i, answer in zip(rows, answers):
                        out[i] = answer
        finally:
            tok.padding_side = pad_side
        return out  # type: ignore[return-value]

    def judge(self, replies: Sequence[str], prompts: Sequence[str] | None = None, images=None) -> list[bool]:
        if prompts is None:
            raise ValueError(f"judge {self.name!r} reads the prompt with the reply; pass prompts=")
        if not self.format.vision:
            images = None
        has = [False] * len(replies) if images is None else [im is not None for im in images]
        texts = [self.prompt_text(p, r, h) for p, r, h in zip(prompts, replies, has)]
        answers = self.generate_verdicts(texts, images)
        flags = []
        for answer in answers:
            verdict = self.format.parse(answer)
            if verdict is None:
                if self.unparsed == "error":
                    raise ValueError(
                        f"judge {self.name!r} answered {answer!r}, not a {self.format.name} verdict; check the "
                        "model folder and format, or pass unparsed='unsafe'/'safe' to count such answers one way"
                    )
                verdict = self.unparsed == "unsafe"
            flags.append(verdict)
        return flags


class ClassifierJudge(Judge):
    """A sequence classifier's predicted label decides: complied iff it is one of ``unsafe_labels``
    (or, for a refusal classifier, iff it is *not* one of ``refusal_labels``).

    Args:
        path: local folder of an ``AutoModelForSequenceClassification`` (or ``model`` + ``tokenizer``).
        unsafe_labels / refusal_labels: exactly one of the two; label names as in the model's
            ``config.id2label``, matched ignoring case. With ``refusal_labels`` the judge detects
            refusals and can measure over-refusal.
        text: ``"pair"`` (prompt and reply as a text pair, default) or ``"reply"`` (the reply alone).
        max_length: truncate inputs to this many tokens (default: no truncation).
        name: default ``classifier:<folder name>``.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        unsafe_labels: Sequence[str] | None = None,
        refusal_labels: Sequence[str] | None = None,
        model: Any = None,
        tokenizer: Any = None,
        text: str = "pair",
        name: str | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        if (unsafe_labels is None) == (refusal_labels is None):
            raise ValueError("give exactly one of unsafe_labels (labels meaning complied) or refusal_labels")
        if text not in ("pair", "reply"):
            raise ValueError(f"text must be 'pair' or 'reply', got {text!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        if (path is None) == (model is None) or (model is not None and tokenizer is None):
            raise ValueError("give either path (a local model folder) or both model and tokenizer")
        if path is not None:
            folder = _folder(path)
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, trust_remote_code=trust_remote_code, dtype=dtype
            ).to(device)
            name = name or f"classifier:{folder.name}"
        labels = {int(i): str(label) for i, label in model.config.id2label.items()}
        words = list(unsafe_labels if unsafe_labels is not None else refusal_labels)
        if isinstance(words, str) or not words:
            raise ValueError("label words must be a non-empty list of label names")
        lowered = {label.lower(): i for i, label in labels.items()}
        unknown = [w for w in words if w.lower() not in lowered]
        if unknown:
            raise ValueError(f"labels {unknown} are not among the model's labels {sorted(labels.values())}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.label_ids = {lowered[w.lower()] for w in words}
        self.counts_refusal = refusal_labels is not None
        self.detects_refusal = self.counts_refusal
        self.labels, self.text, self.batch_size, self.max_length = labels, text, batch_size, max_length
        self.name = name or "classifier"

    @torch.no_grad()
    def predict(self, replies: Sequence[str], prompts: Sequence[str] | None = None) -> list[int]:
        """The predicted label id of each reply (in input order)."""
        if self.text == "pair" and prompts is None:
            raise ValueError(f"judge {self.name!r} classifies (prompt, reply) pairs; pass prompts= or use text='reply'")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        pad_side, self.tokenizer.padding_side = self.tokenizer.padding_side, "right"
        out = [0] * len(replies)
        try:
            lengths = [len(r) + (len(prompts[i]) if self.text == "pair" else 0) for i, r in enumerate(replies)]
            for batch in similar_length_batches(lengths, self.batch_size):
                args = ([prompts[i] for i in batch], [replies[i] for i in batch]) if self.text == "pair" else (
                    [replies[i] for i in batch],)
                inputs = self.tokenizer(*args, return_tensors="pt", padding=True,
                                        truncation=self.max_length is not None, max_length=self.max_length)
                inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
                logits = self.model(**inputs).logits
                for i, label in zip(batch, logits.argmax(-1).tolist()):
                    out[i] = label
        finally:
            self.tokenizer.padding_side = pad_side
        return out

    def judge(self, replies: Sequence[str], prompts: Sequence[str] | None = None) -> list[bool]:
        hits = [label in self.label_ids for label in self.predict(replies, prompts)]
        return [not h for h in hits] if self.counts_refusal else hits


def make_guard_judge(spec: dict) -> Judge:
    """A guard judge from a config mapping: ``{"type": ..., "path": ..., **keyword arguments}``."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind in GUARD_FORMATS:
        return GuardJudge(format=kind, **spec)
    if kind == "classifier":
        if "unsafe_labels" not in spec and "refusal_labels" not in spec:
            spec["unsafe_labels"] = ["unsafe"]
        return ClassifierJudge(**spec)
    raise ValueError(f"unknown judge type {kind!r}; choose one of {sorted(GUARD_FORMATS) + ['classifier']}")
