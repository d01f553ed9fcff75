"""What every benchmark loader returns, and the checks they share.

A loader reads one published file layout and returns *examples*: plain dicts that the evaluation
collator turns into model inputs and the metrics score. Every example has

- ``instruction``: the text the model is asked (after the benchmark's own prompt template);
- ``image``: an absolute image path, or None for a text-only prompt (MMBench examples carry the
  TSV's base64 string in ``image_b64`` instead, decoded per batch);
- ``response``: the reference answer ("" where the benchmark has none, e.g. harmful sets);
- ``judge_prompt``: what a judge that reads prompts sees — the harmful *request*, which for the
  typographic attacks is not the innocuous text the model was shown;
- ``category``: the benchmark's category ("" when it has none); ``record``: the 0-based index of
  the source record, for error messages; ``id``: the benchmark's own identifier.

Format-specific fields (``answers``, ``choices``, ``answer``, ``group``, ``rotation``) are added by
the loaders that score with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..vlguard import DataFormatError

__all__ = ["DataFormatError", "check_options", "example", "require_file"]


def example(
    *,
    record: int,
    instruction: str,
    image: str | None = None,
    response: str = "",
    judge_prompt: str | None = None,
    category: str = "",
    id: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """One example in the common layout (see the module docstring)."""
    return {
        "record": record,
        "id": id,
        "instruction": instruction,
        "image": image,
        "response": response,
        "judge_prompt": judge_prompt if judge_prompt is not None else instruction,
        "category": category,
        **extra,
    }


def check_options(fmt: str, options: Mapping[str, Any] | None, allowed: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with defaults filled in; an unknown key is an error that lists the known ones."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"format {fmt!r} has no option(s) {unknown}; known options: {sorted(allowed)}")
    return {**allowed, **options}


def require_file(path: str | Path, what: str, fix: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist; {fix}")
    return path
