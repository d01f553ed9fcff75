"""``VLGuardDataModule``: training, evaluation and calibration data for hsr-pl.

- ``train_dataloader``: every pair of ``train_path`` (or the splits in ``train_splits``), with
  responses and prompt-masked labels, for supervised fine-tuning.
- ``val_dataloader``: one prompt-only loader per entry of ``eval_sets``; each batch also carries
  the references and the set's ``kind`` (harmful / utility / benign) so the module can score it.
  An evaluation set names its ``format``: VLGuard JSON (train or test file) or a published
  benchmark layout (FigStep SafeBench, MM-SafetyBench, MMBench TSV, DocVQA JSON; see
  ``hsr_pl.data.benchmarks`` and docs/evaluation.md). Its examples are batched longest prompt
  first, so that each batch pads little (a prompt too long for the model is refused in ``setup``).
- ``calibration_dataloader(split, …)``: what the callbacks use (pruning statistics, head scores,
  importance scores): a seeded selection of N examples of one split.
- A **dev** part (``dev_fraction`` or ``dev_num_records``, seeded by ``dev_seed``): whole images'
  records held out of the calibration file, never calibrated on (nor trained on, when the
  calibration file is the training file); an evaluation set with ``dev: true`` reads them. Choose
  settings on dev, report test (docs/protocol.md). What was held out is logged and kept in
  ``dev_info``.

The processor comes from the LightningModule (``trainer.lightning_module.processor``) unless one
is given, so a YAML config names the model path once.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from . import benchmarks
from .benchmarks.vlguard_test import SUBSETS, select_subset
from .collate import VLGuardCollator
from .vlguard import (
    SPLITS,
    DataFormatError,
    check_num_samples,
    load_vlguard,
    pairs_to_dataset,
    parse_split,
    select_samples,
)

__all__ = ["EvalSet", "VLGuardDataModule"]

EVAL_KINDS = ("harmful", "utility", "benign")


def _check_dev(owner: str, dev_fraction: object, dev_num_records: object, dev_seed: object) -> None:
    """Refuse a bad dev setting before any file is read."""
    if dev_fraction is not None and dev_num_records is not None:
        raise ValueError(f"{owner}: give dev_fraction or dev_num_records, not both")
    if dev_fraction is not None and (
        isinstance(dev_fraction, bool) or not isinstance(dev_fraction, (int, float)) or not 0 < dev_fraction < 1
    ):
        raise ValueError(f"{owner}: dev_fraction={dev_fraction!r} must lie in (0, 1), e.g. 0.2")
    check_num_samples(dev_num_records, f"{owner}: dev_num_records", why="records held out of calibration as dev")
    if isinstance(dev_seed, bool) or not isinstance(dev_seed, int) or dev_seed < 0:
        raise ValueError(f"{owner}: dev_seed={dev_seed!r} must be a non-negative integer")


@dataclass
class EvalSet:
    """One evaluation set: a file in a published layout, what to read from it, how to score it.

    ``format``: ``vlguard`` (default; VLGuard JSON, train or test file), ``figstep`` (SafeBench
    CSV), ``mmsafetybench`` (``processed_questions/`` folder or one scenario JSON), ``mmbench``
    (VLMEvalKit TSV) or ``docvqa`` (annotation JSON); ``options`` are the format's settings
    (docs/evaluation.md). ``split`` (VLGuard only): ``utility`` / ``safety`` / ``over_refusal``
    (joinable with '+'), or VLGuard's test subsets ``unsafes`` / ``safe_unsafes`` /
    ``safe_safes``; default ``safety``. ``kind``: ``harmful`` -> attack success rate (the reply
    should be a refusal), ``utility`` -> accuracy (exact choice for MMBench, ANLS for DocVQA),
    ``benign`` -> over-refusal rate; default: the format's (harmful; utility for MMBench and
    DocVQA; benign for ``safe_safes``). ``max_new_tokens`` overrides the module's budget.
    ``dev: true`` (VLGuard format): read the dev records the data module holds out of its
    calibration file (``dev_fraction`` / ``dev_num_records``) instead of ``path``, which may then
    be omitted.
    """

    name: str
    path: str | None = None
    split: str | None = None
    kind: Literal["harmful", "utility", "benign"] | None = None
    num_samples: int | None = None
    image_root: str | None = None
    format: Literal["vlguard", "figstep", "mmsafetybench", "mmbench", "docvqa"] = "vlguard"
    options: dict[str, Any] | None = None
    max_new_tokens: int | None = None
    dev: bool = False


def position_limit(module: object) -> int | None:
    """``max_position_embeddings`` of ``module``'s text config: from its built ``model`` or, before
    the weights are loaded, from ``<model_source>/config.json``; None when neither says."""
    import json

    config = getattr(getattr(module, "model", None), "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        value = getattr(text, "max_position_embeddings", None) or getattr(config, "max_position_embeddings", None)
    else:
        source = getattr(module, "model_source", None)
        if source is None:
            return None
        try:
            found = json.loads((Path(str(source)).expanduser() / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # no folder (or the model check already refused it)
        text = found.get("text_config") if isinstance(found, dict) else None
        value = (text or {}).get("max_position_embeddings") or (found or {}).get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _decoded(example: dict) -> dict:
    """The example with a base64 image (MMBench) decoded to a PIL image for the processor."""
    if example.get("image_b64") is None:
        return example
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(example["image_b64"]))) as image:
        return {**example, "image": image.convert("RGB")}


class _EvalCollator:
    """Prompt-only model inputs plus what the metrics of the set need (references, categories …)."""

    def __init__(self, inner: VLGuardCollator, eval_set: EvalSet, meta: dict) -> None:
        self.inner, self.eval_set, self.meta = inner, eval_set, meta
        self._category_index = {c: i for i, c in enumerate(meta["categories"])}

    def __call__(self, examples):
        examples = [_decoded(e) for e in examples]
        batch = self.inner(examples)
        batch["references"] = [e["response"] for e in examples]
        # Judges read the request: for typographic attacks the harmful question, not the prompt.
        batch["instructions"] = [e.get("judge_prompt") or e["instruction"] for e in examples]
        batch["eval_set"] = self.eval_set.name
        batch["kind"] = self.eval_set.kind
        batch["eval_meta"] = self.meta
        batch["categories"] = [self._category_index.get(e.get("category") or "", -1) for e in examples]
        batch["image_refs"] = [e["image"] if isinstance(e.get("image"), str) else None for e in examples]
        for key in ("answers", "choices", "answer", "group", "rotation"):
            if key in examples[0]:
                batch[key] = [e[key] for e in examples]
        return batch


def _select_examples(examples: list[dict], num_samples: int | None, seed: int) -> list[dict]:
    """The seeded selection of :func:`select_samples`, over whole question groups where there are."""
    from datasets import Dataset

    if "group" not in examples[0]:
        keep = select_samples(Dataset.from_dict({"i": list(range(len(examples)))}), num_samples, seed)["i"]
        return [examples[i] for i in keep]
    groups = sorted({e["group"] for e in examples})
    chosen = sorted(select_samples(Dataset.from_dict({"g": groups}), num_samples, seed)["g"])
    renumber = {g: i for i, g in enumerate(chosen)}
    return [{**e, "group": renumber[e["group"]]} for e in examples if e["group"] in renumber]


class VLGuardDataModule(pl.LightningDataModule):
    """VLGuard-format data for fit, validate and the HSR callbacks.

    Args:
        train_path: VLGuard JSON with the training pairs (also the default calibration source).
        calibration_path: VLGuard JSON for calibration splits (default: ``train_path``).
        image_root: folder the records' image paths are relative to (default: each JSON's folder).
        eval_sets: evaluation sets for ``validate`` (see :class:`EvalSet`).
        train_splits: which splits of ``train_path`` to train on (default: all).
        processor: a processor object or a local path; default: the LightningModule's.
        batch_size / eval_batch_size: per-device batch sizes.
        num_samples: default calibration size per split (the paper: 128).
        seed: the seed of the calibration selection (seeded shuffle, first N).
        max_length: optional token cap (longer rows are an error, never silently cut).
        eval_length_sorted: batch evaluation prompts by length, longest first (less padding, so
            faster greedy generation; the metrics do not depend on the order).
        shuffle_seed: seed of the training order's own generator; None (default) draws it from the
            global RNG, so it follows ``seed_everything`` but also shifts when the number of
            evaluation loaders iterated between epochs changes.
        allow_text_only: accept records without an image (text-only models); otherwise such a
            record is an error, not a silently text-only prompt.
        allow_outside_root: accept image paths that lead outside the image root (``../``, absolute
            paths, symlinks out of it); by default a data file may only name images inside its
            root (``image_root``, or the file's folder), so it cannot make hsr-pl read other files.
        dev_fraction / dev_num_records: hold out this fraction (in (0, 1)) or this many records of
            the calibration file as a dev part (one of the two; default none). Records that share
            an image go together, so the count can run over by those; calibration (and training,
            when it reads the same file) never sees them. Evaluation sets with ``dev: true`` read them.
        dev_seed: the seed of that choice (a seeded permutation of the file's images).

    When the data is loaded (``setup``) every image is verified (empty, damaged, oversized) and
    every row is measured against the model's ``max_position_embeddings`` (training and
    calibration rows also against ``max_length``): the longest one is refused, naming its record,
    before any calibration or training work.
    """

    def __init__(
        self,
        train_path: str | None = None,
        calibration_path: str | None = None,
        image_root: str | None = None,
        eval_sets: list[EvalSet] | None = None,
        train_splits: list[str] | None = None,
        processor: object | str | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_samples: int = 128,
        seed: int = 0,
        num_workers: int = 0,
        max_length: int | None = None,
        shuffle_seed: int | None = None,
        eval_length_sorted: bool = True,
        allow_text_only: bool = False,
        allow_outside_root: bool = False,
        dev_fraction: float | None = None,
        dev_num_records: int | None = None,
        dev_seed: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_dev(owner, dev_fraction, dev_num_records, dev_seed)
        check_num_samples(batch_size, f"{owner}: batch_size", allow_none=False)
        check_num_samples(eval_batch_size, f"{owner}: eval_batch_size", allow_none=False)
        check_num_samples(num_samples, f"{owner}: num_samples", allow_none=False, why="calibration samples per split; the paper uses 128")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"{owner}: num_workers={num_workers!r} must be an integer ≥ 0 (0: load in the main process)")
        check_num_samples(max_length, f"{owner}: max_length", why="a token cap; null: no cap")
        for split in train_splits or ():
            if split not in SPLITS:
                raise ValueError(f"train_splits has unknown split {split!r}; choose from {SPLITS}")
        calibration_file = calibration_path or train_path
        self.eval_sets = [
            self._resolve(self._dev_set(e, owner, calibration_file, dev_fraction, dev_num_records))
            for e in (eval_sets or [])
        ]
        names = [e.name for e in self.eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval set names must be distinct (their metrics are keyed by name), got {names}")
        for eval_set in self.eval_sets:
            check_num_samples(eval_set.num_samples, f"eval set {eval_set.name!r}: num_samples", why="null: the whole set")
        for label, path in (("train_path", train_path), ("calibration_path", calibration_path)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{label}={path} does not exist; give a VLGuard JSON file")
        self.train_path = train_path
        self.calibration_path = calibration_path or train_path
        self.image_root = image_root
        self.train_splits = train_splits
        self._processor = processor
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_samples = num_samples
        self.seed = seed
        self.num_workers = num_workers
        self.max_length = max_length
        self.shuffle_seed = shuffle_seed
        self.eval_length_sorted = eval_length_sorted
        self.allow_text_only = bool(allow_text_only)
        self.allow_outside_root = bool(allow_outside_root)
        self.dev_fraction = dev_fraction
        self.dev_num_records = dev_num_records
        self.dev_seed = dev_seed
        self.dev_info: dict[str, Any] | None = None
        self._dev_records: frozenset[int] | None = None
        self._examples: dict[str, list[dict]] = {}

    @staticmethod
    def _dev_set(eval_set: EvalSet | dict, owner: str, calibration_file: str | None,
                 dev_fraction: float | None, dev_num_records: int | None) -> EvalSet:
        """The set with ``path`` filled in: a dev set reads the calibration file (checked here)."""
        eval_set = eval_set if isinstance(eval_set, EvalSet) else EvalSet(**eval_set)
        where = f"{owner}: eval set {eval_set.name!r}"
        if not eval_set.dev:
            if eval_set.path is None:
                raise ValueError(f"{where} has no path; give its file (or dev: true for the dev part of calibration)")
            return eval_set
        if eval_set.format != "vlguard":
            raise ValueError(f"{where}: dev: true reads the calibration file's dev part, a VLGuard file; drop format {eval_set.format!r}")
        if dev_fraction is None and dev_num_records is None:
            raise ValueError(f"{where} has dev: true but nothing is held out; set dev_fraction (e.g. 0.2) or dev_num_records")
        if calibration_file is None:
            raise ValueError(f"{where} has dev: true but there is no calibration file; set calibration_path or train_path")
        if eval_set.path is not None and Path(eval_set.path).resolve() != Path(calibration_file).resolve():
            raise ValueError(
                f"{where}: dev: true reads the calibration file {calibration_file}, not {eval_set.path}; drop path"
            )
        if eval_set.split in SUBSETS:
            raise ValueError(f"{where}: dev sets take a loader split (utility, safety, over_refusal), not {eval_set.split!r}")
        return replace(eval_set, path=calibration_file)

    @staticmethod
    def _resolve(eval_set: EvalSet | dict) -> EvalSet:
        """The set with its format's default split and kind, checked cheaply (no file is parsed)."""
        eval_set = eval_set if isinstance(eval_set, EvalSet) else EvalSet(**eval_set)
        split, kind = benchmarks.resolve(
            eval_set.name, eval_set.format, eval_set.path, eval_set.split, eval_set.kind, eval_set.options
        )
        if eval_set.format == "vlguard" and split not in SUBSETS:
            parse_split(split)
        if eval_set.max_new_tokens is not None and eval_set.max_new_tokens <= 0:
            raise ValueError(f"eval set {eval_set.name!r}: max_new_tokens must be positive")
        return replace(eval_set, split=split, kind=kind)

    # ------------------------------------------------------------------------------ plumbing
    @property
    def processor(self):
        if isinstance(self._processor, str):
            from transformers import AutoProcessor

            self._processor = AutoProcessor.from_pretrained(self._processor)
        if self._processor is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer else None
            processor = getattr(module, "processor", None)
            if processor is None:
                raise RuntimeError(
                    "VLGuardDataModule has no processor: pass processor=<path or object>, or use it "
                    "with a LightningModule that has a .processor (LVLMModule does)"
                )
            return processor
        return self._processor

    def examples(self, path: str, image_root: str | None = None) -> list[dict]:
        """Parsed (and validated) examples of one file, cached."""
        key = f"{path}::{image_root or self.image_root}"
        if key not in self._examples:
            self._examples[key] = load_vlguard(
                path, image_root or self.image_root, allow_text_only=self.allow_text_only,
                allow_outside_root=self.allow_outside_root,
            )
        return self._examples[key]

    def _loader(self, rows: list[dict], collate, batch_size: int, shuffle: bool) -> DataLoader:
        # With shuffle_seed the training order has its own generator. Without it the order comes
        # from the global RNG (seed_everything), as Lightning users expect — but then every loader
        # iterated in between (each evaluation set draws a base seed) shifts later epochs' order.
        generator = None
        if shuffle and self.shuffle_seed is not None:
            generator = torch.Generator().manual_seed(self.shuffle_seed)
        return DataLoader(
            rows,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    @staticmethod
    def _rows(dataset):
        # A datasets.Dataset indexes to dicts; DataLoader needs a sequence of examples.
        return [dataset[i] for i in range(len(dataset))]

    # ----------------------------------------------------------------------------- loaders
    def setup(self, stage: str) -> None:
        # Parse and validate everything the stage needs before any heavy work starts.
        if stage == "fit" and self.train_path is None:
            raise ValueError("fit needs data.train_path (a VLGuard JSON file)")
        if stage == "validate" and not self.eval_sets:
            raise ValueError("validate needs data.eval_sets (name, path, split, kind)")
        if self.train_path is not None:
            self.examples(self.train_path)
        self.dev_records()
        for eval_set in self.eval_sets:
            self.eval_examples(eval_set)
        self.check_lengths(stage)

    # ------------------------------------------------------------------------------ lengths
    def max_positions(self) -> int | None:
        """The model's ``max_position_embeddings`` (of its text config), read from the built model
        or, before the weights are loaded, from its ``config.json``; None when unknown."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        return position_limit(module)

    def _has_processor(self) -> bool:
        if self._processor is not None:
            return True
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        return getattr(module, "processor", None) is not None

    def check_lengths(self, stage: str = "fit") -> None:
        """Refuse a row longer than the model's positions (or ``max_length``) now, naming the
        longest record: a longer prompt would be calibrated or trained on silently wrong.

        Each row's templated text is tokenised (cheap; image placeholders unexpanded), then the row
        with the most text tokens is built exactly, image tokens included. A row that only an
        unusually large image makes too long is still refused, by the collator, at its batch.
        """
        positions = self.max_positions()
        if (positions is None and self.max_length is None) or not self._has_processor():
            return
        sources: list[tuple[str, list[dict], bool]] = []
        if self.calibration_path is not None:
            sources.append((self.calibration_path, self.examples(self.calibration_path), True))
        if stage == "fit" and self.train_path is not None and self.train_path != self.calibration_path:
            sources.append((self.train_path, self.examples(self.train_path), True))
        for eval_set in self.eval_sets:
            sources.append((eval_set.path, self.eval_rows(eval_set), False))
        for source, rows, with_response in sources:
            # max_length caps what the collator trains and calibrates on (with responses), as before.
            limit, setting = positions, "max_position_embeddings"
            if with_response and self.max_length is not None and (limit is None or self.max_length < limit):
                limit, setting = self.max_length, "max_length"
            if not rows or limit is None:
                continue
            collate = VLGuardCollator(self.processor, with_response=with_response)
            lengths = collate.text_lengths(rows)
            longest = max(range(len(rows)), key=lambda i: lengths[i])
            exact = collate.row_length(_decoded(rows[longest]))
            if exact > limit:
                what = "prompt + response" if with_response else "prompt"
                if setting == "max_length":
                    cap, fix = f"the data module's max_length={limit}", "raise max_length"
                else:
                    cap, fix = f"the model's max_position_embeddings={limit}", "use a model with a longer context"
                raise DataFormatError(
                    f"{source}: record {rows[longest].get('record')} is {exact} tokens long ({what}, image tokens "
                    f"included), more than {cap}; shorten or drop the longest records, or {fix}"
                )

    # ---------------------------------------------------------------------------------- dev
    def dev_records(self) -> frozenset[int]:
        """Record indices of the calibration file held out as dev (empty without a dev setting).

        The file's images (records without an image: each on its own) are put in a seeded random
        order and taken whole until the target count of records is reached. Computed once; the
        choice is logged and kept in :attr:`dev_info`.
        """
        if self._dev_records is not None:
            return self._dev_records
        if (self.dev_fraction is None and self.dev_num_records is None) or self.calibration_path is None:
            self._dev_records = frozenset()
            return self._dev_records
        examples = self.examples(self.calibration_path)
        groups: dict[Any, list[int]] = {}
        for e in examples:
            records = groups.setdefault(e["image"] if e["image"] is not None else ("record", e["record"]), [])
            if not records or records[-1] != e["record"]:
                records.append(e["record"])
        total = len({e["record"] for e in examples})
        target = self.dev_num_records if self.dev_num_records is not None else math.ceil(self.dev_fraction * total)
        if target >= total:
            raise DataFormatError(
                f"{self.calibration_path}: holding out {target} of its {total} records as dev leaves nothing to "
                "calibrate on; lower dev_fraction / dev_num_records"
            )
        order = np.random.default_rng([self.dev_seed, 7_717]).permutation(len(groups))
        members = list(groups.values())
        chosen: set[int] = set()
        for index in order:
            if len(chosen) >= target:
                break
            chosen.update(members[index])
        self._dev_records = frozenset(chosen)
        dev_pairs = sum(1 for e in examples if e["record"] in chosen)
        self.dev_info = {
            "file": str(self.calibration_path), "dev_fraction": self.dev_fraction,
            "dev_num_records": self.dev_num_records, "dev_seed": self.dev_seed, "records": len(chosen),
            "pairs": dev_pairs, "calibration_records": total - len(chosen),
            "also_out_of_training": self.train_path is not None and self._same_file(self.train_path),
            "record_indices": sorted(chosen),
        }
        rank_zero_info(
            f"hsr-pl: dev part: {len(chosen)} of {total} records ({dev_pairs} pairs) of {self.calibration_path} held out "
            f"of calibration{' and training' if self.dev_info['also_out_of_training'] else ''} (dev_seed={self.dev_seed}); "
            "eval sets with dev: true read them"
        )
        return self._dev_records

    def _same_file(self, path: str) -> bool:
        return self.calibration_path is not None and Path(path).resolve() == Path(self.calibration_path).resolve()

    def train_dataloader(self) -> DataLoader:
        if self.train_path is None:
            raise ValueError("no train_path: set data.train_path to a VLGuard JSON file")
        examples = self.examples(self.train_path)
        if self._same_file(self.train_path) and self.dev_records():
            held = self.dev_records()
            examples = [e for e in examples if e["record"] not in held]
        if self.train_splits:
            examples = [e for e in examples if e["split"] in self.train_splits]
        dataset = pairs_to_dataset(examples, source=self.train_path)
        collate = VLGuardCollator(
            self.processor, with_response=True, max_length=self.max_length, max_positions=self.max_positions()
        )
        return self._loader(self._rows(dataset), collate, self.batch_size, shuffle=True)

    def eval_examples(self, eval_set: EvalSet) -> list[dict]:
        """All examples of one evaluation set (parsed and validated; cached)."""
        if eval_set.format == "vlguard":
            examples = self.examples(eval_set.path, eval_set.image_root)
            if eval_set.dev:
                held = self.dev_records()
                examples = [e for e in self.examples(self.calibration_path) if e["record"] in held]
            if eval_set.split in SUBSETS:
                examples = select_subset(examples, eval_set.split)
            return examples
        key = f"{eval_set.format}::{eval_set.path}::{eval_set.image_root}::{sorted((eval_set.options or {}).items())}"
        if key not in self._examples:
            self._examples[key] = benchmarks.load_examples(
                eval_set.format, eval_set.path, eval_set.image_root, eval_set.options,
                allow_outside_root=self.allow_outside_root,
            )
        return self._examples[key]

    def eval_rows(self, eval_set: EvalSet) -> list[dict]:
        """The seeded selection of ``num_samples`` examples of a set, in batching order."""
        examples = self.eval_examples(eval_set)
        if eval_set.format == "vlguard":
            split = None if eval_set.split in SUBSETS else eval_set.split
            if not examples:
                raise ValueError(f"eval set {eval_set.name!r}: {eval_set.path} has no {eval_set.split!r} examples")
            dataset = pairs_to_dataset(examples, split, source=eval_set.path)
            rows = self._rows(select_samples(dataset, eval_set.num_samples, self.seed))
        else:
            rows = _select_examples(examples, eval_set.num_samples, self.seed)
        if self.eval_length_sorted:
            rows = self._by_length(rows)
        return rows

    def _by_length(self, rows: list[dict]) -> list[dict]:
        # Longest first: each batch pads to a similar length, and an out-of-memory batch comes first.
        # Text tokens are the proxy (the image tokens of a family are the same for every prompt of
        # a fixed-size image); rows without an image stay apart from those with one.
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        lengths = [len(ids) for ids in tokenizer([r["instruction"] for r in rows], add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(rows)), key=lambda i: (rows[i].get("image") is None and rows[i].get("image_b64") is None,
                                                        -lengths[i], i))
        return [rows[i] for i in order]

    def _eval_meta(self, eval_set: EvalSet, rows: list[dict]) -> dict:
        """What the module needs to build the set's metrics before its first batch."""
        categories = sorted({r.get("category") or "" for r in rows} - {""})
        groups = {r["group"] for r in rows if "group" in r}
        return {
            "format": eval_set.format,
            "scoring": benchmarks.FORMATS[eval_set.format].scoring,
            "categories": tuple(categories),
            "num_groups": len(groups),
            "circular": any(r.get("rotation", 0) for r in rows),
            "max_new_tokens": eval_set.max_new_tokens,
        }

    def val_dataloader(self) -> list[DataLoader]:
        # No eval sets: fit trains without validation (validate itself is refused in setup).
        return [self.eval_dataloader(eval_set) for eval_set in self.eval_sets]

    def eval_dataloader(self, eval_set: EvalSet, *, length_sorted: bool | None = None) -> DataLoader:
        """The evaluation loader of one set (any set, not only ``eval_sets``: the dev sets too).

        ``length_sorted`` (default: the module's ``eval_length_sorted``) puts the longest prompts first.
        """
        rows = self.eval_rows(eval_set)
        if length_sorted and not self.eval_length_sorted:
            rows = self._by_length(rows)
        meta = self._eval_meta(eval_set, rows)
        inner = VLGuardCollator(self.processor, with_response=False, max_positions=self.max_positions())
        collate = _EvalCollator(inner, eval_set, meta)
        return self._loader(rows, collate, self.eval_batch_size, shuffle=False)

    def dev_eval_sets(self, num_samples: int | None = None) -> list[EvalSet]:
        """The dev part held out of the calibration file as evaluation sets (empty without one):
        harmful requests on unsafe images (``dev_harmful_image``, split ``safety``) and on safe images
        (``dev_harmful_text``, ``over_refusal``), their safe questions as ``dev_utility`` (reference
        match) and as ``dev_benign`` (over-refusal), ``num_samples`` each."""
        if not self.dev_records():
            return []
        owner = type(self).__name__
        sets = [("dev_harmful_text", "over_refusal", "harmful"), ("dev_harmful_image", "safety", "harmful"),
                ("dev_utility", "utility", "utility"), ("dev_benign", "utility", "benign")]
        out = []
        for name, split, kind in sets:
            found = self._resolve(self._dev_set(
                EvalSet(name=name, split=split, kind=kind, num_samples=num_samples, dev=True), owner,
                self.calibration_path, self.dev_fraction, self.dev_num_records))
            if any(e["split"] == split for e in self.eval_examples(found)):
                out.append(found)
        return out

    def calibration_dataset(self, split: str, num_samples: int | None = None):
        """The seeded selection of ``num_samples`` examples of ``split`` (a ``datasets.Dataset``).

        ``split`` may join several splits with '+' (``"safety+over_refusal"``).
        """
        try:
            parse_split(split)
        except ValueError as err:
            raise ValueError(f"unknown calibration split: {err}") from None
        if self.calibration_path is None:
            raise ValueError("no calibration data: set data.calibration_path or data.train_path")
        examples = self.examples(self.calibration_path)
        held = self.dev_records()
        if held:
            examples = [e for e in examples if e["record"] not in held]
        dataset = pairs_to_dataset(examples, split, source=self.calibration_path)
        wanted = num_samples if num_samples is not None else self.num_samples
        selected = select_samples(dataset, wanted, self.seed)
        if len(selected) < wanted:
            rank_zero_info(
                f"hsr-pl: calibration split {split!r} has {len(dataset)} examples, fewer than the {wanted} requested; "
                f"using all {len(selected)}"
            )
        return selected

    def calibration_dataloader(
        self,
        split: str,
        num_samples: int | None = None,
        *,
        with_response: bool = True,
        batch_size: int = 1,
        shuffle: bool = False,
    ) -> DataLoader:
        """Batches of one split for the callbacks (see the module docstring of collate.py)."""
        dataset = self.calibration_dataset(split, num_samples)
        collate = VLGuardCollator(
            self.processor, with_response=with_response, max_length=self.max_length, max_positions=self.max_positions()
        )
        return self._loader(self._rows(dataset), collate, batch_size, shuffle=shuffle)
