"""Which linears a pruner touches: regexes over qualified names, checked against the model.

:func:`resolve_targets` answers ``(names to prune, names whose dense values to keep)`` for the
Pruning and PrunedCheckpoint callbacks alike; every regex that matches nothing, or matches a linear
outside the language model's decoder layers, is an error naming the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from hsr_pl.models import get_adapter
from hsr_pl.validation import regex_list as checked_regex_list

from .errors import PruningConfigError

__all__ = ["regex_list", "resolve_targets"]


def regex_list(value: str | Iterable[str] | None, label: str) -> list[str] | None:
    """``value`` as a list of compiling regexes (None stays None); a bad one is a PruningConfigError."""
    return checked_regex_list(value, label, PruningConfigError)


def resolve_targets(
    model: nn.Module, targets: list[str] | None, ignore: list[str], keep_originals: list[str] | None
) -> tuple[list[str], list[str]]:
    """``(names to prune, names whose dense values to keep)`` for ``model`` (an HF model).

    ``targets`` / ``ignore`` / ``keep_originals`` are regexes (``re.search``) over qualified names.
    """
    adapter = get_adapter(model)
    decoder = adapter.target_linears()
    ignored = [n for n in decoder if any(re.search(p, n) for p in ignore)]
    if targets is None:
        chosen = [n for n in decoder if n not in ignored]
    else:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        example = next(iter(decoder), "?")
        hits: set[str] = set()
        for pattern in targets:
            matched = _matching(
                pattern, linears, f"targets regex {pattern!r} matches no nn.Linear of the model; names look like "
                f"{example!r} (regexes are matched with re.search)",
            )
            outside = [n for n in matched if n not in decoder and not any(re.search(p, n) for p in ignore)]
            if outside:
                raise PruningConfigError(
                    f"targets regex {pattern!r} also matches {len(outside)} linear(s) outside the language "
                    f"model's decoder layers (e.g. {outside[0]!r}); only decoder-layer linears are pruned: "
                    "anchor the regex or add those names to ignore"
                )
            hits.update(matched)
        chosen = [n for n in decoder if n in hits and n not in ignored]
    if not chosen:
        raise PruningConfigError(f"targets={targets} with ignore={ignore} leave no linear to prune")
    if keep_originals is None:
        projections = {adapter.name_of(p) for i in adapter.layer_indices() for p in adapter.projections(i).values()}
        keep = [n for n in chosen if n in projections]
    else:
        keep = []
        for pattern in keep_originals:
            matched = _matching(
                pattern, chosen, f"keep_originals regex {pattern!r} matches none of the {len(chosen)} pruned linears "
                f"(e.g. {chosen[0]!r}); fix it or drop it",
            )
            keep.extend(matched)
        keep = [n for n in chosen if n in set(keep)]
    return chosen, keep


def _matching(pattern: str, names: list[str], error: str) -> list[str]:
    """The ``names`` that ``pattern`` matches (``re.search``); none is a PruningConfigError saying ``error``."""
    matched = [n for n in names if re.search(pattern, n)]
    if not matched:
        raise PruningConfigError(error)
    return matched
