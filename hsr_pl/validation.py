"""The checks every hsr-pl step makes on its settings, with one wording and the caller's error class.

Each function returns the checked (normalised) value or raises ``error`` — the calling step's own
``ValueError`` subclass (``PruningConfigError``, ``RealignConfigError``, ``HeadAttributionError``…)
— with a one-line message that names the setting, the bad value and the fix (``hint``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hsr_pl.data.vlguard import SPLITS

__all__ = [
    "choice",
    "json_output_path",
    "non_negative_int",
    "positive_int",
    "regex_list",
    "split_name",
]


def _hint(hint: str) -> str:
    return f" ({hint})" if hint else ""


def positive_int(value: Any, name: str, hint: str = "", error: type[Exception] = ValueError) -> int:
    """``value`` if it is an int > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise error(f"{name}={value!r} must be a positive integer{_hint(hint)}")
    return value


def non_negative_int(value: Any, name: str, hint: str = "", error: type[Exception] = ValueError) -> int:
    """``value`` if it is an int ≥ 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise error(f"{name}={value!r} must be an integer ≥ 0{_hint(hint)}")
    return value


def choice(value: Any, name: str, choices: Sequence[str], hint: str = "", error: type[Exception] = ValueError) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise error(f"{name}={value!r} is unknown; choose one of {tuple(choices)}{_hint(hint)}")
    return value


def split_name(value: Any, name: str, hint: str = "", error: type[Exception] = ValueError) -> str:
    """A calibration split of the data module, or several joined with ``+`` (``safety+over_refusal``)."""
    parts = [p.strip() for p in value.split("+")] if isinstance(value, str) and value else [value]
    if not all(p in SPLITS for p in parts):
        raise error(f"{name}={value!r} is not a calibration split {SPLITS} (or several joined with '+'){_hint(hint)}")
    return value


def regex_list(value: str | Iterable[str] | None, name: str, error: type[Exception] = ValueError) -> list[str] | None:
    """``value`` as a list of regexes that compile (None stays None; one string is a list of one)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str):
            raise error(f"{name} must be a list of regex strings, got {item!r}")
        try:
            re.compile(item)
        except re.error as exc:
            raise error(f"{name} regex {item!r} does not compile ({exc}); fix or escape it") from None
    return items


def json_output_path(
    value: str | None, name: str, example: str, error: type[Exception] = ValueError, *, look: bool = True
) -> Path | None:
    """A ``.json`` file path (None stays None); with ``look``, also not a folder nor under a file.

    Whether it can be written is checked in ``setup`` (:func:`hsr_pl.io.check_output_file`).
    """
    if value is None:
        return None
    path = Path(value)
    if path.suffix != ".json":
        raise error(f"{name}={value!r} must be a .json file path (e.g. {example})")
    if not look:
        return path
    if path.is_dir():
        raise error(f"{name}={value!r} is a directory; give a file path ending in .json")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise error(f"{name}={value!r} lies under {str(blocker)!r}, which is a file; choose a path in a folder")
    return path
