"""The sparsity table printed after pruning: what the weights hold, not what was asked for.

Counts come from the model's weights (exact zeros) next to the masks in :class:`HSRState`, so a
mask that was not applied, or a fine-tuning step that revived pruned weights, shows up as a
difference between the ``pruned`` and ``zeros`` columns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from hsr_pl.distributed import count_zeros
from hsr_pl.state import HSRState

__all__ = ["SparsityRow", "print_sparsity_table", "sparsity_rows", "sparsity_table"]

# Beyond this many pruned linears, one row per module type (over all layers) stays readable.
MAX_LINEAR_ROWS = 48


@dataclass(frozen=True)
class SparsityRow:
    """Counts of one pruned linear (or one group of them)."""

    name: str
    total: int
    pruned: int
    restored: int
    zeros: int

    @property
    def sparsity(self) -> float:
        """Fraction of the weights that are exactly zero."""
        return self.zeros / max(self.total, 1)


@torch.no_grad()
def sparsity_rows(model: nn.Module, state: HSRState) -> list[SparsityRow]:
    """One row per pruned linear of ``state`` (names qualified inside ``model``). On a sharded
    model the zeros are counted per shard and summed across ranks: every rank must call this."""
    modules = dict(model.named_modules())
    rows = []
    for name, mask in state.pruned.items():
        if name not in modules:
            raise KeyError(f"{name!r} is in the pruning state but not in the model; pass the model that was pruned")
        weight = modules[name].weight
        restored = state.restored.get(name)
        rows.append(
            SparsityRow(
                name=name,
                total=weight.numel(),
                pruned=int(mask.sum()),
                restored=int((restored & mask).sum()) if restored is not None else 0,
                zeros=count_zeros(weight),
            )
        )
    return rows


def _short_names(names: list[str]) -> list[str]:
    # The common dotted prefix ("model.language_model.layers.") says nothing per row.
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    return [n[len(prefix):] for n in names]


def _group_by_type(rows: list[SparsityRow]) -> list[SparsityRow]:
    """Sum rows whose names differ only in their numeric (layer) components."""
    groups: dict[str, list[SparsityRow]] = {}
    for row in rows:
        key = ".".join("*" if part.isdigit() else part for part in row.name.split("."))
        groups.setdefault(key, []).append(row)
    return [
        SparsityRow(key, *(sum(getattr(r, f) for r in members) for f in ("total", "pruned", "restored", "zeros")))
        for key, members in groups.items()
    ]


def sparsity_table(
    model: nn.Module, state: HSRState, *, group: bool | None = None, title: str | None = None,
    rows: list[SparsityRow] | None = None,
) -> Table:
    """A rich table of per-linear (or per module type, ``group=True``) and total sparsity.

    ``group=None`` groups by module type once there are more than :data:`MAX_LINEAR_ROWS` linears.
    ``rows``: :func:`sparsity_rows` computed already (on every rank, for a sharded model).
    """
    rows = sparsity_rows(model, state) if rows is None else rows
    if group is None:
        group = len(rows) > MAX_LINEAR_ROWS
    shown = _group_by_type(rows) if group else rows
    labels = _short_names([r.name for r in shown])
    target = f"target {state.method} {state.sparsity:g}" if state.sparsity is not None else None
    table = Table(
        title=title or "hsr-pl pruning sparsity" + (f" ({target})" if target else ""), header_style="bold"
    )
    table.add_column("module (all layers)" if group else "linear", no_wrap=True)
    for column in ("weights", "pruned", "restored", "zeros", "sparsity"):
        table.add_column(column, justify="right", no_wrap=True)
    for label, row in zip(labels, shown):
        table.add_row(label, f"{row.total:,}", f"{row.pruned:,}", f"{row.restored:,}", f"{row.zeros:,}",
                      f"{100 * row.sparsity:.2f} %")
    total = SparsityRow("total", *(sum(getattr(r, f) for r in rows) for f in ("total", "pruned", "restored", "zeros")))
    table.add_section()
    table.add_row("total", f"{total.total:,}", f"{total.pruned:,}", f"{total.restored:,}", f"{total.zeros:,}",
                  f"{100 * total.sparsity:.2f} %", style="bold")
    return table


def print_sparsity_table(model: nn.Module, state: HSRState, console: Console | None = None, **kwargs) -> None:
    (console or Console()).print(sparsity_table(model, state, **kwargs))
