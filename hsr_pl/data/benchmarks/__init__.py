"""Loaders of published evaluation benchmarks, each reading the release's own file layout.

An evaluation set names its ``format`` (see :class:`hsr_pl.data.EvalSet`); this package maps
each format to its loader, the evaluation kinds it can be scored as, and how utility replies are
scored. VLGuard itself (``format: vlguard``, train or test file) is read by
:func:`hsr_pl.data.vlguard.load_vlguard`; :mod:`.vlguard_test` names its evaluation subsets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .common import check_options
from .docvqa import OPTIONS as _DOCVQA_OPTIONS
from .docvqa import load_docvqa
from .figstep import FIGSTEP_PROMPT, figstep_text, load_figstep, render_figstep
from .figstep import OPTIONS as _FIGSTEP_OPTIONS
from .mmbench import OPTIONS as _MMBENCH_OPTIONS
from .mmbench import load_mmbench, mmbench_prompt
from .mmsafetybench import OPTIONS as _MMSAFETY_OPTIONS
from .mmsafetybench import load_mmsafetybench
from .vlguard_test import SUBSET_KINDS, SUBSETS, select_subset

__all__ = [
    "FIGSTEP_PROMPT",
    "FORMATS",
    "SUBSETS",
    "BenchmarkFormat",
    "figstep_text",
    "load_docvqa",
    "load_figstep",
    "load_mmbench",
    "load_mmsafetybench",
    "mmbench_prompt",
    "render_figstep",
    "select_subset",
]


@dataclass(frozen=True)
class BenchmarkFormat:
    """How one published format is read and scored."""

    load: Callable[..., list[dict]] | None  # None: read by the VLGuard code path
    kinds: tuple[str, ...]  # the evaluation kinds it can be scored as; the first is the default
    scoring: str = "match"  # utility scoring: match (reference string), choice, anls
    options: dict | None = None
    directory_ok: bool = False  # path may be a folder


FORMATS: dict[str, BenchmarkFormat] = {
    "vlguard": BenchmarkFormat(None, ("harmful", "utility", "benign")),
    "figstep": BenchmarkFormat(load_figstep, ("harmful",), options=_FIGSTEP_OPTIONS),
    "mmsafetybench": BenchmarkFormat(load_mmsafetybench, ("harmful",), options=_MMSAFETY_OPTIONS, directory_ok=True),
    "mmbench": BenchmarkFormat(load_mmbench, ("utility",), scoring="choice", options=_MMBENCH_OPTIONS),
    "docvqa": BenchmarkFormat(load_docvqa, ("utility",), scoring="anls", options=_DOCVQA_OPTIONS),
}


def resolve(name: str, fmt: str, path: str, split: str | None, kind: str | None, options: dict | None):
    """``(split, kind)`` with the format's defaults, after the cheap checks (no file is parsed)."""
    where = f"eval set {name!r}"
    if fmt not in FORMATS:
        raise ValueError(f"{where}: unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    spec = FORMATS[fmt]
    target = Path(path).expanduser()
    if not (target.is_file() or (spec.directory_ok and target.is_dir())):
        raise FileNotFoundError(f"{where}: {path} does not exist")
    if fmt == "vlguard":
        if options:
            raise ValueError(f"{where}: format 'vlguard' takes no options (got {sorted(options)})")
        split = split or "safety"
        default_kind = SUBSET_KINDS.get(split, "harmful")
    else:
        if split is not None:
            raise ValueError(f"{where}: format {fmt!r} has no splits; remove split={split!r} (see its options)")
        check_options(fmt, options, spec.options or {})
        default_kind = spec.kinds[0]
    kind = kind or default_kind
    if kind not in ("harmful", "utility", "benign"):
        raise ValueError(f"{where}: kind must be one of ('harmful', 'utility', 'benign'), got {kind!r}")
    if kind not in spec.kinds:
        raise ValueError(f"{where}: a {fmt} set is scored as {' or '.join(spec.kinds)}, not {kind!r}")
    return split, kind


def load_examples(
    fmt: str, path: str, image_root: str | None, options: dict | None, *, allow_outside_root: bool = False
) -> list[dict]:
    """The examples of a non-VLGuard set (see :mod:`.common` for their fields)."""
    loader = FORMATS[fmt].load
    if loader is None:
        raise ValueError("vlguard sets are read by VLGuardDataModule.examples")
    return loader(path, image_root, options, allow_outside_root=allow_outside_root)
