"""The dev check of the automatic realignment budget: one model state on the dev sets, every judge.

The same generation and judges as every evaluation (:func:`~hsr_pl.evaluation.per_prompt.evaluate_per_prompt`:
``module.generate`` greedy with the run's ``max_new_tokens``, the module's judges), batched as the
loaders batch (length-sorted dev loaders pad little). Under DDP each rank answers its slice
``rank::world`` of every set and the verdicts are gathered, so every rank returns the same numbers
and takes the same stop decision.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch.utils.data import DataLoader

from .per_prompt import evaluate_per_prompt, rates
from .runner import headline

__all__ = ["dev_headlines"]


def dev_headlines(module, loaders: Iterable[DataLoader]) -> dict[str, dict[str, Any]]:
    """``{judge: headline(...)}`` of the dev sets for every judge of the module, in its order:
    ``asr`` (mean over harmful sets), ``utility`` (mean over utility sets), ``over_refusal`` (mean
    over benign sets)."""
    per_prompt = evaluate_per_prompt(module, list(loaders))
    judges: list[str] = []
    for row in per_prompt.values():
        for judge in row["flags"]:
            if judge not in judges:
                judges.append(judge)
    results = rates(per_prompt)
    return {judge: headline(results, judge) for judge in judges}
