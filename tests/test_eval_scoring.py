"""Scoring rules and their metrics, each against a slow reference written here and hand-worked cases:
answer extraction, circular rotation and accuracy, ANLS, Cohen's κ and judge agreement, per-category
rates — and their sum reduction under DDP."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from hsr_pl.evaluation.metrics import (
    ANLSScore,
    CategoryRate,
    ChoiceAccuracy,
    CircularAccuracy,
    JudgeAgreement,
)
from hsr_pl.evaluation.scoring import anls, circular_shift, cohen_kappa, extract_choice, levenshtein

from scoring_references import reference_anls, reference_distance, reference_extract, reference_kappa

CHOICES = {"A": "cat", "B": "dog", "C": "bird"}


# ------------------------------------------------------------------------------ answer extraction
@pytest.mark.parametrize("reply, expected", [
    ("B", "B"), ("(C)", "C"), ("The answer is A.", "A"), ("C. bird", "C"), ("**B**", "B"),
    ("A or B", None),  # two letters, and no option text either
    ("a dog", "B"),  # lowercase "a" is no letter; the text "dog" is
    ("it is a dog or a cat", None),  # two option texts
    ("Z", None), ("Z dog", None),  # a declining Z stops the text search
    ("Cannot determine the answer: dog", None),
    ("D", None),  # not an option of this question
    ("a bird, surely", "C"),
    ("this picture shows an animal which is most likely a dog", None),  # longer than twice the options
    ("", None),
])
def test_extract_choice_hand_worked(reply, expected):
    assert extract_choice(reply, CHOICES) == expected
    assert reference_extract(reply, CHOICES) == expected


def test_extract_choice_matches_reference_on_random_replies():
    rng = random.Random(0)
    pieces = ["A", "B", "C", "D", "Z", "a", "the", "answer", "is", "cat", "dog", "bird", "Dog", "(", ")", ".", ":",
              "**", ",", "option", "Bird.", "(B)", "A.", "none"]
    for _ in range(3000):
        n = rng.randint(1, 6)
        options = {L: rng.choice(["cat", "dog", "bird", "red", "blue", "two"]) + rng.choice(["", "s", " fish"])
                   for L in "ABCD"[:n]}
        reply = "".join(rng.choice(pieces) + rng.choice([" ", "", "  "]) for _ in range(rng.randint(0, 8)))
        assert extract_choice(reply, options) == reference_extract(reply, options), (reply, options)


def test_extract_choice_errors():
    with pytest.raises(ValueError, match="at least one option"):
        extract_choice("A", {})
    with pytest.raises(TypeError, match="must be a str"):
        extract_choice(None, CHOICES)


# ------------------------------------------------------------------------------ circular evaluation
def test_circular_shift_hand_worked_and_random():
    choices = {"A": "a", "B": "b", "C": "c", "D": "d"}
    assert circular_shift(choices, "C", 1) == ({"A": "b", "B": "c", "C": "d", "D": "a"}, "B")
    assert circular_shift(choices, "A", 3) == ({"A": "d", "B": "a", "C": "b", "D": "c"}, "B")
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(2, 6)
        options = {"ABCDEF"[i]: f"opt{rng.randint(0, 99)}-{i}" for i in range(n)}
        answer = rng.choice(list(options))
        assert circular_shift(options, answer, 0) == (options, answer)
        assert circular_shift(options, answer, n) == (options, answer)
        seen = set()
        for k in range(n):
            rotated, new = circular_shift(options, answer, k)
            assert rotated[new] == options[answer] and sorted(rotated.values()) == sorted(options.values())
            seen.add(new)
        assert seen == set(options)  # over the rotations the answer takes every position
    with pytest.raises(ValueError, match="not one of the options"):
        circular_shift(choices, "E", 1)


def test_circular_accuracy_matches_reference_over_batches():
    rng = random.Random(2)
    metric = CircularAccuracy(num_groups=12)
    rows = []
    for _ in range(6):
        batch = [(rng.randrange(12), rng.random() < 0.8) for _ in range(rng.randint(0, 9))]
        rows += batch
        metric.update([c for _, c in batch], [g for g, _ in batch])
    groups: dict[int, list[bool]] = {}
    for g, c in rows:
        groups.setdefault(g, []).append(c)
    expected = sum(all(v) for v in groups.values()) / len(groups)
    assert metric.compute().item() == pytest.approx(expected)
    assert metric.result()["n"] == len(groups)
    with pytest.raises(ValueError, match="outside"):
        metric.update([True], [12])


def test_circular_accuracy_hand_worked():
    metric = CircularAccuracy(3)
    metric.update([True, True, True, False, True], [0, 0, 0, 1, 1])  # group 2 never seen
    assert metric.compute().item() == 0.5
    assert math.isnan(CircularAccuracy(2).compute().item())


def test_choice_accuracy_counts_unmatched():
    metric = ChoiceAccuracy()
    metric.update(["B", "cat", "no idea", "C"], [CHOICES] * 4, ["B", "A", "C", "A"])
    assert metric.result() == {"metric": "accuracy", "judge": "choice", "value": 0.5, "n": 4, "unmatched": 1}
    with pytest.raises(ValueError, match="one per reply"):
        metric.update(["B"], [CHOICES, CHOICES], ["B"])


# --------------------------------------------------------------------------------------------- ANLS
@pytest.mark.parametrize("pred, answers, expected", [
    ("hello", ["Hello"], 1.0), ("helo", ["hello"], 0.8), ("abc", ["xyz"], 0.0),
    ("ab", ["ac"], 0.0),  # NL = 0.5 exactly is not below the threshold
    ("abxd", ["abcd"], 0.75), ("  New   York ", ["new york"], 1.0),
    ("1993", ["1/8/93", "1993"], 1.0), ("", [""], 1.0), ("", ["a"], 0.0),
])
def test_anls_hand_worked(pred, answers, expected):
    assert anls(pred, answers) == pytest.approx(expected)


def test_anls_and_levenshtein_match_reference_on_random_strings():
    rng = random.Random(3)
    alphabet = "abc AB1."
    for _ in range(600):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9)))
        assert levenshtein(a, b) == reference_distance(a, b)
        answers = [b] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7))) for _ in range(rng.randint(0, 2))]
        assert anls(a, answers) == pytest.approx(reference_anls(a, answers))


def test_anls_metric_is_the_mean_over_batches():
    rng = random.Random(4)
    metric, scores = ANLSScore(), []
    for _ in range(5):
        preds = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 5))) for _ in range(rng.randint(1, 4))]
        golds = [["".join(rng.choice("abc") for _ in range(rng.randint(1, 5)))] for _ in preds]
        metric.update(preds, golds)
        scores += [reference_anls(p, g) for p, g in zip(preds, golds)]
    assert metric.compute().item() == pytest.approx(sum(scores) / len(scores))
    with pytest.raises(ValueError, match="non-empty list"):
        anls("x", [])


# ------------------------------------------------------------------------------ κ and agreement
def test_cohen_kappa_hand_worked():
    # 50 items: 20 both yes, 5 only a, 10 only b, 15 neither: p_o 0.7, p_e 0.5 -> κ 0.4.
    assert cohen_kappa(20, 5, 10, 15) == pytest.approx(0.4)
    assert cohen_kappa(3, 0, 0, 7) == 1.0
    assert cohen_kappa(0, 5, 5, 0) == pytest.approx(-1.0)
    assert cohen_kappa(0, 4, 0, 0) == 0.0  # constant, but different answers: chance agreement 0
    assert math.isnan(cohen_kappa(4, 0, 0, 0)) and math.isnan(cohen_kappa(0, 0, 0, 6))
    assert math.isnan(cohen_kappa(0, 0, 0, 0))
    with pytest.raises(ValueError, match="non-negative"):
        cohen_kappa(-1, 0, 0, 1)


def test_judge_agreement_matches_reference_over_batches():
    rng = random.Random(5)
    names = ["strict", "keyword", "coherent", "guard"]
    metric = JudgeAgreement(names)
    full = [[] for _ in names]
    for _ in range(7):
        n = rng.randint(0, 11)
        base = [rng.random() < 0.5 for _ in range(n)]
        batch = [[b if rng.random() < 0.8 - 0.2 * j else not b for b in base] for j in range(len(names))]
        batch[3] = [True] * n  # a judge that always says complied
        for j in range(len(names)):
            full[j] += batch[j]
        metric.update(batch)
    result = metric.result()
    assert result["n"] == len(full[0])
    for j in range(len(names)):
        assert result["rate"][j] == pytest.approx(sum(full[j]) / len(full[j]))
        for k in range(len(names)):
            expected = reference_kappa(full[j], full[k])
            got = result["kappa"][j][k]
            assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected), (j, k)
            assert result["agreement"][j][k] == pytest.approx(
                sum(x == y for x, y in zip(full[j], full[k])) / len(full[j]))
    assert torch.allclose(metric.compute()[:3, :3], torch.tensor(result["kappa"], dtype=torch.float64)[:3, :3])
    with pytest.raises(ValueError, match="one verdict per reply"):
        metric.update([[True], [True, False], [True], [True]])
    with pytest.raises(ValueError, match="at least two judges"):
        JudgeAgreement(["only"])


# ---------------------------------------------------------------------------------- per category
def test_category_rate_matches_reference_over_batches():
    rng = random.Random(6)
    categories = ["Illegal Activity", "Hate Speech", "Fraud", "never seen"]
    metric = CategoryRate(categories, "asr", "strict")
    seen = []
    for _ in range(5):
        batch = [(rng.choice([-1, 0, 1, 2]), rng.random() < 0.4) for _ in range(rng.randint(0, 10))]
        seen += batch
        metric.update([f for _, f in batch], [c for c, _ in batch])
    result = metric.result()["categories"]
    for index, name in enumerate(categories):
        flags = [f for c, f in seen if c == index]
        assert result[name]["n"] == len(flags)
        if flags:
            assert result[name]["value"] == pytest.approx(sum(flags) / len(flags))
        else:
            assert math.isnan(result[name]["value"])
    with pytest.raises(ValueError, match="outside"):
        metric.update([True], [4])
    with pytest.raises(ValueError, match="distinct"):
        CategoryRate(["a", "a"])


# --------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, shards: list) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cat, agree = CategoryRate(["x", "y", "z"]), JudgeAgreement(["a", "b"])
        circ, score = CircularAccuracy(4), ANLSScore()
        for flags, cats, groups, preds, golds in shards[rank]:
            cat.update(flags, cats)
            agree.update([flags, [not f for f in flags[:1]] + flags[1:]])
            circ.update(flags, groups)
            score.update(preds, golds)
        out = {"cat": cat.result(), "agree": agree.result(), "circ": circ.result(), "anls": score.result()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_new_metrics_reduce_over_ranks_like_one_process(tmp_path):
    import torch.multiprocessing as mp

    rng = random.Random(7)
    shards = []
    for sizes in ((4, 6), (5,)):
        batches = []
        for size in sizes:
            flags = [rng.random() < 0.5 for _ in range(size)]
            batches.append((flags, [rng.choice([-1, 0, 1, 2]) for _ in flags], [rng.randrange(4) for _ in flags],
                            [rng.choice(["ab", "abc", "x"]) for _ in flags], [["abc"] for _ in flags]))
        shards.append(batches)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), shards), nprocs=2, join=True)
    cat, agree = CategoryRate(["x", "y", "z"]), JudgeAgreement(["a", "b"])
    circ, score = CircularAccuracy(4), ANLSScore()
    for batches in shards:
        for flags, cats, groups, preds, golds in batches:
            cat.update(flags, cats)
            agree.update([flags, [not f for f in flags[:1]] + flags[1:]])
            circ.update(flags, groups)
            score.update(preds, golds)
    single = {"cat": cat.result(), "agree": agree.result(), "circ": circ.result(), "anls": score.result()}
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert _nan_free(got) == _nan_free(single)


def _nan_free(value):
    # NaN != NaN: compare undefined values as None.
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 12)
    if isinstance(value, dict):
        return {k: _nan_free(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_free(v) for v in value]
    return value
