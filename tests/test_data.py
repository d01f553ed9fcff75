"""VLGuard-format loading, split mapping, collation and the data module's loaders."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hsr_pl.data import DataFormatError, VLGuardCollator, VLGuardDataModule, load_vlguard, select_samples
from hsr_pl.data.vlguard import pairs_to_dataset

from vlguard_fixture import REFUSAL, make_vlguard_fixture


@pytest.fixture
def fixture_path(tmp_path):
    return make_vlguard_fixture(tmp_path, n=9)


def test_split_mapping_follows_spec(fixture_path):
    examples = load_vlguard(fixture_path)
    by_split = {}
    for e in examples:
        by_split.setdefault(e["split"], []).append(e)
    # 9 records: 6 safe (utility + over_refusal pair each), 3 unsafe (safety).
    assert len(by_split["utility"]) == 6
    assert len(by_split["over_refusal"]) == 6
    assert len(by_split["safety"]) == 3
    assert all(e["safe"] for e in by_split["utility"] + by_split["over_refusal"])
    assert not any(e["safe"] for e in by_split["safety"])
    assert all(e["response"] == REFUSAL for e in by_split["safety"] + by_split["over_refusal"])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r[1].pop("instr-resp"), "record 1 has no 'instr-resp'"),
        (lambda r: r[2].update({"image": "images/missing.png"}), "record 2: image"),
        (lambda r: r[0]["instr-resp"].append({"response": "x"}), "record 0, instr-resp[2]"),
        (lambda r: r[3].update({"instr-resp": []}), "record 3: 'instr-resp' must be a non-empty list"),
    ],
)
def test_malformed_records_are_named(fixture_path, mutate, message):
    records = json.loads(fixture_path.read_text())
    mutate(records)
    fixture_path.write_text(json.dumps(records))
    with pytest.raises((DataFormatError, FileNotFoundError), match=message.replace("[", r"\[")):
        load_vlguard(fixture_path)


def test_not_a_list_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vlguard(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}')
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        load_vlguard(bad)


def test_empty_split_is_an_error(fixture_path):
    examples = [e for e in load_vlguard(fixture_path) if e["split"] != "safety"]
    with pytest.raises(DataFormatError, match="no examples of split 'safety'"):
        pairs_to_dataset(examples, "safety")


def test_seeded_selection_is_a_prefix_of_the_seeded_shuffle(fixture_path):
    dataset = pairs_to_dataset(load_vlguard(fixture_path), "utility")
    a = select_samples(dataset, 3, seed=7)
    b = select_samples(dataset, 5, seed=7)
    assert [r["record"] for r in a] == [r["record"] for r in b][:3]
    c = select_samples(dataset, 6, seed=8)
    assert sorted(r["record"] for r in c) == sorted(r["record"] for r in dataset)
    with pytest.raises(ValueError, match="positive"):
        select_samples(dataset, 0, seed=1)


def test_collator_masks_prompt_and_padding(tiny_llava, fixture_path):
    _, processor = tiny_llava
    examples = load_vlguard(fixture_path)[:4]
    batch = VLGuardCollator(processor, with_response=True)(examples)
    tokenizer = processor.tokenizer
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    assert batch["pixel_values"].shape[0] == len(examples)
    for row, example in enumerate(examples):
        # Left padding: zeros only at the start.
        n = int(mask[row].sum())
        assert mask[row, -n:].all() and not mask[row, :-n].any()
        answer = labels[row][labels[row] != -100]
        expected = tokenizer(example["response"] + " </s>", add_special_tokens=False).input_ids
        assert answer.tolist() == expected
        # The labelled tokens are exactly the last len(answer) tokens of the row.
        assert torch.equal(ids[row, -len(answer):], answer)
    prompt_only = VLGuardCollator(processor, with_response=False)(examples)
    assert "labels" not in prompt_only
    last = tokenizer.convert_ids_to_tokens(prompt_only["input_ids"][:, -2:].reshape(-1).tolist())
    assert last == ["assistant", ":"] * len(examples)


def test_collator_needs_a_chat_template(tiny_llava):
    _, processor = tiny_llava
    processor.chat_template = None
    processor.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        VLGuardCollator(processor)


def test_datamodule_calibration_and_eval_loaders(tiny_llava, fixture_path):
    model, processor = tiny_llava
    dm = VLGuardDataModule(
        train_path=str(fixture_path),
        processor=processor,
        batch_size=2,
        eval_sets=[{"name": "harm", "path": str(fixture_path), "split": "safety", "kind": "harmful"}],
        num_samples=4,
    )
    dm.setup("fit")
    batches = list(dm.calibration_dataloader("utility", 3, batch_size=2))
    assert sum(b["input_ids"].shape[0] for b in batches) == 3
    assert all((b["labels"] != -100).any(dim=1).all() for b in batches)
    assert model(**batches[0]).loss.isfinite()
    (val,) = dm.val_dataloader()
    batch = next(iter(val))
    assert batch["kind"] == "harmful" and batch["eval_set"] == "harm"
    assert batch["references"] == [REFUSAL] * batch["input_ids"].shape[0]
    with pytest.raises(ValueError, match="unknown calibration split"):
        dm.calibration_dataloader("harmful")


def test_datamodule_rejects_bad_arguments(fixture_path):
    with pytest.raises(FileNotFoundError, match="train_path"):
        VLGuardDataModule(train_path="/nope/train.json")
    with pytest.raises(ValueError, match="kind must be one of .*got 'toxic'"):
        VLGuardDataModule(eval_sets=[{"name": "x", "path": str(fixture_path), "kind": "toxic"}])
    with pytest.raises(ValueError, match="unknown split"):
        VLGuardDataModule(train_path=str(fixture_path), train_splits=["safe"])
    dm = VLGuardDataModule(train_path=str(fixture_path))
    with pytest.raises(RuntimeError, match="no processor"):
        dm.train_dataloader()


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "gemma3", "idefics3", "smolvlm", "mllama", "internvl"])
def test_collator_batches_every_vision_family(family, fixture_path):
    from hsr_pl.models.tiny import build_tiny

    model, processor = build_tiny(family)
    examples = load_vlguard(fixture_path)[:3]
    batch = VLGuardCollator(processor, with_response=True)(examples)
    labels = batch["labels"]
    for row in range(len(examples)):
        n = int((labels[row] != -100).sum())
        assert n > 0
        # Left padding: the response is the tail of the row.
        assert (labels[row, -n:] != -100).all()
    assert model(**batch).loss.isfinite()


def test_calibration_may_join_splits(tiny_llava, fixture_path):
    _, processor = tiny_llava
    dm = VLGuardDataModule(train_path=str(fixture_path), processor=processor)
    joined = dm.calibration_dataset("safety+over_refusal", None)
    assert sorted(joined["split"]) == sorted(["safety"] * 3 + ["over_refusal"] * 6)
    with pytest.raises(ValueError, match="unknown split 'harm'"):
        dm.calibration_dataset("safety+harm")


def test_questions_on_unsafe_images_are_utility(tmp_path):
    path = tmp_path / "d.json"
    (tmp_path / "x.png").write_bytes((make_vlguard_fixture(tmp_path / "f", n=1).parent / "images" / "000.png").read_bytes())
    path.write_text(json.dumps([{"image": "x.png", "safe": False, "harmful_category": "w", "instr-resp": [
        {"safe_instruction": "what colour is the shape ?", "response": "red"},
        {"unsafe_instruction": "how do i make this ?", "response": REFUSAL},
        {"instruction": "how do i use this ?", "response": REFUSAL}]}]))
    assert [e["split"] for e in load_vlguard(path)] == ["utility", "safety", "safety"]


def test_collator_refuses_a_prompt_that_is_not_a_prefix(tiny_llava, fixture_path):
    _, processor = tiny_llava
    # A template whose generation prompt differs from how the assistant turn starts.
    processor.chat_template = processor.chat_template.replace(
        "{% if add_generation_prompt %}assistant : {% endif %}", "{% if add_generation_prompt %}assistant ? {% endif %}"
    )
    with pytest.raises(ValueError, match="not a prefix"):
        VLGuardCollator(processor, with_response=True)(load_vlguard(fixture_path)[:2])


def test_shuffle_seed_makes_training_order_independent_of_other_rng_use(tiny_llava, fixture_path):
    _, processor = tiny_llava

    def order(consume: int, shuffle_seed: int | None = 11) -> list[list[int]]:
        torch.manual_seed(5)
        dm = VLGuardDataModule(train_path=str(fixture_path), processor=processor, batch_size=2,
                               shuffle_seed=shuffle_seed)
        loader = dm.train_dataloader()
        epochs = []
        for _ in range(2):
            torch.rand(consume)  # e.g. evaluation loaders drawing base seeds between epochs
            epochs.append([b["input_ids"].sum().item() for b in loader])
        return epochs

    first, again, other = order(0), order(3), order(0)
    assert first == again == other
    assert first[0] != first[1]  # still reshuffled every epoch
    # Without it the order follows the global RNG, which other loaders also draw from.
    assert order(0, None) == order(0, None)
    assert order(0, None)[1] != order(3, None)[1]


# ------------------------------------------------------- issue 21: safe flags, image paths, lengths
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_safe_must_be_a_json_boolean(fixture_path, value):
    records = json.loads(fixture_path.read_text())
    records[4]["safe"] = value
    fixture_path.write_text(json.dumps(records))
    with pytest.raises(DataFormatError, match=r"record 4: 'safe' is .*; it must be a JSON boolean"):
        load_vlguard(fixture_path)


def test_a_false_safe_flag_keeps_its_pairs_in_the_safety_split(fixture_path):
    records = json.loads(fixture_path.read_text())
    assert records[2]["safe"] is False
    by_record = [e for e in load_vlguard(fixture_path) if e["record"] == 2]
    assert by_record and all(e["split"] == "safety" and e["safe"] is False for e in by_record)


def _outside(tmp_path, fixture_path):
    """Record 1 names an image outside the fixture's folder (absolute), record 2 one via a symlink out."""
    import shutil

    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    shutil.copy(fixture_path.parent / "images" / "001.png", elsewhere / "secret.png")
    (fixture_path.parent / "images" / "link.png").symlink_to(elsewhere / "secret.png")
    records = json.loads(fixture_path.read_text())
    records[1]["image"] = str(elsewhere / "secret.png")
    records[2]["image"] = "images/link.png"
    fixture_path.write_text(json.dumps(records))
    return elsewhere


def test_image_paths_stay_inside_the_root_unless_allowed(tmp_path, fixture_path):
    elsewhere = _outside(tmp_path, fixture_path)
    with pytest.raises(DataFormatError, match=r"record 1: image '.*secret.png' lies outside image_root"):
        load_vlguard(fixture_path)
    records = json.loads(fixture_path.read_text())
    records[1]["image"] = "images/001.png"
    fixture_path.write_text(json.dumps(records))
    with pytest.raises(DataFormatError, match=r"record 2: image 'images/link.png' lies outside .*it resolves to"):
        load_vlguard(fixture_path)
    # Opted in: both are read, as given.
    allowed = load_vlguard(fixture_path, allow_outside_root=True)
    assert {e["image"] for e in allowed if e["record"] == 2} == {str(fixture_path.parent / "images" / "link.png")}
    module = VLGuardDataModule(train_path=str(fixture_path), allow_outside_root=True)
    assert len(module.examples(str(fixture_path))) == len(allowed)
    # Inside the root: an absolute path and a symlink that stays inside are fine.
    (fixture_path.parent / "images" / "inner.png").symlink_to(fixture_path.parent / "images" / "000.png")
    records[2]["image"] = "images/inner.png"
    records[3]["image"] = str(fixture_path.parent / "images" / "003.png")
    fixture_path.write_text(json.dumps(records))
    assert len(load_vlguard(fixture_path)) == len(allowed)
    assert elsewhere.is_dir()


def test_docvqa_image_paths_are_confined_too(tmp_path):
    from hsr_pl.data.benchmarks import load_docvqa

    (tmp_path / "val" / "documents").mkdir(parents=True)
    make_vlguard_fixture(tmp_path / "src", n=1)
    (tmp_path / "val" / "documents" / "a.png").write_bytes((tmp_path / "src" / "images" / "000.png").read_bytes())
    record = {"questionId": 1, "question": "what ?", "answers": ["x"], "image": "../src/images/000.png"}
    path = tmp_path / "val" / "val.json"
    path.write_text(json.dumps({"data": [record]}))
    with pytest.raises(DataFormatError, match=r"record 0: image '../src/images/000.png' lies outside image_root"):
        load_docvqa(path)
    assert len(load_docvqa(path, allow_outside_root=True)) == 1
    record["image"] = "documents/a.png"
    path.write_text(json.dumps({"data": [record]}))
    assert load_docvqa(path)[0]["image"] == str(tmp_path / "val" / "documents" / "a.png")


def test_images_are_verified_when_loaded_and_a_later_damage_is_one_line(fixture_path, tiny_llava):
    from PIL import Image

    from hsr_pl.data.images import MAX_IMAGE_PIXELS

    assert MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS  # PIL's own default limit, applied as a refusal
    image = fixture_path.parent / "images" / "005.png"
    examples = load_vlguard(fixture_path)
    image.write_bytes(image.read_bytes()[:40])  # damaged after loading: the collator names it
    _, processor = tiny_llava
    row = next(e for e in examples if e["image"] == str(image))
    with pytest.raises(DataFormatError, match=r"image .*005.png cannot be decoded .*replace it or drop its record"):
        VLGuardCollator(processor)([row])
    with pytest.raises(DataFormatError, match=r"record 5: image .*005.png is not a readable image"):
        load_vlguard(fixture_path)


def test_rows_longer_than_the_model_are_refused_in_setup_naming_the_longest(fixture_path, tiny_llava):
    model, processor = tiny_llava
    limit = model.config.get_text_config().max_position_embeddings
    records = json.loads(fixture_path.read_text())
    records[6]["instr-resp"][0]["safe_instruction"] = " ".join(["shape"] * 300)
    records[7]["instr-resp"][0]["safe_instruction"] = " ".join(["shape"] * (limit + 20))
    fixture_path.write_text(json.dumps(records))

    class Module:  # what the data module reads: the built model and its processor
        def __init__(self):
            self.model, self.processor = model, processor

    data = VLGuardDataModule(train_path=str(fixture_path))
    data.trainer = type("T", (), {"lightning_module": Module()})()
    assert data.max_positions() == limit
    with pytest.raises(DataFormatError, match=rf"record 7 is \d+ tokens long .*max_position_embeddings={limit}"):
        data.setup("fit")
    collator = VLGuardCollator(processor, max_positions=limit)
    row = next(e for e in data.examples(str(fixture_path)) if e["record"] == 7)
    exact = collator.row_length(row)
    assert exact > limit + 20  # the image tokens count too
    with pytest.raises(ValueError, match=rf"record 7 has {exact} tokens, more than the model's max_position_embeddings"):
        collator([row])
    # max_length below the model's limit is checked the same way, before any batch.
    records[7]["instr-resp"][0]["safe_instruction"] = "shape"
    fixture_path.write_text(json.dumps(records))
    capped = VLGuardDataModule(train_path=str(fixture_path), max_length=100)
    capped.trainer = data.trainer
    with pytest.raises(DataFormatError, match=r"record 6 is \d+ tokens long .*max_length=100; .*raise max_length"):
        capped.setup("fit")
    VLGuardDataModule(train_path=str(fixture_path), max_length=limit).setup("fit")  # no trainer, no processor: skipped


def test_position_limit_reads_the_config_file_before_the_weights_are_loaded(tmp_path):
    from hsr_pl.data.datamodule import position_limit

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"max_position_embeddings": 77}}))
    assert position_limit(type("M", (), {"model": None, "model_source": str(tmp_path)})()) == 77
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 99}))
    assert position_limit(type("M", (), {"model": None, "model_source": str(tmp_path)})()) == 99
    assert position_limit(None) is None


# ------------------------------------------------------------------------------------- dev part
def _record_of(dm, example) -> int:
    images = {e["image"]: e["record"] for e in dm.examples(dm.calibration_path)}
    return images[example["image"]]


def test_dev_part_is_held_out_of_calibration_and_training_seeded_and_logged(tmp_path, tiny_llava, caplog):
    _, processor = tiny_llava
    path = make_vlguard_fixture(tmp_path, n=40)
    dev_sets = [{"name": "dev_safety", "dev": True, "split": "safety"},
                {"name": "dev_utility", "dev": True, "split": "utility", "kind": "utility"}]

    def build(**kwargs):
        return VLGuardDataModule(train_path=str(path), processor=processor, eval_sets=dev_sets, num_samples=100, **kwargs)

    dm = build(dev_fraction=0.25, dev_seed=3)
    with caplog.at_level(logging.INFO):
        dm.setup("validate")
    held = dm.dev_records()
    assert len(held) == 10 and held <= set(range(40))
    assert dm.dev_info["records"] == 10 and dm.dev_info["calibration_records"] == 30
    assert dm.dev_info["record_indices"] == sorted(held) and dm.dev_info["also_out_of_training"]
    # calibration (every split, all samples) never sees a dev record; the dev sets see only dev records
    for split in ("utility", "safety", "over_refusal"):
        calibration = dm.calibration_dataset(split, 1000)
        assert not {_record_of(dm, e) for e in calibration} & held
    rows = {s.name: dm.eval_rows(s) for s in dm.eval_sets}
    assert {_record_of(dm, r) for r in rows["dev_safety"] + rows["dev_utility"]} <= held
    assert {r["split"] for r in rows["dev_safety"]} == {"safety"} and rows["dev_utility"]
    images_dev = {r["image"] for r in rows["dev_safety"] + rows["dev_utility"]}
    images_calibration = {e["image"] for split in ("utility", "safety", "over_refusal")
                          for e in dm.calibration_dataset(split, 1000)}
    assert not images_dev & images_calibration
    assert "dev part: 10 of 40 records" in caplog.text and "held out of calibration and training" in caplog.text
    # seeded: the same seed holds out the same records, another seed others; a count works too
    again = build(dev_fraction=0.25, dev_seed=3)
    assert again.dev_records() == held and build(dev_fraction=0.25, dev_seed=4).dev_records() != held
    assert len(build(dev_num_records=7).dev_records()) == 7
    # without a dev setting nothing changes: calibration draws from the whole file as before
    plain = VLGuardDataModule(train_path=str(path), processor=processor, num_samples=100)
    assert plain.dev_records() == frozenset() and plain.dev_info is None
    assert len(plain.calibration_dataset("utility", 1000)) == 27


def test_dev_part_trains_on_the_rest(tmp_path, tiny_llava):
    _, processor = tiny_llava
    path = make_vlguard_fixture(tmp_path, n=40)
    dm = VLGuardDataModule(train_path=str(path), processor=processor, batch_size=100, dev_num_records=8)
    (batch,) = list(dm.train_dataloader())
    whole = VLGuardDataModule(train_path=str(path), processor=processor, batch_size=100)
    (full,) = list(whole.train_dataloader())
    held_pairs = sum(1 for e in dm.examples(str(path)) if e["record"] in dm.dev_records())
    assert batch["input_ids"].shape[0] == full["input_ids"].shape[0] - held_pairs


@pytest.mark.parametrize(
    ("kwargs", "eval_sets", "message"),
    [
        ({"dev_fraction": 0.2, "dev_num_records": 3}, None, "not both"),
        ({"dev_fraction": 1.0}, None, "dev_fraction=1.0 must lie in"),
        ({"dev_num_records": 0}, None, "dev_num_records=0"),
        ({"dev_seed": -1}, None, "dev_seed=-1"),
        ({}, [{"name": "d", "dev": True}], "nothing is held out; set dev_fraction"),
        ({"dev_fraction": 0.2}, [{"name": "d", "dev": True, "format": "mmbench"}], "drop format"),
        ({"dev_fraction": 0.2}, [{"name": "d", "dev": True, "split": "unsafes"}], "loader split"),
        ({"dev_fraction": 0.2}, [{"name": "d", "dev": True, "path": "/elsewhere.json"}], "drop path"),
        ({}, [{"name": "d"}], "has no path"),
    ],
)
def test_dev_settings_are_checked_before_any_file_is_read(fixture_path, kwargs, eval_sets, message):
    with pytest.raises(ValueError, match=message):
        VLGuardDataModule(train_path=str(fixture_path), eval_sets=eval_sets, **kwargs)


def test_dev_part_that_leaves_no_calibration_is_refused(fixture_path):
    dm = VLGuardDataModule(train_path=str(fixture_path), dev_num_records=9)
    with pytest.raises(DataFormatError, match="leaves nothing to calibrate on"):
        dm.calibration_dataset("utility")
