"""Slow, obviously-correct references for the scoring rules (loops, recursion), shared by the tests."""

from __future__ import annotations

from functools import cache


def reference_extract(reply: str, choices: dict[str, str]) -> str | None:
    """VLMEvalKit's heuristic spelled out character by character."""
    for decline in ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                    "I'm sorry, but without the image provided", "Cannot determine the answer"):
        if decline in reply:
            return None
    words, word = [], ""
    for ch in reply + " ":
        if ch.isspace() or ch in ".()[],:;!*#{}":
            if word:
                words.append(word)
            word = ""
        else:
            word += ch
    seen = []
    for letter in choices:
        if letter in words:
            seen.append(letter)
    if len(seen) == 1:
        return seen[0]
    if len(seen) == 0 and "Z" in words:
        return None
    total = 0
    for option in choices.values():
        total += len(option)
    if len(reply) > 2 * total:
        return None
    found = []
    for letter, option in choices.items():
        if option.lower() in reply.lower():
            found.append(letter)
    return found[0] if len(found) == 1 else None


@cache
def reference_distance(a: str, b: str) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(reference_distance(a[1:], b) + 1, reference_distance(a, b[1:]) + 1,
               reference_distance(a[1:], b[1:]) + (a[0] != b[0]))


def reference_anls(pred: str, answers: list[str]) -> float:
    scores = []
    p = " ".join(pred.lower().split())
    for answer in answers:
        g = " ".join(answer.lower().split())
        longest = max(len(p), len(g))
        nl = 0.0 if longest == 0 else reference_distance(p, g) / longest
        scores.append(1 - nl if nl < 0.5 else 0.0)
    return max(scores)


def reference_kappa(a: list[bool], b: list[bool]) -> float:
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    return float("nan") if expected == 1 else (observed - expected) / (1 - expected)
