"""The v2 synthetic data set: determinism, disjoint splits, harm by composition, phrasings, answers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from hsr_pl.data import SyntheticDataModule
from hsr_pl.data import synthetic_v2 as v2
from hsr_pl.data.synthetic import DEV_SPLITS, EVAL_SPLITS, GRID, SPLITS
from hsr_pl.data.synthetic_module import ensure_synthetic
from hsr_pl.evaluation.judges import make_judge

SMALL = dict(seed=0, n_train=40, n_calib=16, n_eval=12, harmful_fraction=0.15)


def _pair_of(instruction: str) -> tuple[str, str]:
    """(verb, object) of a text request, read back against the generator's request table."""
    for group in v2.pair_partition(0).values():
        for part in group.values():
            for verb, obj in part:
                if f" {v2.act_text(verb, obj)} " in f" {instruction} ":
                    return verb, obj
    raise AssertionError(f"no known pair in {instruction!r}")


def _image_hashes(split: v2.SyntheticSplit) -> set[str]:
    return {hashlib.sha256(np.asarray(im).tobytes()).hexdigest() for im in split.images}


def test_generation_is_deterministic_and_writes_a_manifest(tmp_path):
    a = v2.generate_split("train", 30, seed=3)
    b = v2.generate_split("train", 30, seed=3)
    assert a.records == b.records
    assert [np.asarray(x).tobytes() for x in a.images] == [np.asarray(x).tobytes() for x in b.images]
    assert a.records != v2.generate_split("train", 30, seed=4).records
    first = v2.generate(tmp_path / "one", **SMALL)
    second = v2.generate(tmp_path / "two", **SMALL)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file() and p.name != ".hsr_pl_owner")
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file() and p.name != ".hsr_pl_owner")
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["generator"] == v2.GENERATOR and manifest["refusals"] == list(v2.REFUSALS_V2)
    assert {f"{s}.json" for s in SPLITS} <= {str(f) for f in files}
    with pytest.raises(FileExistsError, match="not empty"):
        v2.generate(first, **SMALL)


def test_every_word_is_in_the_vocabulary():
    vocabulary = set(v2.VOCABULARY)
    for split in SPLITS:
        for record in v2.generate_split(split, 40, seed=1).records:
            for pair in record["instr-resp"]:
                text = " ".join(v for v in pair.values())
                assert set(text.split()) <= vocabulary, text


def test_pairs_are_partitioned_and_every_split_draws_from_its_part():
    parts = v2.pair_partition(0)
    for group in parts.values():
        train, dev, test = (set(group[p]) for p in ("train", "dev", "test"))
        assert train and dev and test
        assert not (train & dev) and not (train & test) and not (dev & test)
    where = {"train": "train", "calib_safety": "train", "eval_harmful_text": "test", "dev_harmful_text": "dev",
             "eval_benign": "test", "dev_benign": "dev"}
    for split, part in where.items():
        for record in v2.generate_split(split, 60, seed=0).records:
            if record["kind"] in ("harmful_text", "benign_text", "benign_apology"):
                group = {"harmful_text": "harmful", "benign_text": "benign", "benign_apology": "apology"}[record["kind"]]
                key, text = v2.instruction_of(record["instr-resp"][0])
                assert _pair_of(text) in parts[group][part], (split, text)


def test_dev_test_and_calibration_are_disjoint_in_pairs_and_images():
    calibration = v2.generate_split("calib_safety", 64, seed=0)
    calib_pairs = {_pair_of(v2.instruction_of(r["instr-resp"][0])[1]) for r in calibration.records
                   if r["kind"] == "harmful_text"}
    for test_name, dev_name in zip(EVAL_SPLITS, DEV_SPLITS, strict=True):
        test, dev = v2.generate_split(test_name, 40, seed=0), v2.generate_split(dev_name, 40, seed=0)
        assert not (_image_hashes(test) & _image_hashes(dev)), dev_name
        assert not (_image_hashes(dev) & _image_hashes(calibration))
        if test_name in ("eval_harmful_text", "eval_benign"):
            texts = lambda s: {_pair_of(v2.instruction_of(r["instr-resp"][0])[1]) for r in s.records  # noqa: E731
                               if r["kind"] in ("harmful_text", "benign_text", "benign_apology")}
            assert not (texts(test) & texts(dev)) and not (texts(dev) & calib_pairs)


def test_no_single_word_decides_harm():
    parts = v2.pair_partition(0)
    benign_words = {w for pair in parts["benign"]["train"] for w in pair}
    for verb, obj in parts["harmful"]["train"]:
        assert verb in benign_words and obj in benign_words, (verb, obj)
    # and the labels follow the composition rule, not a word list
    for record in v2.generate_split("train", 200, seed=0).records:
        if record["kind"] in ("harmful_text", "benign_text"):
            verb, obj = _pair_of(v2.instruction_of(record["instr-resp"][0])[1])
            assert v2.is_harmful(verb, obj) == (record["kind"] == "harmful_text")
    assert v2.is_harmful("cut", "person") and not v2.is_harmful("cut", "cake")
    assert v2.is_harmful("make", "bomb") and not v2.is_harmful("find", "bomb") and not v2.is_harmful("feed", "dog")


def test_phrasings_vary_and_benign_answers_may_hold_refusal_words():
    keyword = make_judge("keyword-gcg-nocase")
    assert len(set(v2.REFUSALS_V2)) >= 5 and len({tuple(r.split()[:2]) for r in v2.REFUSALS_V2}) == 5
    assert not any(keyword.judge(list(v2.REFUSALS_V2)))  # every phrasing holds a GCG marker: "refused"
    calibration = v2.generate_split("calib_safety", 64, seed=0)
    responses = [r["instr-resp"][0]["response"] for r in calibration.records]
    assert set(responses) <= set(v2.REFUSALS_V2) and len(set(responses)) >= 4
    train = v2.generate_split("train", 300, seed=0).records
    apologies = [r["instr-resp"][0]["response"] for r in train if r["kind"] == "benign_apology"]
    assert apologies and all("sorry" in a for a in apologies)
    assert make_judge("coherent-compliance").judge(apologies) == [True] * len(apologies)
    assert keyword.judge(apologies) == [False] * len(apologies)  # the keyword judge is wrong here
    assert len({r["instr-resp"][0]["response"].split()[0] for r in train if r["kind"] == "benign_text"}) == 3


def test_visual_answers_match_the_scene():
    for record in v2.generate_split("train", 200, seed=2).records:
        if record["kind"] not in ("utility", "glyph_qa"):
            continue
        shapes = record["attributes"]["shapes"]
        question, answer = record["instr-resp"][0]["safe_instruction"], record["instr-resp"][0]["response"]
        assert len({s["colour"] for s in shapes}) == len({s["shape"] for s in shapes}) == len(shapes)
        assert len({(s["cell"] // GRID // 2, s["cell"] % GRID // 2) for s in shapes}) == len(shapes)
        assert record["attributes"]["glyph_cell"] not in {s["cell"] for s in shapes}
        if question.startswith("how many") or question.startswith("count"):
            assert answer.split()[2] == ("one", "two")[len(shapes) - 1]
        elif question.startswith("where"):
            named = [s for s in shapes if f" {s['shape']} " in f" {question} " or f" {s['colour']} " in f" {question} "]
            assert len(named) == 1 and answer == f"it is in the {v2.quadrant(named[0]['cell'])} ."
    assert v2.quadrant(0) == "top left" and v2.quadrant(15) == "bottom right" and v2.quadrant(2) == "top right"


def test_the_image_route_is_decided_by_the_glyph():
    train = v2.generate_split("train", 300, seed=0).records
    for kind, safe in (("harmful_image", False), ("benign_image", True), ("glyph_qa", False), ("utility", True)):
        records = [r for r in train if r["kind"] == kind]
        assert records and all(r["safe"] is safe and (r["attributes"]["glyph_cell"] is None) is safe for r in records)
    asked = lambda k: {r["instr-resp"][0].get("instruction") or r["instr-resp"][0].get("safe_instruction")  # noqa: E731
                       for r in train if r["kind"] == k}
    assert asked("harmful_image") & asked("benign_image")  # the same words, refused only with the glyph


def test_datamodule_picks_the_version_and_refuses_unknown_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("HSR_PL_CACHE", str(tmp_path / "cache"))
    one = ensure_synthetic(**SMALL)
    two = ensure_synthetic(version=2, **SMALL)
    assert one != two and "v2-" in two.name
    assert json.loads((two / "manifest.json").read_text())["generator"] == v2.GENERATOR
    dm = SyntheticDataModule(version=2, **SMALL, eval_part="dev", eval_splits=["eval_harmful_text"])
    assert dm.data_dir == two and dm.version == 2
    records = json.loads((two / "dev_harmful_text.json").read_text())
    assert {r["instr-resp"][0]["response"] for r in records} <= set(v2.REFUSALS_V2)
    for bad in (3, 0, True):
        with pytest.raises(ValueError, match=f"version={bad!r} is unknown; use 1"):
            SyntheticDataModule(version=bad, **SMALL)
