"""DocVQA (single-page task, Mathew et al., WACV 2021) in the annotation JSON of its v1.0 release.

Layout read: ``val/val_v1.0.json`` (or ``train_v1.0.json``): an object with ``dataset_name``,
``dataset_split``, ``dataset_version`` and ``data``, a list of records with ``questionId``,
``question``, ``image`` (a path such as ``documents/pybv0228_81.png``, relative to the JSON's
folder), ``docId``, ``answers`` (every accepted answer) and optionally ``question_types``,
``ucsf_document_id``, ``ucsf_document_page_no``, ``data_split``. A bare list of such records is
read too. The test split withholds ``answers``; it cannot be scored locally.

The prompt is the question followed by ``options.prompt_suffix`` (default: LLaVA's short-answer
instruction "Answer the question using a single word or phrase."); replies are scored with ANLS
(:func:`hsr_pl.evaluation.scoring.anls`, threshold 0.5) against every accepted answer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..images import check_image, resolve_image
from .common import DataFormatError, check_options, example, require_file

__all__ = ["SHORT_ANSWER", "load_docvqa"]

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
OPTIONS = {"prompt_suffix": SHORT_ANSWER}


def load_docvqa(
    path: str | os.PathLike, image_root: str | None = None, options: dict | None = None, *, allow_outside_root: bool = False
) -> list[dict]:
    """Examples of a DocVQA annotation file (see the module docstring); images must lie inside
    ``image_root`` unless ``allow_outside_root`` (:mod:`hsr_pl.data.images`)."""
    options = check_options("docvqa", options, OPTIONS)
    path = require_file(path, "DocVQA annotation file", "pass the release's val/val_v1.0.json")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path} is not valid JSON ({err})") from None
    records = content.get("data") if isinstance(content, dict) else content
    if not isinstance(records, list) or not records:
        raise DataFormatError(f"{path}: expected an object with a non-empty 'data' list (or a list of records)")
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    examples = []
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise DataFormatError(f"{where} is a {type(record).__name__}, expected an object")
        for key in ("question", "image"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise DataFormatError(f"{where} has no {key!r} string (keys: {sorted(record)})")
        answers = record.get("answers")
        if "answers" not in record:
            raise DataFormatError(f"{where} has no 'answers' (the test split withholds them); score the val split")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataFormatError(f"{where}: 'answers' must be a non-empty list of strings, got {answers!r}")
        image = resolve_image(record["image"], root, where, allow_outside_root=allow_outside_root)
        check_image(image, where)
        examples.append(example(
            record=index, id=str(record.get("questionId", index)),
            instruction=record["question"].strip() + options["prompt_suffix"], image=str(image),
            response=answers[0], answers=list(answers),
        ))
    return examples
