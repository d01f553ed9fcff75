"""MMBench in VLMEvalKit's TSV layout (Liu et al., 2023; VLMEvalKit, open-compass/VLMEvalKit).

Layout read: a tab-separated file with a header row and the columns ``index``, ``question``,
``A``, ``B`` (and ``C``, ``D``, … when the question has them), ``answer`` (the correct letter),
``image`` (the base64-encoded image, or — for rows that share an image — the ``index`` of the row
holding it, as VLMEvalKit writes a string of at most 64 characters), and optionally ``hint``,
``category``, ``l2-category``, ``split``, ``source``. Missing options and hints are empty cells;
VLMEvalKit reads the file with pandas, so the strings pandas takes for missing (``nan``,
``None``, ``N/A``, …) are missing here too.

The prompt is VLMEvalKit's default multiple-choice prompt: ``Hint: …`` (when there is one),
``Question: …``, ``Options:`` with one ``X. text`` line per option, and "Please select the
correct answer from the options above." Replies are scored by exact choice after
:func:`hsr_pl.evaluation.scoring.extract_choice`.

Circular evaluation (``options.circular: true``): MMBench asks each question once per rotation of
its options and counts it right only if every rotation is. In VLMEvalKit's TSVs the rotations are
rows whose ``index`` is the question's index plus k x 1 000 000; when the file has them they are
used, otherwise the rotations are made here. Without ``circular`` only the published questions
(index below 1 000 000) are asked.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import os
import string
import sys
from pathlib import Path

from ...evaluation.scoring import circular_shift
from .common import DataFormatError, check_options, example, require_file

__all__ = ["ROTATION_STRIDE", "load_mmbench", "mmbench_prompt", "read_tsv"]

ROTATION_STRIDE = 1_000_000
SELECT_PROMPT = "Please select the correct answer from the options above. \n"
OPTIONS = {"circular": False, "prompt_suffix": None}
# pandas.read_csv's default missing-value strings (how VLMEvalKit sees an empty option).
MISSING = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})


def _present(value: str | None) -> bool:
    return value is not None and value not in MISSING


def read_tsv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The TSV's rows as dicts of strings (fields may be long: base64 images)."""
    path = require_file(path, "MMBench TSV", "pass a VLMEvalKit MMBench file such as MMBench_DEV_EN.tsv")
    limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            header = reader.fieldnames or []
            rows = list(reader)
    finally:
        csv.field_size_limit(limit)
    missing = [c for c in ("index", "question", "A", "B", "answer", "image") if c not in header]
    if missing:
        hint = " (the test split withholds answers: use the dev TSV)" if missing == ["answer"] else ""
        raise DataFormatError(f"{path}: header lacks columns {missing} (has {header}){hint}")
    if not rows:
        raise DataFormatError(f"{path} has a header but no rows")
    return rows


def mmbench_prompt(question: str, choices: dict[str, str], hint: str | None = None, suffix: str | None = None) -> str:
    """VLMEvalKit's multiple-choice prompt (see the module docstring); ``suffix`` replaces its last line."""
    text = f"Hint: {hint}\n" if hint else ""
    text += f"Question: {question}\n"
    text += "Options:\n" + "".join(f"{letter}. {option}\n" for letter, option in choices.items())
    return text + (SELECT_PROMPT if suffix is None else suffix)


def _choices(row: dict[str, str]) -> dict[str, str]:
    return {c: row[c] for c in string.ascii_uppercase if _present(row.get(c))}


def _check_image(b64: str, where: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        data = base64.b64decode(b64, validate=True)
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as err:
        raise DataFormatError(f"{where}: the image cell is not a base64-encoded image ({err})") from None


def load_mmbench(
    path: str | os.PathLike, image_root: str | None = None, options: dict | None = None, *, allow_outside_root: bool = False
) -> list[dict]:
    """Examples of a MMBench TSV; ``options``: ``circular`` (bool), ``prompt_suffix`` (str). The images
    are inside the TSV (base64), so ``allow_outside_root`` has nothing to allow."""
    options = check_options("mmbench", options, OPTIONS)
    if image_root is not None:
        raise ValueError("mmbench reads its images from the TSV's base64 'image' column; remove image_root")
    path = Path(path).expanduser()
    rows = read_tsv(path)
    by_index: dict[int, dict[str, str]] = {}
    for number, row in enumerate(rows):
        where = f"{path}: row {number} (line {number + 2})"
        try:
            index = int(row["index"])
        except (TypeError, ValueError):
            raise DataFormatError(f"{where}: index={row['index']!r} is not an integer") from None
        if index in by_index:
            raise DataFormatError(f"{where}: index {index} appears twice")
        if not _present(row.get("question")):
            raise DataFormatError(f"{where}: empty question")
        choices = _choices(row)
        if len(choices) < 2 or list(choices) != list(string.ascii_uppercase[: len(choices)]):
            raise DataFormatError(f"{where}: options must be A, B, … without gaps; found {list(choices)}")
        if row.get("answer") not in choices:
            raise DataFormatError(f"{where}: answer {row.get('answer')!r} is not one of the options {list(choices)}")
        row["_where"], row["_number"] = where, str(number)
        by_index[index] = row
    # Rows sharing an image hold the index of the row that has it.
    for row in by_index.values():
        cell = row["image"]
        if len(cell) <= 64:
            target = by_index.get(int(cell)) if cell.strip().lstrip("-").isdigit() else None
            if target is None or len(target["image"]) <= 64:
                raise DataFormatError(f"{row['_where']}: image {cell!r} is neither base64 nor the index of a row with an image")
            row["_b64"] = target["image"]
        else:
            row["_b64"] = cell
    for row in by_index.values():
        if len(row["image"]) > 64:
            _check_image(row["_b64"], row["_where"])

    main = [i for i in by_index if i < ROTATION_STRIDE]
    rotations = {i for i in by_index if i >= ROTATION_STRIDE}
    for i in sorted(rotations):
        if i % ROTATION_STRIDE not in by_index:
            raise DataFormatError(f"{by_index[i]['_where']}: rotation of question {i % ROTATION_STRIDE}, which is missing")
    group_of = {index: g for g, index in enumerate(main)}
    suffix = options["prompt_suffix"]
    examples = []

    def add(row: dict[str, str], choices: dict[str, str], answer: str, index: int, rotation: int) -> None:
        hint = row.get("hint") if _present(row.get("hint")) else None
        examples.append(example(
            record=int(row["_number"]), id=str(index), instruction=mmbench_prompt(row["question"], choices, hint, suffix),
            response=answer, category=row.get("category") or "", image_b64=row["_b64"], choices=choices,
            answer=answer, group=group_of[index % ROTATION_STRIDE], rotation=rotation,
        ))

    for index in main:
        row = by_index[index]
        add(row, _choices(row), row["answer"], index, 0)
        if not options["circular"]:
            continue
        if rotations:
            continue  # the file's own rotations follow below
        for shift in range(1, len(_choices(row))):
            rotated, answer = circular_shift(_choices(row), row["answer"], shift)
            add(row, rotated, answer, index + shift * ROTATION_STRIDE, shift)
    if options["circular"] and rotations:
        for index in sorted(rotations):
            row = by_index[index]
            add(row, _choices(row), row["answer"], index, index // ROTATION_STRIDE)
    return examples
