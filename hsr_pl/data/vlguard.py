"""VLGuard-format records -> ``datasets.Dataset`` splits (VLGuard's train/test JSON layout).

A VLGuard file is a JSON list; each record has an ``image`` path (relative to an image root), a
``safe`` flag for the image, a ``harmful_category`` and ``instr-resp``: a list of dicts holding one
of ``safe_instruction`` / ``unsafe_instruction`` / ``instruction`` and a ``response``. Each pair
becomes one example of one split:

- ``utility``      ``safe_instruction`` + helpful answer ("safe_safes"; also on an unsafe image,
                   where the question about it must still be answered — VLGuard has no such
                   pair, the embedded synthetic set does)
- ``safety``       unsafe image + ``instruction`` or ``unsafe_instruction`` + refusal ("unsafes")
- ``over_refusal`` safe image + ``unsafe_instruction`` + refusal        ("safe_unsafes")

Callers may join splits with ``+`` (``"safety+over_refusal"``): the harmful requests whose harm is
in the image and those whose harm is in the words.

Everything is checked up front (missing, empty, damaged or oversized image, an image path outside
the image root, a ``safe`` flag that is not a JSON boolean, malformed record, empty split) with an
error that names the file and record index, so no calibration or training work starts on bad data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import DataFormatError
from .images import check_image, resolve_image

__all__ = ["SPLITS", "DataFormatError", "check_num_samples", "load_vlguard", "pairs_to_dataset", "parse_split", "select_samples", "split_of"]

SPLITS = ("utility", "safety", "over_refusal")
_INSTRUCTION_KEYS = ("safe_instruction", "unsafe_instruction", "instruction")


def split_of(safe_image: bool, key: str) -> str:
    """The split of one pair: see the module docstring."""
    if key == "safe_instruction":
        return "utility"
    if key == "unsafe_instruction":
        return "over_refusal" if safe_image else "safety"
    return "utility" if safe_image else "safety"


def _where(path: Path, index: int) -> str:
    return f"{path}: record {index}"


def load_vlguard(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    allow_text_only: bool = False,
    allow_outside_root: bool = False,
) -> list[dict]:
    """Read a VLGuard JSON file into flat examples, one per instruction/response pair.

    Each example: ``{"image": absolute path or None, "instruction", "response", "split",
    "safe": bool, "category": str, "record": int}``. ``image_root`` defaults to the JSON file's
    folder. A record without an ``image`` (missing or null) is refused unless ``allow_text_only``
    (text-only LMs): silently dropping the image would calibrate or evaluate a different task.
    ``safe`` must be a JSON boolean (the string ``"false"`` would read as true). Image paths must
    resolve inside ``image_root`` unless ``allow_outside_root``; every image is verified now
    (:mod:`hsr_pl.data.images`).
    """
    path = Path(path)
    if path.is_dir():
        raise DataFormatError(f"VLGuard file {path} is a folder; pass the JSON file (e.g. {path / 'train.json'})")
    if not path.is_file():
        raise FileNotFoundError(f"VLGuard file {path} does not exist; pass an existing JSON file path")
    root = Path(image_root) if image_root is not None else path.parent
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataFormatError(f"{path} is not valid JSON ({err}); expected a JSON list of records") from None
    if not isinstance(records, list):
        raise DataFormatError(f"{path} holds a {type(records).__name__}; expected a JSON list of records")
    examples: list[dict] = []
    for index, record in enumerate(records):
        where = _where(path, index)
        if not isinstance(record, dict):
            raise DataFormatError(f"{where} is a {type(record).__name__}, expected an object")
        for key in ("safe", "instr-resp"):
            if key not in record:
                raise DataFormatError(f"{where} has no {key!r} field (fields: {sorted(record)})")
        safe = record["safe"]
        if not isinstance(safe, bool):
            raise DataFormatError(
                f"{where}: 'safe' is {safe!r} ({type(safe).__name__}); it must be a JSON boolean, true or false "
                "without quotes (a string such as \"false\" would read as true): fix the record"
            )
        image = record.get("image")
        if image is None and not allow_text_only:
            raise DataFormatError(
                f"{where} has no image; VLGuard records pair an image with instructions: add the image path, or set "
                "allow_text_only: true (data module) for a text-only model"
            )
        if image is not None and (not isinstance(image, str) or not image):
            raise DataFormatError(f"{where}: 'image' must be a path string, got {image!r}")
        if image is not None:
            image_path = resolve_image(image, root, where, allow_outside_root=allow_outside_root)
            check_image(image_path, where)
            image = str(image_path)
        pairs = record["instr-resp"]
        if not isinstance(pairs, list) or not pairs:
            raise DataFormatError(f"{where}: 'instr-resp' must be a non-empty list of dicts")
        for j, pair in enumerate(pairs):
            keys = [k for k in _INSTRUCTION_KEYS if isinstance(pair, dict) and k in pair]
            if len(keys) != 1 or not isinstance(pair.get("response"), str):
                raise DataFormatError(
                    f"{where}, instr-resp[{j}]: expected exactly one of {_INSTRUCTION_KEYS} and a "
                    f"'response' string, got {pair!r}"
                )
            instruction = pair[keys[0]]
            if not isinstance(instruction, str) or not instruction.strip():
                raise DataFormatError(f"{where}, instr-resp[{j}]: empty instruction")
            examples.append(
                {
                    "image": image,
                    "instruction": instruction,
                    "response": pair["response"],
                    "split": split_of(safe, keys[0]),
                    "safe": safe,
                    "category": str(record.get("harmful_category") or ""),
                    "record": index,
                }
            )
    return examples


def parse_split(split: str) -> tuple[str, ...]:
    """``"safety+over_refusal"`` -> ``("safety", "over_refusal")``, each checked."""
    parts = tuple(p.strip() for p in str(split).split("+"))
    for part in parts:
        if part not in SPLITS:
            raise ValueError(f"unknown split {part!r} in {split!r}; choose from {SPLITS}, joined with '+'")
    return parts


def pairs_to_dataset(examples: Iterable[dict], split: str | None = None, *, source: str = "data"):
    """A ``datasets.Dataset`` of ``examples`` (optionally one split, or several joined by '+');
    an empty selection is an error."""
    from datasets import Dataset

    wanted = parse_split(split) if split is not None else None
    rows = [e for e in examples if wanted is None or e["split"] in wanted]
    if not rows:
        raise DataFormatError(
            f"{source} has no examples of split {split!r}; splits are derived from the records' "
            "'safe' flag and instruction key (see docs/organism.md, VLGuard mapping)"
        )
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    return Dataset.from_dict(columns)


def check_num_samples(num_samples: object, label: str = "num_samples", allow_none: bool = True, why: str = "") -> None:
    """Refuse a count that is not a positive integer (None allowed unless ``allow_none=False``)."""
    if num_samples is None and allow_none:
        return
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        tail = " or null" if allow_none else ""
        raise ValueError(f"{label}={num_samples!r} must be a positive integer{tail}" + (f" ({why})" if why else ""))


def select_samples(dataset, num_samples: int | None, seed: int):
    """Seeded shuffle, then the first ``num_samples`` (all when None or larger than the set)."""
    check_num_samples(num_samples)
    shuffled = dataset.shuffle(seed=seed)
    if num_samples is None or num_samples >= len(shuffled):
        return shuffled
    return shuffled.select(range(num_samples))
