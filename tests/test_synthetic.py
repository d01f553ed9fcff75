"""The synthetic VLGuard-format generator: determinism, closed vocabulary, held-out design, images."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from hsr_pl.data import synthetic as S


def _pairs(split: S.SyntheticSplit):
    for record in split.records:
        for pair in record["instr-resp"]:
            key, text = S.instruction_of(pair)
            yield record, key, text, pair["response"]


@pytest.fixture(scope="module")
def splits() -> dict[str, S.SyntheticSplit]:
    sizes = {"train": 1500, "calib_utility": 64, "calib_safety": 64}
    return {name: S.generate_split(name, sizes.get(name, 200), seed=3, n_calib=64) for name in S.SPLITS}


def test_in_memory_generation_is_deterministic_and_seeded():
    a = S.generate_split("train", 40, seed=5)
    b = S.generate_split("train", 40, seed=5)
    c = S.generate_split("train", 40, seed=6)
    assert a.records == b.records
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
    assert a.records != c.records


def test_kind_mix_is_exact(splits):
    counts = Counter(r["kind"] for r in splits["train"].records)
    n = len(splits["train"])
    harmful = counts["harmful_text"] + counts["harmful_image"]
    assert harmful == round(0.15 * n) and abs(counts["harmful_text"] - counts["harmful_image"]) <= 1
    assert counts["utility"] == pytest.approx(0.5 * n, abs=1)
    assert set(counts) == set(S.KINDS)
    for fraction in (0.10, 0.25):
        mix = Counter(r["kind"] for r in S.generate_split("train", 400, 0, harmful_fraction=fraction).records)
        assert mix["harmful_text"] + mix["harmful_image"] == round(fraction * 400)
    assert {r["kind"] for r in splits["calib_utility"].records} == {"utility"}
    assert Counter(r["kind"] for r in splits["calib_safety"].records) == {"harmful_text": 32, "harmful_image": 32}
    assert {r["kind"] for r in splits["eval_benign"].records} == {"benign_text", "benign_image"}
    assert {r["kind"] for r in splits["eval_glyph_qa"].records} == {"glyph_qa"}


def test_every_word_is_in_the_vocabulary_and_tokenizes(splits):
    from hsr_pl.models.tiny import word_tokenizer

    vocab = set(S.VOCABULARY)
    assert len(vocab) == len(S.VOCABULARY) and 60 <= len(vocab) <= 110
    used = set()
    for split in splits.values():
        for _, _, text, response in _pairs(split):
            used |= set(text.split()) | set(response.split())
    assert used <= vocab
    tokenizer = word_tokenizer(S.VOCABULARY)
    ids = tokenizer(" ".join(S.VOCABULARY), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(S.VOCABULARY) and tokenizer.unk_token_id not in ids


def test_responses_follow_the_labels_and_the_image(splits):
    answers = {"colour": "it is {c} .", "shape": "it is a {s} .", "describe": "a {c} {s} ."}
    for split in splits.values():
        for record, key, text, response in _pairs(split):
            kind, attrs = record["kind"], record["attributes"]
            assert record["safe"] is (attrs["glyph_cell"] is None)
            if kind in S.HARMFUL_KINDS:
                assert response == S.REFUSAL and record["harmful_category"]
                assert key == ("unsafe_instruction" if kind == "harmful_text" else "instruction")
            else:
                assert key == "safe_instruction" and record["harmful_category"] is None
            if kind in ("utility", "glyph_qa"):
                assert response in {a.format(c=attrs["colour"], s=attrs["shape"]) for a in answers.values()}
            if kind == "benign_text":
                words = text.split()
                verb, obj = words[words.index("a") - 1], words[words.index("a") + 1]
                assert response == f"here is how to {verb} a {obj} ."
                assert verb not in S.HARMFUL_VERBS and obj not in S.HARMFUL_OBJECTS
            if kind == "harmful_text":
                words = text.split()
                verb, obj = words[words.index("a") - 1], words[words.index("a") + 1]
                assert verb in S.HARMFUL_VERBS or obj in S.HARMFUL_OBJECTS
            if kind == "benign_image":
                assert response.endswith(f": draw a {attrs['colour']} {attrs['shape']} .")
            if kind in ("benign_image", "harmful_image"):
                assert "this" in text.split()


def test_evaluation_sets_are_held_out(splits):
    def pair_of(text):
        words = text.split()
        return words[words.index("a") - 1], words[words.index("a") + 1]

    train = splits["train"].records
    train_texts = {t for _, _, t, _ in _pairs(splits["train"])}
    # Words seen in training, as prompt or as (teacher-forced) response tokens.
    train_words = {w for _, _, t, r in _pairs(splits["train"]) for w in (t + " " + r).split()}
    train_pairs = {pair_of(t) for r, _, t, _ in _pairs(splits["train"]) if r["kind"].endswith("_text")}
    for name in ("eval_harmful_text", "eval_benign"):
        for record, _, text, _ in _pairs(splits[name]):
            if record["kind"].endswith("_text"):
                assert pair_of(text) not in train_pairs
    # The paraphrase set asks visual questions in phrasings the training split never shows;
    # utility and glyph QA ask the training phrasings about fresh images.
    assert not {t for _, _, t, _ in _pairs(splits["eval_utility_paraphrase"])} & train_texts
    for name in ("eval_utility", "eval_glyph_qa"):
        assert {t for _, _, t, _ in _pairs(splits[name])} <= train_texts
        images = {splits[name].images[i].tobytes() for i in range(len(splits[name]))}
        assert not images & {im.tobytes() for im in splits["train"].images}
    image_requests = [t for r, _, t, _ in _pairs(splits["eval_harmful_image"])]
    assert not set(image_requests) & train_texts
    # ...but every word of every evaluation prompt was seen in training.
    for name in S.EVAL_SPLITS:
        for _, _, text, _ in _pairs(splits[name]):
            assert set(text.split()) <= train_words, text
    combos = S.heldout_combinations(3)
    for group in combos.values():
        assert not set(group["train"]) & set(group["eval"])
        verbs_train = {v for v, _ in group["train"]}
        assert {v for v, _ in group["eval"]} <= verbs_train
        total = len(group["train"]) + len(group["eval"])
        assert 0.2 < len(group["eval"]) / total < 0.4
    assert len(train) == 1500


def test_image_drawing_reference():
    rng = np.random.default_rng(0)
    for colour in S.COLOURS:
        for shape in S.SHAPES:
            cell, glyph = int(rng.integers(16)), None
            if rng.random() < 0.5:
                glyph = (cell + 1 + int(rng.integers(15))) % 16
            pixels = np.asarray(S.draw_image(colour, shape, cell, glyph, np.random.default_rng(1)))
            assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
            target = np.array(S.COLOURS[colour], dtype=np.uint8)
            exact = np.all(pixels == target, axis=-1)
            ys, xs = np.nonzero(exact)
            assert len(ys) >= 5, (colour, shape)
            # Every pixel of the shape's colour lies inside the shape's 8×8 cell.
            assert set(zip((ys // 8).tolist(), (xs // 8).tolist())) == {divmod(cell, 4)}
            for index in range(16):
                r, c = divmod(index, 4)
                block = pixels[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].astype(int)
                if index == glyph:
                    for y in range(8):
                        for x in range(8):
                            expected = 255 if ((y // 2) + (x // 2)) % 2 == 0 else 0
                            assert (block[y, x] == expected).all()
                elif index != cell:
                    assert block.max() < 120  # dark background, nothing drawn
    with pytest.raises(ValueError, match="different cells"):
        S.draw_image("red", "circle", 3, 3, rng)
    with pytest.raises(ValueError, match="unknown colour"):
        S.draw_image("orange", "circle", 3, None, rng)


def test_generate_writes_vlguard_files_atomically_and_deterministically(tmp_path):
    a = S.generate(tmp_path / "a", seed=1, n_train=30, n_calib=8, n_eval=6)
    b = S.generate(tmp_path / "b", seed=1, n_train=30, n_calib=8, n_eval=6)
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for split in S.SPLITS:
        records = json.loads((a / f"{split}.json").read_text())
        memory = S.generate_split(split, len(records), seed=1, n_calib=8)
        assert records == memory.records
        for record, image in zip(records, S.load_images(records, a)):
            assert np.array_equal(np.asarray(image), np.asarray(memory.images[records.index(record)]))
    calibration = json.loads((a / "calibration.json").read_text())
    assert len(calibration) == 16
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["vocabulary"] == list(S.VOCABULARY) and manifest["seed"] == 1
    assert manifest["sizes"]["dev_harmful_text"] == 6 and manifest["splits"]["dev"] == list(S.DEV_SPLITS)
    assert manifest["dev_pairs"] == {k: [" ".join(p) for p in v] for k, v in S.dev_combinations(1, 8).items()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left

    with pytest.raises(FileExistsError, match="overwrite=True"):
        S.generate(a, seed=2, n_train=3, n_calib=1, n_eval=1)
    S.generate(a, seed=2, n_train=3, n_calib=1, n_eval=1, overwrite=True)
    assert len(json.loads((a / "train.json").read_text())) == 3
    assert not (a / "images" / "train" / "000010.png").exists()  # the old set is gone, not mixed in
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_generate_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    calls = []

    def failing_write(path, obj):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        path.write_text(json.dumps(obj))

    monkeypatch.setattr(S, "_write_json", failing_write)
    with pytest.raises(OSError, match="disk full"):
        S.generate(tmp_path / "out", n_train=5, n_calib=2, n_eval=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs,match", [
    ({"seed": -1}, "seed"),
    ({"n_train": -5}, "n_train"),
    ({"n_eval": 2.5}, "n_eval"),
    ({"harmful_fraction": 0.0}, "harmful_fraction"),
    ({"harmful_fraction": 1.2}, "harmful_fraction"),
])
def test_generate_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.generate(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_unknown_split_and_instruction_keys():
    with pytest.raises(ValueError, match="unknown split"):
        S.generate_split("test", 3)
    with pytest.raises(KeyError, match="no instruction key"):
        S.instruction_of({"response": "x"})
    with pytest.raises(ValueError, match="unknown instruction key"):
        S.vlguard_role(True, "question")


def test_vlguard_roles_agree_with_the_loader(tmp_path):
    from hsr_pl.data.vlguard import load_vlguard

    out = S.generate(tmp_path / "d", seed=0, n_train=200, n_calib=20, n_eval=10)
    for split in ("train", "calibration", "eval_harmful_text"):
        examples = load_vlguard(out / f"{split}.json")
        records = json.loads((out / f"{split}.json").read_text())
        expected = {"harmful_text": "over_refusal", "harmful_image": "safety"}
        by_kind = [expected.get(r["kind"], "utility") for r in records for _ in r["instr-resp"]]
        assert [e["split"] for e in examples] == by_kind
        roles = [S.vlguard_role(r["safe"], S.instruction_of(p)[0]) for r in records for p in r["instr-resp"]]
        assert roles == by_kind
    calibration = load_vlguard(out / "calibration.json")
    assert Counter(e["split"] for e in calibration) == {"utility": 20, "safety": 10, "over_refusal": 10}


def test_to_dataset_flattens_pairs(splits):
    data = S.to_dataset(S.generate_split("eval_benign", 12, seed=0))
    assert len(data) == 12 and data.column_names[:2] == ["id", "image"]
    row = data[0]
    assert row["image"].size == (32, 32) and row["role"] == "utility"
    assert row["response"].startswith(S.COMPLIANCE_PREFIX)


# ------------------------------------------------------------------------------ dev / test
# sha256 of every calibration and test split (records as sorted JSON, then each image's pixels) at the
# published sizes, computed on main before the dev splits existed (commit ef9b589): the shipped
# organism's numbers were measured on exactly these sets (seed 0; seed 1 in the issue-18 check).
PUBLISHED_SPLITS = {
    0: {
        "calib_utility": "f01e9728cf1e63d33c3d94e9734827081ec4606201092565eb1bb0d9749dd73c",
        "calib_safety": "bb925f6c5f97ff2dd55269e64d6f78e20ecb3f9ee37979f1683f4f45fe191c72",
        "eval_utility": "45429b48fcac704f4ec25c50f05926475413b350f88920a7155632d608886e14",
        "eval_harmful_text": "bd46b0940ccff8c9a3b939b29155c28d92f9b48f404c2361af0e9292d993b54b",
        "eval_harmful_image": "b20f217ee619bff26a900ac82c8eeb065389638bc8297044294dc8c53bdcaa56",
        "eval_benign": "d2c51ca57e2e89cb753b6da174462d713dc0a4777b3404fb0f54feba1cff01ad",
        "eval_glyph_qa": "c85ab9daa9ed48f71b31e8599028c6a8d2cb02fc14510788993fcc74a838ce71",
        "eval_utility_paraphrase": "b09bb43c3a0336c0408b56daaa5ecf81c32f72f6a638f95e1c2b978849518335",
    },
    1: {
        "calib_utility": "7e6dadd36ea9680c28733578f42e47d819ded70cb215b7d766de4f23b10ea7a2",
        "calib_safety": "91ee7742e6bdb9e48a4b7d0d9b9651caf56b72afc3b49c1e381a237beb4e16c7",
        "eval_utility": "26584b29143687da3c4413885f7902e68d03e3c7d242ea0b541f00b31459e261",
        "eval_harmful_text": "61c5acbac699e004b24c5e357cee2efe934af18ab21628adf055ff5783f9b688",
        "eval_harmful_image": "f86a632b615d329d50a376d4f7199390c3fcf51cfe4c7dca722649d23d5794dd",
        "eval_benign": "d0b48bae586be69518c0abf6857e7a857d8c0b8bceeb35ce6d68a3070408a4e5",
        "eval_glyph_qa": "bbdf837005b04239ce6964953cb5846c28c69de96d58c509d95835798347126d",
        "eval_utility_paraphrase": "5fe078bfc986de37b525b4c0bf19bad9d74a606d1f5adf0fc1c4e34e3d994062",
    },
}
PUBLISHED_TRAIN_600 = "cd1e4cc9b09a9a9635b8fe552ff35da0a2f0be7dab6a77bc402a1d4e8a6d06f2"


def _digest(split: S.SyntheticSplit) -> str:
    import hashlib

    h = hashlib.sha256(json.dumps(split.records, sort_keys=True).encode())
    for image in split.images:
        h.update(image.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("seed", [0, 1])
def test_published_calibration_and_test_sets_are_unchanged(seed):
    for name, expected in PUBLISHED_SPLITS[seed].items():
        n = 256 if name.startswith("calib") else 300
        assert _digest(S.generate_split(name, n, seed)) == expected, name
    if seed == 0:
        assert _digest(S.generate_split("train", 600, 0)) == PUBLISHED_TRAIN_600
    assert S.EVAL_SPLITS == tuple(PUBLISHED_SPLITS[seed])[2:]


@pytest.fixture(scope="module")
def published() -> dict[str, S.SyntheticSplit]:
    """Seed 0 at the shipped sizes: calibration 256, test and dev 300 (train: a 1500 sample)."""
    sizes = {"train": 1500, "calib_utility": 256, "calib_safety": 256}
    return {name: S.generate_split(name, sizes.get(name, 300), 0, n_calib=256) for name in S.SPLITS}


def test_dev_splits_are_disjoint_from_calibration_and_test_in_pairs_and_images(published):
    def text_pairs(names):
        return {S._text_pair(t) for name in names for r, _, t, _ in _pairs(published[name]) if r["kind"].endswith("_text")}

    calibration = text_pairs(["calib_utility", "calib_safety"])
    test = text_pairs(S.EVAL_SPLITS)
    dev = text_pairs(S.DEV_SPLITS)
    assert dev and calibration and test
    assert not dev & calibration and not dev & test
    harmful_dev = text_pairs(["dev_harmful_text"])
    assert harmful_dev <= set(S.heldout_combinations(0)["harmful"]["train"])  # trained on, never calibrated
    assert len(harmful_dev) >= 30  # 54 pairs to draw from at n_calib=256

    def pixels(names):
        return {image.tobytes() for name in names for image in published[name].images}

    dev_images = pixels(S.DEV_SPLITS)
    assert len(dev_images) == sum(len(published[n]) for n in S.DEV_SPLITS)  # every dev image distinct
    for other in (["calib_utility", "calib_safety"], S.EVAL_SPLITS, ["train"]):
        assert not dev_images & pixels(other), other


def test_dev_splits_mirror_their_test_twins(published):
    for dev, test in zip(S.DEV_SPLITS, S.EVAL_SPLITS, strict=True):
        assert dev == test.replace("eval_", "dev_")
        assert Counter(r["kind"] for r in published[dev].records) == Counter(r["kind"] for r in published[test].records)
        assert all(r["id"].startswith(dev) and r["image"].startswith(f"images/{dev}/") for r in published[dev].records)
    # same question phrasings and image-request verbs as test (the paraphrases only in the paraphrase twin)
    for name in ("utility", "harmful_image", "utility_paraphrase"):
        dev_texts = {t for _, _, t, _ in _pairs(published[f"dev_{name}"])}
        test_texts = {t for _, _, t, _ in _pairs(published[f"eval_{name}"])}
        assert dev_texts == test_texts, name


def test_dev_pairs_follow_n_calib_and_are_refused_when_none_is_left():
    small = S.dev_combinations(0, 8)["harmful"]
    assert len(S.dev_combinations(0, 256)["harmful"]) < len(small) < len(S.heldout_combinations(0)["harmful"]["train"])
    with pytest.raises(ValueError, match="no pair is left for the dev splits; lower n_calib"):
        S.dev_combinations(0, 5000)
    with pytest.raises(ValueError, match="lower n_calib"):
        S.generate_split("dev_harmful_text", 3, 0, n_calib=5000)
