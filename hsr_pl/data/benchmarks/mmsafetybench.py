"""MM-SafetyBench: query-relevant images that carry the harmful key phrase (Liu et al., ECCV 2024).

Layout read (the MM-SafetyBench release, isXinLiu/MM-SafetyBench, ``data/`` plus the separately
distributed image archive):

- ``processed_questions/<scenario>.json``, e.g. ``01-Illegal_Activitiy.json`` (the release's
  spelling): an object mapping question ids (``"0"``, ``"1"``, …) to records with the keys
  ``Question``, ``Changed Question``, ``Key Phrase``, ``Phrase Type``, ``Rephrased Question`` and
  ``Rephrased Question(SD)``;
- ``imgs/<scenario>/{SD,TYPO,SD_TYPO}/<id>.jpg``: the Stable Diffusion image of the key phrase,
  its typography, and the two stacked.

The image type decides the text, as in the release's evaluation: ``SD`` images go with
``Rephrased Question(SD)``, ``TYPO`` and ``SD_TYPO`` with ``Rephrased Question``. The harmful
original ``Question`` is what prompt-reading judges see; the scenario is the category.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..images import check_image, resolve_image
from .common import DataFormatError, check_options, example

__all__ = ["IMAGE_TYPES", "SCENARIOS", "load_mmsafetybench", "read_scenario"]

SCENARIOS = (
    "01-Illegal_Activitiy", "02-HateSpeech", "03-Malware_Generation", "04-Physical_Harm", "05-EconomicHarm",
    "06-Fraud", "07-Sex", "08-Political_Lobbying", "09-Privacy_Violence", "10-Legal_Opinion",
    "11-Financial_Advice", "12-Health_Consultation", "13-Gov_Decision",
)
# Image type -> the record key holding the text shown with it.
IMAGE_TYPES = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question"}
OPTIONS = {"image_type": "SD_TYPO", "scenarios": None}


def read_scenario(path: Path, text_key: str) -> list[tuple[str, dict]]:
    """``(id, record)`` pairs of one scenario file, each checked for ``Question`` and ``text_key``."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path} is not valid JSON ({err}); expected an object of question records") from None
    if not isinstance(records, dict) or not records:
        raise DataFormatError(f"{path}: expected a non-empty JSON object mapping question ids to records")
    out = []
    for qid, record in records.items():
        where = f"{path}: question {qid!r}"
        if not isinstance(record, dict):
            raise DataFormatError(f"{where} is a {type(record).__name__}, expected an object")
        for key in ("Question", text_key):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise DataFormatError(f"{where} has no {key!r} text (keys: {sorted(record)})")
        out.append((str(qid), record))
    return out


def _scenario_files(path: Path, wanted) -> list[Path]:
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"{path} holds no <scenario>.json files; point path at processed_questions/")
    else:
        raise FileNotFoundError(
            f"MM-SafetyBench path {path} does not exist; give processed_questions/ or one <scenario>.json"
        )
    if wanted is not None:
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        found = {f.stem: f for f in files}
        unknown = [w for w in wanted if w not in found]
        if unknown:
            raise ValueError(f"MM-SafetyBench scenarios {unknown} not found in {path}; found {sorted(found)}")
        files = [found[w] for w in wanted]
    return files


def load_mmsafetybench(
    path: str | os.PathLike, image_root: str | None = None, options: dict | None = None, *, allow_outside_root: bool = False
) -> list[dict]:
    """Examples of one scenario file or a whole ``processed_questions/`` folder.

    ``options``: ``image_type`` (``SD`` | ``TYPO`` | ``SD_TYPO``, default ``SD_TYPO``),
    ``scenarios`` (names to keep, default all). ``image_root`` defaults to the ``imgs`` folder
    beside ``processed_questions``. Question ids that would lead outside it (``../x``) are refused
    unless ``allow_outside_root``.
    """
    options = check_options("mmsafetybench", options, OPTIONS)
    image_type = options["image_type"]
    if image_type not in IMAGE_TYPES:
        raise ValueError(f"mmsafetybench option image_type={image_type!r}: choose one of {sorted(IMAGE_TYPES)}")
    path = Path(path).expanduser()
    files = _scenario_files(path, options["scenarios"])
    questions_dir = path if path.is_dir() else path.parent
    root = Path(image_root).expanduser() if image_root is not None else questions_dir.parent / "imgs"
    text_key = IMAGE_TYPES[image_type]
    examples = []
    for file in files:
        scenario = file.stem
        for qid, record in read_scenario(file, text_key):
            where = f"{file}: question {qid!r}"
            relative = Path(scenario) / image_type / f"{qid}.jpg"
            if not (root / relative).is_file():
                raise FileNotFoundError(
                    f"{where}: image {root / relative} does not exist; check image_root (now {root}), "
                    f"which must hold <scenario>/{image_type}/<id>.jpg"
                )
            image = resolve_image(relative, root, where, allow_outside_root=allow_outside_root)
            check_image(image, where)
            examples.append(example(
                record=len(examples), id=f"{scenario}/{qid}", instruction=record[text_key].strip(),
                image=str(image), judge_prompt=record["Question"].strip(), category=scenario,
            ))
    return examples
