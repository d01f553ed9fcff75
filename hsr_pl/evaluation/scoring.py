"""Per-reply scoring rules of the published benchmarks, as plain functions.

They live apart from the metrics (which only count) and from the loaders (which only read files),
so that each rule can be checked on its own against a slow reference:

- :func:`extract_choice` — the option letter a multiple-choice reply names, by the heuristic
  VLMEvalKit applies before any LLM-based matching (MMBench): a lone option letter among the
  reply's words, else a lone option text contained in the reply.
- :func:`circular_shift` — the option rotation of MMBench's circular evaluation.
- :func:`anls` — DocVQA's Average Normalized Levenshtein Similarity of one answer.
- :func:`cohen_kappa` — chance-corrected agreement of two judges from their 2x2 counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = [
    "ANLS_THRESHOLD",
    "CHOICE_PUNCTUATION",
    "NO_ANSWER",
    "anls",
    "circular_shift",
    "cohen_kappa",
    "extract_choice",
    "levenshtein",
    "normalise_answer",
]

# Characters VLMEvalKit turns into spaces before looking for a standalone option letter.
CHOICE_PUNCTUATION = ".()[],:;!*#{}"
# VLMEvalKit's "the model declined to choose" letter: no option is inferred, and — unlike an
# unmatched reply — no option text is searched for either.
NO_ANSWER = "Z"
_DECLINES = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
ANLS_THRESHOLD = 0.5


def _option_letter(reply: str, letters: Sequence[str]) -> str | None:
    if any(decline in reply for decline in _DECLINES):
        return NO_ANSWER
    words = reply.translate({ord(c): " " for c in CHOICE_PUNCTUATION}).split()
    named = [letter for letter in letters if letter in words]
    if len(named) == 1:
        return named[0]
    if not named and NO_ANSWER in words:
        return NO_ANSWER
    return None


def _option_text(reply: str, choices: Mapping[str, str]) -> str | None:
    text = reply.lower()
    # A reply much longer than all options together is prose, not a quoted option.
    if len(text) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    contained = [letter for letter, option in choices.items() if str(option).lower() in text]
    return contained[0] if len(contained) == 1 else None


def extract_choice(reply: str, choices: Mapping[str, str]) -> str | None:
    """The option letter ``reply`` answers with, or None when none can be inferred.

    ``choices`` maps letters (``"A"``…) to option texts, in order. First a standalone letter: the
    reply's words (after turning ``.()[],:;!*#{}`` into spaces) must name exactly one of the
    letters — ``"B"``, ``"(B)"``, ``"The answer is B."`` all do, ``"A or B"`` does not. A reply
    that declines (a ``Z`` word, or one of VLMEvalKit's refusal sentences) gives None at once.
    Otherwise the option *texts*: exactly one must occur in the lowercased reply, and the reply
    may be at most twice as long as all options together.
    """
    if not isinstance(reply, str):
        raise TypeError(f"reply must be a str, got {type(reply).__name__}")
    if not choices:
        raise ValueError("choices is empty; a multiple-choice question needs at least one option")
    letter = _option_letter(reply, list(choices))
    if letter == NO_ANSWER:
        return None
    if letter is not None:
        return letter
    return _option_text(reply, choices)


def circular_shift(choices: Mapping[str, str], answer: str, shift: int) -> tuple[dict[str, str], str]:
    """Options rotated by ``shift`` places (letter i gets option i + shift) and the answer's new letter.

    MMBench's circular evaluation asks every question once per rotation and counts it correct only
    if every rotation is; rotation 0 is the question as published.
    """
    letters = list(choices)
    if answer not in choices:
        raise ValueError(f"answer {answer!r} is not one of the options {letters}")
    n = len(letters)
    texts = [choices[letter] for letter in letters]
    rotated = {letters[i]: texts[(i + shift) % n] for i in range(n)}
    return rotated, letters[(letters.index(answer) - shift) % n]


def normalise_answer(text: str) -> str:
    """DocVQA's answer normalisation: lowercase, whitespace runs collapsed, ends stripped."""
    return " ".join(str(text).lower().split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """One question's ANLS: the best ``1 - NL`` over the ground-truth answers, 0 where NL ≥ threshold.

    NL is the Levenshtein distance of the normalised strings divided by the longer length (two
    empty strings have NL 0). DocVQA averages this over questions, with threshold 0.5.
    """
    if isinstance(answers, str) or not answers:
        raise ValueError("answers must be a non-empty list of ground-truth strings")
    pred = normalise_answer(prediction)
    best = 0.0
    for answer in answers:
        gold = normalise_answer(answer)
        longest = max(len(pred), len(gold))
        nl = levenshtein(pred, gold) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def cohen_kappa(both: int, only_a: int, only_b: int, neither: int) -> float:
    """Cohen's κ of two binary raters from their counts (both said yes, only a, only b, neither).

    κ = (p_o − p_e) / (1 − p_e) with p_o the observed agreement and p_e the agreement expected
    from each rater's own yes-rate. When p_e = 1 (both raters gave one and the same answer to
    everything) κ is 0/0: NaN, and the raw agreement is the number to read.
    """
    counts = (both, only_a, only_b, neither)
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must be non-negative, got {counts}")
    n = sum(counts)
    if n == 0:
        return math.nan
    yes_a, yes_b = both + only_a, both + only_b
    if yes_a == yes_b and yes_a in (0, n):  # p_e = 1 exactly
        return math.nan
    observed = (both + neither) / n
    expected = (yes_a * yes_b + (n - yes_a) * (n - yes_b)) / (n * n)
    return (observed - expected) / (1 - expected)
