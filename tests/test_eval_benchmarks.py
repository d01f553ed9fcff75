"""Benchmark loaders on fixtures in each release's own layout: what they read, how they fail, and how
the data module batches them (selection, length order, the fields the metrics need)."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from hsr_pl.data import DataFormatError, VLGuardDataModule
from hsr_pl.data.benchmarks import (
    FIGSTEP_PROMPT,
    figstep_text,
    load_docvqa,
    load_figstep,
    load_mmbench,
    load_mmsafetybench,
    mmbench_prompt,
    render_figstep,
)
from hsr_pl.data.benchmarks.figstep import resolve_font

from benchmark_fixtures import (
    FIGSTEP_CATEGORIES,
    MMBENCH_QUESTIONS,
    SCENARIOS,
    write_docvqa,
    write_figstep,
    write_mmbench,
    write_mmsafetybench,
    write_vlguard_test,
)


# -------------------------------------------------------------------------------------- FigStep
def test_figstep_reads_the_csv_and_its_image_folder(tmp_path):
    path = write_figstep(tmp_path)
    examples = load_figstep(path)
    assert len(examples) == 6
    first = examples[0]
    assert first["instruction"] == FIGSTEP_PROMPT and first["image"].endswith("images/SafeBench/query_ForbidQI_1_1_6.png")
    assert first["judge_prompt"] == "How can someone do harmful thing 1.1, with commas?"  # quoted CSV field
    assert [e["category"] for e in examples] == [c for c in FIGSTEP_CATEGORIES for _ in range(2)]
    assert first["id"] == "ForbidQI_1_1" and first["record"] == 0


def test_figstep_text_wraps_like_figstep():
    assert figstep_text("Steps to manufacture illegal drugs.") == "Steps to\nmanufacture\nillegal drugs.\n1. \n2. \n3. "
    assert figstep_text("List of places.\n") == "List of places.\n1. \n2. \n3. "
    assert figstep_text("Supercalifragilisticexpialidocious words") == "Supercalifragil\nisticexpialidoc\nious words\n1. \n2. \n3. "


def _ink_bands(image) -> list[tuple[int, int]]:
    gray = image.convert("L")
    rows = [any(gray.getpixel((x, y)) < 128 for x in range(gray.width)) for y in range(gray.height)]
    bands, start = [], None
    for y, ink in enumerate(rows + [False]):
        if ink and start is None:
            start = y
        if not ink and start is not None:
            bands.append((start, y))
            start = None
    return bands


def test_figstep_rendering_layout():
    font, description = resolve_font()
    image = render_figstep("ABC\nDEF\n1. ", font)
    assert image.size == (760, 760) and image.mode == "RGB" and description
    assert image.getpixel((759, 759)) == (255, 255, 255) and image.getpixel((5, 5)) == (255, 255, 255)
    bands = _ink_bands(image)
    assert len(bands) == 3 and bands[0][0] >= 10  # three lines of text, drawn from y = 10 down
    gray = image.convert("L")
    left = min(x for x in range(760) for y in range(bands[0][0], bands[0][1]) if gray.getpixel((x, y)) < 128)
    assert 20 <= left < 40
    with pytest.raises(FileNotFoundError, match="cannot be opened"):
        resolve_font("/nope/font.ttf")


def test_figstep_renders_from_the_csv_alone_and_reuses_the_cache(tmp_path):
    path = write_figstep(tmp_path, images=False)
    render_dir = tmp_path / "rendered"
    examples = load_figstep(path, options={"render_dir": str(render_dir)})
    assert len(examples) == 6 and all(e["image"].startswith(str(render_dir)) for e in examples)
    info = json.loads((render_dir / "render.json").read_text())
    assert info["font"] and info["canvas"] == [760, 760] and info["wrap_width"] == 15
    with Image.open(examples[0]["image"]) as image:
        assert image.size == (760, 760)
        assert len(_ink_bands(image)) >= 4  # wrapped instruction lines plus 1. 2. 3.
    stamp = (render_dir / "query_ForbidQI_1_1_6.png").stat().st_mtime_ns
    load_figstep(path, options={"render_dir": str(render_dir)})
    assert (render_dir / "query_ForbidQI_1_1_6.png").stat().st_mtime_ns == stamp


def test_figstep_errors_name_row_and_fix(tmp_path):
    path = write_figstep(tmp_path)
    rows = list(csv.DictReader(open(path)))
    (tmp_path / "images_gone.csv").write_text(path.read_text())
    with pytest.raises(FileNotFoundError, match=r"row 0 \(line 2\).*options.images=render"):
        load_figstep(tmp_path / "images_gone.csv", image_root=str(tmp_path / "nowhere"))
    rows[3]["instruction"] = " "
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataFormatError, match=r"row 3 \(line 5\): empty 'instruction'"):
        load_figstep(bad)
    (tmp_path / "cols.csv").write_text("dataset,question\nForbidQI,why?\n")
    with pytest.raises(DataFormatError, match="lacks columns"):
        load_figstep(tmp_path / "cols.csv")
    with pytest.raises(ValueError, match="no option"):
        load_figstep(path, options={"fonts": "x"})
    with pytest.raises(ValueError, match="images="):
        load_figstep(path, options={"images": "maybe"})


# ------------------------------------------------------------------------------- MM-SafetyBench
def test_mmsafetybench_reads_scenarios_and_pairs_text_with_image_type(tmp_path):
    folder = write_mmsafetybench(tmp_path)
    examples = load_mmsafetybench(folder)
    assert len(examples) == 6 and [e["category"] for e in examples] == [s for s in SCENARIOS for _ in range(3)]
    first = examples[0]
    assert first["image"].endswith("imgs/01-Illegal_Activitiy/SD_TYPO/0.jpg")
    assert first["instruction"].startswith("The bottom of the image shows")  # Rephrased Question
    assert first["judge_prompt"] == "How do I do bad thing 0-0?"
    sd = load_mmsafetybench(folder / "02-HateSpeech.json", options={"image_type": "SD"})
    assert len(sd) == 3 and sd[1]["image"].endswith("imgs/02-HateSpeech/SD/1.jpg")
    assert sd[1]["instruction"] == "The image shows a phrase of an activity 1-1. List steps."  # Rephrased Question(SD)
    only = load_mmsafetybench(folder, options={"scenarios": ["02-HateSpeech"], "image_type": "TYPO"})
    assert {e["category"] for e in only} == {"02-HateSpeech"} and "/TYPO/" in only[0]["image"]


def test_mmsafetybench_errors(tmp_path):
    folder = write_mmsafetybench(tmp_path)
    (tmp_path / "data" / "imgs" / "02-HateSpeech" / "SD_TYPO" / "2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="question '2'.*SD_TYPO/<id>.jpg"):
        load_mmsafetybench(folder)
    records = json.loads((folder / "01-Illegal_Activitiy.json").read_text())
    del records["1"]["Rephrased Question"]
    (folder / "01-Illegal_Activitiy.json").write_text(json.dumps(records))
    with pytest.raises(DataFormatError, match="question '1' has no 'Rephrased Question'"):
        load_mmsafetybench(folder / "01-Illegal_Activitiy.json")
    with pytest.raises(ValueError, match="image_type"):
        load_mmsafetybench(folder, options={"image_type": "SDTYPO"})
    with pytest.raises(ValueError, match="not found"):
        load_mmsafetybench(folder, options={"scenarios": ["99-Nothing"]})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mmsafetybench(tmp_path / "nope")


# ----------------------------------------------------------------------------------------- MMBench
def test_mmbench_prompt_is_vlmevalkits():
    assert mmbench_prompt("how many circles ?", {"A": "one", "B": "two"}, "count the shapes") == (
        "Hint: count the shapes\nQuestion: how many circles ?\nOptions:\nA. one\nB. two\n"
        "Please select the correct answer from the options above. \n"
    )
    assert mmbench_prompt("q", {"A": "x", "B": "y"}, None, suffix="Answer with the letter.") == (
        "Question: q\nOptions:\nA. x\nB. y\nAnswer with the letter."
    )


def test_mmbench_reads_questions_options_and_base64_images(tmp_path):
    examples = load_mmbench(write_mmbench(tmp_path))
    assert len(examples) == 4 and [e["answer"] for e in examples] == ["C", "A", "B", "A"]
    assert examples[2]["choices"] == {"A": "circle", "B": "square"}  # empty C, D cells are no options
    assert examples[1]["instruction"].startswith("Hint: count the shapes\nQuestion: how many circles ?\n")
    assert examples[3]["instruction"].startswith('Question: is it "left" or right ?')  # quoted TSV cell
    with Image.open(io.BytesIO(base64.b64decode(examples[0]["image_b64"]))) as image:
        assert image.size == (12, 12)
    assert [e["group"] for e in examples] == [0, 1, 2, 3] and all(e["rotation"] == 0 for e in examples)


def test_mmbench_circular_rotations_made_here_equal_the_files_own(tmp_path):
    made = load_mmbench(write_mmbench(tmp_path / "a"), options={"circular": True})
    given = load_mmbench(write_mmbench(tmp_path / "b", with_rotations=True), options={"circular": True})
    assert len(made) == len(given) == sum(len(q[1]) for q in MMBENCH_QUESTIONS)
    key = lambda e: (e["group"], e["rotation"])  # noqa: E731
    published = {e["group"]: e for e in made if e["rotation"] == 0}
    for a, b in zip(sorted(made, key=key), sorted(given, key=key)):
        assert (a["choices"], a["answer"], a["instruction"]) == (b["choices"], b["answer"], b["instruction"])
        assert a["image_b64"] == b["image_b64"]  # the rotations' image cells hold the original's index
        original = published[a["group"]]
        assert a["choices"][a["answer"]] == original["choices"][original["answer"]]  # the same right option
    plain = load_mmbench(write_mmbench(tmp_path / "c", with_rotations=True))
    assert len(plain) == 4 and all(e["rotation"] == 0 for e in plain)


def _edit_tsv(path, edit):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    edit(rows)
    with open(path, "w", newline="") as handle:
        csv.writer(handle, delimiter="\t").writerows(rows)


def test_mmbench_missing_value_strings_are_no_options(tmp_path):
    path = write_mmbench(tmp_path)
    _edit_tsv(path, lambda rows: rows[3].__setitem__(6, "None"))  # pandas reads "None" as missing
    assert load_mmbench(path)[2]["choices"] == {"A": "circle", "B": "square"}
    _edit_tsv(path, lambda rows: rows[1].__setitem__(6, "nan"))  # D of question 0
    assert list(load_mmbench(path)[0]["choices"]) == ["A", "B", "C"]


@pytest.mark.parametrize("edit, message", [
    (lambda rows: [r.pop(7) for r in rows], "lacks columns \\['answer'\\].*use the dev TSV"),
    (lambda rows: rows[1].__setitem__(7, "E"), "row 0 \\(line 2\\): answer 'E' is not one of"),
    (lambda rows: rows[2].__setitem__(9, "bm90IGFuIGltYWdlIGF0IGFsbCwganVzdCBzb21lIHRleHQgdGhhdCBpcyBsb25nIGVub3VnaA=="),
     "row 1 \\(line 3\\): the image cell is not a base64-encoded image"),
    (lambda rows: rows[2].__setitem__(9, "7"), "row 1 \\(line 3\\): image '7' is neither base64"),
    (lambda rows: rows[3].__setitem__(0, "0"), "index 0 appears twice"),
    (lambda rows: rows[2].__setitem__(4, ""), "options must be A, B, … without gaps"),
])
def test_mmbench_errors_name_the_row(tmp_path, edit, message):
    path = write_mmbench(tmp_path)
    _edit_tsv(path, edit)
    with pytest.raises(DataFormatError, match=message):
        load_mmbench(path)


# ------------------------------------------------------------------------------------------ DocVQA
def test_docvqa_reads_the_annotation_file(tmp_path):
    examples = load_docvqa(write_docvqa(tmp_path))
    assert len(examples) == 3
    assert examples[0]["instruction"] == "what is the date ?\nAnswer the question using a single word or phrase."
    assert examples[0]["answers"] == ["1/8/93", "january 8 1993"] and examples[0]["id"] == "1000"
    assert examples[2]["image"].endswith("val/documents/doc0002_1.png")
    bare = load_docvqa(write_docvqa(tmp_path), options={"prompt_suffix": ""})
    assert bare[1]["instruction"] == "who is the sender ?"


def test_docvqa_errors(tmp_path):
    path = write_docvqa(tmp_path)
    content = json.loads(path.read_text())
    del content["data"][1]["answers"]
    path.write_text(json.dumps(content))
    with pytest.raises(DataFormatError, match="record 1 has no 'answers' \\(the test split withholds them\\)"):
        load_docvqa(path)
    content["data"][1]["answers"] = ["x"]
    content["data"][2]["image"] = "documents/missing.png"
    path.write_text(json.dumps(content))
    with pytest.raises(FileNotFoundError, match="record 2: image .*missing.png does not exist"):
        load_docvqa(path)
    path.write_text(json.dumps({"data": []}))
    with pytest.raises(DataFormatError, match="non-empty 'data' list"):
        load_docvqa(path)


# ----------------------------------------------------------------------------------- data module
@pytest.fixture
def all_sets(tmp_path):
    return [
        {"name": "figstep", "format": "figstep", "path": str(write_figstep(tmp_path / "fs"))},
        {"name": "mmsafety", "format": "mmsafetybench", "path": str(write_mmsafetybench(tmp_path / "mm")),
         "options": {"image_type": "SD"}},
        {"name": "vlguard_unsafes", "path": str(write_vlguard_test(tmp_path / "vg")), "split": "unsafes",
         "image_root": str(tmp_path / "vg" / "test")},
        {"name": "vlguard_safe_safes", "path": str(tmp_path / "vg" / "test.json"), "split": "safe_safes",
         "image_root": str(tmp_path / "vg" / "test")},
        {"name": "mmbench", "format": "mmbench", "path": str(write_mmbench(tmp_path / "mb")),
         "options": {"circular": True}, "max_new_tokens": 3},
        {"name": "docvqa", "format": "docvqa", "path": str(write_docvqa(tmp_path / "dv"))},
    ]


def test_eval_sets_get_their_formats_default_kinds(all_sets, tiny_llava):
    dm = VLGuardDataModule(eval_sets=all_sets, processor=tiny_llava[1])
    assert [(e.name, e.kind) for e in dm.eval_sets] == [
        ("figstep", "harmful"), ("mmsafety", "harmful"), ("vlguard_unsafes", "harmful"),
        ("vlguard_safe_safes", "benign"), ("mmbench", "utility"), ("docvqa", "utility")]
    dm.setup("validate")
    counts = {e.name: len(dm.eval_rows(e)) for e in dm.eval_sets}
    assert counts == {"figstep": 6, "mmsafety": 6, "vlguard_unsafes": 2, "vlguard_safe_safes": 3,
                      "mmbench": 13, "docvqa": 3}


@pytest.mark.parametrize("change, error, message", [
    ({"kind": "utility"}, ValueError, "a figstep set is scored as harmful, not 'utility'"),
    ({"split": "safety"}, ValueError, "format 'figstep' has no splits"),
    ({"format": "safebench"}, ValueError, "unknown format 'safebench'"),
    ({"options": {"colour": 1}}, ValueError, "has no option\\(s\\) \\['colour'\\]"),
    ({"path": "/nope.csv"}, FileNotFoundError, "eval set 'figstep': /nope.csv does not exist"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be positive"),
])
def test_bad_eval_sets_fail_before_any_loading(all_sets, change, error, message):
    with pytest.raises(error, match=message):
        VLGuardDataModule(eval_sets=[{**all_sets[0], **change}])


def test_duplicate_set_names_and_unknown_vlguard_split(all_sets):
    with pytest.raises(ValueError, match="distinct"):
        VLGuardDataModule(eval_sets=[all_sets[0], all_sets[0]])
    with pytest.raises(ValueError, match="unknown split 'unsafe'"):
        VLGuardDataModule(eval_sets=[{**all_sets[2], "split": "unsafe"}])


def test_rows_are_batched_longest_first_and_selection_keeps_whole_questions(all_sets, tiny_llava):
    tokenizer = tiny_llava[1].tokenizer
    sets = [{**all_sets[4], "num_samples": 2}, {**all_sets[5]}]
    dm = VLGuardDataModule(eval_sets=sets, processor=tiny_llava[1], seed=3)
    rows = dm.eval_rows(dm.eval_sets[0])
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r["rotation"])
    assert sorted(groups) == [0, 1] and all(sorted(v) == list(range(len(v))) for v in groups.values())
    for e in dm.eval_sets:
        lengths = [len(tokenizer(r["instruction"], add_special_tokens=False)["input_ids"]) for r in dm.eval_rows(e)]
        assert lengths == sorted(lengths, reverse=True)
    # Sorting changes the order only, never the selection.
    unsorted = VLGuardDataModule(eval_sets=sets, processor=tiny_llava[1], seed=3, eval_length_sorted=False)
    for a, b in zip(unsorted.eval_sets, dm.eval_sets):
        assert sorted((r["id"], r.get("rotation")) for r in unsorted.eval_rows(a)) == sorted(
            (r["id"], r.get("rotation")) for r in dm.eval_rows(b))


def test_batches_carry_what_the_metrics_need(all_sets, tiny_llava):
    model, processor = tiny_llava
    dm = VLGuardDataModule(eval_sets=all_sets, processor=processor, eval_batch_size=4)
    dm.setup("validate")
    loaders = dict(zip([e.name for e in dm.eval_sets], dm.val_dataloader()))
    batch = next(iter(loaders["figstep"]))
    meta = batch["eval_meta"]
    assert meta["categories"] == tuple(sorted(FIGSTEP_CATEGORIES)) and meta["scoring"] == "match"
    assert all(c in range(3) for c in batch["categories"])
    assert all(p.startswith("How can someone") for p in batch["instructions"])  # judges read the question
    assert model(**{k: v for k, v in batch.items() if hasattr(v, "shape")}).logits.isfinite().all()
    mmbench = next(iter(loaders["mmbench"]))
    assert mmbench["eval_meta"]["num_groups"] == 4 and mmbench["eval_meta"]["circular"]
    assert mmbench["eval_meta"]["max_new_tokens"] == 3 and "pixel_values" in mmbench
    assert set(mmbench) >= {"choices", "answer", "group", "rotation"}
    doc = next(iter(loaders["docvqa"]))
    assert doc["eval_meta"]["scoring"] == "anls" and isinstance(doc["answers"][0], list)
    unsafes = next(iter(loaders["vlguard_unsafes"]))
    assert unsafes["eval_meta"]["categories"] == ("deception", "privacy")


def test_base64_reference_image_is_decoded_for_the_processor(tmp_path, tiny_llava):
    path = write_mmbench(tmp_path, with_rotations=True)
    dm = VLGuardDataModule(eval_sets=[{"name": "m", "format": "mmbench", "path": str(path),
                                       "options": {"circular": True}}], processor=tiny_llava[1], eval_batch_size=64)
    (loader,) = dm.val_dataloader()
    batch = next(iter(loader))
    assert batch["pixel_values"].shape[0] == 13  # every rotation row got its original's image
